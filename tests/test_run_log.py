"""The console as a SLURM log shows it: how the run runs, one compact line per logged step, tokens/s in
the bar, and the end-of-run throughput line."""

from __future__ import annotations

import re

import pytest
from helpers import tiny_run

import orpo_dist
from orpo_dist.run_log import end_line, step_line


def test_step_and_end_lines():
    row = {"step": 10, "loss": 0.69314, "rewards/accuracies": 0.5, "learning_rate": 1e-4, "tokens_per_second": 1234.4,
           "epoch": 0.5, "mfu": None}  # fmt: skip
    assert step_line(row) == ("step 10: loss 0.6931 | rewards/accuracies 0.50 | learning_rate 1.00e-04 | epoch 0.50 | "
                              "tokens_per_second 1234")  # fmt: skip
    line = end_line(10.0, 20, 8, 50_000, [{"mfu": 0.2}, {"mfu": 0.4}])
    assert line == ("train_runtime 10.0 s | train_samples_per_second 16.00 | train_steps_per_second 2.000 | "
                    "tokens/s 5000 | mfu 0.300")  # fmt: skip
    assert "mfu" not in end_line(1.0, 1, 1, 1, [{}])  # unknown on CPU: not shown


@pytest.mark.slow
def test_a_run_prints_its_setup_each_logged_step_and_its_throughput(tmp_path, tiny_model_dir, capsys):
    orpo_dist.train(tiny_run(tmp_path / "run", model=str(tiny_model_dir), max_steps=4, logging_steps=2,
                             log="tensorboard"))  # fmt: skip
    captured = capsys.readouterr()
    out = captured.out
    assert "precision as the weights (no mixed precision); strategy none (one process) over 1 process(es); " \
           "sequence parallel size 1" in out  # fmt: skip
    steps = re.findall(r"^\[orpo_dist\] step (\d+): loss [\d.]+ \|", out, flags=re.M)
    assert steps == ["2", "4"]
    assert re.search(r"train_runtime [\d.]+ s \| train_samples_per_second [\d.]+ \| .* tokens/s \d+", out)
    assert "tokens_s=" in captured.err  # the bar (stderr) shows tokens/s
    assert "tensorboard: events in" in out and "wandb" not in (out + captured.err).lower()  # only its tracker


def test_how_it_runs_names_the_zero_stage_fsdp_sharding_and_sp_size():
    from types import SimpleNamespace as NS

    from orpo_dist.config import load_config
    from orpo_dist.run_log import how_it_runs

    def accelerator(kind, state, precision="bf16", n=8):
        return NS(state=state, distributed_type=NS(value=kind), mixed_precision=precision, num_processes=n)

    cfg = load_config(None, {"sequence_parallel_size": 2})
    zero3 = how_it_runs(accelerator("DEEPSPEED", NS(deepspeed_plugin=NS(zero_stage=3))), cfg)
    assert zero3 == "precision bf16; strategy DeepSpeed ZeRO-3 over 8 process(es); sequence parallel size 2"
    fsdp = how_it_runs(
        accelerator("FSDP", NS(fsdp_plugin=NS(fsdp_version=2, reshard_after_forward=True))), cfg
    )
    assert "strategy FSDP2 (FULL_SHARD) over 8" in fsdp
