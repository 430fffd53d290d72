"""One typed config: YAML file + `--key value` overrides, with the names users bring from elsewhere.

Every leaf name is unique across sections, so a key can be written flat (`lr: 1e-4`, `--lr 1e-4`,
the AutoTrain / TRL style) or nested (`train: {lr: 1e-4}`, `--train.lr 1e-4`). `ALIASES` maps
AutoTrain `LLMTrainingParams`, TRL, Axolotl and Unsloth spellings onto ours.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """Bad configuration: the message lists every problem with its value and the fix."""


@dataclass
class ModelConfig:
    model: str = "builtin:tiny"
    """HF hub id, a local directory, or `builtin:tiny` / `builtin:small` (made locally, no download)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype on load; `auto` = float32 on CPU, bf16 on GPUs that support it."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless you trust the repository."""
    attn_implementation: str | None = None
    """`sdpa`, `eager`, `flash_attention_2`, ... (None = transformers' default)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% slower."""
    backend: Literal["auto", "hf", "unsloth"] = "auto"
    """`auto` picks Unsloth only when it can run (1 process, CUDA, supported model); else transformers."""
    fused_kernels: Literal["auto", "liger", "none"] = "auto"
    """Liger's Triton kernels (RoPE, RMSNorm, SwiGLU): `auto` uses them on CUDA when installed; never required."""


@dataclass
class DataConfig:
    data_path: str = "builtin:case_rule"
    """JSONL/JSON/CSV/Parquet file, a `save_to_disk` directory, a hub dataset, or `builtin:case_rule`."""
    train_split: str = "train"
    """Split to read from a hub dataset or a DatasetDict directory."""
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    max_length: int = 1024
    """Max tokens of prompt + completion; longer pairs are truncated (prompt first, then completions)."""
    max_prompt_length: int = 512
    """Prompts longer than this keep their last tokens."""
    max_completion_length: int | None = None
    """Completions longer than this keep their first tokens (None: only `max_length` applies)."""
    eval_split: float = 0.1
    """Fraction of pairs held out for evaluation (0 = no eval)."""
    eval_data_path: str | None = None
    """A separate evaluation file/dataset instead of a held-out fraction."""
    skip_invalid: bool = False
    """Drop (and count) malformed rows instead of stopping with an error."""
    max_samples: int | None = None
    """Use only the first N pairs (quick experiments)."""
    num_proc: int = 1
    """Processes for tokenisation (`datasets.map`)."""


@dataclass
class OrpoConfig:
    beta: float = 0.1
    """Weight of the odds-ratio term (paper lambda; TRL `beta`; AutoTrain `dpo_beta`; Axolotl `orpo_alpha`)."""
    nll_scope: Literal["prompt_completion", "completion"] = "prompt_completion"
    """Tokens in the chosen NLL term: prompt + completion (paper, TRL) or completion only (LLaMA-Factory)."""
    logps_chunk_size: int = 1024
    """Token positions per chunk when computing log-probs; the vocab-wide logits exist for one chunk at a time."""
    layout: Literal["padded", "packed", "shared_prefix"] = "padded"
    """Batch layout: `padded` (chosen and rejected padded to one length), `packed` (no pad tokens), or
    `shared_prefix` (no pad tokens, each prompt run once; needs sdpa, eager or flex_attention)."""


@dataclass
class PeftConfig:
    peft: bool = False
    """Train LoRA adapters instead of all weights."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str = "all-linear"
    """Comma-separated module names, or `all-linear`."""
    quantization: Literal["int4", "int8"] | None = None
    """Load the base in 4-bit (nf4, QLoRA) or 8-bit with bitsandbytes; needs `peft: true`."""


@dataclass
class TrainConfig:
    output_dir: str = "outputs/orpo"
    epochs: float = 1.0
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run `epochs`)."""
    batch_size: int = 8
    """Pairs per device per micro-batch."""
    gradient_accumulation: int = 1
    lr: float = 5e-5
    scheduler: Literal[
        "linear",
        "cosine",
        "cosine_with_restarts",
        "constant",
        "constant_with_warmup",
        "polynomial",
        "inverse_sqrt",
    ] = "linear"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Clip gradients to this norm (0 = no clipping)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """`auto`: what the accelerate launch config says (`no` without one); else forces this."""
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int | None = None
    """Evaluate every N optimizer steps (None: at the end of each epoch)."""
    save_steps: int | None = 500
    """Checkpoint every N optimizer steps (None: only at the end)."""
    save_total_limit: int | None = 2
    """Keep this many step checkpoints (None: keep all)."""
    log: Literal["none", "wandb", "tensorboard"] = "none"
    run_name: str | None = None
    wandb_project: str = "orpo_dist"
    resume: str | None = None
    """`auto`: newest complete checkpoint in output_dir if any, else start fresh (use on SLURM);
    `latest` / `true`: that checkpoint, which must exist; or a checkpoint path."""
    eval_on_start: bool = True
    """Evaluate before the first step, so the log shows the starting held-out preference accuracy."""
    group_by_length: bool = False
    """Shard so ranks get similar token counts per step (fewer stragglers)."""
    eval_batch_size: int | None = None


