"""Training-loop switches: gradient checkpointing, mixed precision, trackers (wandb offline, tensorboard)."""

from __future__ import annotations

import math

import pytest
from helpers import tiny_run

import orpo_dist

RUN = dict(max_samples=48, max_steps=3, batch_size=4, gradient_accumulation=1, lr=1e-3, save_steps=None)


def _losses(result) -> list[float]:
    return [r["loss"] for r in result.metrics if "loss" in r]


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    plain = _losses(orpo_dist.train(tiny_run(tmp_path / "a", **RUN)))
    ckpt = _losses(orpo_dist.train(tiny_run(tmp_path / "b", **RUN, gradient_checkpointing=True)))
    assert len(plain) == 3
    assert ckpt == pytest.approx(plain, abs=1e-5)


def test_bf16_mixed_precision_trains_on_cpu(tmp_path):
    fp32 = _losses(orpo_dist.train(tiny_run(tmp_path / "a", **RUN, mixed_precision="no")))
    bf16 = _losses(orpo_dist.train(tiny_run(tmp_path / "b", **RUN, mixed_precision="bf16")))
    assert all(math.isfinite(x) for x in bf16)
    assert bf16 != fp32  # autocast really ran in bf16 ...
    assert bf16 == pytest.approx(fp32, rel=2e-2)  # ... and agrees with fp32 to bf16 precision


def test_tensorboard_tracker_writes_events(tmp_path):
    orpo_dist.train(tiny_run(tmp_path, **RUN, log="tensorboard"))
    assert list(tmp_path.rglob("events.out.tfevents.*")), sorted(p.name for p in tmp_path.rglob("*"))


def test_wandb_without_a_key_goes_offline_with_a_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc login either
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    wandb.teardown()  # wandb keeps process-wide settings from an earlier in-process run (WANDB_MODE=disabled)
    orpo_dist.train(tiny_run(tmp_path / "out", **RUN, log="wandb", run_name="t"))
    out = capsys.readouterr().out
    assert "wandb: offline (no API key found): run " in out and "upload it with: wandb sync " in out
    assert list((tmp_path / "out").rglob("offline-run-*")), "no offline wandb run directory"
    # the key never lands in the saved config
    assert "api_key" not in (tmp_path / "out" / "config.yaml").read_text().lower()
