"""Preemption: SIGUSR1 (SLURM's warning before the time limit) or SIGTERM (scancel, a Kubernetes eviction)
stops a run at the next step boundary, with a checkpoint, on every rank at once.

A signal reaches ranks at different moments: `Preemption.check` all-reduces the flag once per step, so every
rank stops after the same step (a rank that stopped alone would hang the others). The command line starts
recording signals before torch is imported (`record_early`), so this module imports nothing heavy at the
top; a DataLoader worker leaves the signals to the main process (`ignore_in_worker`).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

log = logging.getLogger("orpo_dist")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def record_early() -> tuple[Callable[[], bool], dict]:
    """Record a stop signal from the very start, so one that arrives while torch is still importing or the
    model loading stops the run at its first step boundary with exit 3 (not signal death). Returns
    (was one received, the previous handlers to restore)."""
    got: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in STOP_SIGNALS}
    return (lambda: bool(got)), previous


def ignore_in_worker(_: int = 0) -> None:
    """A DataLoader worker's init: a stop signal (sent to every process) is the main process's to handle:
    it finishes the step and checkpoints. A worker killed by it would abort the step instead."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Preemption:
    """SIGUSR1 (SLURM's warning before the time limit) or SIGTERM: stop and save at the next step boundary.

    Installed before anything slow starts (`already` reports a signal the command line caught even
    earlier), so a signal during start-up stops the run at its first step boundary, exit 3.
    """

    def __init__(self, already: Callable[[], bool] | None = None):
        self.already, self.requested = already, False  # not entered (a benchmark): no handlers, never stops

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        self.requested = self.requested or bool(self.already and self.already())
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():  # a Python-API caller gets its handlers back
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("received signal %s: will checkpoint after this step and exit", signum)

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank once any rank got a signal (a collective: call it on every rank, every step)."""
        return self.check(accelerator)[0]

    def check(self, accelerator: Accelerator, flags: torch.Tensor | None = None) -> tuple[bool, ...]:
        """(stop requested on any rank, *each flag set on any rank): the step's one collective, which also
        carries the numerical-health flags (health.non_finite) so every rank stops after the same step."""
        import torch  # here, not at the top: the command line imports this module before torch (see above)

        from orpo_dist.distributed import all_sum

        values = torch.tensor([float(self.requested)], device=accelerator.device)
        if flags is not None:
            values = torch.cat([values, flags.to(accelerator.device, torch.float32)])
        return tuple(v > 0 for v in all_sum(accelerator, values).tolist())