@dataclass
class ExportConfig:
    export: list[str] = field(default_factory=list)
    """At the end of training: any of `merged_16bit`, `gguf`."""
    gguf_quant: Literal["q4_k_m", "q8_0", "f16"] = "q4_k_m"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    orpo: OrpoConfig = field(default_factory=OrpoConfig)
    lora: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (no secrets: no field holds one)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self) -> None:
        """Raise one ConfigError listing every problem, each with its value and the fix."""
        problems = _problems(self)
        if problems:
            raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


# Other tools' names -> ours. Values are our leaf names (or callables for names that need mapping).
ALIASES: dict[str, str] = {
    # AutoTrain LLMTrainingParams
    "project_name": "output_dir",
    "prompt_text_column": "prompt_column",
    "text_column": "chosen_column",
    "rejected_text_column": "rejected_column",
    "dpo_beta": "beta",
    "valid_split": "eval_data_path",
    "model_max_length": "max_length",
    "model_name_or_path": "model",
    "logging_steps": "logging_steps",
    # TRL / transformers TrainingArguments
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation",
    "learning_rate": "lr",
    "lr_scheduler_type": "scheduler",
    "report_to": "log",
    "resume_from_checkpoint": "resume",
    "use_peft": "peft",
    "lora_target_modules": "target_modules",
    # original ORPO code / Axolotl
    "alpha": "beta",
    "orpo_alpha": "beta",
    "lambda": "beta",
    "micro_batch_size": "batch_size",
    "num_epochs": "epochs",
    "dataset": "data_path",
    "datasets": "data_path",
    "val_set_size": "eval_split",
    "sequence_len": "max_length",
    # Unsloth
    "max_seq_length": "max_length",
    "use_gradient_checkpointing": "gradient_checkpointing",
    "load_in_4bit": "load_in_4bit",
    "load_in_8bit": "load_in_8bit",
    "bf16": "bf16",
    "fp16": "fp16",
}
# Boolean switches from other tools that set one of our Literal fields.
_SWITCHES = {
    "load_in_4bit": ("quantization", "int4"),
    "load_in_8bit": ("quantization", "int8"),
    "bf16": ("mixed_precision", "bf16"),
    "fp16": ("mixed_precision", "fp16"),
}

SECTIONS = {f.name: f.type for f in fields(Config)}
_SECTION_CLASSES = {
    "model": ModelConfig,
    "data": DataConfig,
    "orpo": OrpoConfig,
    "lora": PeftConfig,
    "train": TrainConfig,
    "export": ExportConfig,
}
LEAVES: dict[str, tuple[str, dataclasses.Field]] = {
    f.name: (section, f) for section, cls in _SECTION_CLASSES.items() for f in fields(cls)
}
_HINTS = {name: typing.get_type_hints(cls) for name, cls in _SECTION_CLASSES.items()}


def _canonical(key: str) -> str:
    """`--lora-r`, `lora_r`, `train.lr` -> leaf name; aliases resolved."""
    key = key.lstrip("-").replace("-", "_")
    if "." in key:
        section, _, leaf = key.partition(".")
        if section in _SECTION_CLASSES and leaf in LEAVES and LEAVES[leaf][0] == section:
            return leaf
        key = leaf if section in _SECTION_CLASSES else key
    return ALIASES.get(key, key)


