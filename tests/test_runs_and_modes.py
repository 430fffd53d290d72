"""Modes and re-runs as users try them: `max_steps: 0` / `--eval_only`, a re-run into a directory that holds a
finished model, a resume after the model was copied elsewhere, `accelerate launch --cpu --num_processes 2`."""

from __future__ import annotations

import re
import shutil
import sys

import pytest
from helpers import ACCEL, TINY_YAML, launch_env, read_jsonl, run_process, tiny_run

import orpo_dist
from orpo_dist.config import ConfigError, load_config


def test_max_steps_zero_is_evaluation_never_an_epoch():
    cfg = load_config(None, {"max_steps": 0})
    assert cfg.train.eval_only
    with pytest.raises(ConfigError, match="eval_only .* needs held-out pairs"):
        load_config(None, {"max_steps": 0, "eval_split": 0})
    with pytest.raises(ConfigError, match="max_steps=-2 must be -1"):
        load_config(None, {"max_steps": -2})


@pytest.mark.slow
def test_eval_only_and_max_steps_zero_evaluate_without_training(tmp_path, tiny_model_dir):
    for name, keys in (("eval_only", {"eval_only": True}), ("zero", {"max_steps": 0})):
        out = tmp_path / name
        result = orpo_dist.train(tiny_run(out, model=str(tiny_model_dir), eval_split=0.2, **keys))
        assert result.global_step == 0 and result.final_dir is None, name
        rows = read_jsonl(out / "metrics.jsonl")
        assert [r["step"] for r in rows] == [0] and "eval_loss" in rows[0], name
        assert not (out / "final").exists() and not list(out.glob("checkpoint-*")), name


@pytest.mark.slow
def test_eval_only_of_a_lora_adapter_and_of_a_checkpoint(tmp_path, tiny_model_dir):
    out = tmp_path / "lora"
    orpo_dist.train(tiny_run(out, model=str(tiny_model_dir), peft=True, max_steps=2, save_steps=1, eval_split=0.2))
    trained = read_jsonl(out / "metrics.jsonl")[-1]["eval_loss"]
    # the adapter directory as the model: its base comes from adapter_config.json
    result = orpo_dist.train(tiny_run(tmp_path / "adapter", model=str(out / "final"), eval_only=True, eval_split=0.2))
    assert result.metrics[0]["eval_loss"] == pytest.approx(trained, rel=1e-5)
    assert load_config(None, {"lora_model_dir": str(out / "final")}).peft.adapter_path == str(out / "final")
    # a checkpoint: resume it and evaluate
    at_1 = orpo_dist.train(tiny_run(out, model=str(tiny_model_dir), peft=True, eval_only=True, eval_split=0.2,
                                    resume=str(out / "checkpoint-1")))  # fmt: skip
    assert at_1.global_step == 1 and at_1.metrics[-1]["step"] == 1 and "eval_loss" in at_1.metrics[-1]


@pytest.mark.slow
def test_a_run_into_a_finished_output_dir_is_refused_unless_overwrite(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    run = tiny_run(out, model=str(tiny_model_dir), max_steps=2, save_steps=None)
    orpo_dist.train(run)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a finished model .*overwrite_output_dir: true"):
        orpo_dist.train(run)
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched
    assert orpo_dist.train({**run, "overwrite_output_dir": True}).global_step == 2


@pytest.mark.slow
def test_resume_with_the_model_moved_but_the_same_weights_continues(tmp_path, tiny_model_dir, capsys):
    model = tmp_path / "machine_a" / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "run"
    orpo_dist.train(tiny_run(out, model=str(model), max_steps=2, save_steps=1))
    moved = tmp_path / "machine_b" / "model"
    shutil.copytree(model, moved)
    shutil.rmtree(model)
    capsys.readouterr()
    result = orpo_dist.train(tiny_run(out, model=str(moved), max_steps=3, save_steps=1, resume="latest"))
    assert result.global_step == 3
    assert "the model moved" in capsys.readouterr().out
    # other weights at the new path: refused as before
    other = tmp_path / "machine_c" / "model"
    shutil.copytree(moved, other)
    (other / "config.json").write_text((other / "config.json").read_text().replace("}", ', "note": 1}', 1))
    with pytest.raises(ConfigError, match="cannot resume .*model "):
        orpo_dist.train(tiny_run(out, model=str(other), max_steps=4, resume="latest"))


def test_launcher_processes_reads_the_accelerate_command_line(tmp_path):
    import subprocess

    from orpo_dist.preflight import launcher_processes

    fake = tmp_path / "accelerate"
    fake.write_text("import time; time.sleep(30)\n")
    for args, expected in ((["launch", "--cpu", "--num_processes", "2"], 2), (["launch", "--num_processes=3"], 3),
                           (["launch", "--cpu"], 1)):  # fmt: skip
        proc = subprocess.Popen([sys.executable, str(fake), *args])
        try:
            import time

            time.sleep(0.2)
            assert launcher_processes(proc.pid) == expected, args
        finally:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_accelerate_launch_cpu_with_two_processes_is_refused_with_the_working_spelling(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "-m",
           "orpo_dist.train", "--config", str(TINY_YAML), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    code, out = run_process(cmd, launch_env(), tmp_path, timeout=300)
    assert code != 0, out[-2000:]
    assert "starts one process, not 2" in out and "--multi_gpu --num_processes 2" in out, out[-2000:]
    assert ACCEL.is_dir()


def test_dry_run_checks_config_data_and_model_and_trains_nothing(tmp_path, capsys):
    from orpo_dist.cli import main

    out = tmp_path / "run"
    code = main(["--config", str(TINY_YAML), "--dry_run", "--peft", "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "dry run: resolved config" in printed and "lr: 0.003" in printed  # the resolved config
    assert "read 34 pairs, used 34 (train)" in printed and "  chosen:" in printed  # data: counts, one pair
    assert re.search(r"87,360 parameters, [\d,]+ trainable; .*AdamW state ~[\d.]+ (MiB|GiB)", printed)
    assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()
