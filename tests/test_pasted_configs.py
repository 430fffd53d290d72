"""Other tools' configs as users paste them (tests/configs/pasted/), and the everyday TRL / HF keys.

Each pasted file uses every key of the tool's published ORPO example plus its common training keys:
every key is mapped, accepted with one warning line naming why it changes nothing, or refused with
one line saying why it cannot be honoured.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO

from orpo_dist.config import ConfigError, load_config
from orpo_dist.config.aliases import IGNORED, OTHER_KEYS, REFUSED
from orpo_dist.config.load import LEAVES

PASTED = REPO / "tests" / "configs" / "pasted"


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "orpo_dist" and r.levelno == logging.WARNING]


def test_axolotl_orpo_example_loads_as_pasted(caplog):
    caplog.set_level(logging.WARNING, "orpo_dist")
    cfg = load_config(PASTED / "axolotl_orpo.yaml")
    m, d, o, pe, t = cfg.model, cfg.data, cfg.orpo, cfg.peft, cfg.train
    assert (m.model, m.attn_implementation, m.gradient_checkpointing, m.tf32) == (
        "mistralai/Mistral-7B-v0.1", "flash_attention_2", True, False,
    )  # fmt: skip
    assert (d.data_path, d.chat_template, d.max_length, d.eval_split, d.cache_dir) == (
        "argilla/ultrafeedback-binarized-preferences-cleaned", "chatml", 4096, 0.1, "last_run_prepared",
    )  # fmt: skip
    assert (o.beta, o.layout) == (0.1, "padded")  # orpo_alpha; sample_packing: false
    # adapter: qlora + load_in_4bit; lora_target_linear wins over the listed modules (Axolotl: their union)
    assert (pe.use_peft, pe.quantization, pe.lora_r, pe.lora_alpha, pe.target_modules) == (
        True, "int4", 32, 16, "all-linear",
    )  # fmt: skip
    assert (t.gradient_accumulation, t.batch_size, t.epochs, t.optim, t.scheduler, t.lr) == (
        4, 2, 1, "adamw_8bit", "cosine", 2e-4,
    )  # fmt: skip
    assert (t.warmup_steps, t.evals_per_epoch, t.saves_per_epoch, t.logging_steps) == (10, 4, 1, 1)
    (line,) = _warnings(caplog)  # one line, naming each ignored key and why
    for key in ("remove_unused_columns", "strict", "fp16 (empty", "deepspeed (off)"):
        assert key in line, key
    assert m.special_tokens == {"pad_token": "</s>"}  # checked against the tokenizer at start


def test_special_tokens_must_already_be_tokens_of_the_tokenizer():
    from orpo_dist.builtin import build_tokenizer
    from orpo_dist.preflight import check_special_tokens

    tokenizer = build_tokenizer()
    check_special_tokens(
        load_config(None, {"special_tokens": {"pad_token": "</s>", "eos_token": "</s>"}}), tokenizer
    )
    with pytest.raises(
        ConfigError, match=r"special_tokens: pad_token='<\|pad\|>' not tokens of .*grow the embeddings"
    ):
        check_special_tokens(load_config(None, {"special_tokens": {"pad_token": "<|pad|>"}}), tokenizer)


def test_llamafactory_orpo_recipe_loads_as_pasted(caplog):
    caplog.set_level(logging.WARNING, "orpo_dist")
    cfg = load_config(PASTED / "llamafactory_orpo.yaml")
    m, d, o, pe, t = cfg.model, cfg.data, cfg.orpo, cfg.peft, cfg.train
    assert (m.model, m.trust_remote_code) == ("meta-llama/Meta-Llama-3-8B-Instruct", True)
    # LLaMA-Factory's ORPO: the NLL over the completion, lora_alpha = 2 x lora_rank
    assert (o.beta, o.nll_scope) == (0.1, "completion")
    assert (pe.use_peft, pe.lora_r, pe.lora_alpha, pe.target_modules) == (True, 8, 16, "all-linear")
    assert (d.data_path, d.chat_template, d.max_length, d.max_samples, d.overwrite_cache, d.num_proc) == (
        "data/dpo_en_demo.jsonl", "llama3", 2048, 1000, True, 16,
    )  # fmt: skip
    assert (t.batch_size, t.gradient_accumulation, t.lr, t.epochs, t.scheduler, t.mixed_precision) == (
        1, 8, 5e-6, 3.0, "cosine", "bf16",
    )  # fmt: skip
    assert (t.eval_strategy, t.eval_steps, t.eval_batch_size, d.eval_split, t.overwrite_output_dir) == (
        "steps", 500, 1, 0.1, True,
    )  # fmt: skip
    (line,) = _warnings(caplog)
    assert "plot_loss" in line and "save_only_model" in line


def test_llamafactory_stage_dpo_alone_is_dpo_and_refused():
    with pytest.raises(ConfigError, match="stage=dpo without pref_loss trains DPO.*add pref_loss: orpo"):
        load_config(None, {"stage": "dpo"})
    with pytest.raises(ConfigError, match="pref_loss='sigmoid': orpo_dist trains ORPO only"):
        load_config(None, {"stage": "dpo", "pref_loss": "sigmoid"})
    assert load_config(None, {"lora_rank": 8, "lora_alpha": 8}).peft.lora_alpha == 8  # set: kept


def test_autotrain_config_yaml_loads_as_pasted(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, "orpo_dist")
    monkeypatch.setenv("HF_USERNAME", "someone")
    cfg = load_config(PASTED / "autotrain_orpo.yaml")
    d, pe, t, e = cfg.data, cfg.peft, cfg.train, cfg.export
    assert (cfg.model.model, t.output_dir, t.log) == (
        "meta-llama/Meta-Llama-3-8B-Instruct", "autotrain-llama3-8b-orpo", "tensorboard",
    )  # fmt: skip
    assert (d.data_path, d.train_split, d.eval_data_path, d.chat_template) == (
        "argilla/distilabel-capybara-dpo-7k-binarized", "train", None, "chatml",
    )  # fmt: skip
    assert (d.prompt_column, d.chosen_column, d.rejected_column) == ("prompt", "chosen", "rejected")
    # block_size is AutoTrain's training length; model_max_length only the tokenizer's limit
    assert (d.max_length, d.max_prompt_length, d.max_completion_length) == (1024, 512, 1024)
    assert (pe.use_peft, pe.quantization, pe.target_modules) == (True, "int4", "all-linear")
    assert (t.epochs, t.batch_size, t.lr, t.gradient_accumulation, t.mixed_precision) == (
        3,
        2,
        3e-5,
        4,
        "fp16",
    )
    assert (e.formats, e.push_to_hub, e.hub_model_id) == (
        ["merged_16bit"],
        True,
        "someone/autotrain-llama3-8b-orpo",
    )
    (line,) = _warnings(caplog)
    assert "padding" in line
    monkeypatch.delenv("HF_USERNAME")
    with pytest.raises(ConfigError, match=r"username='\$\{HF_USERNAME\}': set that variable"):
        load_config(PASTED / "autotrain_orpo.yaml")


def test_pasted_configs_train(tmp_path, tiny_model_dir):
    """Each pasted file, with only the model, the data and the size swapped for local tiny ones, trains."""
    from helpers import pairs_jsonl

    import orpo_dist

    data = pairs_jsonl(tmp_path / "pairs.jsonl", n=24)
    local = {"max_steps": 2, "max_length": 96, "max_prompt_length": 48, "max_completion_length": None,
             "mixed_precision": "no", "attn_implementation": "sdpa", "quantization": None, "optim": "adamw_torch",
             "push_to_hub": False, "export": [], "eval_steps": None, "log": "none", "model": str(tiny_model_dir),
             "data_path": str(data), "chat_template": "none", "cache_dir": None, "num_proc": 1,
             "dataloader_num_workers": 0, "ddp_timeout": 600}  # fmt: skip
    for name in ("axolotl_orpo", "llamafactory_orpo", "autotrain_orpo"):
        pasted = yaml.safe_load((PASTED / f"{name}.yaml").read_text())
        pasted.pop("datasets", None), pasted.pop("dataset", None), pasted.pop("hub", None)
        pasted.get("data", {}).pop("path", None)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(pasted))
        result = orpo_dist.train(str(path), output_dir=str(tmp_path / name), **local)
        assert result.global_step == 2 and (result.final_dir / "adapter_config.json").is_file(), name


test_pasted_configs_train = pytest.mark.slow(test_pasted_configs_train)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("deepspeed", "ds_config.json", "accelerate launch --config_file configs/accelerate/zero3.yaml"),
        ("fsdp", ["full_shard"], "configs/accelerate/fsdp2.yaml"),
        ("early_stopping_patience", 3, "no early stopping"),
        ("tokens", ["<tool>"], "grow the embeddings"),
        ("report_to", ["wandb", "tensorboard"], "logs to one tracker"),
        ("finetuning_type", "freeze", "freezing layers is not supported"),
        ("packing", True, "layout: packed"),
    ],
)
def test_keys_that_cannot_be_honoured_are_refused_with_the_reason(key, value, message):
    with pytest.raises(ConfigError, match=f"{key}=.*{message}") as e:
        load_config(None, {key: value})
    assert len(str(e.value).splitlines()) == 2  # "invalid config:" and the one line


def test_foreign_names_never_shadow_our_keys():
    for name in (*IGNORED, *REFUSED, *OTHER_KEYS):
        assert name not in LEAVES, name


@pytest.mark.parametrize(
    "typo,hint",
    [("lerning_rate", "learning_rate"), ("remove_unused_colums", "remove_unused_columns"),
     ("lora_alpah", "lora_alpha"), ("warmup_step", "warmup_steps")],
)  # fmt: skip
def test_did_you_mean_for_close_names(typo, hint):
    with pytest.raises(ConfigError, match=f"Did you mean '{hint}'"):
        load_config(None, {typo: 1})


@pytest.mark.parametrize("far", ["deepspeedx_config", "use_magic_trick", "sample_weights", "seedling_count"])
def test_no_misleading_hint_for_far_names(far):
    with pytest.raises(ConfigError) as e:
        load_config(None, {far: 1})
    assert "Did you mean" not in str(e.value) and "--help" in str(e.value)


def test_trl_everyday_keys_have_their_hf_meaning():
    cfg = load_config(None, {
        "warmup_steps": 0.1, "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 1e-6},
        "eval_strategy": "epoch", "save_strategy": "no", "logging_strategy": "steps", "report_to": ["wandb"],
        "torch_dtype": "bfloat16", "use_rslora": True, "use_dora": True, "lora_modules_to_save": ["lm_head"],
        "bnb_4bit_quant_type": "fp4", "use_bnb_nested_quant": False, "dataset_config": "default",
        "dataset_num_proc": 4, "disable_dropout": False, "logging_first_step": True, "tf32": True,
        "use_liger_kernel": False, "gradient_checkpointing_kwargs": {"use_reentrant": True},
    })  # fmt: skip
    t, pe, m = cfg.train, cfg.peft, cfg.model
    assert (t.warmup_steps, t.scheduler, t.lr_scheduler_kwargs) == (
        0.1,
        "cosine_with_min_lr",
        {"min_lr": 1e-6},
    )
    assert (t.eval_strategy, t.save_strategy, t.logging_strategy, t.log) == ("epoch", "no", "steps", "wandb")
    assert (m.dtype, m.disable_dropout, m.tf32, m.fused_kernels) == ("bfloat16", False, True, "none")
    assert m.gradient_checkpointing_kwargs == {"use_reentrant": True}
    assert (pe.use_rslora, pe.use_dora, pe.modules_to_save, pe.bnb_4bit_quant_type, pe.use_bnb_nested_quant) == (
        True, True, "lm_head", "fp4", False,
    )  # fmt: skip
    assert (cfg.data.dataset_config, cfg.data.num_proc) == ("default", 4)
    assert load_config(None, {"warmup_steps": 10}).train.warmup_steps == 10
    assert load_config(None, {"report_to": []}).train.log == "none"
    assert load_config(None, {"report_to": "none"}).train.log == "none"
    assert load_config(None, ["--lr_scheduler_kwargs", '{"num_cycles": 2}']).train.lr_scheduler_kwargs == {
        "num_cycles": 2
    }
    assert load_config(None, {"eval_strategy": "steps", "logging_steps": 5}).train.eval_steps == 5
    with pytest.raises(ConfigError, match="cosine_with_min_lr needs lr_scheduler_kwargs"):
        load_config(None, {"lr_scheduler_type": "cosine_with_min_lr"})


def test_report_to_all_means_the_installed_tracker(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    expected = "tensorboard" if real("tensorboard") else "none"
    assert load_config(None, {"report_to": "all"}).train.log == expected


def test_warmup_steps_and_scheduler_kwargs_reach_the_schedule():
    from orpo_dist.optim import build_optimizer

    model = torch.nn.Linear(2, 2)
    t = load_config(None, {"warmup_steps": 0.25, "lr": 1.0, "scheduler": "constant_with_warmup"}).train
    _, sched = build_optimizer(
        t, model, total_steps=10
    )  # ceil(0.25 x 10) = 3 warmup steps, as transformers 5
    lrs = [sched.get_last_lr()[0]] + [(sched.step(), sched.get_last_lr()[0])[1] for _ in range(4)]
    assert lrs == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    t = load_config(None, {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 0.1},
                           "lr": 1.0, "warmup_steps": 0}).train  # fmt: skip
    _, sched = build_optimizer(t, model, total_steps=4)
    for _ in range(4):
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.1)


def test_cadence_follows_the_strategy_keys():
    from orpo_dist import cadence

    def steps(kind, keys, total=12, per_epoch=6):
        t = load_config(None, keys).train
        fn = {"log": lambda s: cadence.logs(t, s, total, s % per_epoch == 0),
              "eval": lambda s: cadence.evaluates(t, s, per_epoch, s % per_epoch == 0),
              "save": lambda s: cadence.saves(t, s, per_epoch, s % per_epoch == 0, total)}[kind]  # fmt: skip
        return [s for s in range(1, total + 1) if fn(s)]

    assert steps("log", {"logging_steps": 5}) == [5, 10, 12]
    assert steps("log", {"logging_steps": 5, "logging_first_step": True}) == [1, 5, 10, 12]
    assert steps("log", {"logging_strategy": "epoch"}) == [6, 12]
    assert steps("log", {"logging_strategy": "no"}) == [12]
    assert steps("eval", {}) == [6, 12]
    assert steps("eval", {"eval_steps": 4}) == [4, 8, 12]
    assert steps("eval", {"eval_strategy": "no", "eval_steps": 4}) == []
    assert steps("eval", {"evals_per_epoch": 3}) == [2, 4, 6, 8, 10, 12]
    assert steps("save", {"save_steps": 4}) == [4, 8]
    assert steps("save", {"save_strategy": "epoch"}) == [6]
    assert steps("save", {"save_strategy": "no"}) == []
    assert steps("save", {"saves_per_epoch": 2}) == [3, 6, 9]


def test_disable_dropout_defaults_as_trl_and_zeroes_lora_dropout_too(tiny_model_dir):
    from trl.experimental.orpo import ORPOConfig

    from orpo_dist.modeling import load_model

    assert (
        load_config().model.disable_dropout
        is ORPOConfig("x", use_cpu=True, bf16=False).disable_dropout
        is True
    )
    cfg = load_config(None, {"peft": True, "lora_dropout": 0.1})
    model = load_model(cfg, str(tiny_model_dir), 1, torch.device("cpu"), say=lambda m: None)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
    cfg = load_config(None, {"peft": True, "lora_dropout": 0.1, "disable_dropout": False, "use_rslora": True})
    model = load_model(cfg, str(tiny_model_dir), 1, torch.device("cpu"), say=lambda m: None)
    assert 0.1 in {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert model.peft_config["default"].use_rslora is True


assert Path(PASTED).is_dir()


def test_llamafactory_dataset_names_resolve_through_dataset_info(tmp_path):
    import json

    from helpers import pairs_jsonl

    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(line) for line in pairs_jsonl(tmp_path / "p.jsonl", n=6).read_text().splitlines()]
    (data / "prefs.json").write_text(json.dumps([{"instruction": r["prompt"], "chosen": r["chosen"],
                                                  "rejected": r["rejected"]} for r in rows]))  # fmt: skip
    info = {"my_prefs": {"file_name": "prefs.json", "ranking": True,
                         "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}},
            "demo": {"file_name": "dpo_en_demo.json", "ranking": True, "formatting": "sharegpt",
                     "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}}  # fmt: skip
    (data / "dataset_info.json").write_text(json.dumps(info))
    cfg = load_config(
        None, {"stage": "dpo", "pref_loss": "orpo", "dataset": "my_prefs", "dataset_dir": str(data)}
    )
    assert cfg.data.sources == [{"path": str(data / "prefs.json"), "prompt_column": "instruction",
                                 "chosen_column": "chosen", "rejected_column": "rejected"}]  # fmt: skip
    from orpo_dist.builtin import build_tokenizer
    from orpo_dist.data import build_datasets

    train, _, report = build_datasets(cfg.data, build_tokenizer(), seed=0)
    assert report.read == 6 and len(train) + report.used_eval == 6
    with pytest.raises(ConfigError, match="dataset=demo: .* sharegpt.*prompt / chosen / rejected"):
        load_config(None, {"stage": "dpo", "pref_loss": "orpo", "dataset": "demo", "dataset_dir": str(data)})
