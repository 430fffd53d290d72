"""Real 2-process runs on CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3, launched as users launch them.

Each run asserts the world size and strategy it got and which pairs each rank trained on (the trainer's
`ORPO_DIST_TRACE_DIR` trace), because several CPU launch spellings silently run one process or
unconnected ones (docs/architecture.md, "Where rank-aware code lives"). Launch recipes, as the shipped configs' comments say:
- DDP:        ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/multi_gpu.yaml
- DeepSpeed:  accelerate launch --config_file configs/accelerate/zero{2,3}.yaml, WITHOUT ACCELERATE_USE_CPU
              (it turns DeepSpeed off: accelerate would quietly run plain DDP); the trainer picks gloo.
both with --num_processes 2 --mixed_precision no. FSDP2 (launched as DeepSpeed is) is in test_fsdp2.py.

The first DeepSpeed launch on a machine compiles a small extension (~80 s); later ones reuse it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    ACCEL,
    N_PAIRS,
    SAVE_AT,
    STEPS,
    STRATEGIES,
    TINY_YAML,
    Run,
    accelerate_cmd,
    launch,
    launch_env,
    run_process,
)
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_op")]  # launches DeepSpeed ranks

GLOBAL_BATCH = 8
STEPS_PER_EPOCH = -(-N_PAIRS // GLOBAL_BATCH)


LORA = ("--peft", "--lr", "1e-2")
LORA_RUNS = {  # name: (strategy, extra flags)
    "ddp_lora": ("ddp", LORA),
    "ddp_lora_export": ("ddp", (*LORA, "--export", "merged_16bit")),
    "zero3_lora": ("zero3", LORA),
}


class Runs:
    """Each named run is launched once per module, on first use, and shared by the tests that read it."""

    def __init__(self, tmp: Path, model_dir: Path):
        self.tmp, self.model_dir, self.cache = tmp, model_dir, {}

    def __getitem__(self, name: str) -> Run:
        if name not in self.cache:
            self.cache[name] = self._make(name)
        return self.cache[name]

    def base_weights(self) -> dict[str, torch.Tensor]:
        return load_file(self.model_dir / "model.safetensors")

    def _make(self, name: str) -> Run:
        tmp, model = self.tmp, self.model_dir
        if name == "single":  # one process with the whole per-step batch of 2 ranks
            return launch(tmp, name, None, model, "--batch_size", "4")
        if name in STRATEGIES:
            return launch(tmp, name, name, model)
        if name in LORA_RUNS:
            strategy, extra = LORA_RUNS[name]
            return launch(tmp, name, strategy, model, *extra)
        if name == "ddp_overwrite":  # a new job on the ddp run's cache, rebuilding it: --overwrite_cache
            cache = self["ddp"].data[0]["directory"].rsplit("/", 1)[0]
            return launch(
                tmp, name, "ddp", model, "--cache_dir", cache, "--overwrite_cache", "--max_steps", "1"
            )
        if name.endswith("_resumed"):
            # killed one step after the step-4 checkpoint (as a crash would be), then resumed to the end; a
            # run that simply ends at max_steps leaves final/ but no resumable checkpoint of its last step
            base, out = name.removesuffix("_resumed"), tmp / name
            strategy, extra = LORA_RUNS.get(base, (base, ()))
            first = launch(
                tmp, name + "-1", strategy, model, *extra, "--max_steps", str(SAVE_AT + 1), out=out
            )
            first.check_ok()
            run = launch(tmp, name + "-2", strategy, model, *extra, "--resume", "latest", out=out)
            run.resumed_from = first
            return run
        raise KeyError(name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> Runs:
    return Runs(tmp_path_factory.mktemp("mp"), tiny_model_dir)


def assert_two_ranks(run: Run, distributed: str) -> None:
    """The launch really gave 2 connected ranks of the asked kind, and they trained on different pairs."""
    run.check_ok()
    # only rank 0 prints: the line appears once
    assert run.log.count(f"world_size=2 distributed={distributed} ") == 1, run.log[-4000:]
    assert {t["rank"] for t in run.trace} == {0, 1}
    assert {t["world_size"] for t in run.trace} == {2}
    for rank in (0, 1):
        assert sorted(t["step"] for t in run.trace if t["rank"] == rank) == list(range(1, STEPS + 1))
    epochs = [range(1, STEPS_PER_EPOCH + 1), range(STEPS_PER_EPOCH + 1, STEPS + 1)]
    for epoch, steps in enumerate(epochs):
        rank_ids = [[i for s in steps for i in run.ids(rank, s)] for rank in (0, 1)]
        assert rank_ids[0] and rank_ids[1]
        assert not set(rank_ids[0]) & set(rank_ids[1]), f"ranks shared pairs in epoch {epoch}"
        assert len(set(rank_ids[0] + rank_ids[1])) == len(rank_ids[0]) + len(rank_ids[1]), (
            "a pair trained twice"
        )
        if epoch == 0:  # a full epoch: the union is the whole train split (eval_split 0: ids 0..N-1)
            assert sorted(rank_ids[0] + rank_ids[1]) == list(range(N_PAIRS))
    # metrics.jsonl has one row per step: only rank 0 writes it
    assert [r["step"] for r in run.rows] == list(range(1, STEPS + 1))
    assert (run.out / "final" / "config.json").exists() or (
        run.out / "final" / "adapter_config.json"
    ).exists()
    assert (run.out / f"checkpoint-{SAVE_AT}" / "COMPLETE").exists()


def assert_losses_close(got: dict[int, float], want: dict[int, float], rel: float, steps=None) -> None:
    steps = list(steps or want)
    assert steps and all(s in got for s in steps), (sorted(got), steps)
    bad = {s: (got[s], want[s]) for s in steps if abs(got[s] - want[s]) > rel * abs(want[s]) + 2e-6}
    assert not bad, f"per-step loss differs (step: (got, want)): {bad}"


def assert_weights_close(got: dict, want: dict, start: dict | None, rel: float) -> None:
    """Per tensor, |got - want| is at most `rel` of how far training moved `want` from `start`.

    Relative to the training update, not absolute: Adam turns float-rounding noise in a near-zero
    gradient into a visible step for that one entry, so an elementwise atol would be arbitrary.
    """
    assert got.keys() == want.keys()
    worst, name = 0.0, None
    for k in want:
        moved = (want[k].float() - (start[k].float() if start else 0)).norm()
        assert moved > 0, f"{k} did not change in training: the comparison would be vacuous"
        ratio = ((got[k].float() - want[k].float()).norm() / moved).item()
        if ratio >= worst:
            worst, name = ratio, k
    assert worst <= rel, (
        f"final weights differ: {name} by {worst:.2e} of its training update (tolerance {rel})"
    )


# ------------------------------------------------------------------------------------------ DDP


def test_ddp_two_ranks_split_the_data(runs):
    run = runs["ddp"]
    assert_two_ranks(run, STRATEGIES["ddp"][2])
    assert len(run.losses()) == STEPS and all(v == v for v in run.losses().values())


def test_ddp_equals_one_process_with_the_whole_batch(runs):
    """2 ranks x 2 pairs == 1 process x 4 pairs: same pairs per step, same losses, same weights."""
    ddp, single = runs["ddp"], runs["single"]
    ddp.check_ok()
    single.check_ok()
    assert single.log.count("world_size=1 distributed=NO ") == 1
    assert {t["world_size"] for t in single.trace} == {1}
    for step in range(1, STEPS + 1):
        assert sorted(ddp.ids(0, step) + ddp.ids(1, step)) == sorted(single.ids(0, step)), step
    assert_losses_close(ddp.losses(), single.losses(), rel=1e-5)
    assert_weights_close(ddp.weights(), single.weights(), runs.base_weights(), rel=1e-4)


# ------------------------------------------------------------------------------------------ DeepSpeed


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_matches_ddp(runs, stage):
    run, ddp = runs[stage], runs["ddp"]
    assert_two_ranks(run, STRATEGIES[stage][2])
    assert [t["ids"] for t in sorted(run.trace, key=lambda t: (t["step"], t["rank"]))] == [
        t["ids"] for t in sorted(ddp.trace, key=lambda t: (t["step"], t["rank"]))
    ]
    assert_losses_close(run.losses(), ddp.losses(), rel=1e-4)
    # the saved model is whole (gathered across ranks under ZeRO-3) and loads the ordinary way
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run.out / "final")
    base = AutoModelForCausalLM.from_pretrained(runs.model_dir)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in base.state_dict().items()
    }
    assert_weights_close(run.weights(), ddp.weights(), runs.base_weights(), rel=1e-3)


# ------------------------------------------------------------------------------------------ tokenised cache


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_one_rank_tokenises_the_other_memory_maps(runs, strategy):
    """A fresh 2-rank job: rank 0 validates and tokenises into the cache; rank 1 waits and memory-maps it."""
    run = runs[strategy]
    run.check_ok()
    assert run.data[0]["built"] is True and run.data[1]["built"] is False, run.data
    assert run.data[0]["directory"] == run.data[1]["directory"]
    assert run.data[0]["directory"].startswith(str(run.out / "data_cache"))
    assert run.log.count("tokenised cache: miss: building (no cache in") == 1
    assert "tokenised cache: hit" not in run.log and "rank 1: tokenised cache" not in run.log


def test_overwrite_cache_rebuilds_once_and_every_rank_takes_the_new_build(runs):
    """overwrite_cache: rank 0 rebuilds in place; rank 1 takes that build (the broadcast build id), not the old one."""
    run, old = runs["ddp_overwrite"], runs["ddp"]
    run.check_ok()
    assert run.data[0]["built"] is True and run.data[1]["built"] is False, run.data
    assert run.data[0]["directory"] == run.data[1]["directory"] == old.data[0]["directory"]
    assert run.log.count("tokenised cache: miss: building (overwrite_cache: true)") == 1
    assert "rank 1: tokenised cache" not in run.log


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_a_resumed_job_reads_the_cache(runs, strategy):
    """A requeued job (resume) tokenises nothing: every rank memory-maps the first launch's cache."""
    resumed = runs[f"{strategy}_resumed"]
    resumed.check_ok()
    first = resumed.resumed_from
    assert first.data[0]["built"] is True and first.data[1]["built"] is False
    assert [resumed.data[r]["built"] for r in (0, 1)] == [False, False], resumed.data
    assert {resumed.data[r]["directory"] for r in (0, 1)} == {first.data[0]["directory"]}
    assert f"tokenised cache: hit {first.data[0]['directory']}" in resumed.log
    assert "tokenised cache: miss" not in resumed.log and "read 34 pairs, used 34 (train)" in resumed.log


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize(
    ("strategy", "rel", "wrel"),
    [("ddp", 1e-5, 1e-4), ("zero2", 1e-4, 1e-3), ("zero3", 1e-4, 1e-3)],
    ids=["ddp", "zero2", "zero3"],
)
def test_resume_continues_the_uninterrupted_run(runs, strategy, rel, wrel):
    """Stop after the step-4 checkpoint, resume: steps 5-8 and the final weights are the uninterrupted run's."""
    full, resumed = runs[strategy], runs[f"{strategy}_resumed"]
    resumed.check_ok()
    first = resumed.resumed_from
    assert (resumed.out / f"checkpoint-{SAVE_AT}" / "COMPLETE").exists()
    assert f"resumed from {resumed.out / f'checkpoint-{SAVE_AT}'} at step {SAVE_AT}" in resumed.log
    assert_losses_close(first.losses(), full.losses(), rel=rel, steps=range(1, SAVE_AT + 2))
    assert sorted(resumed.losses()) == list(range(SAVE_AT + 1, STEPS + 1))
    assert_losses_close(resumed.losses(), full.losses(), rel=rel, steps=range(SAVE_AT + 1, STEPS + 1))
    # the data order continues where the checkpoint left it, on every rank
    for rank in (0, 1):
        for step in range(SAVE_AT + 1, STEPS + 1):
            assert resumed.ids(rank, step) == full.ids(rank, step), (rank, step)
    assert_weights_close(resumed.weights(), full.weights(), runs.base_weights(), rel=wrel)


