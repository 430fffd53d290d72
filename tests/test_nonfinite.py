"""Non-finite numbers never become a model: every float setting is checked, a NaN / inf loss or gradient norm
stops the run (exit 1, one line, the last good checkpoint kept, no final/), divergence is warned about, and
float16 master weights are refused."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import OFFLINE_ENV, REPO, assert_one_error_line, tiny_run
from safetensors.torch import load_file

import orpo_dist
from orpo_dist.config import SECTIONS, ConfigError, load_config
from orpo_dist.health import GRAD_NORM_WARN, Health, NonFiniteError, non_finite
from orpo_dist.loss import OrpoParts
from orpo_dist.run_dir import complete_checkpoints

FLOAT_KEYS = [
    f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls) if f.type in (float, "float")
]
RUN = dict(max_steps=8, save_steps=2, save_total_limit=None, logging_steps=1)


def test_every_float_setting_is_known():
    assert {"lr", "beta", "max_grad_norm", "epochs", "warmup_ratio", "weight_decay", "lora_dropout",
            "eval_split"} <= set(FLOAT_KEYS)  # fmt: skip


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e39", "-3.5e38"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_setting_must_be_finite(key, value):
    for overrides in ([f"--{key}", value], {key: value}, {key: float(value)}):
        with pytest.raises(ConfigError, match=f"{key}=.* must be a finite number") as e:
            load_config(None, overrides)
        assert str(e.value).count(f"{key}=") == 1, str(e.value)  # one problem per key, not two


def test_yaml_infinity_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: .inf\nbeta: .nan\nepochs: -.inf\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    for key in ("lr=inf", "beta=nan", "epochs=-inf"):
        assert key in str(e.value)


def _nan_from(step: int, what: str, monkeypatch):
    """From optimizer step `step` on, the loss (or only the gradient norm) is NaN / inf."""
    from accelerate import Accelerator

    calls = {"steps": 0}
    real_loss, real_clip = OrpoParts.loss, Accelerator.clip_grad_norm_

    def loss(self, *args, **kwargs):
        value = real_loss(self, *args, **kwargs)
        return value * float("nan") if what == "loss" and calls["steps"] + 1 >= step else value

    def clip(self, *args, **kwargs):
        calls["steps"] += 1
        norm = real_clip(self, *args, **kwargs)
        return norm * float("inf") if what == "grad_norm" and calls["steps"] >= step else norm

    monkeypatch.setattr(OrpoParts, "loss", loss)
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip)


@pytest.mark.parametrize(("what", "step"), [("loss", 5), ("grad_norm", 3), ("loss", 1)])
def test_a_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, what, step
):
    _nan_from(step, what, monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError) as e:
        orpo_dist.train(tiny_run(out, **RUN))
    msg = str(e.value)
    assert (
        f"non-finite {'loss' if what == 'loss' else 'gradient norm'} at step {step}:" in msg
        and "\n" not in msg
    )
    assert "no final/ was written" in msg and not (out / "final").exists()
    kept = [p.name for p in complete_checkpoints(out)]
    assert kept == [
        f"checkpoint-{s}" for s in range(2, step, 2)
    ]  # every save before the bad step, none after
    assert not list(out.glob(".checkpoint-*"))
    if kept:
        assert f"the last good checkpoint is {out / kept[-1]}" in msg
        weights = load_file(out / kept[-1] / "model" / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())
    else:
        assert "none was saved yet" in msg and "not the lr" in msg  # step 1: no update made yet
    # the stopped run's checkpoint resumes (after the cause is fixed)
    if kept:
        monkeypatch.undo()
        again = orpo_dist.train(tiny_run(out, **RUN, resume="auto"))
        assert again.global_step == 8 and (out / "final").is_dir()


@pytest.mark.slow
def test_the_command_line_exits_1_with_one_line(tmp_path):
    script = f"""
import sys
from orpo_dist.loss import OrpoParts
real = OrpoParts.loss
OrpoParts.loss = lambda self, *a, **k: real(self, *a, **k) * float("nan")
from orpo_dist.cli import main
sys.exit(main(["--config", {str(REPO / "tests/configs/tiny.yaml")!r}, "--output_dir", {str(tmp_path / "out")!r}]))
"""
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert_one_error_line(proc.stderr, "non-finite loss at step 1")
    assert not (tmp_path / "out" / "final").exists()


def test_fp16_loss_scaling_overflow_is_a_skipped_step_not_a_failure():
    loss = torch.tensor(2.0)
    assert non_finite(loss, torch.tensor(float("inf")), grads_may_overflow=True).tolist() == [0.0, 0.0]
    assert non_finite(loss, torch.tensor(float("inf")), grads_may_overflow=False).tolist() == [0.0, 1.0]
    assert non_finite(loss * float("nan"), 1.5, grads_may_overflow=True).tolist() == [1.0, 0.0]
    assert non_finite(loss, None, grads_may_overflow=False).tolist() == [0.0, 0.0]  # DeepSpeed before a step


def test_divergence_is_warned_once_per_kind():
    health = Health(load_config(None, {"lr": 1e-3}))
    assert health.watch({"step": 1, "loss": 2.0, "grad_norm": 1.0}) == []
    assert health.watch({"step": 2, "loss": 5.9, "grad_norm": 1.0}) == []  # below 3x
    warned = health.watch({"step": 3, "loss": 6.5, "grad_norm": 2 * GRAD_NORM_WARN})
    assert len(warned) == 2 and "loss 6.5 at step 3 is above 3x its first logged value 2" in warned[0]
    assert "lr=0.001" in warned[0] and f"grad_norm {2 * GRAD_NORM_WARN:g}" in warned[1]
    assert health.watch({"step": 4, "loss": 9.0, "grad_norm": 3 * GRAD_NORM_WARN}) == []
    # the stop message then names the learning rate first
    assert "likely lr too high" in str(health.error(9, True, REPO / "nonexistent"))
    fp16 = Health(load_config(None, {"mixed_precision": "fp16"}))
    assert "fp16 overflow" in str(fp16.error(4, True, REPO / "nonexistent"))


def test_a_diverging_run_is_warned_about_in_the_log(tmp_path, monkeypatch, capsys):
    from orpo_dist.metrics import MetricsLog

    real = MetricsLog.log_train

    def rising(self, *args, **fields):
        row = real(self, *args, **fields)
        row["loss"] *= 4.0 if fields["step"] >= 3 else 1.0
        return row

    monkeypatch.setattr(MetricsLog, "log_train", rising)
    orpo_dist.train(tiny_run(tmp_path, max_steps=4, save_steps=None))
    out = capsys.readouterr().out
    assert out.count("warning: loss") == 1 and "at step 3 is above 3x its first logged value" in out


def test_float16_master_weights_are_refused_float16_lora_trains(tmp_path):
    with pytest.raises(ConfigError, match="dtype=float16 for a full fine-tune"):
        orpo_dist.train(tiny_run(tmp_path / "full", dtype="float16"))
    assert not (tmp_path / "full" / "base_model").exists()  # refused before the model was made or loaded
    result = orpo_dist.train(
        tiny_run(tmp_path / "lora", dtype="float16", peft=True, max_steps=3, save_steps=None)
    )
    assert all(math.isfinite(r["loss"]) for r in result.metrics if "loss" in r)
