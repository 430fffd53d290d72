"""Users bring their code: TRL's ORPO example with only its import line changed, in-memory data and models
through `orpo_dist.train`, and AutoTrain's Python API (orpo_dist.autotrain)."""

from __future__ import annotations

import os

import pytest
import yaml

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from test_trl_oracle import _pairs  # noqa: E402

import orpo_dist  # noqa: E402
from orpo_dist.config import ConfigError  # noqa: E402

TRL_IMPORT = "from trl.experimental.orpo import ORPOConfig, ORPOTrainer"
OURS_IMPORT = "from orpo_dist import ORPOConfig, ORPOTrainer"
# TRL's ORPO quick start (docs), with a local model and pairs instead of hub downloads, on CPU in float32
SCRIPT = """
{import_line}
import datasets, torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(MODEL)
train_dataset = datasets.Dataset.from_list(PAIRS)

training_args = ORPOConfig(output_dir=OUT, max_steps=1, logging_steps=1, bf16=False, use_cpu=True, report_to=[],
                           max_length=256, remove_unused_columns=False, beta=0.2)
trainer = ORPOTrainer(model=model, args=training_args, processing_class=tokenizer, train_dataset=train_dataset)
output = trainer.train()
"""


def _run(import_line: str, model_dir, out) -> dict:
    scope = {"MODEL": str(model_dir), "PAIRS": _pairs(), "OUT": str(out)}
    exec(SCRIPT.format(import_line=import_line), scope)  # the script as a user runs it
    return scope


@pytest.mark.slow
def test_trl_example_with_only_the_import_changed_gives_trls_first_step_loss(tmp_path, tiny_model_dir):
    import torch

    torch.manual_seed(0)
    trl = _run(TRL_IMPORT, tiny_model_dir, tmp_path / "trl")
    trl_loss = next(r["loss"] for r in trl["trainer"].state.log_history if "loss" in r)
    torch.manual_seed(0)
    ours = _run(OURS_IMPORT, tiny_model_dir, tmp_path / "ours")
    rows = [r for r in ours["trainer"].state.log_history if "loss" in r]  # as scripts read TRL's
    assert rows[0]["step"] == 1 and ours["output"].global_step == 1
    assert rows[0]["loss"] == pytest.approx(trl_loss, abs=1e-4)
    # what was passed is recorded by what it is, never as a repr
    saved = yaml.safe_load((tmp_path / "ours" / "config.yaml").read_text())
    assert "in-memory-Dataset-" in saved["data"]["data_path"] and "in-memory-" in saved["model"]["model"]
    assert "Dataset(" not in (tmp_path / "ours" / "config.yaml").read_text()
    trainer = ours["trainer"]
    metrics = trainer.evaluate()
    assert metrics == {}  # no eval_dataset given, as TRL's evaluate() needs one
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "model.safetensors").is_file()


@pytest.mark.slow
def test_train_accepts_datasets_dataframes_lists_and_model_objects(tmp_path, tiny_model_dir):
    import datasets
    import pandas as pd
    from transformers import AutoModelForCausalLM

    pairs = _pairs() * 4
    common = dict(max_steps=1, max_length=96, max_prompt_length=48, batch_size=4, eval_on_start=False,
                  mixed_precision="no", logging_steps=1)  # fmt: skip
    forms = {
        "dataset": datasets.Dataset.from_list(pairs),
        "dict": datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs)}),
        "list": pairs,
        "frame": pd.DataFrame(pairs),
    }
    names = set()
    for name, data in forms.items():
        out = tmp_path / name
        result = orpo_dist.train(
            {"data_path": data, "model": str(tiny_model_dir)}, output_dir=str(out), **common
        )
        assert result.global_step == 1, name
        names.add(os.path.basename(yaml.safe_load((out / "config.yaml").read_text())["data"]["data_path"]))
    # the same rows give the same fingerprint, whatever object held them
    assert len({n.rsplit("-", 1)[1] for n in names}) == 1
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = tmp_path / "object"
    result = orpo_dist.train({"data_path": pairs, "model": model, "eval_data_path": pairs[:4]},
                             output_dir=str(out), **{**common, "max_steps": 2, "save_steps": 1})  # fmt: skip
    assert result.global_step == 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert "in-memory-LlamaForCausalLM-" in saved["model"]["model"]
    assert "in-memory-list-" in saved["data"]["eval_data_path"]
    # resume of in-memory data: the same rows are the same file, so the run continues
    again = orpo_dist.train({"data_path": list(pairs), "model": model, "eval_data_path": pairs[:4]},
                            output_dir=str(out), **{**common, "max_steps": 3, "resume": "latest"})  # fmt: skip
    assert again.global_step == 3 and again.metrics[0]["step"] == 2  # continued from checkpoint-1


def test_objects_that_cannot_be_read_are_refused_with_the_fix(tmp_path):
    from orpo_dist.inputs import rows_of, write_model

    with pytest.raises(ConfigError, match="a set cannot be read; pass a path, a datasets.Dataset"):
        rows_of({1, 2})
    with pytest.raises(ConfigError, match="a dict is not a transformers PreTrainedModel"):
        write_model({}, tmp_path)


