"""The optimizer over the trainable parameters, and the learning-rate schedule from transformers."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from orpo_dist.config import TrainConfig


def build_optimizer(t: TrainConfig, model: torch.nn.Module, total_steps: int):
    """(optimizer, scheduler). The scheduler is stepped by hand once per optimizer step: passed to
    accelerate's prepare() it would be stepped once per process."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = get_scheduler(
        t.scheduler,
        optimizer,
        num_warmup_steps=int(t.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    return optimizer, scheduler
