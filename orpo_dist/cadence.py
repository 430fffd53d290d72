"""When a step logs, evaluates and saves: transformers' `*_strategy` / `*_steps` keys and Axolotl's
`evals_per_epoch` / `saves_per_epoch`, as one pure function per kind (tests/test_cadence.py)."""

from __future__ import annotations

from orpo_dist.config import TrainConfig


def per_epoch(times: int | None, steps_per_epoch: int) -> int | None:
    """Axolotl `evals_per_epoch: 4` -> every max(1, steps_per_epoch // 4) steps."""
    return max(1, steps_per_epoch // times) if times else None


def logs(t: TrainConfig, step: int, total: int, epoch_end: bool) -> bool:
    if step == total or (t.logging_first_step and step == 1):
        return True
    if t.logging_strategy == "epoch":
        return epoch_end
    return t.logging_strategy == "steps" and step % t.logging_steps == 0


def evaluates(t: TrainConfig, step: int, steps_per_epoch: int, epoch_end: bool) -> bool:
    every = per_epoch(t.evals_per_epoch, steps_per_epoch) or t.eval_steps
    if t.eval_strategy == "no":
        return False
    if t.eval_strategy == "epoch" or (t.eval_strategy == "auto" and not every):
        return epoch_end
    return bool(every) and step % every == 0


def saves(t: TrainConfig, step: int, steps_per_epoch: int, epoch_end: bool, total: int) -> bool:
    """Step checkpoints (the last step is final/, never a checkpoint)."""
    if step >= total or t.save_strategy == "no":
        return False
    if t.save_strategy == "epoch":
        return epoch_end
    every = per_epoch(t.saves_per_epoch, steps_per_epoch) or t.save_steps
    return bool(every) and step % every == 0
