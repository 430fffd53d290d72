"""Numerical health: a non-finite loss or gradient norm stops the run before anything is saved;
divergence is warned about in the log.

The check costs nothing extra: the loss and the gradient norm are computed anyway, their finiteness
is kept as a tensor on the device (no sync per micro-batch), and the flags ride on the one collective
the loop already makes per step (`preemption.Preemption.check`). Every rank therefore stops after
the same step, before that step's checkpoint is written: the last checkpoint on disk holds finite
weights, and no `final/` is written. Under fp16 mixed precision a non-finite gradient norm is the
loss scaler's overflow signal (that step is skipped, the scale lowered), not a failure; a non-finite
loss still is.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from orpo_dist.config import Config
from orpo_dist.run_dir import complete_checkpoints

DIVERGENCE_FACTOR = 3.0  # loss above this multiple of its first logged value: warn
GRAD_NORM_WARN = 1e3  # a pre-clipping gradient norm above this usually precedes a blow-up


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN / inf: the run stopped without saving (exit 1)."""


def non_finite(loss: torch.Tensor, grad_norm, grads_may_overflow: bool) -> torch.Tensor:
    """[loss not finite, grad norm not finite] as floats on the loss's device, for the step's collective."""
    grad_bad = torch.zeros((), device=loss.device)
    if grad_norm is not None and not grads_may_overflow:
        grad_bad = (~torch.isfinite(torch.as_tensor(grad_norm, dtype=torch.float32))).float().to(loss.device)
    return torch.stack([(~torch.isfinite(loss.detach().float())).float(), grad_bad])


class Health:
    """Divergence warnings from the logged rows, and the message for a non-finite step."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.first_loss: float | None = None
        self.warned: set[str] = set()

    def watch(self, row: dict) -> list[str]:
        """Warnings for a logged training row (each kind once per run)."""
        loss, grad_norm, out = row.get("loss"), row.get("grad_norm"), []
        if self.first_loss is None and loss is not None and math.isfinite(loss):
            self.first_loss = loss
        first = self.first_loss
        if first is not None and first > 0 and loss is not None and loss > DIVERGENCE_FACTOR * first:
            out += self._once("loss", f"loss {loss:.4g} at step {row['step']} is above {DIVERGENCE_FACTOR:g}x "
                                      f"its first logged value {first:.4g}: the run may be diverging "
                                      f"(lr={self.cfg.train.lr:g}; lower it, or raise warmup_ratio)")  # fmt: skip
        if grad_norm is not None and grad_norm > GRAD_NORM_WARN:
            out += self._once("grad_norm", f"grad_norm {grad_norm:.4g} at step {row['step']} is above "
                                           f"{GRAD_NORM_WARN:g}: the run may be diverging "
                                           f"(lr={self.cfg.train.lr:g}, max_grad_norm={self.cfg.train.max_grad_norm:g})")  # fmt: skip
        return out

    def _once(self, kind: str, message: str) -> list[str]:
        if kind in self.warned:
            return []
        self.warned.add(kind)
        return [f"warning: {message}"]

    def error(self, step: int, loss_bad: bool, output_dir: Path) -> NonFiniteError:
        """The one-line stop message: what, where, the likely causes, what was kept."""
        t, done = self.cfg.train, complete_checkpoints(output_dir)
        last_checkpoint = str(done[-1]) if done else "none (none was saved yet)"
        what = "loss" if loss_bad else "gradient norm"
        causes = []
        if t.mixed_precision == "fp16" or self.cfg.model.dtype == "float16":
            causes.append("fp16 overflow (use bf16, or mixed_precision: no)")
        if step <= 1:
            causes.append("bad data or a broken model/dtype (no update has been made yet, so not the lr)")
        else:
            diverged = "loss" in self.warned or "grad_norm" in self.warned
            lr = f"lr too high (lr={t.lr:g}: try it 3-10x lower, or more warmup)"
            data = "bad data (ORPO_DIST_TRACE_DIR=<dir> lists each step's pairs)"
            causes += [lr, data] if diverged or not causes else [data, lr]
        return NonFiniteError(
            f"non-finite {what} at step {step}: likely {'; or '.join(causes)}. Stopped without saving this step; "
            f"the last good checkpoint is {last_checkpoint} (fix the cause, then --resume auto); no final/ was written"
        )
