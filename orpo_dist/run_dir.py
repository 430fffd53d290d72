"""The layout of a run's checkpoints on disk, in one place: checkpoint.py writes it; resume.py, preflight.py,
health.py and elastic.py read it.

    <output_dir>/checkpoint-<step>/           a whole checkpoint (only with COMPLETE inside)
        state/                                accelerate's save_state: model or adapter, optimizer, RNG
        model/                                the weights in safetensors with the tokenizer (from_pretrained)
        orpo_state.json                       the data position, the scheduler, the run's Fingerprint (JSON)
        COMPLETE                              written last: every rank finished its part
        universal/                            made on demand: DeepSpeed's universal checkpoint (elastic.py)
    <output_dir>/.checkpoint-<step>.partial/  a save in progress, renamed into place once whole
"""

from __future__ import annotations

import re
from pathlib import Path

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "orpo_state.json"  # progress, scheduler, fingerprint: JSON, never a pickle
STATE_DIR = "state"
MODEL_DIR = "model"
UNIVERSAL_DIR = "universal"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / f"checkpoint-{step}"


def partial_dir(out: Path, step: int) -> Path:
    """Where a save of `step` is written before it is renamed into place."""
    return Path(out) / f".checkpoint-{step}.partial"


def complete_checkpoints(out: Path) -> list[Path]:
    """`checkpoint-<step>/` directories whose save finished on every rank, oldest first.

    Anything else (`checkpoint-8-copy`, a half-written save, a file) is ignored, and so is a symlink:
    resuming and rotation never follow one out of the run (rotation would delete what it points to).
    """
    found = [
        p
        for p in Path(out).glob("checkpoint-*")
        if CHECKPOINT_NAME.match(p.name)
        and not p.is_symlink()
        and p.is_dir()
        and not (p / COMPLETE_MARKER).is_symlink()
        and (p / COMPLETE_MARKER).is_file()
    ]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))