@pytest.mark.parametrize("name", ["ddp_lora", "zero3_lora"])
def test_lora_resume_continues_the_uninterrupted_run(runs, name):
    """LoRA checkpoints hold the adapter + optimizer (not the frozen base) and resume exactly, on both ranks."""
    full, resumed = runs[name], runs[f"{name}_resumed"]
    resumed.check_ok()
    assert f"resumed from {resumed.out / f'checkpoint-{SAVE_AT}'} at step {SAVE_AT}" in resumed.log
    assert (resumed.out / f"checkpoint-{SAVE_AT}" / "model" / "adapter_model.safetensors").exists()
    assert sorted(resumed.losses()) == list(range(SAVE_AT + 1, STEPS + 1))
    assert_losses_close(resumed.losses(), full.losses(), rel=1e-4, steps=range(SAVE_AT + 1, STEPS + 1))
    for rank in (0, 1):
        for step in range(SAVE_AT + 1, STEPS + 1):
            assert resumed.ids(rank, step) == full.ids(rank, step), (rank, step)


# ------------------------------------------------------------------------------------------ LoRA


def test_rank0_merge_matches_the_adapter(runs):
    """2-rank LoRA run with export: rank 0 merges once; the merged model computes what base + adapter does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = runs["ddp_lora_export"]
    run.check_ok()
    assert run.log.count("world_size=2 distributed=MULTI_CPU ") == 1
    assert {t["world_size"] for t in run.trace} == {2} and {t["rank"] for t in run.trace} == {0, 1}
    assert run.log.count("exported merged_16bit") == 1  # rank 0 only
    merged_dir = run.out / "export" / "merged"
    assert (merged_dir / "config.json").exists() and not (merged_dir / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(runs.model_dir, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(runs.model_dir, dtype=torch.float32), run.out / "final"
    ).eval()
    ids = torch.randint(7, merged.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, before = adapted(ids).logits, merged(ids).logits, base(ids).logits
    # the merged weights are bfloat16 (2-3 significant digits): loose on values (measured max 0.004 on
    # logits up to ~0.8), strict on what is predicted
    assert (got - want).abs().max() < 0.02, (got - want).abs().max()
    assert (want - before).abs().max() > 0.2, (
        "the adapter barely changed the model: the comparison would be vacuous"
    )
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.97, f"merged model predicts a different next token at {1 - agree:.1%} of positions"


def test_lora_under_zero3_matches_ddp(runs):
    run, ddp = runs["zero3_lora"], runs["ddp_lora_export"]
    assert_two_ranks(run, "DEEPSPEED")
    assert_losses_close(run.losses(), ddp.losses(), rel=1e-4)
    assert_weights_close(run.weights(), ddp.weights(), None, rel=1e-3)  # adapter_model.safetensors, gathered


# ------------------------------------------------------------------------------------------ bad launches


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("world_size_env", "WORLD_SIZE=2 processes but the process group has 1"),
        ("multi_gpu_without_cpu_flag", "gradients would never be synchronised"),
        (
            "deepspeed_with_cpu_flag",
            "asks for DEEPSPEED (ACCELERATE_USE_DEEPSPEED=true) but accelerate is running MULTI_CPU",
        ),
    ],
    ids=["world_size_env", "multi_gpu_without_cpu_flag", "deepspeed_with_cpu_flag"],
)
def test_a_bad_launch_fails_loudly(tmp_path, tiny_model_dir, how, message):
    """Launches that would otherwise train silently on one rank, unsynchronised ranks, or without ZeRO."""
    train = ["-m", "orpo_dist.train", "--config", str(TINY_YAML), "--model", str(tiny_model_dir)]
    train += ["--output_dir", str(tmp_path / "out")]
    accelerate = accelerate_cmd(2)
    if how == "world_size_env":  # env says 2 processes, but a plain `python` (no launcher) starts one
        cmd, env = [sys.executable, *train], launch_env(WORLD_SIZE="2")
    elif how == "multi_gpu_without_cpu_flag":
        cmd, env = [*accelerate, "--multi_gpu", *train], launch_env()
    else:
        cmd = [*accelerate, "--config_file", str(ACCEL / "zero3.yaml"), *train]
        env = launch_env(ACCELERATE_USE_CPU="true")
    rc, log = run_process(cmd, env, cwd=tmp_path, timeout=300)
    assert rc != 0, log[-4000:]
    assert message in log, log[-4000:]
    assert not (tmp_path / "out" / "final").exists()
