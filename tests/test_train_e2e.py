"""End to end on CPU: the CLI trains the built-in tiny model on the built-in task, and it learns.

Also: the files a run leaves (config.yaml, metrics.jsonl, final/), a PEFT run's adapter, exact
resume after a preemption (SIGUSR1), and the CLI's exit codes on bad input.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import OFFLINE_ENV, REPO, orpo_forward, signal_after_logging, tiny_run
from safetensors.torch import load_file

import orpo_dist
from orpo_dist.config import load_config
from orpo_dist.trainer import PREEMPTED_EXIT_CODE, exit_code

TRAIN_KEYS = [
    "loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
    "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "learning_rate", "grad_norm",
    "epoch", "tokens_per_second", "data_wait_seconds",
]  # fmt: skip
EVAL_KEYS = [f"eval_{k}" for k in TRAIN_KEYS[:10]]


def _env() -> dict[str, str]:
    # one intra-op thread: on a shared 2-core machine torch's default threads make tiny ops ~100x slower
    return {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orpo_dist.train", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_training_restores_the_callers_signal_handlers(tmp_path):
    """preemption.Preemption hands SIGUSR1/SIGTERM back after training (Python-API callers stay stoppable)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    run = {**E2E_CONFIG, "max_samples": 32, "max_steps": 1, "eval_split": 0, "output_dir": str(tmp_path)}
    orpo_dist.train(run)
    assert {s: signal.getsignal(s) for s in before} == before


# ------------------------------------------------------------------------------------------ the quickstart-like run

# The quickstart preset on 600 of its 2000 pairs, one epoch of batch 16 at lr 3e-3 (the preset trains 20
# epochs so that its greedy completions also learn to copy the word), logging every 5 steps.
E2E_CONFIG = {
    **yaml.safe_load((REPO / "orpo_dist" / "presets" / "quickstart.yaml").read_text()),
    "max_samples": 600,
    "logging_steps": 5,
    "save_steps": None,
    "epochs": 1,
    "batch_size": 16,
    "lr": 3.0e-3,
    "eval_steps": None,
}
E2E_CONFIG.pop("output_dir")


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    """`python -m orpo_dist.train --config run.yaml`: 540 train / 60 held-out pairs, 34 steps."""
    tmp = tmp_path_factory.mktemp("e2e")
    out = tmp / "out"
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump({**E2E_CONFIG, "output_dir": str(out)}))
    start = time.perf_counter()
    proc = _cli("--config", str(config))
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, rows, proc, elapsed


def test_e2e_loss_falls_and_heldout_accuracy_rises(e2e_run):
    out, rows, proc, elapsed = e2e_run
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert train[-1]["loss"] < 0.8 * train[0]["loss"], [r["loss"] for r in train]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 34  # eval_on_start, and at the end
    assert 0.3 <= evals[0]["eval_rewards/accuracies"] <= 0.7
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert "held-out preference accuracy" in proc.stdout
    assert elapsed < 120


def test_e2e_metrics_jsonl_rows(e2e_run):
    _, rows, _, _ = e2e_run
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(train) + len(evals) == len(rows)  # every row is one or the other
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30, 34]  # every logging_steps, and the last step
    for r in train:
        missing = [k for k in TRAIN_KEYS if k not in r]
        assert not missing, (missing, r)
        assert all(isinstance(r[k], (int, float)) for k in TRAIN_KEYS)
        assert 0 <= r["rewards/accuracies"] <= 1 and r["tokens_per_second"] > 0 and r["learning_rate"] >= 0
        assert r["data_wait_seconds"] >= 0 and "mfu" not in r  # mfu: GPU only
        # consistency: margins = chosen - rejected; rewards = beta * logps; loss = nll - beta * log_odds_ratio
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
        assert r["rewards/chosen"] == pytest.approx(0.5 * r["logps/chosen"], abs=1e-5)
        assert r["loss"] == pytest.approx(r["nll_loss"] - 0.5 * r["log_odds_ratio"], abs=1e-5)
    assert train[-1]["epoch"] == pytest.approx(1.0)
    assert (
        train[-1]["learning_rate"] == 0.0
    )  # cosine to 0: the rate for the next step, as transformers logs it
    for r in evals:
        missing = [k for k in EVAL_KEYS if k not in r]
        assert not missing, (missing, r)


def test_e2e_config_yaml_is_the_resolved_config(e2e_run):
    out, _, _, _ = e2e_run
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (
        saved["train"]["lr"] == 3.0e-3
        and saved["orpo"]["beta"] == 0.5
        and saved["data"]["max_samples"] == 600
    )
    # it loads back as the same config (what a user re-runs)
    expected = load_config(None, {**E2E_CONFIG, "output_dir": str(out)})
    assert load_config(out / "config.yaml").to_dict() == expected.to_dict()


def test_e2e_final_model_loads_and_is_the_trained_one(e2e_run, tokenizer):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from orpo_dist.data import build_datasets
    from orpo_dist.layouts import PaddedCollator

    out, rows, _, _ = e2e_run
    final = out / "final"
    assert (final / "model.safetensors").exists()
    assert not list(final.glob("*.bin")) and not list(out.rglob("pytorch_model*.bin"))
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(final)
    text = "Write in capitals: abc\n"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    base = load_file(out / "base_model" / "model.safetensors")
    trained = load_file(final / "model.safetensors")
    assert max((trained[k] - base[k]).abs().max().item() for k in base) > 1e-3

    # the saved weights reproduce the logged final held-out metrics
    cfg = load_config(out / "config.yaml")
    _, eval_ds, _ = build_datasets(cfg.data, tok, cfg.train.seed)
    batch = PaddedCollator(tok.pad_token_id)(list(eval_ds))
    with torch.no_grad():
        parts = orpo_forward(model, batch, 1024)
    last_eval = [r for r in rows if "eval_loss" in r][-1]
    assert parts.loss(0.5).item() == pytest.approx(last_eval["eval_loss"], abs=1e-4)
    accuracy = (parts.metric_sums(0.5)["rewards/accuracies"] / parts.pairs).item()
    assert accuracy == pytest.approx(last_eval["eval_rewards/accuracies"], abs=1e-6)


