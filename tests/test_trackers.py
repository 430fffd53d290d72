"""Dashboards carry over: tracker keys as TRL / transformers write them (`train/loss`, `eval/...`) against
`train/global_step`, read back from a real tensorboard event file and a real wandb offline run file;
WANDB_PROJECT / WANDB_ENTITY / WANDB_RUN_ID honoured; a preempted and requeued run continues the same
wandb run; the notices name the directories and the `wandb sync` command."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_YAML, launch_env, read_jsonl, tiny_run

import orpo_dist

EVAL = dict(eval_split=0.2, eval_on_start=True, eval_steps=2)


def test_tensorboard_events_have_trl_names_and_steps(tmp_path, capsys):
    result = orpo_dist.train(tiny_run(tmp_path, max_steps=4, save_steps=None, log="tensorboard", **EVAL))
    logdir = re.search(r"tensorboard: events in (\S+) \(view: tensorboard --logdir", capsys.readouterr().out)
    assert logdir and Path(logdir[1]) == (tmp_path / "orpo_dist").resolve()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logdir[1])
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/nll_loss", "train/log_odds_ratio", "train/rewards/margins",
            "train/rewards/accuracies", "train/learning_rate", "eval/loss", "eval/rewards/accuracies"} <= tags  # fmt: skip
    assert not {"loss", "eval_loss", "rewards/margins"} & tags  # no flat names on the dashboard
    rows = result.metrics
    for key, tag in (("loss", "train/loss"), ("rewards/margins", "train/rewards/margins"),
                     ("eval_rewards/accuracies", "eval/rewards/accuracies")):  # fmt: skip
        want = [(r["step"], r[key]) for r in rows if key in r]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6), tag
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2, 4]


# ------------------------------------------------------------------------------------------ wandb, offline


def _wandb_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No API key, no login (a fresh HOME), wandb not disabled: what a new user on a cluster has."""
    env = launch_env(HOME=str(tmp_path / "home"), WANDB_SILENT="true", **extra)
    env.pop("WANDB_MODE")
    env.pop("WANDB_API_KEY", None)
    return env


def _records(run_file: Path) -> list[dict]:
    """The .wandb transaction log, decoded by wandb's own reader (`wandb leet inspect --json`)."""
    wandb_cli = Path(sys.executable).parent / "wandb"
    proc = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_file)], capture_output=True,
                          text=True, timeout=120, check=True)  # fmt: skip
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _notice(stdout: str) -> re.Match:
    found = re.search(
        r"wandb: offline \(no API key found\): run (\w+) in (\S+); upload it with: (.+)", stdout
    )
    assert found, stdout[-3000:]
    return found


def _train_until_preempted(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run, and send SIGUSR1 (SLURM's warning before the time limit) once the first checkpoint is saved."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = []
    for line in proc.stdout:
        out.append(line)
        if "saved checkpoint" in line and proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)
    return proc.wait(timeout=300), "".join(out)


@pytest.mark.slow
def test_wandb_offline_run_has_trl_names_and_a_requeued_run_continues_it(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "orpo_dist.train", "--config", str(TINY_YAML), "--output_dir", str(out),
           "--log", "wandb", "--max_steps", "60", "--save_steps", "3", "--eval_split", "0.2",
           "--eval_on_start", "true", "--eval_steps", "3", "--resume", "auto"]  # fmt: skip
    env = _wandb_env(tmp_path, WANDB_PROJECT="orpo-habits", WANDB_ENTITY="my-team")

    # 1. preempted after its first checkpoint (exit 3), as a SLURM job at its time limit
    rc, log1 = _train_until_preempted(cmd, env, tmp_path)
    assert rc == 3, log1[-3000:]
    first = _notice(log1)
    run_id, sync_dir = first[1], Path(first[2])
    assert first[3] == f"wandb sync {sync_dir}"
    assert sync_dir.parent == (out / "wandb").resolve() and (sync_dir / f"run-{run_id}.wandb").is_file()
    assert (out / "wandb_run_id").read_text() == run_id

    # 2. requeued: the same command resumes from the checkpoint and continues the same wandb run
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    second = _notice(proc.stdout)
    assert second[1] == run_id and Path(second[2]) != sync_dir
    assert second[3].startswith(f"wandb sync --id {run_id} {sync_dir.parent}/offline-run-*-{run_id}")

    segments = [_records(d / f"run-{run_id}.wandb") for d in (sync_dir, Path(second[2]))]
    runs = [next(r["run"] for r in records if r["type"] == "run") for records in segments]
    assert [r["run_id"] for r in runs] == [run_id, run_id]
    assert [r["project"] for r in runs] == ["orpo-habits"] * 2 and [r["entity"] for r in runs] == [
        "my-team"
    ] * 2
    assert runs[1].get("resume") is True and not runs[0].get("resume")
    metrics = [r["metric"] for r in segments[0] if r["type"] == "metric"]
    assert {"glob_name": "*", "step_metric": "train/global_step"}.items() <= {
        k: v for m in metrics for k, v in m.items() if k in ("glob_name", "step_metric")
    }.items()

    history = [r["history"]["item"] for records in segments for r in records if r["type"] == "history"]
    train = [h for h in history if "train/loss" in h]
    evals = [h for h in history if "eval/loss" in h]
    assert train and evals and all("loss" not in h and "eval_loss" not in h for h in history)
    assert {"train/nll_loss", "train/log_odds_ratio", "train/rewards/margins", "train/rewards/accuracies",
            "train/global_step"} <= set(train[0])  # fmt: skip
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", proc.stdout)[1])
    steps = [h["train/global_step"] for h in train]
    assert steps == list(range(1, len(steps) - (60 - resumed_at) + 1)) + list(range(resumed_at + 1, 61))
    # the dashboard shows exactly what metrics.jsonl holds, step for step (the resumed segment)
    rows = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}
    for h in train[-(60 - resumed_at) :]:
        assert h["train/loss"] == rows[h["train/global_step"]]["loss"]
    assert evals[0]["train/global_step"] == 0 and evals[-1]["train/global_step"] == 60


