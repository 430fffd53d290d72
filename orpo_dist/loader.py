"""This rank's batches: PairShards' schedule -> tokenised rows -> the layout's collator -> the device.

The order is a pure function of (seed, epoch, step), so a resumed run continues with exactly the pairs
the uninterrupted run would have trained on next. A `torch.utils.data.DataLoader` runs that schedule:
its batch sampler yields this rank's micro-batches ([(pair index, weight), ...]) in order, and with
`dataloader_num_workers` > 0 worker processes read and collate the next micro-batches while the current
step runs (in order; pinned memory and a non-blocking copy on CUDA). The time the loop still waits for
a batch is counted (`data_wait_seconds`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from orpo_dist.config import TrainConfig
from orpo_dist.distributed import data_parallel
from orpo_dist.preemption import ignore_in_worker


class PairShards:
    """Which pairs each rank trains on, step by step, epoch by epoch (deterministic from the seed).

    Step s of an epoch takes the next `global_batch` pairs of that epoch's permutation and deals them
    to the `world * accumulation` micro-batch slots; rank r owns slots r*accum .. r*accum+accum-1.
    So ranks see disjoint pairs, the union over ranks is the whole split, a pair's chosen and rejected
    stay together, and the global batch of a step does not depend on how it is split over ranks.
    A slot left empty by the ragged last step gets one filler pair with weight 0.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        accumulation: int,
        world: int,
        rank: int,
        seed: int,
        shuffle: bool = True,
        group_by_length: bool = False,
    ):
        self.lengths, self.batch_size, self.accumulation = lengths, batch_size, accumulation
        self.world, self.rank, self.seed = world, rank, seed
        self.shuffle, self.group_by_length = shuffle, group_by_length
        self.global_batch = batch_size * accumulation * world

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.global_batch)

    def order(self, epoch: int) -> list[int]:
        n = len(self.lengths)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
        if self.group_by_length:  # sort within blocks of 16 global batches: similar lengths share a step
            block = 16 * self.global_batch
            order = [
                i
                for s in range(0, n, block)
                for i in sorted(order[s : s + block], key=self.lengths.__getitem__)
            ]
            steps = [order[s : s + self.global_batch] for s in range(0, n, self.global_batch)]
            perm = torch.randperm(len(steps), generator=g).tolist()  # but visit the steps in random order
            order = [i for p in perm for i in steps[p]]
        return order

    def step_slots(self, pairs: list[int]) -> list[list[int]]:
        """Deal one step's pairs to all world*accum slots, round-robin (by length if grouping)."""
        slots_n = self.world * self.accumulation
        if self.group_by_length:
            pairs = sorted(pairs, key=self.lengths.__getitem__, reverse=True)
            # snake order: slot token counts stay balanced
            slots = [[] for _ in range(slots_n)]
            for i, p in enumerate(pairs):
                lap, j = divmod(i, slots_n)
                slots[j if lap % 2 == 0 else slots_n - 1 - j].append(p)
            return slots
        return [pairs[j::slots_n] for j in range(slots_n)]

    def micro_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, list[tuple[int, float]]]]:
        """Yield (step_in_epoch, [(pair_index, weight), ...]) for this rank's micro-batches."""
        order = self.order(epoch)
        for step in range(start_step, self.steps_per_epoch):
            pairs = order[step * self.global_batch : (step + 1) * self.global_batch]
            slots = self.step_slots(pairs)
            for micro in range(self.accumulation):
                slot = slots[self.rank * self.accumulation + micro]
                yield step, [(i, 1.0) for i in slot] if slot else [(pairs[0], 0.0)]


