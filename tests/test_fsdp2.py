"""FSDP2 on 2 CPU ranks (gloo), launched exactly as on GPUs:

    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 --mixed_precision no \
        -m orpo_dist.train ...

(without ACCELERATE_USE_CPU, which turns FSDP into plain DDP). accelerate records such a launch as one
process per rank on a machine without CUDA; `distributed._fsdp_on_cpu` restores FSDP, so what runs is
accelerate's GPU path: `fsdp2_prepare_model`, sharded `save_state` / `load_state`, `get_state_dict`.

- equal numbers: 3 float32 steps of the same global batch give every logged metric within 1e-5 and the
  first step's gradients within 1e-6 for 2-rank FSDP2, 2-rank DDP and one process; each FSDP2 rank holds
  about half of DDP's parameter + gradient + optimizer bytes;
- a run killed after its step-4 checkpoint (SHARDED_STATE_DICT) resumes onto the uninterrupted run's
  losses, pairs and weights; the final model is ordinary safetensors;
- LoRA with parameters kept gathered after forward and activation checkpointing equals DDP LoRA, and
  exports a merged model.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import (
    ACCEL,
    SAVE_AT,
    STEPS,
    TINY_YAML,
    LaunchedRuns,
    Run,
    accelerate_cmd,
    launch,
    launch_env,
    per_rank,
    run_process,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # launches 2-rank runs

REPO = Path(__file__).resolve().parents[1]
STEP = REPO / "tests" / "sp_step.py"
LORA = ("--peft", "--lr", "1e-2")
# 3 steps, the tiny run's global batch (2 ranks x 2 pairs x 2 micro-batches = one process x 4 x 2)
EQUAL = ("--max_steps", "3", "--save_steps", "100")
NOT_METRICS = {"data_wait_seconds", "tokens_per_second", "train_runtime", "peak_memory_gb"}


# name: (ranks before, ranks after, extra flags); the global batch stays 8 pairs per step
ELASTIC = {
    "elastic_2to4": (2, 4, ()),
    "elastic_2to1": (2, 1, ()),
    "elastic_4to2_lora": (4, 2, LORA),
    "elastic_1to2_lora": (1, 2, LORA),
}


class Runs(LaunchedRuns):
    """Each named run is launched once per module, on first use."""

    def _make(self, name: str):
        tmp, model = self.tmp, self.model_dir
        if name.startswith("step_"):  # tests/sp_step.py: metrics, first-step gradients, bytes per rank
            return self._step(name.removeprefix("step_"))
        if name == "fsdp2":  # checkpoints at steps 4 and 6 (the elastic runs compare optimizer state at 6)
            return launch(tmp, name, name, model, "--save_steps", "2")
        if name == "ddp":
            return launch(tmp, name, name, model)
        if name in ELASTIC:  # 5 steps on `before` ranks, then resumed from checkpoint-4 on `after` ranks
            before, after, extra = ELASTIC[name]
            out = tmp / name
            first = launch(tmp, name + "-1", "fsdp2", model, *extra, *per_rank(before), "--max_steps",
                           str(SAVE_AT + 1), out=out, ranks=before)  # fmt: skip
            first.check_ok()
            run = launch(tmp, name + "-2", "fsdp2", model, *extra, *per_rank(after), "--save_steps", "2",
                         "--resume", "latest", out=out, ranks=after)  # fmt: skip
            run.resumed_from = first
            return run
        if name == "fsdp2_lora":
            return launch(tmp, name, "fsdp2_keep_ac", model, *LORA, "--export", "merged_16bit")
        if name == "ddp_lora":
            return launch(tmp, name, "ddp", model, *LORA)
        if name == "fsdp2_resumed":  # killed one step after the step-4 checkpoint, then resumed
            out = tmp / name
            first = launch(tmp, name + "-1", "fsdp2", model, "--max_steps", str(SAVE_AT + 1), out=out)
            first.check_ok()
            run = launch(tmp, name + "-2", "fsdp2", model, "--resume", "latest", out=out)
            run.resumed_from = first
            return run
        raise KeyError(name)

    def _step(self, how: str) -> list[dict]:
        out = self.tmp / f"step-{how}"
        argv = ["--config", str(TINY_YAML), "--model", str(self.model_dir), "--output_dir", str(out / "run")]
        if how == "single":  # in this process: one rank with the whole per-step batch
            from sp_step import run

            return [run(out, [*argv, *EQUAL, "--batch_size", "4"])]
        config, env = {"fsdp2": ("fsdp2", {}), "ddp": ("multi_gpu", {"ACCELERATE_USE_CPU": "true"})}[how]
        cmd = [*accelerate_cmd(2, config=ACCEL / f"{config}.yaml"), str(STEP), str(out), *argv, *EQUAL]
        rc, log = run_process(cmd, launch_env(**env), cwd=self.tmp)
        assert rc == 0, log[-6000:]
        return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> Runs:
    return Runs(tmp_path_factory.mktemp("fsdp2"), tiny_model_dir)


def metric_diff(a: list[dict], b: list[dict]) -> float:
    """The largest difference of any logged metric at any step (timings and memory aside)."""
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    worst = 0.0
    for x, y in zip(a, b):
        keys = {k for k in x if k not in NOT_METRICS and isinstance(x[k], (int, float))}
        assert keys == {k for k in y if k not in NOT_METRICS and isinstance(y[k], (int, float))}
        worst = max([worst] + [abs(x[k] - y[k]) for k in keys if not (math.isnan(x[k]) and math.isnan(y[k]))])
    return worst


def test_fsdp2_equals_ddp_and_one_process(runs):
    """Same global batch, 3 float32 steps: metrics to 1e-5, first-step gradients to 1e-6, and each FSDP2
    rank holds about 1/2 of DDP's parameter + gradient + optimizer bytes."""
    fsdp, ddp, single = runs["step_fsdp2"], runs["step_ddp"], runs["step_single"]
    assert [r["distributed"] for r in fsdp] == ["FSDP", "FSDP"]
    assert [r["distributed"] for r in ddp] == ["MULTI_CPU", "MULTI_CPU"]
    # the two data-parallel ranks trained on different pairs, which together are the single run's
    for step in range(3):
        ids = fsdp[0]["steps"][step]["ids"] + fsdp[1]["steps"][step]["ids"]
        assert (
            sorted(ids)
            == single[0]["steps"][step]["ids"]
            == sorted(ddp[0]["steps"][step]["ids"] + ddp[1]["steps"][step]["ids"])
        )
    rows = {name: rec[0]["rows"] for name, rec in (("fsdp2", fsdp), ("ddp", ddp), ("single", single))}
    assert len([r for r in rows["single"] if "loss" in r]) == 3
    diffs = {other: metric_diff(rows["fsdp2"], rows[other]) for other in ("ddp", "single")}
    print("max metric difference of fsdp2 vs", diffs)
    assert max(diffs.values()) <= 1e-5
    want = single[0]["grads"]
    for rec in (*fsdp, *ddp):
        assert rec["grads"].keys() == want.keys()
        worst = max((rec["grads"][k] - want[k]).abs().max().item() for k in want)
        print(f"first-step gradient {rec['distributed']} rank {rec['rank']} vs one process: {worst:.1e}")
        assert worst <= 1e-6, (rec["distributed"], rec["rank"], worst)
    assert max(g.abs().max().item() for g in want.values()) > 1e-3  # not vacuous
    for rank in (0, 1):
        f, d = fsdp[rank]["bytes"], ddp[rank]["bytes"]
        assert d["param"] == single[0]["bytes"]["param"] and d["optimizer"] > 0
        ratio = sum(f.values()) / sum(d.values())
        assert 0.45 <= ratio <= 0.55, (rank, f, d)
    print("bytes per rank fsdp2", [r["bytes"] for r in fsdp], "ddp", [r["bytes"] for r in ddp])


