"""From what users write to a `Config`: YAML files, `--key value` flags, and other tools' names.

`ALIASES` maps AutoTrain `LLMTrainingParams`, TRL, Axolotl and Unsloth spellings onto our keys;
`SWITCHES` are other tools' booleans that set one of our choices; `OTHER_KEYS` are other tools' keys
that are checked or translated but not stored (`trainer: orpo`, Axolotl's `adapter`, `rl` and
`datasets` list). Values are coerced to the field's type here, once; every bad key or value is
collected and reported together with the bad combinations.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import Field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from orpo_dist.config.checks import problems
from orpo_dist.config.expand import expand_settings
from orpo_dist.config.schema import CHAT_TEMPLATES, SECTIONS, Config, ConfigError
from orpo_dist.config.yaml_safe import load_yaml, repeated_keys

# Other tools' names -> ours.
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
    "peft": "use_peft",
    "optimizer": "optim",
    "repo_id": "hub_model_id",
    # TRL / transformers TrainingArguments
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation",
    "learning_rate": "lr",
    "lr_scheduler_type": "scheduler",
    "report_to": "log",
    "resume_from_checkpoint": "resume",
    "lora_target_modules": "target_modules",
    "dataset_name": "data_path",
    "dataset_train_split": "train_split",
    "dataset_test_split": "eval_data_path",
    # original ORPO code / Axolotl
    "alpha": "beta",
    "orpo_alpha": "beta",
    "lambda": "beta",
    "micro_batch_size": "batch_size",
    "num_epochs": "epochs",
    "dataset": "data_path",
    "val_set_size": "eval_split",
    "sequence_len": "max_length",
    "base_model": "model",
    "lr_scheduler": "scheduler",
    "wandb_name": "run_name",
    # Unsloth
    "max_seq_length": "max_length",
    "use_gradient_checkpointing": "gradient_checkpointing",
    # accelerate ParallelismConfig
    "sp_size": "sequence_parallel_size",
    # ours, by the section's name
    "export": "formats",
}
# Boolean switches from other tools that set one of our Literal fields.
SWITCHES = {
    "load_in_4bit": ("quantization", "int4"),
    "load_in_8bit": ("quantization", "int8"),
    "bf16": ("mixed_precision", "bf16"),
    "fp16": ("mixed_precision", "fp16"),
    "use_flash_attention_2": ("attn_implementation", "flash_attention_2"),  # AutoTrain
    "flash_attention": ("attn_implementation", "flash_attention_2"),  # Axolotl
    "lora_target_linear": ("target_modules", "all-linear"),  # Axolotl
}
# Other tools' spellings of one of our values.
VALUE_ALIASES = {
    "optim": {"adamw_bnb_8bit": "adamw_8bit"},  # transformers' / Axolotl's older name
    "chat_template": {"tokenizer_default": "tokenizer"},  # Axolotl
}


def _only_orpo(cfg: Config, value: Any, key: str) -> None:
    """AutoTrain `--trainer` / Axolotl `rl`: accepted when it is `orpo` (the only thing orpo_dist trains)."""
    if str(value).lower() != "orpo":
        raise ConfigError(f"{key}={value!r}: orpo_dist trains ORPO only; use {key}: orpo (or leave it out)")


def _train_flag(cfg: Config, value: Any, key: str) -> None:
    """AutoTrain's `--train` (what `python -m orpo_dist.train` always does): accepted, nothing to set."""
    _coerce(value, bool, key)


def _adapter(cfg: Config, value: Any, key: str) -> None:
    """Axolotl: `lora` sets peft: true; `qlora` sets peft: true and quantization: int4."""
    text = str(value).lower() if value is not None else ""
    if text not in ("lora", "qlora", "", "none", "null"):
        raise ConfigError(f"{key}={value!r} must be lora or qlora (or leave it out for a full fine-tune)")
    if text in ("lora", "qlora"):
        _set(cfg, "use_peft", True)
    if text == "qlora":
        _set(cfg, "quantization", "int4")


