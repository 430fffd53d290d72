"""From what users write to a `Config`: YAML files, `--key value` flags, and other tools' names.

Other tools' vocabulary lives in `aliases.py`; this module reads, resolves names, and coerces values to
the field's type, once. Every bad key or value is collected and reported together with the bad
combinations, in one "invalid config" message (`invalid`).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import types
import typing
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from orpo_dist.config.aliases import (
    ALIASES,
    FALSE,
    FOREIGN_SECTIONS,
    IF_UNSET,
    IGNORED,
    OTHER_KEYS,
    REFUSED,
    SWITCHES,
    TRUE,
    VALUE_ALIASES,
    as_bool,
    combined,
)
from orpo_dist.config.checks import invalid, problems
from orpo_dist.config.expand import expand_settings
from orpo_dist.config.schema import CHAT_TEMPLATES, SECTIONS, Config, ConfigError
from orpo_dist.config.yaml_safe import load_yaml, repeated_keys

log = logging.getLogger("orpo_dist")
# Sections renamed since checkpoints were first written: an old `orpo_config.yaml` still loads.
OLD_SECTIONS = {"lora": "peft"}

LEAVES: dict[str, tuple[str, Field]] = {f.name: (s, f) for s, cls in SECTIONS.items() for f in fields(cls)}
HINTS: dict[str, Any] = {
    name: hint for cls in SECTIONS.values() for name, hint in typing.get_type_hints(cls).items()
}


def canonical(key: str) -> str:
    """`--lora-r`, `lora_r`, `peft.lora_r` -> the leaf name, aliases resolved."""
    key = key.lstrip("-").replace("-", "_")
    if "." in key:
        section, _, leaf = key.partition(".")
        if OLD_SECTIONS.get(section, section) in SECTIONS:
            key = leaf
    return ALIASES.get(key, key)


def _unknown(key: str) -> ConfigError:
    names = sorted(set(LEAVES) | set(ALIASES) | set(SWITCHES) | set(OTHER_KEYS) | set(IGNORED) | set(REFUSED))
    # only a near spelling: a loose match (padding_free -> learning_rate) misleads more than no hint
    close = difflib.get_close_matches(key.lstrip("-").replace("-", "_"), names, n=1, cutoff=0.8)
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
    if origin is dict or hint is dict:  # `lr_scheduler_kwargs: {min_lr: 1e-6}`, or JSON on the command line
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} is not a mapping (write it as {{name: value}} or JSON)")
        return value
    if origin is list:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        return [_coerce(v, args[0], key) for v in items] if args else items
    if hint is bool:
        return as_bool(value, key)
    if hint in (int, float):
        try:
            number = float(value) if hint is float else int(float(value)) if _is_integral(value) else None
        except (TypeError, ValueError):
            number = None
        if number is None:
            raise ConfigError(f"{key}={value!r} is not a{'n integer' if hint is int else ' number'}")
        return number
    if hint is str:  # a YAML list for a comma-separated key (`modules_to_save: [lm_head]`)
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return value


def _resume(value: Any) -> str | None:
    """`resume` as users write it: true / yes -> "latest", false / no / none -> None, else a word or path."""
    text = str(value).strip().lower() if value is not None else "none"
    if value is True or text in TRUE:
        return "latest"
    if value is False or text in (*FALSE, "none", "null", ""):
        return None
    return str(value)


@dataclass
class _Reading:
    """What reading the keys gathers besides the config: ignored keys with their reasons, handler pairs that
    apply only where the user set nothing (IF_UNSET), and the leaves the user set."""

    cfg: Config
    ignored: dict[str, str] = field(default_factory=dict)
    if_unset: list[tuple[str, Any]] = field(default_factory=list)
    set_leaves: set[str] = field(default_factory=set)


def _is_off(value: Any) -> bool:
    """Empty, false, none, [] or {}: a refused key that asks for nothing (Axolotl's `deepspeed:`)."""
    text = value.strip().lower() if isinstance(value, str) else None
    return value in (None, False, [], {}) or text in ("", "none", "null", *FALSE)


def _set(r: _Reading, key: str, value: Any) -> None:
    leaf = canonical(key)
    if leaf in IGNORED:
        r.ignored[leaf] = IGNORED[leaf]
        return
    if leaf in REFUSED:
        if _is_off(value):
            r.ignored[leaf] = "off"
            return
        raise ConfigError(f"{key}={value!r} cannot be honoured: {REFUSED[leaf]}")
    known = leaf in LEAVES or leaf in OTHER_KEYS or leaf in SWITCHES
    takes_none = leaf == "resume" or (leaf in HINTS and _accepts_none(HINTS[leaf]))
    if known and value is None and not takes_none:  # Axolotl `fp16:`: an empty key (an explicit "" is a value)
        r.ignored[leaf] = "empty: the default stays"
        return
    if leaf in OTHER_KEYS:
        for target, chosen in OTHER_KEYS[leaf][0](value, leaf):
            if target.startswith(IF_UNSET):
                r.if_unset.append((target.removeprefix(IF_UNSET), chosen))
            else:
                _set(r, target, chosen)
        return
    if leaf in SWITCHES:
        target, chosen = SWITCHES[leaf]
        if str(value).lower() != "auto" and _coerce(value, bool, key):  # Axolotl `bf16: auto`: leave it
            _set(r, target, chosen)
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
    setattr(getattr(r.cfg, section), leaf, value)
    r.set_leaves.add(leaf)


def _accepts_none(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _adapter_as_model(cfg: Config) -> None:
    """`model: <a LoRA adapter directory>` (a LoRA run's final/): its base is the model, it is the adapter."""
    config = Path(cfg.model.model).expanduser() / "adapter_config.json"
    if config.is_file() and not (config.parent / "config.json").is_file():
        base = json.loads(config.read_text()).get("base_model_name_or_path")
        if base:
            cfg.model.model, cfg.peft.adapter_path = str(base), str(config.parent)
    if cfg.peft.adapter_path:
        cfg.peft.use_peft = True


def _flatten(data: dict[str, Any]) -> list[tuple[str, Any]]:
    """YAML may be flat or nested by section; a section name holding a scalar is that leaf (`model: x`).
    AutoTrain's `params:` / `hub:` sections are read the same way."""
    items = []
    for key, value in data.items():
        section = OLD_SECTIONS.get(key, key)
        if (section in SECTIONS or section in FOREIGN_SECTIONS) and isinstance(value, dict):
            items.extend(value.items())
        else:
            items.append((key, value))
    return items


def _is_bool_key(key: str) -> bool:
    leaf = canonical(key)
    return leaf in SWITCHES or (leaf in HINTS and HINTS[leaf] is bool) or OTHER_KEYS.get(leaf, (0, False))[1]


CONFIG = "config"  # `--config FILE.yaml`: the file the other flags override (cli.parse takes it out)


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    """`--key value`, `--key=value`, and bare boolean flags (`--peft`), as AutoTrain accepts them;
    `--config FILE` comes back as the pair ("config", FILE)."""
    items: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are written --key value")
        key, eq, value = arg[2:].partition("=")
        if key == CONFIG and not eq:
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path to a YAML file (or `quickstart`)")
            value, i = argv[i + 1], i + 1
        elif not eq:
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
    path: str | Path | None = None,
    overrides: list[str] | list[tuple[str, Any]] | dict[str, Any] | None = None,
) -> Config:
    """Defaults <- YAML file <- overrides (a dict, CLI tokens like ['--lr', '1e-4'], or the pairs
    parse_overrides makes of them). Validated."""
    cfg = Config()
    items: list[tuple[str, Any]] = []
    if path is not None:
        items += _flatten(data := read_yaml(path))
        if repeated := repeated_keys(data, str(path), canonical, SECTIONS, OLD_SECTIONS):  # both places named
            raise ConfigError("invalid config:\n" + "\n".join(f"  - {e}" for e in repeated))
    if isinstance(overrides, dict):
        items += _flatten(overrides)
    elif overrides:
        overrides = list(overrides)
        items += overrides if isinstance(overrides[0], tuple) else parse_overrides(overrides)
    errors, r = [], _Reading(cfg)
    for key, value in items:
        try:
            _set(r, key, value)
        except ConfigError as e:
            errors.append(str(e))
    for key, value in r.if_unset:
        if key not in r.set_leaves:
            _set(r, key, value)
    derived, together = combined({canonical(k): v for k, v in items})
    for key, value in derived:
        _set(r, key, value)
    errors += together
    if r.ignored:  # one line, on the first process only (every rank reads the config)
        if os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":
            log.warning("ignored (they change nothing here): " +
                        "; ".join(f"{k} ({why})" for k, why in r.ignored.items()))  # fmt: skip
    _adapter_as_model(cfg)
    if cfg.train.max_steps == 0:  # never "a whole epoch": zero steps of training is an evaluation
        cfg.train.eval_only = True
    if cfg.train.eval_strategy == "steps" and not cfg.train.eval_steps:
        cfg.train.eval_steps = cfg.train.logging_steps  # transformers: eval_steps defaults to logging_steps
    d = cfg.data  # Axolotl `sequence_len: 256` alone: a prompt budget that fits
    if d.max_prompt_length >= d.max_length and "max_prompt_length" not in {canonical(k) for k, _ in items}:
        d.max_prompt_length = d.max_length // 2
    errors += expand_settings(cfg)  # `~` and `$VAR` in paths, as a shell would
    errors += problems(cfg)  # every problem at once: bad values and bad combinations
    if errors:
        raise invalid(errors)
    return cfg
