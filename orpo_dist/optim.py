"""The optimizer over the trainable parameters, and the learning-rate schedule from transformers.

`optim` takes transformers' `OptimizerNames` spellings and builds the same objects its Trainer builds
(`Trainer.get_optimizer_cls_and_kwargs`; tests/test_optim.py checks they agree): torch AdamW (fused),
bitsandbytes' 8-bit / paged AdamW, transformers' Adafactor. Weight decay applies to every trainable
parameter, as before this key existed, so `adamw_torch` gives exactly the numbers it always gave.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from transformers import get_scheduler

from orpo_dist.config import ConfigError, TrainConfig

ADAM = {"betas": (0.9, 0.999), "eps": 1e-8}
# name -> (module, class, kwargs): what transformers' Trainer builds for the name
OPTIMIZERS = {
    "adamw_torch": ("torch.optim", "AdamW", ADAM),
    "adamw_torch_fused": ("torch.optim", "AdamW", {**ADAM, "fused": True}),
    "adamw_8bit": ("bitsandbytes.optim", "AdamW", {**ADAM, "optim_bits": 8, "is_paged": False}),
    "paged_adamw_8bit": ("bitsandbytes.optim", "AdamW", {**ADAM, "optim_bits": 8, "is_paged": True}),
    "paged_adamw_32bit": ("bitsandbytes.optim", "AdamW", {**ADAM, "optim_bits": 32, "is_paged": True}),
    "adafactor": (
        "transformers.optimization",
        "Adafactor",
        {"scale_parameter": False, "relative_step": False},
    ),
}


def check_optimizer(name: str) -> None:
    """Before anything is loaded: the optimizer can run here (ConfigError naming the fix otherwise)."""
    module = OPTIMIZERS[name][0]
    if module.startswith("bitsandbytes") and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"optim={name} needs bitsandbytes: pip install bitsandbytes (or use adamw_torch)")
    if name.startswith("paged_") and not torch.cuda.is_available():
        raise ConfigError(
            f"optim={name} pages optimizer state between GPU and CPU memory and needs a CUDA GPU; "
            f"use {name.removeprefix('paged_').replace('adamw_32bit', 'adamw_torch')} here"
        )


def build_optimizer(t: TrainConfig, model: torch.nn.Module, total_steps: int):
    """(optimizer, scheduler). The scheduler is stepped by hand once per optimizer step: passed to
    accelerate's prepare() it would be stepped once per process."""
    params = [p for p in model.parameters() if p.requires_grad]
    module, cls, kwargs = OPTIMIZERS[t.optim]
    optimizer_cls = getattr(importlib.import_module(module), cls)
    optimizer = optimizer_cls(params, lr=t.lr, weight_decay=t.weight_decay, **kwargs)
    try:
        scheduler = get_scheduler(
            t.scheduler,
            optimizer,
            num_warmup_steps=warmup_steps(t, total_steps),
            num_training_steps=total_steps,
            scheduler_specific_kwargs=t.lr_scheduler_kwargs or None,
        )
    except (TypeError, ValueError) as e:  # `min_lr` on a linear schedule, cosine_with_min_lr without one
        raise ConfigError(f"scheduler={t.scheduler} lr_scheduler_kwargs={t.lr_scheduler_kwargs}: {e}") from None
    return optimizer, scheduler


def warmup_steps(t: TrainConfig, total_steps: int) -> int:
    """transformers 5: `warmup_steps` >= 1 is a count, below 1 a fraction of the steps (rounded up);
    unset, `warmup_ratio` of the steps."""
    if t.warmup_steps is not None:
        return int(t.warmup_steps) if t.warmup_steps >= 1 else math.ceil(t.warmup_steps * total_steps)
    return int(t.warmup_ratio * total_steps)


def describe_optimizer(t: TrainConfig, optimizer, total_steps: int) -> str:
    cls = type(optimizer)
    warmup = warmup_steps(t, total_steps)
    return (
        f"optimizer {t.optim} ({cls.__module__.split('.')[0]} {cls.__name__}, lr {t.lr:g}, weight_decay "
        f"{t.weight_decay:g}); scheduler {t.scheduler}, {warmup} warmup of {total_steps} steps"
    )