def _unknown(key: str) -> ConfigError:
    names = sorted(set(LEAVES) | set(ALIASES))
    close = difflib.get_close_matches(key.lstrip("-").replace("-", "_"), names, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else " Run with --help for the list of keys."
    return ConfigError(f"unknown config key '{key}'.{hint}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise with the value and the type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if origin is Literal:
        if isinstance(value, bool) and "no" in args:  # `mixed_precision: false`
            value = "no"
        text = str(value).lower() if value is not None else "none"
        if text not in args:
            raise ConfigError(f"{key}={value!r} is not one of {list(args)}")
        return text
    if origin is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return list(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("true", "1", "yes", "on", "unsloth"):  # Unsloth: use_gradient_checkpointing="unsloth"
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r} is not a boolean (use true or false)")
    if hint in (int, float):
        try:
            number = float(value) if hint is float else int(float(value)) if _is_integral(value) else None
        except (TypeError, ValueError):
            number = None
        if number is None:
            raise ConfigError(f"{key}={value!r} is not a{'n integer' if hint is int else ' number'}")
        return number
    if hint is str:
        if isinstance(value, bool) and key == "resume":
            return "latest" if value else None
        return str(value)
    return value


def _is_integral(value: Any) -> bool:
    try:
        return float(value) == int(float(value))
    except (TypeError, ValueError):
        return False


def _set(cfg: Config, key: str, value: Any) -> None:
    leaf = _canonical(key)
    if leaf in _SWITCHES:
        target, chosen = _SWITCHES[leaf]
        if _coerce(value, bool, key):
            _set(cfg, target, chosen)
        return
    if leaf not in LEAVES:
        raise _unknown(key)
    section, _ = LEAVES[leaf]
    hint = _HINTS[section][leaf]
    if leaf == "resume" and str(value).lower() in ("false", "0", "no"):
        value = None
    if leaf == "eval_data_path" and isinstance(value, (int, float)) and not isinstance(value, bool):
        leaf, hint = "eval_split", float  # `val_set_size: 0.05` style
    setattr(getattr(cfg, section), leaf, _coerce(value, hint, key))


def _flatten(data: dict[str, Any]) -> list[tuple[str, Any]]:
    """YAML may be flat or nested by section; a section name holding a scalar is that leaf (`model: x`)."""
    items = []
    for key, value in data.items():
        if key in _SECTION_CLASSES and isinstance(value, dict):
            items.extend(value.items())
        else:
            items.append((key, value))
    return items


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    """`--key value`, `--key=value`, and bare boolean flags (`--peft`), as AutoTrain accepts them."""
    items: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are written --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            leaf = _canonical(key)
            is_bool = leaf in _SWITCHES or (leaf in LEAVES and _HINTS[LEAVES[leaf][0]][leaf] is bool)
            if (
                is_bool
                and takes_value
                and argv[i + 1].lower()
                not in ("true", "false", "1", "0", "yes", "no", "on", "off", "unsloth")
            ):
                takes_value = False
            if takes_value:
                value, i = argv[i + 1], i + 1
            elif is_bool:
                value = "true"
            else:
                if leaf not in LEAVES and leaf not in _SWITCHES:
                    raise _unknown(key)
                raise ConfigError(f"--{key} needs a value")
        items.append((key, value))
        i += 1
    return items


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> Config:
    """Defaults <- YAML file <- overrides (a dict, or CLI tokens like ['--lr', '1e-4']). Validated."""
    cfg = Config()
    items: list[tuple[str, Any]] = []
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        items += _flatten(data)
    if isinstance(overrides, dict):
        items += _flatten(overrides)
    elif overrides:
        items += parse_overrides(list(overrides))
    errors = []
    for key, value in items:
        try:
            _set(cfg, key, value)
        except ConfigError as e:
            errors.append(str(e))
    errors += _problems(cfg)  # every problem at once: bad values and bad combinations
    if errors:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {e}" for e in errors))
    return cfg


def _problems(cfg: Config) -> list[str]:
    d, t, o, lo = cfg.data, cfg.train, cfg.orpo, cfg.lora
    p = []
    for name, value in [
        ("batch_size", t.batch_size),
        ("gradient_accumulation", t.gradient_accumulation),
        ("logging_steps", t.logging_steps),
        ("max_length", d.max_length),
        ("max_prompt_length", d.max_prompt_length),
        ("logps_chunk_size", o.logps_chunk_size),
        ("num_proc", d.num_proc),
        ("lora_r", lo.lora_r),
    ]:
        if value < 1:
            p.append(f"{name}={value} must be >= 1")
    for name, value in [
        ("save_steps", t.save_steps),
        ("eval_steps", t.eval_steps),
        ("eval_batch_size", t.eval_batch_size),
        ("max_completion_length", d.max_completion_length),
        ("max_samples", d.max_samples),
    ]:
        if value is not None and value < 1:
            p.append(f"{name}={value} must be >= 1 (or unset)")
    if t.lr <= 0:
        p.append(f"lr={t.lr} must be > 0")
    if o.beta < 0:
        p.append(f"beta={o.beta} must be >= 0 (0 trains plain SFT on the chosen answers)")
    if t.max_steps <= 0 and t.epochs <= 0:
        p.append(f"epochs={t.epochs} and max_steps={t.max_steps}: set epochs > 0 or max_steps > 0")
    if not 0 <= t.warmup_ratio < 1:
        p.append(f"warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    if t.max_grad_norm < 0:
        p.append(f"max_grad_norm={t.max_grad_norm} must be >= 0 (0 disables clipping)")
    if not 0 <= d.eval_split < 1:
        p.append(f"eval_split={d.eval_split} must be a fraction in [0, 1)")
    if d.max_prompt_length >= d.max_length:
        p.append(
            f"max_prompt_length={d.max_prompt_length} must be < max_length={d.max_length} "
            "so completions keep at least one token"
        )
    if not 0 <= lo.lora_dropout < 1:
        p.append(f"lora_dropout={lo.lora_dropout} must be in [0, 1)")
    if lo.quantization and not lo.peft:
        p.append(
            f"quantization={lo.quantization} needs peft: true (4/8-bit weights can only train through LoRA)"
        )
    bad = [e for e in cfg.export.export if e not in ("merged_16bit", "gguf")]
    if bad:
        p.append(f"export={cfg.export.export}: {bad} not in ['merged_16bit', 'gguf']")
    return p