class PairRows:
    """The dataset as the DataLoader reads it: one micro-batch [(pair index, weight), ...] at a time."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, pairs: list[tuple[int, float]]) -> list[dict]:
        rows = self.dataset[[i for i, _ in pairs]]
        return [
            dict(
                id=rows["id"][j],
                prompt_ids=rows["prompt_ids"][j],
                chosen_ids=rows["chosen_ids"][j],
                rejected_ids=rows["rejected_ids"][j],
                weight=w,
            )
            for j, (_, w) in enumerate(pairs)
        ]


class MicroBatchSampler(Sampler):
    """This rank's micro-batches from (epoch, step) on, epoch after epoch (or one epoch: `once`)."""

    def __init__(self, shards: PairShards, epoch: int, start_step: int = 0, once: bool = False):
        self.shards, self.epoch, self.start_step, self.once = shards, epoch, start_step, once

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        epoch, step = self.epoch, self.start_step
        while True:
            for _, pairs in self.shards.micro_batches(epoch, step):
                yield pairs
            if self.once:
                return
            epoch, step = epoch + 1, 0


class PairLoader:
    def __init__(self, dataset, collate, shards: PairShards, device: torch.device, num_workers: int = 0):
        self.dataset, self.collate, self.shards, self.device = dataset, collate, shards, device
        self.num_workers = num_workers
        self.wait_seconds = 0.0  # waiting for the next step's batches, since the last take_wait_seconds

    def _batches(self, sampler: MicroBatchSampler) -> Iterator[dict[str, torch.Tensor]]:
        loader = DataLoader(
            PairRows(self.dataset),
            batch_sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=ignore_in_worker if self.num_workers else None,
        )
        for batch in loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def micro_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch's micro-batches from `start_step` (the eval pass)."""
        return self._batches(MicroBatchSampler(self.shards, epoch, start_step, once=True))

    def steps(
        self, epoch: int, step_in_epoch: int, global_step: int = 0
    ) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Each optimizer step's `accumulation` micro-batches, from (epoch, step_in_epoch) on, without end."""
        steps_per_epoch, accumulation = self.shards.steps_per_epoch, self.shards.accumulation
        if not 0 <= step_in_epoch < steps_per_epoch:
            raise ValueError(
                f"step_in_epoch={step_in_epoch} is outside the {steps_per_epoch} steps of an epoch"
            )
        micro = self._batches(MicroBatchSampler(self.shards, epoch, step_in_epoch))
        while True:
            start = time.perf_counter()
            batches = [next(micro) for _ in range(accumulation)]
            self.wait_seconds += time.perf_counter() - start
            global_step += 1
            trace_pairs(batches, self.shards.rank, self.shards.world, global_step)
            yield batches

    def take_wait_seconds(self) -> float:
        """Seconds spent waiting for batches since the last call."""
        seconds, self.wait_seconds = self.wait_seconds, 0.0
        return seconds


def trace_pairs(batches: list[dict], rank: int, world_size: int, step: int) -> None:
    """ORPO_DIST_TRACE_DIR=dir: each rank records the pair ids it trained on (for tests and audits)."""
    trace_dir = os.environ.get("ORPO_DIST_TRACE_DIR")
    if trace_dir:
        ids = [int(i) for b in batches for i, w in zip(b["ids"], b["pair_weight"]) if w > 0]
        row = {"rank": rank, "world_size": world_size, "step": step, "ids": ids}
        with open(Path(trace_dir) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def pair_lengths(dataset) -> np.ndarray:
    """Tokens of each pair's longer sequence (prompt + the longer completion): the `length` column only."""
    return dataset.select_columns(["length"]).with_format("numpy")[:]["length"]


def resolve_num_workers(num_workers: int | str, device: torch.device) -> int:
    """`auto`: 2 on CUDA; 0 on CPU, where workers take cores from the step itself."""
    if num_workers != "auto":
        return int(num_workers)
    return 2 if device.type == "cuda" else 0


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
    workers = resolve_num_workers(t.dataloader_num_workers, accelerator.device)
    train = PairLoader(train_ds, collate, shards, accelerator.device, workers)
    if eval_ds is None:
        return train, None
    eval_shards = PairShards(
        np.zeros(len(eval_ds), np.int32), t.eval_batch_size or t.batch_size, 1, *ranks, shuffle=False
    )
    return train, PairLoader(eval_ds, collate, eval_shards, accelerator.device, workers)
