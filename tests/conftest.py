"""Shared fixtures: a tokenizer and a tiny model made locally, loaded through `from_pretrained`.

Nothing here downloads: the hub is unreachable in CI and on developer machines.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import OFFLINE_ENV

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
# Tiny models gain nothing from threads, and the multi-process tests put 2 ranks on 2 cores: one
# intra-op thread per process (inherited by launched subprocesses) avoids oversubscription stalls.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed on CPU JIT-builds its shared-memory all-reduce op (torch cpp_extension) and takes a file lock,
# `<TORCH_EXTENSIONS_DIR>/<op>/lock`, on every load. A rank killed while it holds the lock (the kill,
# preemption and lost-rank tests kill ranks at any moment) leaves it behind, and every later DeepSpeed
# start then sleeps on it forever. So a test that launches DeepSpeed requests `deepspeed_op`: the op is
# built once per session before any such test can kill a builder, and a lock left behind is removed after
# each of them. Tests that never start DeepSpeed (the fast tier) never pay for the build.
EXTENSIONS = Path(
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "orpo_dist_torch_ext"))
)


def _remove_stale_extension_locks() -> None:
    for lock in EXTENSIONS.glob("*/lock"):
        lock.unlink(missing_ok=True)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def _deepspeed_cpu_op_built():
    _remove_stale_extension_locks()  # from an earlier session that was killed
    try:
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()
    except Exception:  # noqa: BLE001 - no DeepSpeed or no compiler: the DeepSpeed tests say so themselves
        pass


@pytest.fixture
def deepspeed_op(_deepspeed_cpu_op_built):
    """Request it (`pytest.mark.usefixtures("deepspeed_op")`) in a test that launches DeepSpeed ranks."""
    yield
    _remove_stale_extension_locks()


@pytest.fixture(scope="session")
def tokenizer():
    from orpo_dist.builtin import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`builtin:tiny` saved as an ordinary HF checkpoint (safetensors + tokenizer)."""
    from orpo_dist.builtin import save_builtin_model

    return save_builtin_model("builtin:tiny", tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    """The tiny model in float32, its random init nudged so per-token log-probs differ visibly."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()
