"""This rank's batches: PairShards' schedule -> tokenised rows -> the layout's collator -> the device.

The order is a pure function of (seed, epoch, step), so a resumed run continues with exactly the pairs
the uninterrupted run would have trained on next.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from orpo_dist.config import TrainConfig
from orpo_dist.distributed import PairShards, data_parallel


class PairLoader:
    def __init__(self, dataset, collate, shards: PairShards, device: torch.device):
        self.dataset, self.collate, self.shards, self.device = dataset, collate, shards, device

    def collate_pairs(self, pairs: list[tuple[int, float]]) -> dict[str, torch.Tensor]:
        """One micro-batch from [(pair index, weight), ...], on the device."""
        rows = self.dataset[[i for i, _ in pairs]]
        examples = [
            dict(
                id=rows["id"][j],
                prompt_ids=rows["prompt_ids"][j],
                chosen_ids=rows["chosen_ids"][j],
                rejected_ids=rows["rejected_ids"][j],
                weight=w,
            )
            for j, (_, w) in enumerate(pairs)
        ]
        return {k: v.to(self.device) for k, v in self.collate(examples).items()}

    def micro_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        for _, pairs in self.shards.micro_batches(epoch, start_step):
            yield self.collate_pairs(pairs)

    def steps(
        self, epoch: int, step_in_epoch: int, global_step: int = 0
    ) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Each optimizer step's `accumulation` micro-batches, from (epoch, step_in_epoch) on, without end."""
        steps_per_epoch, accumulation = self.shards.steps_per_epoch, self.shards.accumulation
        if not 0 <= step_in_epoch < steps_per_epoch:
            raise ValueError(
                f"step_in_epoch={step_in_epoch} is outside the {steps_per_epoch} steps of an epoch"
            )
        while True:
            micro = self.micro_batches(epoch, step_in_epoch)
            for _ in range(step_in_epoch, steps_per_epoch):
                batches = [next(micro) for _ in range(accumulation)]
                global_step += 1
                trace_pairs(batches, self.shards.rank, self.shards.world, global_step)
                yield batches
            epoch, step_in_epoch = epoch + 1, 0


def trace_pairs(batches: list[dict], rank: int, world_size: int, step: int) -> None:
    """ORPO_DIST_TRACE_DIR=dir: each rank records the pair ids it trained on (for tests and audits)."""
    trace_dir = os.environ.get("ORPO_DIST_TRACE_DIR")
    if trace_dir:
        ids = [int(i) for b in batches for i, w in zip(b["ids"], b["pair_weight"]) if w > 0]
        row = {"rank": rank, "world_size": world_size, "step": step, "ids": ids}
        with open(Path(trace_dir) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def pair_lengths(dataset) -> list[int]:
    """Tokens of each pair's longer sequence (prompt + the longer completion), for length grouping."""
    columns = zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])
    return [len(p) + max(len(c), len(r)) for p, c, r in columns]


def make_loaders(
    t: TrainConfig, train_ds, eval_ds, collate, accelerator
) -> tuple[PairLoader, PairLoader | None]:
    """The training stream (shuffled per epoch, optionally length-grouped) and the eval pass (in order)."""
    ranks = (*data_parallel(accelerator), t.seed)  # an SP group's ranks get the same pairs
    shards = PairShards(
        pair_lengths(train_ds),
        t.batch_size,
        t.gradient_accumulation,
        *ranks,
        group_by_length=t.group_by_length,
    )
    train = PairLoader(train_ds, collate, shards, accelerator.device)
    if eval_ds is None:
        return train, None
    eval_shards = PairShards([0] * len(eval_ds), t.eval_batch_size or t.batch_size, 1, *ranks, shuffle=False)
    return train, PairLoader(eval_ds, collate, eval_shards, accelerator.device)