# ------------------------------------------------------------------------------------------ PEFT


def test_peft_run_saves_an_adapter_that_peft_loads(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = orpo_dist.train(tiny_run(
        tmp_path / "peft", model=str(tiny_model_dir), max_samples=24, max_steps=3, batch_size=8,
        gradient_accumulation=1, lr=1e-2, peft=True, save_steps=None,
    ))  # fmt: skip
    final = result.final_dir
    assert (final / "adapter_model.safetensors").exists() and (final / "adapter_config.json").exists()
    assert not (final / "model.safetensors").exists()  # the adapter, not a copy of the base
    assert not list(final.glob("*.bin"))

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.clone()
    model = PeftModel.from_pretrained(base, final).eval()
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and max(p.abs().max().item() for p in lora_b.values()) > 0  # lora_B starts at 0: trained
    adapter = load_file(final / "adapter_model.safetensors")
    assert all("lora_" in k for k in adapter)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - base_logits).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------ resume


def _resume_config(output_dir: Path, tiny_model_dir) -> dict:
    # 18 pairs, global batch 4 (2 x accumulation 2): 5 steps per epoch, the last one ragged (a filler
    # slot); 8 steps cross into epoch 1. Linear schedule with warmup: the scheduler state matters too.
    return tiny_run(
        output_dir, model=str(tiny_model_dir), max_samples=18, max_steps=8, lr=5e-3, scheduler="linear",
        warmup_ratio=0.25, save_steps=4, seed=3,
    )  # fmt: skip


def test_resume_after_preemption_is_exact(tmp_path, tiny_model_dir, monkeypatch, capsys):
    a = orpo_dist.train(_resume_config(tmp_path / "a", tiny_model_dir))
    assert a.global_step == 8 and not a.preempted

    # B1: the same run, preempted by SIGUSR1 (SLURM's warning signal) right after step 4's checkpoint
    signal_after_logging(monkeypatch, step=4)
    b1 = orpo_dist.train(_resume_config(tmp_path / "b", tiny_model_dir))
    monkeypatch.undo()
    assert b1.preempted and b1.global_step == 4 and b1.final_dir is None
    assert exit_code(b1) == PREEMPTED_EXIT_CODE
    assert (tmp_path / "b" / "checkpoint-4" / "COMPLETE").exists()
    assert not (tmp_path / "b" / "final").exists()

    # B2: run again with resume: latest; it continues at step 5 with the same data, optimizer and schedule
    capsys.readouterr()
    b2 = orpo_dist.train({**_resume_config(tmp_path / "b", tiny_model_dir), "resume": "latest"})
    assert b2.global_step == 8 and not b2.preempted
    log = capsys.readouterr().out  # the tokenised data comes from B1's cache, its report printed again
    assert f"tokenised cache: hit {tmp_path / 'b' / 'data_cache'}/" in log and "read 18 pairs, used" in log
    assert "tokenised cache: miss" not in log

    def losses(rows):
        return {r["step"]: (r["loss"], r["learning_rate"]) for r in rows if "loss" in r}

    la, lb1, lb2 = losses(a.metrics), losses(b1.metrics), losses(b2.metrics)
    assert sorted(lb1) == [1, 2, 3, 4] and sorted(lb2) == [5, 6, 7, 8]
    for step in range(1, 9):
        got = (lb1 | lb2)[step]
        assert got == pytest.approx(la[step], abs=1e-6), step
    # the steps after resume saw updated weights, so matching them is not trivial
    assert la[8][0] != pytest.approx(la[5][0], abs=1e-3)

    wa, wb = load_file(a.final_dir / "model.safetensors"), load_file(b2.final_dir / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# ------------------------------------------------------------------------------------------ CLI


def test_cli_help_exits_0():
    proc = _cli("--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m orpo_dist.train" in proc.stdout and "--lr" in proc.stdout


def test_console_script_is_the_same_cli():
    script = Path(sys.executable).parent / "orpo-dist"
    assert script.exists(), f"{script} missing: install the package (pip install -e .)"
    proc = subprocess.run([str(script), "--help"], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: python -m orpo_dist.train" in proc.stdout, proc.stderr


def test_cli_unknown_flag_exits_2_naming_the_closest_key(tmp_path):
    proc = _cli("--lerning-rate", "1e-3", "--output-dir", str(tmp_path / "never"), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "lerning" in proc.stderr and "learning_rate" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--lr", "-1"], "lr=-1"),
        (["--batch-size", "abc"], "'abc'"),
        (["--beta", "-0.5", "--warmup-ratio", "2"], "beta=-0.5"),
    ],
)
def test_cli_bad_value_exits_2_before_loading_anything(tmp_path, args, expected):
    start = time.perf_counter()
    proc = _cli(*args, "--output-dir", str(tmp_path / "never"), timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    if "--warmup-ratio" in args:
        assert "warmup_ratio=2" in proc.stderr  # every problem at once
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists()  # no output dir, so no model was built or loaded
    assert elapsed < 30, elapsed
