"""Which checkpoints resume on another number of ranks (resume.check_settings; fast, nothing launched).
The runs themselves are tests/test_fsdp2.py (FSDP2 2->4 and 4->2) and tests/test_multiprocess_faults.py
(another global batch refused) and tests/test_elastic_zero.py (ZeRO 2->1, 2->4, 1->2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orpo_dist.config import ConfigError
from orpo_dist.resume import Fingerprint, ResumePoint, check_settings


def point(**saved) -> ResumePoint:
    return ResumePoint(Path("/ckpt/checkpoint-4"), {"progress": {"global_step": 4}}, fingerprint(**saved))


def fingerprint(**values) -> Fingerprint:
    base = dict(global_batch=8, world_size=2, per_device_batch=2, gradient_accumulation=2, seed=7,
                strategy="FSDP", model="m", adapter="full")  # fmt: skip
    return Fingerprint(**{**base, **values})


@pytest.mark.parametrize("strategy", ["FSDP", "DEEPSPEED"])
@pytest.mark.parametrize(("world", "batch", "accumulation"), [(4, 1, 2), (1, 4, 2), (8, 1, 1), (2, 1, 4)])
def test_a_sharded_checkpoint_continues_on_another_split_of_the_same_global_batch(
    strategy, world, batch, accumulation
):
    """FSDP: DCP reshards on load. ZeRO: converted to DeepSpeed's universal checkpoint (elastic.py)."""
    now = fingerprint(
        strategy=strategy, world_size=world, per_device_batch=batch, gradient_accumulation=accumulation
    )
    check_settings(point(strategy=strategy), now)  # no error


@pytest.mark.parametrize(
    ("saved", "now"), [("DEEPSPEED", "MULTI_CPU"), ("FSDP", "DEEPSPEED"), ("MULTI_CPU", "FSDP")]
)
def test_another_strategy_is_refused(saved, now):
    with pytest.raises(ConfigError, match=f"strategy {saved} -> {now}"):
        check_settings(point(strategy=saved), fingerprint(strategy=now))


def test_fsdp_checkpoint_on_one_plain_process_is_refused():
    with pytest.raises(ConfigError, match="strategy FSDP -> NO"):
        check_settings(point(), fingerprint(strategy="NO", world_size=1, per_device_batch=4))


def test_fsdp_with_another_global_batch_seed_or_model_is_refused_with_every_value():
    now = fingerprint(world_size=4, global_batch=16, seed=8, model="other")
    with pytest.raises(ConfigError) as e:
        check_settings(point(), now)
    for needle in ("global_batch 8 -> 16", "seed 7 -> 8", "model m -> other"):
        assert needle in str(e.value)
