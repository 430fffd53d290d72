"""The CPU shim for FSDP (distributed._fsdp_on_cpu), on a stand-in accelerator: when it acts and when it
leaves accelerate's decision alone. The real 2-rank runs are tests/test_fsdp2.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType

from orpo_dist.distributed import _fsdp_on_cpu


@pytest.fixture
def fake(monkeypatch):
    """An accelerator as accelerate 1.16 leaves a torchrun-launched FSDP rank on a machine without CUDA."""
    for key, value in {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_RESHARD_AFTER_FORWARD": "false",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    saved = dict(PartialState._shared_state)
    state = SimpleNamespace(distributed_type=DistributedType.NO, fsdp_plugin=None)
    yield SimpleNamespace(state=state, num_processes=2, distributed_type=state.distributed_type)
    PartialState._shared_state.clear()
    PartialState._shared_state.update(saved)


def test_an_fsdp_launch_on_cpu_gets_fsdp_and_the_launch_plugin(fake):
    _fsdp_on_cpu(fake)
    assert fake.state.distributed_type == DistributedType.FSDP
    assert PartialState._shared_state["distributed_type"] == DistributedType.FSDP
    assert fake.state.fsdp_plugin.fsdp_version == 2 and fake.state.fsdp_plugin.reshard_after_forward is False


@pytest.mark.parametrize("case", ["no_fsdp_asked", "cuda", "not_connected", "already_ddp"])
def test_otherwise_accelerate_decides(fake, monkeypatch, case):
    if case == "no_fsdp_asked":
        monkeypatch.delenv("ACCELERATE_USE_FSDP")
    elif case == "cuda":  # a GPU machine: accelerate's own FSDP path, untouched
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    elif case == "not_connected":  # plain `python`: no process group
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    else:  # ACCELERATE_USE_CPU=true made it DDP: check_world_size refuses that loudly
        fake.distributed_type = fake.state.distributed_type = DistributedType.MULTI_CPU
    before = fake.state.distributed_type
    _fsdp_on_cpu(fake)
    assert fake.state.distributed_type == before and fake.state.fsdp_plugin is None