def _datasets(cfg: Config, value: Any, key: str) -> None:
    """Axolotl: a list of one `{path, split, type}` (sets data_path and train_split; the format is detected)."""
    entries = value if isinstance(value, list) else [value]
    if len(entries) != 1:
        raise ConfigError(
            f"{key} has {len(entries)} entries; orpo_dist trains on one preference dataset: keep one entry "
            "(or join the files into one)"
        )
    entry = entries[0]
    if not isinstance(entry, dict):
        return _set(cfg, "data_path", entry)
    unknown = sorted(set(entry) - {"path", "split", "type"})
    if "path" not in entry or unknown:
        raise ConfigError(
            f"{key}[0]={entry!r}: an entry takes path (a file, directory or hub dataset), split and type "
            f"(ignored: the format is detected from the rows){'; not ' + ', '.join(unknown) if unknown else ''}"
        )
    _set(cfg, "data_path", entry["path"])
    if entry.get("split"):
        _set(cfg, "train_split", entry["split"])


def _refuse_token(cfg: Config, value: Any, key: str) -> None:
    """AutoTrain `--token`: refused; a secret on the command line ends up in shell history and logs."""
    raise ConfigError(
        f"--{key}: orpo_dist takes no secrets as options (they would land in shell history and logs); "
        "set HF_TOKEN in the environment or run `hf auth login`"
    )


# Other tools' keys that are checked or translated, not stored: key -> (handler, is a boolean flag).
OTHER_KEYS: dict[str, tuple[Callable[[Config, Any, str], None], bool]] = {
    "trainer": (_only_orpo, False),
    "rl": (_only_orpo, False),
    "train": (_train_flag, True),
    "adapter": (_adapter, False),
    "datasets": (_datasets, False),
    "token": (_refuse_token, False),
}
# Sections renamed since checkpoints were first written: an old `orpo_config.yaml` still loads.
OLD_SECTIONS = {"lora": "peft"}

LEAVES: dict[str, tuple[str, Field]] = {f.name: (s, f) for s, cls in SECTIONS.items() for f in fields(cls)}
HINTS: dict[str, Any] = {
    name: hint for cls in SECTIONS.values() for name, hint in typing.get_type_hints(cls).items()
}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def canonical(key: str) -> str:
    """`--lora-r`, `lora_r`, `peft.lora_r` -> the leaf name, aliases resolved."""
    key = key.lstrip("-").replace("-", "_")
    if "." in key:
        section, _, leaf = key.partition(".")
        if OLD_SECTIONS.get(section, section) in SECTIONS:
            key = leaf
    return ALIASES.get(key, key)


def _unknown(key: str) -> ConfigError:
    names = sorted(set(LEAVES) | set(ALIASES) | set(SWITCHES) | set(OTHER_KEYS))
    close = difflib.get_close_matches(key.lstrip("-").replace("-", "_"), names, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else " Run with --help for the list of keys."
    return ConfigError(f"unknown config key '{key}'.{hint}")


def _is_integral(value: Any) -> bool:
    try:
        return float(value) == int(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise with the value and the type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):  # `int | Literal["auto"]`: the first that fits
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e).removeprefix(f"{key}={value!r} "))
        raise ConfigError(f"{key}={value!r} " + " and ".join(errors))
    if origin is Literal:
        if isinstance(value, bool) and "no" in args:  # `mixed_precision: false`
            value = "no"
        text = str(value).lower() if value is not None else "none"
        if text not in args:
            raise ConfigError(f"{key}={value!r} is not one of {list(args)}")
        return text
    if origin is list:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        return [_coerce(v, args[0], key) for v in items] if args else items
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in (*TRUE, "unsloth"):  # Unsloth: use_gradient_checkpointing="unsloth"
            return True
        if text in FALSE:
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
        return str(value)
    return value