@pytest.mark.slow
def test_wandb_run_id_from_the_environment(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "orpo_dist.train", "--config", str(TINY_YAML), "--output_dir", str(out),
           "--log", "wandb", "--max_steps", "2", "--save_steps", "none"]  # fmt: skip
    proc = subprocess.run(cmd, env=_wandb_env(tmp_path, WANDB_RUN_ID="habit42"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    notice = _notice(proc.stdout)
    assert notice[1] == "habit42" and (out / "wandb_run_id").read_text() == "habit42"
    run = next(r["run"] for r in _records(Path(notice[2]) / "run-habit42.wandb") if r["type"] == "run")
    assert run["project"] == "orpo_dist"  # no wandb_project, no $WANDB_PROJECT: the default


# ------------------------------------------------------------------------------------------ generated samples


@pytest.mark.slow  # trains a tiny run
def test_tensorboard_has_the_samples_text_and_the_generation_scores(tmp_path):
    result = orpo_dist.train(tiny_run(tmp_path, max_steps=4, save_steps=None, log="tensorboard", **EVAL))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "orpo_dist"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"eval/generation/rule_followed", "eval/generation/exact", "eval/sample_seconds"} <= scalars
    want = [(r["step"], r["eval_generation/rule_followed"]) for r in result.metrics if "eval_loss" in r]
    got = [(e.step, e.value) for e in events.Scalars("eval/generation/rule_followed")]
    assert [s for s, _ in got] == [s for s, _ in want] == [0, 2, 4]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6)
    (tag,) = [t for t in events.Tags()["tensors"] if t.startswith("eval/samples")]
    texts = events.Tensors(tag)
    assert [t.step for t in texts] == [0, 2, 4]
    table = texts[-1].tensor_proto.string_val[0].decode()
    samples = [r for r in read_jsonl(tmp_path / "samples.jsonl") if r["step"] == 4]
    assert table.startswith("| step | prompt | completion | chosen | rejected |")
    assert len(table.splitlines()) == 2 + len(samples) == 2 + 4
    assert samples[0]["chosen"] in table


@pytest.mark.slow
def test_wandb_has_the_samples_table_and_the_generation_scores(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "orpo_dist.train", "--config", str(TINY_YAML), "--output_dir", str(out),
           "--log", "wandb", "--max_steps", "4", "--save_steps", "none", "--eval_split", "0.2",
           "--eval_on_start", "true", "--eval_steps", "2"]  # fmt: skip
    proc = subprocess.run(
        cmd, env=_wandb_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    notice = _notice(proc.stdout)
    records = _records(Path(notice[2]) / f"run-{notice[1]}.wandb")
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    tables = [h for h in history if h.get("eval/samples._type") == "table-file"]  # wandb flattens the Table
    assert [h["train/global_step"] for h in tables] == [0, 2, 4]
    assert all(h["eval/samples.ncols"] == 5 and h["eval/samples.nrows"] == 4 for h in tables)
    scores = [h for h in history if "eval/generation/rule_followed" in h]
    assert [h["train/global_step"] for h in scores] == [0, 2, 4]
    assert all("eval/generation/exact" in h for h in scores)
