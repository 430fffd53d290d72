"""Shared fixtures: a tokenizer and a tiny model made locally, loaded through `from_pretrained`.

Nothing here downloads: the hub is unreachable in CI and on developer machines.
"""

from __future__ import annotations

import os

import pytest
from helpers import OFFLINE_ENV

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
# Tiny models gain nothing from threads, and the multi-process tests put 2 ranks on 2 cores: one
# intra-op thread per process (inherited by launched subprocesses) avoids oversubscription stalls.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


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
