"""A real training run that records what tests/test_sequence_parallel.py compares.

    [accelerate launch ...] tests/sp_step.py OUT_DIR --config tests/configs/tiny.yaml [--key value ...]

Runs `orpo_dist.trainer.Trainer(cfg, preempt).train()` (the launch decides the world and the strategy), with two
taps that change nothing: the full gradient of every trainable parameter at the moment the first optimizer
step starts (after accumulation and the reduction over ranks; `deepspeed.utils.safe_get_full_grad` under
ZeRO, the gathered DTensor under FSDP2), the bytes of parameters, gradients and optimizer state this rank
holds, and the pair ids of every step's micro-batches. Each rank writes OUT_DIR/rank<r>.pt: its world size,
sequence-parallel size and place, data-parallel rank, pair ids per step, the tokens of its micro-batches,
the logged metric rows (rank 0) and the first step's gradients. Plain tensors and numbers only (read back
with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from orpo_dist.cli import parse
from orpo_dist.distributed import data_parallel
from orpo_dist.preemption import Preemption
from orpo_dist.sequence_parallel import slice_of
from orpo_dist.trainer import Trainer


def run(out: Path, argv: list[str]) -> dict:
    cfg, _ = parse(argv)
    with Preemption() as preempt:
        return _run(out, Trainer(cfg, preempt))


def _run(out: Path, trainer: Trainer) -> dict:
    accelerator = trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    engine_optimizer = getattr(trainer.model, "optimizer", None)  # DeepSpeed steps its ZeRO optimizer itself
    stepper = engine_optimizer if engine_optimizer is not None else trainer.optimizer
    grads: dict[str, torch.Tensor] = {}
    steps: list[dict] = []

    def full_grad(p: torch.nn.Parameter) -> torch.Tensor:
        if engine_optimizer is None:  # FSDP2: a DTensor shard of the reduced gradient
            return p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(p)

    def first_step_grads(original):
        def step(*args, **kwargs):
            if not grads and accelerator.sync_gradients:  # plain accelerate calls step on every micro-batch
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        grads[name] = full_grad(p).detach().float().clone().cpu()
                        held["grad"] += local_bytes(p.grad)
            return original(*args, **kwargs)

        return step

    def recorded(original):
        def optimizer_step(batches, window):
            ids = [int(i) for b in batches for i, w in zip(b["ids"], b["pair_weight"]) if w > 0]
            steps.append({"ids": sorted(ids), "tokens": [int(b["input_ids"].numel()) for b in batches]})
            return original(batches, window)

        return optimizer_step

    held = {"param": sum(local_bytes(p) for p in model.parameters()), "grad": 0}
    stepper.step = first_step_grads(stepper.step)
    trainer.optimizer_step = recorded(trainer.optimizer_step)
    result = trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    states = inner.state.values() if engine_optimizer is None else []
    held["optimizer"] = sum(local_bytes(v) for state in states for v in state.values())
    sp_rank, sp = slice_of(accelerator)
    record = {
        "world_size": accelerator.num_processes,
        "rank": accelerator.process_index,
        "sp": sp,
        "sp_rank": sp_rank,
        "dp": data_parallel(accelerator),
        "distributed": accelerator.distributed_type.value,
        "steps": steps,
        "rows": result.metrics,
        "grads": grads,
        "bytes": held,  # this rank's parameter / gradient / optimizer-state bytes (not DeepSpeed's)
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.save(record, out / f"rank{accelerator.process_index}.pt")
    return record


def local_bytes(t) -> int:
    """Bytes this rank holds of a tensor: its shard of an FSDP2 DTensor, else all of it."""
    if not isinstance(t, torch.Tensor):
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2:])
