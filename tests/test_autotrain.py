"""AutoTrain's data layout and command, and the Axolotl / TRL keys users paste, run as users run them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import conversations_jsonl, launch_env, pairs_jsonl, read_jsonl

from orpo_dist.builtin import build_tokenizer, case_rule_pairs
from orpo_dist.config import ConfigError, load_config
from orpo_dist.data import DataError, build_datasets

# The seed's AutoTrain ORPO command, flag for flag; only `autotrain llm` and the model are swapped.
AUTOTRAIN = (
    "--train --model {model} --data-path {data} --project-name my-orpo --trainer orpo "
    "--prompt-text-column prompt --text-column chosen --rejected-text-column rejected --peft --dpo-beta 0.1 "
    "--epochs 1 --batch-size 2 --gradient-accumulation 4 --lr 5e-5 --lora-r 16 --lora-alpha 32 "
    "--max-prompt-length 128 --max-completion-length 64 --log wandb"
)


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    run_env = launch_env(HOME=str(cwd / "home"), WANDB_SILENT="true", **env)
    run_env.pop("WANDB_MODE")  # --log wandb as a user has it: no API key, so wandb goes offline
    return subprocess.run([sys.executable, "-m", "orpo_dist.train", *args], cwd=cwd, env=run_env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_the_autotrain_orpo_command_runs_as_written(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    pairs_jsonl(data / "train.jsonl", n=64)
    proc = _cli(AUTOTRAIN.format(model=tiny_model_dir, data=data).split(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    project = tmp_path / "my-orpo"  # --project-name is the output directory, relative to where it runs
    cfg = load_config(project / "config.yaml")
    assert (cfg.train.batch_size, cfg.train.gradient_accumulation, cfg.train.lr, cfg.orpo.beta) == (
        2,
        4,
        5e-5,
        0.1,
    )
    assert (cfg.peft.use_peft, cfg.peft.lora_r, cfg.peft.lora_alpha) == (True, 16, 32)
    assert (cfg.data.max_prompt_length, cfg.data.max_completion_length, cfg.train.log) == (128, 64, "wandb")
    assert (
        f"data: {data} (standard)" in proc.stdout
        and "read 64 pairs, used 58 (train) + 6 (eval)" in proc.stdout
    )
    assert re.search(
        r"wandb: offline \(no API key found\): run \w+ in \S+; upload it with: wandb sync", proc.stdout
    )
    assert (project / "final" / "adapter_model.safetensors").is_file()
    rows = read_jsonl(project / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [8]  # 58 pairs / 8 per step; logged at the last step
    assert (project / "report.md").is_file() and (project / "report.png").is_file()


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_data_path_directory_with_train_and_valid_splits(kind, tmp_path):
    """AutoTrain: --data-path DIR holding train.<kind>, and --valid-split NAME naming NAME.<kind> beside it."""
    frames = {
        "train": pd.DataFrame(case_rule_pairs(12, seed=1)),
        "valid": pd.DataFrame(case_rule_pairs(5, seed=2)),
    }
    for split, frame in frames.items():
        path = tmp_path / f"{split}.{kind}"
        if kind == "jsonl":
            frame.to_json(path, orient="records", lines=True)
        else:
            getattr(frame, f"to_{kind}")(path, index=False)
    cfg = load_config(None, ["--data-path", str(tmp_path), "--valid-split", "valid"])
    train, evaluation, report = build_datasets(cfg.data, build_tokenizer(), seed=0)
    assert (len(train), len(evaluation), report.read) == (12, 5, 17)
    tokenizer = build_tokenizer()
    first_eval = tokenizer.decode(evaluation[0]["prompt_ids"], skip_special_tokens=True)
    assert first_eval == frames["valid"].iloc[0]["prompt"]


def test_data_path_directory_without_the_split_names_it(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    cfg = load_config(None, {"data_path": str(tmp_path)})
    with pytest.raises(DataError, match=r"holds no train\.jsonl\|json\|csv\|parquet"):
        build_datasets(cfg.data, build_tokenizer(), seed=0)
    pairs_jsonl(tmp_path / "train.jsonl", 6)
    cfg = load_config(None, {"data_path": str(tmp_path), "valid_split": "validation"})
    with pytest.raises(DataError, match=r"holds no validation\.jsonl"):
        build_datasets(cfg.data, build_tokenizer(), seed=0)


@pytest.mark.parametrize("value", ["dpo", "sft", "default"])
def test_trainer_other_than_orpo_is_an_error_naming_orpo(value):
    with pytest.raises(
        ConfigError, match=rf"trainer='{value}': orpo_dist trains ORPO only; use trainer: orpo"
    ):
        load_config(None, ["--trainer", value])
    with pytest.raises(ConfigError, match=r"rl='dpo'.*use rl: orpo"):
        load_config(None, {"rl": "dpo"})
    assert load_config(None, ["--train", "--trainer", "orpo", "--lr", "1e-4"]).train.lr == 1e-4


def test_token_on_the_command_line_is_refused_without_echoing_it():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--token", "hf_secret123"])
    assert "HF_TOKEN" in str(e.value) and "hf_secret123" not in str(e.value)


@pytest.mark.slow
def test_axolotl_config_as_pasted_trains(tmp_path, tiny_model_dir):
    data = conversations_jsonl(tmp_path / "orpo.jsonl", n=24)
    config = {
        "base_model": str(tiny_model_dir),
        "rl": "orpo",
        "orpo_alpha": 0.1,
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "lora_target_linear": True,
        "datasets": [{"path": str(data), "type": "chat_template.argilla", "split": "train"}],
        "chat_template": "chatml",
        "sequence_len": 256,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "num_epochs": 1,
        "max_steps": 3,
        "learning_rate": 5.0e-5,
        "optimizer": "adamw_bnb_8bit",
        "lr_scheduler": "cosine",
        "bf16": "auto",
        "val_set_size": 0.1,
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "axolotl.yaml").write_text(yaml.safe_dump(config))
    proc = _cli(["--config", str(tmp_path / "axolotl.yaml")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config(tmp_path / "out" / "config.yaml")
    assert cfg.model.model == str(tiny_model_dir) and cfg.data.data_path == str(data)
    assert (cfg.peft.use_peft, cfg.peft.quantization, cfg.orpo.beta, cfg.train.optim) == (
        True,
        None,
        0.1,
        "adamw_8bit",
    )
    assert (cfg.data.max_length, cfg.train.batch_size, cfg.train.scheduler, cfg.train.mixed_precision) == (
        256, 2, "cosine", "auto",
    )  # fmt: skip
    assert "chat_template: chatml (applied)" in proc.stdout
    assert "optimizer adamw_8bit (bitsandbytes AdamW" in proc.stdout
    assert (tmp_path / "out" / "final" / "adapter_config.json").is_file()


def test_axolotl_and_trl_keys():
    qlora = load_config(None, {"adapter": "qlora", "base_model": "org/m", "dataset_name": "org/prefs",
                               "dataset_train_split": "train_prefs", "dataset_test_split": "test_prefs"})  # fmt: skip
    assert (qlora.peft.use_peft, qlora.peft.quantization, qlora.model.model) == (True, "int4", "org/m")
    assert (qlora.data.data_path, qlora.data.train_split, qlora.data.eval_data_path) == (
        "org/prefs", "train_prefs", "test_prefs",
    )  # fmt: skip
    assert load_config(None, {"datasets": "org/prefs"}).data.data_path == "org/prefs"
    several = load_config(None, {"datasets": [{"path": "a.jsonl"}, {"path": "b.jsonl", "split": "x"}]}).data
    assert several.sources == [{"path": "a.jsonl"}, {"path": "b.jsonl", "split": "x"}]  # mixed: test_data_mix.py
    with pytest.raises(ConfigError, match=r"datasets\[0\].*an entry takes path.*not data_files"):
        load_config(None, {"datasets": [{"path": "org/x", "data_files": ["a.json"]}]})
    with pytest.raises(ConfigError, match="adapter='ia3' must be lora or qlora"):
        load_config(None, {"adapter": "ia3"})


def test_max_prompt_length_follows_a_short_sequence_len_unless_set():
    """Axolotl configs set `sequence_len` alone: the prompt budget (default 512) shrinks to half of it."""
    assert load_config(None, {"sequence_len": 256}).data.max_prompt_length == 128
    assert load_config(None, {"sequence_len": 2048}).data.max_prompt_length == 512
    with pytest.raises(ConfigError, match="max_prompt_length=512 must be < max_length=256"):
        load_config(None, {"sequence_len": 256, "max_prompt_length": 512})
