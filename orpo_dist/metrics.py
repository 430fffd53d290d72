"""Metrics: sums over a logging window, reduced over ranks when logged, written by rank 0.

Metrics are averaged over all ranks (sums all-reduced, then divided), never rank 0's shard. Each
logged row goes to `<output_dir>/metrics.jsonl` (always) and to the tracker (`log: wandb|tensorboard`,
trackers.py, under TRL's `train/...` / `eval/...` names). The per-pair metric names are
loss.PAIR_METRICS; `nll_loss` and `loss` are derived from the sums. Training rows also carry
`train_runtime` (seconds since this process started training) and `peak_memory_gb` (rank 0: CUDA
peak allocated, else the process's peak RSS), which the report (report.py) reads.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from orpo_dist.config import Config
from orpo_dist.distributed import all_sum
from orpo_dist.loss import PAIR_METRICS, OrpoParts, orpo_loss
from orpo_dist.throughput import FlopsModel
from orpo_dist.trackers import Tracker

# metrics of the machine and the moment, not of the training: never equal in two runs of the same steps
WALL_CLOCK_KEYS = frozenset(
    {
        "tokens_per_second",
        "data_wait_seconds",
        "mfu",
        "train_runtime",
        "peak_memory_gb",
        "eval_sample_seconds",
    }
)


def step_sums(parts: OrpoParts, batch: dict, beta: float) -> dict[str, torch.Tensor]:
    """What one micro-batch adds to a window: per-pair metric sums plus the loss sums and counts."""
    return {
        **parts.metric_sums(beta),
        "nll_sum": parts.nll_sum.detach(),
        "nll_tokens": parts.nll_tokens,
        "or_sum": parts.or_sum.detach() * parts.share,
        "pairs": parts.pairs * parts.share,
        "num_tokens": batch["num_tokens"].float(),
    }


class MetricWindow:
    """Sums over a logging window, reduced over ranks only when logged. `beta` is the run's ORPO beta."""

    def __init__(self, beta: float):
        self.beta = beta
        self.sums: dict[str, torch.Tensor] = {}

    def add_step(self, parts: OrpoParts, batch: dict) -> None:
        """Add one micro-batch's ORPO sums."""
        self.add(step_sums(parts, batch, self.beta))

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()

    def reduce(self, accelerator: Accelerator, prefix: str = "") -> dict[str, float]:
        """Means over every pair (and NLL token) of the window on every rank; resets the window."""
        keys = sorted(self.sums)
        total = all_sum(
            accelerator, torch.stack([torch.as_tensor(self.sums[k]).to(accelerator.device) for k in keys])
        )
        s = dict(zip(keys, total.tolist()))
        self.sums = {}
        pairs = max(s["pairs"], 1.0)
        out = {f"{prefix}{k}": s[k] / pairs for k in PAIR_METRICS}
        out[f"{prefix}nll_loss"] = s["nll_sum"] / max(s["nll_tokens"], 1.0)
        out[f"{prefix}loss"] = orpo_loss(
            s["nll_sum"], max(s["nll_tokens"], 1.0), s["or_sum"], pairs, self.beta
        )
        out[f"{prefix}num_tokens"] = s["num_tokens"]
        if "data_wait_seconds" in s:  # per rank: the mean over ranks
            out["data_wait_seconds"] = s["data_wait_seconds"] / accelerator.num_processes
        return out

    def preview(self) -> dict[str, str]:
        """This rank's running loss and preference accuracy over the window so far (the progress bar)."""
        s = {k: float(v) for k, v in self.sums.items() if k in ("nll_sum", "nll_tokens", "or_sum", "pairs")}
        pairs = max(s["pairs"], 1.0)
        loss = orpo_loss(s["nll_sum"], max(s["nll_tokens"], 1.0), s["or_sum"], pairs, self.beta)
        return {"loss": f"{loss:.4f}", "accuracy": f"{float(self.sums['rewards/accuracies']) / pairs:.2f}"}


class MetricsLog:
    """Rank 0 appends each row to metrics.jsonl (rounded to 6 decimals) and sends it to the tracker."""

    def __init__(self, accelerator: Accelerator, cfg: Config, flops: FlopsModel | None = None):
        self.accelerator, self.cfg, self.flops = accelerator, cfg, flops
        self.path = Path(cfg.train.output_dir) / "metrics.jsonl"
        self.rows: list[dict] = []
        self.started = time.perf_counter()
        self.tokens_trained = 0.0  # every rank's tokens in the windows logged by this process, for the end line
        self.tracker = (
            Tracker(accelerator, cfg) if accelerator.is_main_process and cfg.train.log != "none" else None
        )

    def start(self, resumed_step: int | None) -> None:
        """metrics.jsonl holds each step once. A resume keeps only the rows up to its checkpoint's step (the
        rest is retrained and logged again; a line torn by a kill is dropped); a fresh start moves an
        earlier run's file aside to metrics.previous.jsonl."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return
        if resumed_step is None:
            aside = self.path.with_name("metrics.previous.jsonl")
            os.replace(self.path, aside)
            print(f"[orpo_dist] an earlier run's {self.path.name} moved to {aside}", flush=True)
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= resumed_step:
                kept.append(line + "\n")
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text("".join(kept))
        os.replace(partial, self.path)

    def log_train(self, window: MetricWindow, seconds: float, data_wait: float, **fields) -> dict:
        """Reduce a training window into a row (tokens/s and mfu over `seconds`, the seconds this rank
        waited for data, and the given fields), write it."""
        window.add({"data_wait_seconds": torch.tensor(data_wait)})
        row = window.reduce(self.accelerator)
        tokens = row.pop("num_tokens")
        self.tokens_trained += tokens
        row["tokens_per_second"] = tokens / max(seconds, 1e-9)
        if self.flops is not None:  # GPU only
            row["mfu"] = self.flops.mfu(row["tokens_per_second"], self.accelerator.num_processes)
        row.update(
            {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in fields.items() if v is not None}
        )
        row["train_runtime"] = time.perf_counter() - self.started
        row["peak_memory_gb"] = _peak_memory_gb(self.accelerator.device)
        self.write(row)
        return row

    def write(self, row: dict) -> None:
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        if self.accelerator.is_main_process:
            self.rows.append(row)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tracker is not None:
                self.tracker.log(row)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