@pytest.mark.slow
def test_a_peft_model_object_trains_its_adapter_further(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    out = tmp_path / "run"
    result = orpo_dist.train({"model": model, "data_path": _pairs() * 4}, output_dir=str(out), max_steps=1,
                             max_length=96, max_prompt_length=48, eval_on_start=False)  # fmt: skip
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["model"] == str(tiny_model_dir) and saved["peft"]["use_peft"] is True
    assert "in-memory-PeftModel-" in saved["peft"]["adapter_path"]
    trained = yaml.safe_load((result.final_dir / "adapter_config.json").read_text())
    assert trained["r"] == 4 and sorted(trained["target_modules"]) == ["q_proj", "v_proj"]


def test_orpo_config_takes_trl_names_and_defaults():
    from orpo_dist import ORPOConfig

    args = ORPOConfig(output_dir="o", learning_rate=2e-5, per_device_train_batch_size=2, warmup_steps=0.1,
                      lr_scheduler_type="cosine", report_to=["wandb"], bf16=False)  # fmt: skip
    assert args.learning_rate == 2e-5 and args.beta == 0.1  # given, and TRL's default
    cfg = args.to_config()
    t = cfg.train
    assert (t.output_dir, t.lr, t.batch_size, t.warmup_steps, t.scheduler, t.log) == (
        "o", 2e-5, 2, 0.1, "cosine", "wandb",
    )  # fmt: skip
    default = ORPOConfig().to_config()
    assert (default.train.lr, default.train.epochs, default.train.logging_steps, default.data.eval_split) == (
        1e-6, 3, 10, 0,
    )  # fmt: skip
    assert (default.train.eval_strategy, default.model.gradient_checkpointing, default.model.disable_dropout) == (
        "no", True, True,
    )  # fmt: skip


def test_peft_config_maps_onto_the_lora_keys():
    from peft import LoraConfig

    from orpo_dist.trl_api import lora_keys

    keys = lora_keys(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                use_rslora=True))  # fmt: skip
    assert keys == {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                    "target_modules": "q_proj,v_proj", "use_rslora": True, "use_dora": False}  # fmt: skip


# AutoTrain's two documented ORPO examples (its quick start and the customer-support one), written from
# AutoTrain's documentation; only the import lines, the model and the data location are local.
AUTOTRAIN_IMPORTS = "from orpo_dist.autotrain import LLMTrainingParams, AutoTrainProject"
AUTOTRAIN_SCRIPTS = {
    "quickstart": """
params = LLMTrainingParams(
    model=MODEL, data_path=DATA, project_name=OUT, trainer="orpo",
    prompt_text_column="prompt", text_column="chosen", rejected_text_column="rejected",
    dpo_beta=0.1, max_prompt_length=128, max_completion_length=64,
    epochs=1, batch_size=2, gradient_accumulation=1, lr=5e-5, peft=True, lora_r=16, lora_alpha=32, log="wandb",
)
project = AutoTrainProject(params=params, backend="local", process=True)
result = project.create()
""",
    "customer_support": """
params = LLMTrainingParams(
    model=MODEL, data_path=DATA, project_name=OUT, trainer="orpo",
    prompt_text_column="prompt", text_column="chosen", rejected_text_column="rejected",
    dpo_beta=0.15, max_prompt_length=256, max_completion_length=128,
    epochs=1, batch_size=2, gradient_accumulation=4, lr=2e-5, peft=True, lora_r=16, lora_alpha=64, log="wandb",
)
project = AutoTrainProject(params=params, backend="local", process=True)
result = project.create()
""",
}


@pytest.mark.slow
@pytest.mark.parametrize("example", list(AUTOTRAIN_SCRIPTS))
def test_autotrain_python_api_examples_run_with_only_the_imports_changed(example, tmp_path, tiny_model_dir,
                                                                         monkeypatch):  # fmt: skip
    pytest.importorskip("bitsandbytes")  # AutoTrain's default with peft: int4
    from helpers import pairs_jsonl

    monkeypatch.setenv("WANDB_MODE", "disabled")
    data = tmp_path / "data"
    data.mkdir()
    pairs_jsonl(data / "train.jsonl", n=16)
    scope = {"MODEL": str(tiny_model_dir), "DATA": str(data), "OUT": str(tmp_path / "out")}
    exec(AUTOTRAIN_IMPORTS + "\n" + AUTOTRAIN_SCRIPTS[example], scope)
    result = scope["result"]
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    beta, accumulation, alpha = (0.1, 1, 32) if example == "quickstart" else (0.15, 4, 64)
    assert (saved["orpo"]["beta"], saved["train"]["gradient_accumulation"], saved["peft"]["lora_alpha"]) == (
        beta, accumulation, alpha,
    )  # fmt: skip
    assert (saved["peft"]["quantization"], saved["train"]["log"]) == ("int4", "wandb")
    assert result.final_dir is not None and (result.final_dir / "adapter_config.json").is_file()


def test_autotrain_project_refuses_other_backends_and_keeps_the_token_out_of_the_config(monkeypatch):
    from orpo_dist.autotrain import AutoTrainProject, LLMTrainingParams

    monkeypatch.delenv("HF_TOKEN", raising=False)
    params = LLMTrainingParams(model="m", trainer="orpo", token="hf_secret")
    assert os.environ["HF_TOKEN"] == "hf_secret" and "token" not in params.params
    with pytest.raises(ConfigError, match="backend='spaces-a10g-large'.*use backend='local'"):
        AutoTrainProject(params=params, backend="spaces-a10g-large")
