"""GPU-only paths. Run on a CUDA machine with `pytest -m gpu` (scripts/gpu_checks.sh does it);
skipped with the reason everywhere else, so the CPU suite stays honest about what it covers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, orpo_forward, tiny_run

import orpo_dist

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu_checks.sh there)"
    ),
]
RUN = dict(model="builtin:small", max_samples=256, max_steps=6, batch_size=8, gradient_accumulation=1, lr=1e-3,
           eval_split=0.125, save_steps=3, mixed_precision="bf16")  # fmt: skip


def test_qlora_int4_on_cuda_trains_with_bf16_compute(tmp_path):
    import bitsandbytes  # noqa: F401  (the GPU image must carry it)

    result = orpo_dist.train(tiny_run(tmp_path, **RUN, peft=True, quantization="int4"))
    losses = [r["loss"] for r in result.metrics if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert (result.final_dir / "adapter_model.safetensors").exists()


def test_flash_or_sdpa_attention_matches_eager_logps(tmp_path):
    from transformers import AutoModelForCausalLM

    from orpo_dist.builtin import build_tokenizer, save_builtin_model
    from orpo_dist.layouts import PaddedCollator

    path = save_builtin_model("builtin:small", tmp_path / "m")
    tok = build_tokenizer()
    ex = [
        dict(
            id=i,
            prompt_ids=tok(f"Write in capitals: w{i}\n")["input_ids"],
            chosen_ids=[30 + i, 2],
            rejected_ids=[40, 41, 2],
        )
        for i in range(4)
    ]
    batch = {k: v.cuda() for k, v in PaddedCollator(tok.pad_token_id)(ex).items()}
    out = {}
    for impl in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, attn_implementation=impl
        ).cuda()
        with torch.no_grad():
            out[impl] = orpo_forward(model, batch, 64).chosen_logps.float()
    torch.testing.assert_close(out["sdpa"], out["eager"], atol=2e-2, rtol=2e-2)


def test_fsdp2_one_process_wraps_saves_and_loads(tmp_path):
    """FSDP2 on one CUDA process: wrapping, saving, loading (2-rank CPU runs are tests/test_fsdp2.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/fsdp2.yaml"),
        "--num_processes", "1", "-m", "orpo_dist.train", "--model", "builtin:small", "--max_samples", "128",
        "--max_steps", "4", "--save_steps", "2", "--output_dir", str(tmp_path), "--eval_split", "0",
        "--max_length", "64", "--max_prompt_length", "48", "--batch_size", "4",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed=FSDP" in proc.stdout
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    resumed = subprocess.run(cmd + ["--max_steps", "6", "--resume", "latest"], env=env, capture_output=True,
                             text=True, timeout=600, cwd=REPO)  # fmt: skip
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]


def test_liger_kernels_match_the_plain_model(tmp_path):
    pytest.importorskip("liger_kernel", reason="pip install liger-kernel")
    from transformers import AutoModelForCausalLM

    from orpo_dist.builtin import build_tokenizer, save_builtin_model
    from orpo_dist.layouts import PaddedCollator
    from orpo_dist.modeling import apply_fused_kernels

    path = save_builtin_model("builtin:small", tmp_path / "m")
    tok = build_tokenizer()
    ex = [dict(id=i, prompt_ids=tok(f"Write in capitals: w{i}\n")["input_ids"], chosen_ids=[30 + i, 2],
               rejected_ids=[40, 41, 2]) for i in range(4)]  # fmt: skip
    batch = {k: v.cuda() for k, v in PaddedCollator(tok.pad_token_id)(ex).items()}
    out = {}
    for mode in ("none", "liger"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
        assert apply_fused_kernels(model, mode) == mode
        parts = orpo_forward(model, batch, 64)
        parts.loss(0.1).backward()
        out[mode] = (parts.chosen_logps.float().detach(), model.lm_head.weight.grad.float())
    torch.testing.assert_close(out["liger"][0], out["none"][0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out["liger"][1], out["none"][1], atol=2e-2, rtol=5e-2)


def test_prefetching_workers_and_mfu_on_cuda(tmp_path):
    """On CUDA the loader collates in 2 workers into pinned memory by default: same losses as no workers; and
    every training row carries mfu (a fraction of the GPU's bf16 peak) and data_wait_seconds."""
    runs = {w: orpo_dist.train(tiny_run(tmp_path / str(w), **RUN, save_steps=None, dataloader_num_workers=w))
            for w in ("auto", 0)}  # fmt: skip
    rows = {w: [r for r in result.metrics if "loss" in r] for w, result in runs.items()}
    assert [r["loss"] for r in rows["auto"]] == [r["loss"] for r in rows[0]]
    name = torch.cuda.get_device_name()
    for r in rows["auto"]:
        assert r["data_wait_seconds"] >= 0
        if any(gpu in name for gpu in ("H100", "H200", "A100", "B200", "L4")):
            assert 0 < r["mfu"] < 1, r