def test_fsdp2_trains_two_ranks_and_saves_ordinary_weights(runs):
    from transformers import AutoModelForCausalLM

    run: Run = runs["fsdp2"]
    run.check_ok()
    assert run.log.count("world_size=2 distributed=FSDP ") == 1, run.log[-4000:]
    assert "(FSDP2: parameters, gradients and optimizer state sharded over 2 ranks" in run.log
    assert {t["rank"] for t in run.trace} == {0, 1}
    for step in range(1, STEPS + 1):
        assert not set(run.ids(0, step)) & set(run.ids(1, step))
    state = run.out / f"checkpoint-{SAVE_AT}" / "state"
    # SHARDED_STATE_DICT: torch.distributed.checkpoint directories, one shard file per rank
    assert len(list((state / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    assert len(list((state / "optimizer_0").glob("*.distcp"))) == 2
    model = AutoModelForCausalLM.from_pretrained(run.out / "final", dtype=torch.float32)
    final = load_file(run.out / "final" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in final.items())
    ddp = runs["ddp"]
    assert metric_diff(run.rows, ddp.rows) <= 1e-5
    base = load_file(runs.model_dir / "model.safetensors")
    for k, v in ddp.weights().items():
        assert (final[k] - v).norm() <= 1e-4 * (v - base[k]).norm(), k


def test_fsdp2_resume_continues_the_uninterrupted_run(runs):
    """Killed after the step-4 sharded checkpoint, resumed on 2 ranks: the rest of the run is the
    uninterrupted one's. accelerate #3971 (FSDP2 + SHARDED_STATE_DICT optimizer load fails on a missing
    `step`) does not happen: the optimizer loads, and Adam continues from step 4, not from 0."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    full, resumed = runs["fsdp2"], runs["fsdp2_resumed"]
    resumed.check_ok()
    assert f"resumed from {resumed.out / f'checkpoint-{SAVE_AT}'} at step {SAVE_AT}" in resumed.log
    assert sorted(resumed.losses()) == list(range(SAVE_AT + 1, STEPS + 1))
    assert metric_diff(resumed.rows, full.rows[SAVE_AT:]) <= 1e-5
    for rank in (0, 1):
        for step in range(SAVE_AT + 1, STEPS + 1):
            assert resumed.ids(rank, step) == full.ids(rank, step)
    got, want = resumed.weights(), full.weights()
    assert all(torch.equal(got[k], want[k]) for k in want), "final weights differ from the uninterrupted run"
    # the checkpoint's optimizer state: Adam at step 4 with non-zero moments for every parameter
    flat = resumed.out / "optim.pt"
    dcp_to_torch_save(resumed.out / f"checkpoint-{SAVE_AT}" / "state" / "optimizer_0", flat)
    state = torch.load(flat, weights_only=True)["optimizer"]["state"]
    assert state and all(float(s["step"]) == SAVE_AT for s in state.values())
    assert all(s["exp_avg"].norm() > 0 for s in state.values())


def test_fsdp2_lora_keep_gathered_with_activation_checkpointing(runs):
    """LoRA, reshard_after_forward false, activation checkpointing: equals DDP LoRA; adapter + merged export."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, ddp = runs["fsdp2_lora"], runs["ddp_lora"]
    run.check_ok()
    assert "reshard_after_forward=False, activation_checkpointing=True" in run.log
    assert metric_diff(run.rows, ddp.rows) <= 1e-5
    got, want = run.weights(), ddp.weights()  # adapter_model.safetensors
    assert got.keys() == want.keys() and all((got[k] - want[k]).abs().max() < 1e-5 for k in want)
    merged = AutoModelForCausalLM.from_pretrained(run.out / "export" / "merged", dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(runs.model_dir, dtype=torch.float32), run.out / "final"
    ).eval()
    ids = torch.randint(7, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(ids).logits - adapted(ids).logits).abs().max() < 0.02


def adam_state(checkpoint: Path, tmp: Path) -> dict:
    """A sharded (DCP) optimizer checkpoint gathered into one dict: parameter name -> Adam state."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = tmp / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "state" / "optimizer_0", flat)
    return torch.load(flat, weights_only=True)["optimizer"]["state"]


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("elastic_2to4", "fsdp2"),
        ("elastic_2to1", "fsdp2"),
        ("elastic_4to2_lora", "ddp_lora"),
        ("elastic_1to2_lora", "ddp_lora"),
    ],
)
def test_fsdp2_resumes_on_another_number_of_ranks(runs, tmp_path, name, reference):
    """A checkpoint written on N ranks resumes on M with the same global batch (DCP reshards on load):
    each later step trains the same pairs with the same numbers as the uninterrupted run, Adam's step
    counts and moments carry over, and across the interrupted + resumed run every pair of the first epoch
    is trained exactly once (Megatron-Bridge #5637 skipped or repeated samples on a smaller dp size;
    torchtitan #816 refuses a changed dp degree because its dataloader cannot reshard)."""
    before, after, _ = ELASTIC[name]
    run, full = runs[name], runs[reference]
    first = run.resumed_from
    run.check_ok()
    assert f"world_size={after} distributed=FSDP " in run.log
    assert f"resumed from {run.out / f'checkpoint-{SAVE_AT}'} at step {SAVE_AT}" in run.log
    assert {t["world_size"] for t in first.trace} == {before} and {t["world_size"] for t in run.trace} == {
        after
    }
    diff = metric_diff(run.rows, full.rows[SAVE_AT:])
    print(f"{name}: max metric difference vs the uninterrupted run {diff:.2e}")
    assert diff <= 1e-5

    # every pair of epoch 1 (steps 1-5) once: steps 1-4 before the checkpoint, step 5 after the resume
    def pairs(r, steps):
        return [i for t in r.trace if t["step"] in steps for i in t["ids"]]

    epoch1 = pairs(first, range(1, SAVE_AT + 1)) + pairs(run, [SAVE_AT + 1])
    assert sorted(epoch1) == list(range(34))
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert sorted(pairs(run, [step])) == sorted(pairs(full, [step])), step
    # Adam continued: at step 6 its step count is 6 (a reset would give 2)
    state = adam_state(run.out / "checkpoint-6", tmp_path)
    assert state and all(float(s["step"]) == 6 for s in state.values())
    if reference == "fsdp2":  # and its moments are the uninterrupted run's
        want = adam_state(full.out / "checkpoint-6", tmp_path)
        assert state.keys() == want.keys()
        for k in want:
            for moment in ("exp_avg", "exp_avg_sq"):
                a, b = state[k][moment], want[k][moment]
                assert (a - b).norm() <= 1e-4 * b.norm() + 1e-12, (k, moment)
