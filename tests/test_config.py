"""Config: YAML + flags, aliases from AutoTrain / TRL / Axolotl / Unsloth, validation, every shipped preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import REPO

from orpo_dist.cli import parse, quickstart_preset
from orpo_dist.config import ALIASES, LEAVES, SWITCHES, Config, ConfigError, load_config


def test_defaults_are_valid_and_roundtrip_through_yaml(tmp_path):
    cfg = load_config()
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert set(yaml.safe_load((tmp_path / "c.yaml").read_text())) == {
        "model",
        "data",
        "orpo",
        "peft",
        "train",
        "export",
    }


def test_flat_and_nested_yaml_are_the_same(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("model: m\nlr: 1.0e-4\nbeta: 0.2\nlora_r: 8\npeft: true\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text(
        "model: {model: m}\ntrain: {lr: 1e-4}\norpo: {beta: 0.2}\npeft: {lora_r: 8, use_peft: true}\n"
    )
    old = tmp_path / "old.yaml"  # an orpo_config.yaml written before the section was renamed
    old.write_text("model: {model: m}\ntrain: {lr: 1e-4}\norpo: {beta: 0.2}\nlora: {lora_r: 8, peft: true}\n")
    assert load_config(flat) == load_config(nested) == load_config(old)
    cfg = load_config(flat)
    assert (cfg.model.model, cfg.train.lr, cfg.orpo.beta, cfg.peft.lora_r) == ("m", 1e-4, 0.2, 8)


@pytest.mark.parametrize(
    "argv",
    [
        ["--lora-r", "8"],
        ["--lora_r", "8"],
        ["--lora-r=8"],
        ["--peft.lora_r", "8"],
        ["--lora.lora_r", "8"],  # the section's name before it was `peft`
    ],
)
def test_flag_spellings(argv):
    assert load_config(None, argv).peft.lora_r == 8


def test_bare_boolean_flags_as_in_autotrain():
    cfg = load_config(None, ["--peft", "--gradient-checkpointing", "--lr", "2e-5"])
    assert cfg.peft.use_peft and cfg.model.gradient_checkpointing and cfg.train.lr == 2e-5
    assert load_config(None, ["--peft", "false"]).peft.use_peft is False
    assert load_config(None, ["--skip-invalid", "--peft"]).data.skip_invalid is True


def test_autotrain_llm_training_params_names():
    cfg = load_config(
        None,
        [
            "--model", "org/model",
            "--data-path", "pairs.jsonl",
            "--project-name", "runs/x",
            "--prompt-text-column", "question",
            "--text-column", "good",
            "--rejected-text-column", "bad",
            "--dpo-beta", "0.25",
            "--max-length", "2048",
            "--max-prompt-length", "512",
            "--max-completion-length", "1024",
            "--epochs", "3",
            "--batch-size", "2",
            "--gradient-accumulation", "8",
            "--lr", "3e-5",
            "--peft",
            "--lora-r", "32",
            "--lora-alpha", "64",
            "--lora-dropout", "0.1",
            "--quantization", "int4",
            "--log", "tensorboard",
            "--scheduler", "cosine_with_restarts",
            "--warmup-ratio", "0.05",
            "--weight-decay", "0.01",
            "--max-grad-norm", "0.5",
            "--mixed-precision", "bf16",
            "--seed", "7",
            "--save-steps", "100",
            "--eval-steps", "50",
            "--logging-steps", "5",
            "--max-steps", "1000",
        ],
    )  # fmt: skip
    assert cfg.model.model == "org/model" and cfg.data.data_path == "pairs.jsonl"
    assert cfg.train.output_dir == "runs/x"
    assert (cfg.data.prompt_column, cfg.data.chosen_column, cfg.data.rejected_column) == (
        "question",
        "good",
        "bad",
    )
    assert cfg.orpo.beta == 0.25
    assert (cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.max_completion_length) == (
        2048,
        512,
        1024,
    )
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.gradient_accumulation) == (3, 2, 8)
    assert cfg.train.lr == 3e-5 and cfg.peft.use_peft and cfg.peft.quantization == "int4"
    assert (cfg.peft.lora_r, cfg.peft.lora_alpha, cfg.peft.lora_dropout) == (32, 64, 0.1)
    assert cfg.train.log == "tensorboard" and cfg.train.scheduler == "cosine_with_restarts"
    assert (cfg.train.warmup_ratio, cfg.train.weight_decay, cfg.train.max_grad_norm) == (0.05, 0.01, 0.5)
    assert cfg.train.mixed_precision == "bf16" and cfg.train.seed == 7
    assert (cfg.train.save_steps, cfg.train.eval_steps, cfg.train.logging_steps, cfg.train.max_steps) == (
        100,
        50,
        5,
        1000,
    )


@pytest.mark.parametrize("alias", ["beta", "dpo_beta", "alpha", "orpo_alpha", "lambda"])
def test_beta_aliases(alias):
    assert load_config(None, {alias: 0.3}).orpo.beta == 0.3


def test_trl_and_axolotl_names():
    cfg = load_config(
        None,
        {
            "learning_rate": 1e-5,
            "num_train_epochs": 2,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "lr_scheduler_type": "cosine",
            "report_to": "wandb",
            "micro_batch_size": 3,
            "sequence_len": 1024,
            "val_set_size": 0.05,
            "bf16": True,
        },
    )
    assert cfg.train.lr == 1e-5 and cfg.train.epochs == 2 and cfg.train.gradient_accumulation == 2
    assert cfg.train.batch_size == 3  # the later key wins
    assert cfg.train.scheduler == "cosine" and cfg.train.log == "wandb"
    assert cfg.data.max_length == 1024 and cfg.data.eval_split == 0.05 and cfg.train.mixed_precision == "bf16"


def test_every_alias_points_at_a_real_key():
    for alias, target in ALIASES.items():
        assert target in LEAVES, (alias, target)
    for switch, (target, value) in SWITCHES.items():
        cfg = load_config(None, {"peft": True, switch: True})
        section = LEAVES[target][0]
        assert getattr(getattr(cfg, section), target) == value, switch


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match="unknown config key 'lerning_rate'.*'learning_rate'"):
        load_config(None, ["--lerning_rate", "1e-4"])
    with pytest.raises(ConfigError, match="'lora_alpha'"):
        load_config(None, {"lora_alpah": 16})


def test_every_problem_is_reported_at_once_with_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, {"batch_size": 0, "lr": -1, "quantization": "int4", "max_prompt_length": 4096,
                           "scheduler": "cosine_forever", "peft": "maybe"})  # fmt: skip
    msg = str(e.value)
    for needle in ["batch_size=0", "lr=-1.0", "needs peft: true", "max_prompt_length=4096", "'cosine_forever'",
                   "'maybe' is not a boolean"]:  # fmt: skip
        assert needle in msg, (needle, msg)


def test_type_errors_name_the_key_and_value():
    with pytest.raises(ConfigError, match="batch.size=.abc. is not an integer"):
        load_config(None, ["--batch-size", "abc"])
    with pytest.raises(ConfigError, match="--lr needs a value"):
        load_config(None, ["--lr"])


def test_resume_spellings():
    """`true` means "latest" however it is written (YAML bool, flag text, TRL's name), never a path."""
    for spelling in [
        {"resume": True},
        {"resume": "true"},
        {"resume_from_checkpoint": True},
        {"resume": "yes"},
    ]:
        assert load_config(None, spelling).train.resume == "latest", spelling
    for argv in (["--resume", "true"], ["--resume=True"], ["--resume_from_checkpoint", "true"]):
        assert load_config(None, argv).train.resume == "latest", argv
    for spelling in [
        {"resume": False},
        {"resume": "false"},
        {"resume_from_checkpoint": False},
        {"resume": None},
    ]:
        assert load_config(None, spelling).train.resume is None, spelling
    assert load_config(None, ["--resume", "no"]).train.resume is None
    assert load_config(None, ["--resume", "latest"]).train.resume == "latest"
    assert load_config(None, ["--resume", "auto"]).train.resume == "auto"
    assert (
        load_config(None, {"resume_from_checkpoint": "out/checkpoint-10"}).train.resume == "out/checkpoint-10"
    )


def test_export_formats_are_checked_where_they_are_spelled():
    assert load_config(None, {"export": ["merged_16bit", "gguf"]}).export.formats == ["merged_16bit", "gguf"]
    assert load_config(None, ["--export", "gguf"]).export.formats == ["gguf"]
    with pytest.raises(ConfigError, match="'onnx' is not one of"):
        load_config(None, {"export": "merged_16bit,onnx"})
    with pytest.raises(ConfigError, match="gguf_quant='q2_k' is not one of"):
        load_config(None, {"gguf_quant": "q2_k"})


def test_shared_prefix_with_flash_attention_is_a_config_error():
    with pytest.raises(ConfigError, match="layout=shared_prefix with attn_implementation=flash_attention_2"):
        load_config(None, {"layout": "shared_prefix", "attn_implementation": "flash_attention_2"})


def test_yaml_floats_written_without_dot_are_numbers(tmp_path):
    """PyYAML reads `5e-5` as a string; it must still become a float."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 5e-5\nweight_decay: 1e-2\n")
    cfg = load_config(path)
    assert cfg.train.lr == 5e-5 and cfg.train.weight_decay == 0.01


def test_cli_config_file_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nbatch_size: 4\n")
    cfg, preset = parse(["--config", str(path), "--batch-size", "2"])
    assert not preset and cfg.train.lr == 1e-4 and cfg.train.batch_size == 2
    with pytest.raises(ConfigError, match="no such file"):
        parse(["--config", str(tmp_path / "missing.yaml")])


def test_no_config_runs_the_quickstart_preset():
    cfg, preset = parse([])
    assert preset and cfg.model.model == "builtin:tiny" and cfg.data.data_path == "builtin:case_rule"


def _shipped_configs() -> list[Path]:
    found = [Path(quickstart_preset())]
    for folder in ("examples", "tests/slurm", "tests/configs"):
        found += sorted((REPO / folder).glob("*.yaml"))
    return found


@pytest.mark.parametrize("path", _shipped_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_training_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_python_api_is_callable_even_after_the_cli_module_is_imported():
    """`import orpo_dist.train` rebinds the package attribute to the CLI module; it must still train."""
    import importlib

    import orpo_dist

    importlib.import_module("orpo_dist.cli")
    importlib.import_module("orpo_dist.train")  # the `python -m orpo_dist.train` shim
    assert callable(orpo_dist.train) and orpo_dist.train.__module__ == "orpo_dist"
    with pytest.raises(ConfigError, match="lr=-1.0 must be > 0"):  # validated before anything loads
        orpo_dist.train({"lr": -1})
    with pytest.raises(ConfigError, match="lr=-1.0 must be > 0"):
        orpo_dist.train(None, lr=-1)


def test_config_package_imports_nothing_else_of_orpo_dist():
    """config/ is the bottom layer: everything may import it, it imports only itself (and libraries)."""
    import ast

    for path in (Path(__file__).parents[1] / "orpo_dist" / "config").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                if name == "orpo_dist" or name.startswith("orpo_dist."):
                    assert name.startswith("orpo_dist.config"), (path.name, name)


def test_cli_parse_takes_config_out_of_the_flags(tmp_path):
    from orpo_dist.cli import parse

    p = tmp_path / "run.yaml"
    p.write_text("lr: 0.001\nbeta: 0.3\n")
    cfg, preset = parse(["--lr", "2e-4", f"--config={p}", "--peft"])
    assert (cfg.train.lr, cfg.orpo.beta, cfg.peft.use_peft, preset) == (2e-4, 0.3, True, False)
    with pytest.raises(ConfigError, match="--config needs a path"):
        parse(["--config"])