def _resume(value: Any) -> str | None:
    """`resume` as users write it: true / yes -> "latest", false / no / none -> None, else a word or path."""
    text = str(value).strip().lower() if value is not None else "none"
    if value is True or text in TRUE:
        return "latest"
    if value is False or text in (*FALSE, "none", "null", ""):
        return None
    return str(value)


def _set(cfg: Config, key: str, value: Any) -> None:
    leaf = canonical(key)
    if leaf in OTHER_KEYS:
        return OTHER_KEYS[leaf][0](cfg, value, leaf)
    if leaf in SWITCHES:
        target, chosen = SWITCHES[leaf]
        if str(value).lower() != "auto" and _coerce(value, bool, key):  # Axolotl `bf16: auto`: leave it
            _set(cfg, target, chosen)
        return
    if leaf not in LEAVES:
        raise _unknown(key)
    if isinstance(value, str):
        value = VALUE_ALIASES.get(leaf, {}).get(value.lower(), value)
        if leaf == "chat_template" and value.lower() in CHAT_TEMPLATES:
            value = value.lower()
    if leaf == "eval_data_path" and isinstance(value, (int, float)) and not isinstance(value, bool):
        leaf = "eval_split"  # AutoTrain / Axolotl `valid_split: 0.05`: a fraction, not a path
    section, _ = LEAVES[leaf]
    value = _resume(value) if leaf == "resume" else _coerce(value, HINTS[leaf], key)
    setattr(getattr(cfg, section), leaf, value)


def _flatten(data: dict[str, Any]) -> list[tuple[str, Any]]:
    """YAML may be flat or nested by section; a section name holding a scalar is that leaf (`model: x`)."""
    items = []
    for key, value in data.items():
        section = OLD_SECTIONS.get(key, key)
        if section in SECTIONS and isinstance(value, dict):
            items.extend(value.items())
        else:
            items.append((key, value))
    return items


def _is_bool_key(key: str) -> bool:
    leaf = canonical(key)
    return leaf in SWITCHES or (leaf in HINTS and HINTS[leaf] is bool) or OTHER_KEYS.get(leaf, (0, False))[1]


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
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if _is_bool_key(key) and has_value and argv[i + 1].lower() not in (*TRUE, *FALSE, "unsloth"):
                has_value = False  # `--peft data.jsonl`? no: a bare switch followed by something else
            if has_value:
                value, i = argv[i + 1], i + 1
            elif _is_bool_key(key):
                value = "true"
            elif canonical(key) not in LEAVES and canonical(key) not in OTHER_KEYS:
                raise _unknown(key)
            else:
                raise ConfigError(f"--{key} needs a value")
        items.append((key, value))
        i += 1
    return items


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping, or a one-line ConfigError naming the file (and the line of a syntax error)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass a YAML file (e.g. {p / 'run.yaml'})")
    try:
        data = load_yaml(p.read_text(encoding="utf-8-sig"), str(path))  # no alias bomb, no key twice
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start})"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: YAML syntax error: {problem}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> Config:
    """Defaults <- YAML file <- overrides (a dict, or CLI tokens like ['--lr', '1e-4']). Validated."""
    cfg = Config()
    items: list[tuple[str, Any]] = []
    if path is not None:
        items += _flatten(data := read_yaml(path))
        if repeated := repeated_keys(data, str(path), canonical, SECTIONS, OLD_SECTIONS):  # both places named
            raise ConfigError("invalid config:\n" + "\n".join(f"  - {e}" for e in repeated))
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
    d = cfg.data  # Axolotl `sequence_len: 256` alone: a prompt budget that fits
    if d.max_prompt_length >= d.max_length and "max_prompt_length" not in {canonical(k) for k, _ in items}:
        d.max_prompt_length = d.max_length // 2
    errors += expand_settings(cfg)  # `~` and `$VAR` in paths, as a shell would
    errors += problems(cfg)  # every problem at once: bad values and bad combinations
    if errors:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {e}" for e in errors))
    return cfg
