"""Where orpo_dist may write a model: only where it overwrites nothing it was made from (path settings are
expanded as a shell would when the config is read: config/expand.py).

Every directory orpo_dist writes a model into (an export, the merged model) gets a small marker file,
`MARKER`; a directory that holds model weights without it was written by someone else (a base model,
a download) and is never written over.
"""

from __future__ import annotations

import json
from pathlib import Path

from orpo_dist.config import ConfigError

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
