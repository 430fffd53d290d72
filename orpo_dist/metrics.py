"""Metrics: sums over a logging window, reduced over ranks when logged, written by rank 0.

Metrics are averaged over all ranks (sums all-reduced, then divided), never rank 0's shard. Each
logged row goes to `<output_dir>/metrics.jsonl` (always) and to the tracker (`log: wandb|tensorboard`).
The per-pair metric names are loss.PAIR_METRICS; `nll_loss` and `loss` are derived from the sums.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator

from orpo_dist.config import Config
from orpo_dist.distributed import all_sum
from orpo_dist.loss import PAIR_METRICS, OrpoParts


def step_sums(parts: OrpoParts, batch: dict, beta: float) -> dict[str, torch.Tensor]:
    """What one micro-batch adds to a window: per-pair metric sums plus the loss sums and counts."""
    return {
        **parts.metric_sums(beta),
        "nll_sum": parts.nll_sum.detach(),
        "nll_tokens": parts.nll_tokens,
        "or_sum": parts.or_sum.detach(),
        "pairs": parts.pairs,
        "num_tokens": batch["num_tokens"].float(),
    }


class MetricWindow:
    """Sums over a logging window, reduced over ranks only when logged."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()

    def reduce(self, accelerator: Accelerator, beta: float, prefix: str = "") -> dict[str, float]:
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
        out[f"{prefix}loss"] = out[f"{prefix}nll_loss"] + beta * s["or_sum"] / pairs
        out[f"{prefix}num_tokens"] = s["num_tokens"]
        return out


class MetricsLog:
    """Rank 0 appends each row to metrics.jsonl (rounded to 6 decimals) and sends it to the tracker."""

    def __init__(self, accelerator: Accelerator, cfg: Config):
        self.accelerator, self.cfg = accelerator, cfg
        self.path = Path(cfg.train.output_dir) / "metrics.jsonl"
        self.rows: list[dict] = []
        if accelerator.is_main_process and cfg.train.log != "none":
            _init_tracker(accelerator, cfg)

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

    def log_train(self, window: MetricWindow, beta: float, seconds: float, **fields) -> dict:
        """Reduce a training window into a row (with tokens/s over `seconds` and the given fields), write it."""
        row = window.reduce(self.accelerator, beta)
        row["tokens_per_second"] = row.pop("num_tokens") / max(seconds, 1e-9)
        row.update(
            {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in fields.items() if v is not None}
        )
        self.write(row)
        return row

    def write(self, row: dict) -> None:
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        if self.accelerator.is_main_process:
            self.rows.append(row)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if self.cfg.train.log != "none":
                self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


def _init_tracker(accelerator: Accelerator, cfg: Config) -> None:
    if cfg.train.log == "wandb" and not os.environ.get("WANDB_API_KEY") and not _wandb_logged_in():
        os.environ.setdefault("WANDB_MODE", "offline")
        print(
            "[orpo_dist] wandb: no API key found; logging offline to ./wandb (sync later with `wandb sync`)",
            flush=True,
        )
    init_kwargs = (
        {"wandb": {"name": cfg.train.run_name, "dir": cfg.train.output_dir}}
        if cfg.train.log == "wandb"
        else {}
    )
    accelerator.init_trackers(cfg.train.wandb_project, config=_flat_config(cfg), init_kwargs=init_kwargs)


def _wandb_logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text()


def _flat_config(cfg: Config) -> dict:
    return {
        k: v
        for section in cfg.to_dict().values()
        for k, v in section.items()
        if isinstance(v, (int, float, str, bool)) or v is None
    }
