"""`optim`: the objects transformers' Trainer builds for each name; checkpoint + resume with each that runs
on CPU (bit-exact continuation); the paged ones stop before training without CUDA."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import TINY_YAML, assert_one_error_line, launch_env, tiny_run

import orpo_dist
from orpo_dist.config import OPTIMIZERS as NAMES
from orpo_dist.config import ConfigError, load_config
from orpo_dist.optim import OPTIMIZERS, build_optimizer, check_optimizer

CPU_OPTIMIZERS = ["adamw_torch", "adamw_torch_fused", "adamw_8bit", "adafactor"]


@pytest.mark.parametrize("name", NAMES)
def test_same_objects_as_transformers_trainer(name, tmp_path):
    """Our table against transformers' own mapping (its Trainer.get_optimizer_cls_and_kwargs)."""
    pytest.importorskip("bitsandbytes")
    from transformers import Trainer, TrainingArguments
    from transformers.training_args import OptimizerNames

    assert name in {o.value for o in OptimizerNames}
    args = TrainingArguments(
        output_dir=str(tmp_path), optim=name, learning_rate=1e-3, report_to=[], use_cpu=True
    )
    want_cls, want_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    model = torch.nn.Linear(4, 4)
    cfg = load_config(None, {"optim": name, "lr": 1e-3, "weight_decay": 0.01})
    optimizer, _ = build_optimizer(cfg.train, model, total_steps=10)
    assert type(optimizer) is want_cls
    for key, value in want_kwargs.items():
        if key in ("optim_bits", "is_paged"):  # bitsandbytes keeps these on the optimizer
            got = optimizer.args.optim_bits if key == "optim_bits" else optimizer.is_paged
        else:
            got = optimizer.defaults[key]  # the constructor arguments (the schedule moves group lr)
        assert got == value, (key, got, value)
    assert optimizer.defaults["weight_decay"] == 0.01
    assert OPTIMIZERS[name][2] == {k: v for k, v in want_kwargs.items() if k != "lr"}


def _run(out, optim: str, **extra):
    return orpo_dist.train(tiny_run(out, optim=optim, max_steps=4, save_steps=2, lr=1e-2, **extra))


@pytest.mark.parametrize("optim", CPU_OPTIMIZERS)
def test_checkpoint_and_resume_continue_exactly(optim, tmp_path):
    """Steps 3-4 resumed from checkpoint-2 (weights, optimizer state, schedule, data position) equal the
    uninterrupted run's steps 3-4."""
    whole = _run(tmp_path / "whole", optim)
    resumed = _run(tmp_path / "resumed", optim, resume=str(tmp_path / "whole" / "checkpoint-2"))
    losses = {r["step"]: r["loss"] for r in whole.metrics if "loss" in r}
    again = {r["step"]: r["loss"] for r in resumed.metrics if "loss" in r}
    assert sorted(again) == [3, 4] and losses[3] != losses[1]
    assert again == {3: losses[3], 4: losses[4]}
    saved = torch.load(tmp_path / "whole" / "checkpoint-2" / "state" / "optimizer.bin", weights_only=True)
    state = [
        s.get("__bnb_optimizer_quant_state__", s) for s in saved["state"].values()
    ]  # bnb nests its state
    dtypes = {str(v.dtype) for s in state for k, v in s.items() if k in ("state1", "state2", "exp_avg")}
    if optim == "adamw_8bit":  # the moments of tensors >= 4096 elements really are 8-bit (bitsandbytes)
        assert dtypes == {"torch.uint8", "torch.float32"}
    elif optim == "adafactor":  # factored second moment: a row and a column vector per matrix
        assert any("exp_avg_sq_row" in s for s in state)
    else:
        assert dtypes == {"torch.float32"}


@pytest.mark.slow
def test_paged_optimizers_without_cuda_stop_before_training(tmp_path):
    optim = "paged_adamw_8bit"
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: paged optimizers run")
    with pytest.raises(
        ConfigError, match="optim=paged_adamw_32bit .* needs a CUDA GPU; use adamw_torch here"
    ):
        check_optimizer("paged_adamw_32bit")
    out = tmp_path / "never"
    cmd = [sys.executable, "-m", "orpo_dist.train", "--config", str(TINY_YAML), "--optimizer", optim,
           "--output_dir", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert_one_error_line(proc.stderr, f"optim={optim}", "needs a CUDA GPU")
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.parametrize("optim", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_paged_optimizers_resume_on_cuda(optim, tmp_path):  # pragma: no cover - GPU machine
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    whole = _run(tmp_path / "whole", optim)
    resumed = _run(tmp_path / "resumed", optim, resume=str(tmp_path / "whole" / "checkpoint-2"))
    losses = {r["step"]: r["loss"] for r in whole.metrics if "loss" in r}
    assert {r["step"]: r["loss"] for r in resumed.metrics if "loss" in r} == {3: losses[3], 4: losses[4]}


def test_optimizer_spellings():
    assert (
        load_config(None, ["--optimizer", "adamw_bnb_8bit"]).train.optim == "adamw_8bit"
    )  # AutoTrain / Axolotl
    assert load_config(None, {"optim": "adafactor"}).train.optim == "adafactor"  # TRL
