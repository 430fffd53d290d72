"""DeepSpeed ZeRO checkpoints resume on another number of ranks (orpo_dist/elastic.py): the checkpoint is
converted to DeepSpeed's universal checkpoint and loaded with `load_universal`, with no user action
beyond the new launch and a per-device batch that keeps the global batch (8 pairs per step).

ZeRO-1 2->1, ZeRO-2 2->1 and 2->4, ZeRO-3 1->2 and, LoRA, 2->1. Each case: 5 steps on N ranks (checkpoint at step 4, then a "kill"), resumed on M ranks to step 8 with a
checkpoint at step 6. Asserted: steps 5-8 log the uninterrupted run's metrics (1e-5), train its pairs,
every pair of the first epoch is trained exactly once across the two runs (Megatron-Bridge #5637), and
Adam continued (step count 6 at step 6; moments equal to the uninterrupted run's). DeepSpeed #5405 (HF
Trainer + DeepSpeed cannot resume with a different GPU count) does not happen here.
"""

from __future__ import annotations

import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from helpers import N_PAIRS, SAVE_AT, STEPS, LaunchedRuns, launch, per_rank

from orpo_dist.safe_load import SAFE_GLOBALS, _resolve

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_op")]  # launches DeepSpeed ranks

LORA = ("--peft", "--lr", "1e-2")
NOT_METRICS = {"data_wait_seconds", "tokens_per_second", "train_runtime", "peak_memory_gb"}
# name: (strategy, ranks before, ranks after, extra flags, the uninterrupted run to compare with)
CASES = {
    "zero1_2to1": ("zero1", 2, 1, (), "zero2_ref"),
    "zero2_2to1": ("zero2", 2, 1, (), "zero2_ref"),
    "zero2_2to4": ("zero2", 2, 4, (), "zero2_ref"),
    "zero3_1to2": ("zero3", 1, 2, (), "zero2_ref"),
    "zero3_lora_2to1": ("zero3", 2, 1, LORA, "ddp_lora_ref"),
}


class Runs(LaunchedRuns):
    def _make(self, name: str):
        tmp, model = self.tmp, self.model_dir
        if name == "zero2_ref":  # uninterrupted, checkpoints at 4 and 6
            return launch(tmp, name, "zero2", model, "--save_steps", "2")
        if name == "ddp_lora_ref":
            return launch(tmp, name, "ddp", model, *LORA)
        if name.startswith("first-"):  # 5 steps, checkpoint at 4
            _, strategy, before, *lora = name.split("-")
            before, extra = int(before), LORA if lora else ()
            return launch(tmp, name, strategy, model, *extra, *per_rank(before), "--max_steps",
                          str(SAVE_AT + 1), ranks=before)  # fmt: skip
        strategy, before, after, extra, _ = CASES[name]
        first = self[f"first-{strategy}-{before}" + ("-lora" if extra else "")]
        first.check_ok()
        out = tmp / name
        shutil.copytree(first.out, out)
        run = launch(tmp, name, strategy, model, *extra, *per_rank(after), "--save_steps", "2", "--resume",
                     "latest", out=out, ranks=after)  # fmt: skip
        run.resumed_from = first
        return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> Runs:
    return Runs(tmp_path_factory.mktemp("elastic_zero"), tiny_model_dir)


def metric_diff(a: list[dict], b: list[dict]) -> float:
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    return max(
        abs(x[k] - y[k])
        for x, y in zip(a, b)
        for k in x
        if k not in NOT_METRICS and isinstance(x[k], (int, float))
    )


def adam(checkpoint: Path, tmp: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A ZeRO checkpoint's Adam state per parameter, through DeepSpeed's own universal conversion."""
    from deepspeed.checkpoint.ds_to_universal import main

    out = tmp / f"universal-{checkpoint.parent.name}-{checkpoint.name}"
    main(Namespace(input_folder=str(checkpoint / "state" / "pytorch_model"), output_folder=str(out / "t"),
                   num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                   inject_missing_state=True))  # fmt: skip

    zero = out / "t" / "zero"
    safe = [obj for name in SAFE_GLOBALS if (obj := _resolve(name)) is not None]
    with torch.serialization.safe_globals(safe):  # DeepSpeed's loss-scaler record, never executed
        common = torch.load(zero / "optimizer_state.pt", weights_only=True)
    # ZeRO-1/2 keep a step per parameter (step.pt); ZeRO-3 one per flat group, in the common state
    steps = [s["step"] for s in common.get("optimizer_state_dict", {}).get("state", {}).values()]

    def read(file: Path) -> torch.Tensor:
        value = torch.load(file, weights_only=True)
        return value["param"] if isinstance(value, dict) else value  # step.pt is the bare count

    return {
        p.name: {
            "exp_avg": read(p / "exp_avg.pt"),
            "step": read(p / "step.pt") if (p / "step.pt").exists() else steps[0],
        }
        for p in zero.iterdir()
        if p.is_dir()
    }


@pytest.mark.parametrize("name", list(CASES))
def test_zero_resumes_on_another_number_of_ranks(runs, tmp_path, name):
    strategy, before, after, _, reference = CASES[name]
    run, full = runs[name], runs[reference]
    first = run.resumed_from
    run.check_ok()
    assert f"world_size={after} distributed=DEEPSPEED " in run.log, run.log[-4000:]
    assert f"resumed from {run.out / f'checkpoint-{SAVE_AT}'} at step {SAVE_AT}" in run.log
    assert {t["world_size"] for t in first.trace} == {before} and {t["world_size"] for t in run.trace} == {
        after
    }
    diff = metric_diff(run.rows, full.rows[SAVE_AT:])
    print(f"{name}: max metric difference vs the uninterrupted run {diff:.2e}")
    assert diff <= 1e-5

    def pairs(r, steps):
        return [i for t in r.trace if t["step"] in steps for i in t["ids"]]

    assert sorted(pairs(first, range(1, SAVE_AT + 1)) + pairs(run, [SAVE_AT + 1])) == list(range(N_PAIRS))
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert sorted(pairs(run, [step])) == sorted(pairs(full, [step])), step
    state = adam(run.out / "checkpoint-6", tmp_path)
    assert state and all(float(s["step"]) == 6 for s in state.values())
    if reference == "zero2_ref":  # the moments are the uninterrupted run's
        want = adam(full.out / "checkpoint-6", tmp_path)
        assert state.keys() == want.keys()
        for k in want:
            a, b = state[k]["exp_avg"].flatten(), want[k]["exp_avg"].flatten()  # ZeRO-3 keeps them flat
            assert (a - b).norm() <= 1e-4 * b.norm() + 1e-12, k
