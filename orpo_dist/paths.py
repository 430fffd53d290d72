"""Where orpo_dist may write: path settings expanded as a shell would, and models written only where
they overwrite nothing they were made from.

Every directory orpo_dist writes a model into (an export, the merged model) gets a small marker file,
`MARKER`; a directory that holds model weights without it was written by someone else (a base model,
a download) and is never written over.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from orpo_dist.config.schema import Config, ConfigError

MARKER = ".orpo_dist_export"
WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.gguf",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "pytorch_model*",
)
_VAR = re.compile(r"\$(\w+)|\$\{(\w+)(:?-[^}]*)?\}")  # $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}


def expand(value: str, key: str) -> str:
    """`~` and `$VAR` / `${VAR}` / `${VAR:-default}` expanded as a shell would; an unset variable (without a
    default) is a ConfigError naming it, never a directory literally called `$VAR`."""
    unset = []

    def substitute(m: re.Match) -> str:
        name, default = m.group(1) or m.group(2), m.group(3)
        value = os.environ.get(name)
        if default is not None and (value is None or (default.startswith(":") and not value)):
            return default.lstrip(":")[1:]
        if value is None:
            unset.append(f"${name}")
            return m.group(0)
        return value

    expanded = _VAR.sub(substitute, value)
    if unset:
        raise ConfigError(
            f"{key}={value!r}: {', '.join(dict.fromkeys(unset))} is not set; set it, or write the path out"
        )
    return os.path.expanduser(expanded)


# path settings ((section, key)), expanded once when the config is read
PATH_KEYS = (("model", "model"), ("data", "data_path"), ("data", "eval_data_path"), ("data", "cache_dir"),
             ("data", "chat_template"), ("train", "output_dir"), ("train", "resume"))  # fmt: skip


def expand_settings(cfg: Config) -> list[str]:
    """Expand `~` and `$VAR` in every path setting of `cfg` in place; the problems (an unset variable,
    an empty output_dir, which would write the whole run into the current directory)."""
    problems = []
    for section, key in PATH_KEYS:
        value = getattr(getattr(cfg, section), key)
        if isinstance(value, str) and ("$" in value or value.startswith("~")):
            try:
                setattr(getattr(cfg, section), key, expand(value, key))
            except ConfigError as e:
                problems.append(str(e))
    if not cfg.train.output_dir.strip():
        problems.append(
            "output_dir is empty: the run would be written into the current directory; name one, e.g. outputs/run"
        )
    return problems


def model_weights(directory: Path) -> list[str]:
    """The weight files directly in `directory` (none if it is not a directory)."""
    if not directory.is_dir():
        return []
    return sorted({p.name for pattern in WEIGHT_PATTERNS for p in directory.glob(pattern) if p.is_file()})


def check_model_out(out: str | Path, inputs: dict[str, str | Path], key: str = "--out") -> Path:
    """Refuse (ConfigError, before any model loads) a model destination that would overwrite its inputs.

    `inputs`: what the model is made from ({"the checkpoint": dir, "the adapter's base model": dir});
    `out` may not be one of them or inside one, may not lie under a regular file, and may not be a
    directory holding model weights that orpo_dist did not write. Symlinks are resolved first."""
    given = Path(out)
    if not str(out).strip():
        raise ConfigError(f"{key} is empty; name the directory the model is written to")
    real = given.expanduser().resolve()
    for what, path in inputs.items():
        source = Path(path).expanduser().resolve()
        if real == source or source in real.parents:
            where = "is" if real == source else "is inside"
            raise ConfigError(
                f"{key} {given} {where} {what} ({source}): writing there would overwrite it; choose another directory"
            )
    existing = next(p for p in (real, *real.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == real else f"is under {existing}, which is a file"
        raise ConfigError(f"{key} {given} {where}; choose a directory")
    weights = model_weights(real)
    if weights and not (real / MARKER).is_file():
        shown = ", ".join(weights[:3]) + (", ..." if len(weights) > 3 else "")
        raise ConfigError(
            f"{key} {given} already holds model weights orpo_dist did not write ({shown}); "
            "choose an empty or new directory"
        )
    return real


def mark_written(directory: Path, what: str) -> None:
    """Mark `directory` as written by orpo_dist, so a later export may replace what is in it."""
    (Path(directory) / MARKER).write_text(json.dumps({"written_by": "orpo_dist", "what": what}) + "\n")
