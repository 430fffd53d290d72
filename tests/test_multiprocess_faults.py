"""Real 2-rank CPU runs (gloo) that meet a fault: a resume on another world size, a resume DeepSpeed cannot
continue, a planted pickle in a ZeRO checkpoint, a hung rank (SIGSTOP) and a lost rank (SIGKILL).

World size and strategy are asserted from what each rank traced (ORPO_DIST_TRACE_DIR), as in
tests/helpers.py's `launch`, as test_multiprocess.py does.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from helpers import ACCEL, SAVE_AT, STEPS, TINY_YAML, Run, accelerate_cmd, launch, launch_env, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_op")]  # launches DeepSpeed ranks


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir):
    """The uninterrupted reference: 1 process x 4 pairs x 2 micro-batches = the global batch of 2 ranks x 2 x 2."""
    run = launch(tmp_path_factory.mktemp("single"), "single", None, tiny_model_dir, "--batch_size", "4")
    run.check_ok()
    return run


def _assert_continues(resumed, reference, world: int) -> None:
    resumed.check_ok()
    assert f"resumed from {resumed.out / f'checkpoint-{SAVE_AT}'} at step {SAVE_AT}" in resumed.log
    assert {t["world_size"] for t in resumed.trace} == {world}
    assert {t["rank"] for t in resumed.trace} == set(range(world))
    for step in range(SAVE_AT + 1, STEPS + 1):  # the same pairs per step, however they are dealt to ranks
        got = sorted(i for t in resumed.trace if t["step"] == step for i in t["ids"])
        assert got == sorted(reference.ids(0, step)), step
    want, got = reference.losses(), resumed.losses()
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=2e-6), step


def test_a_ddp_checkpoint_resumes_on_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, single):
    out = tmp_path / "out"
    first = launch(tmp_path, "ddp-1", "ddp", tiny_model_dir, "--max_steps", str(SAVE_AT + 1), out=out)
    first.check_ok()
    assert {t["world_size"] for t in first.trace} == {2}
    resumed = launch(
        tmp_path, "single-2", None, tiny_model_dir, "--batch_size", "4", "--resume", "auto", out=out
    )
    _assert_continues(resumed, single, world=1)


def test_a_one_process_checkpoint_resumes_on_two_ddp_ranks(tmp_path, tiny_model_dir, single):
    out = tmp_path / "out"
    first = launch(tmp_path, "single-1", None, tiny_model_dir, "--batch_size", "4", "--max_steps", str(SAVE_AT + 1),
                   out=out)  # fmt: skip
    first.check_ok()
    resumed = launch(tmp_path, "ddp-2", "ddp", tiny_model_dir, "--resume", "auto", out=out)
    _assert_continues(resumed, single, world=2)
    assert read_jsonl(out / "metrics.jsonl") and [
        r["step"] for r in read_jsonl(out / "metrics.jsonl")
    ] == list(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def zero2_checkpoint(tmp_path_factory, tiny_model_dir) -> Path:
    tmp = tmp_path_factory.mktemp("zero2")
    run = launch(tmp, "zero2", "zero2", tiny_model_dir, "--max_steps", str(SAVE_AT + 1))
    run.check_ok()
    assert {t["world_size"] for t in run.trace} == {2} and "distributed=DEEPSPEED" in run.log
    return run.out


def _copy(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(src, out)
    return out


@pytest.mark.parametrize(
    ("strategy", "extra", "needle"),
    [
        # another world size with the same global batch continues (tests/test_elastic_zero.py); another
        # global batch cannot
        ("zero2-1", ("--batch_size", "2"), "global_batch 8 -> 4"),
        ("ddp", (), "strategy DEEPSPEED -> MULTI_CPU"),
        (None, ("--batch_size", "4"), "strategy DEEPSPEED -> NO"),
    ],
    ids=["zero2-on-one-rank-another-global-batch", "zero2-as-ddp", "zero2-as-one-plain-process"],
)
def test_a_zero_checkpoint_is_refused_where_its_partitioned_state_cannot_load(
    tmp_path, tiny_model_dir, zero2_checkpoint, strategy, extra, needle
):
    out = _copy(zero2_checkpoint, tmp_path)
    if strategy == "zero2-1":
        run = _launch_zero2(tmp_path, tiny_model_dir, out, 1, *extra, "--resume", "auto")
    else:
        run = launch(tmp_path, "refused", strategy, tiny_model_dir, *extra, "--resume", "auto", out=out)
    _assert_refused(run)
    refused = f"cannot resume from {out / f'checkpoint-{SAVE_AT}'}"
    assert refused in run.log and needle in run.log, run.log[-4000:]
    assert not run.trace  # nothing trained


def _assert_refused(run) -> None:
    """Exit 2 from the trainer (a launcher reports any failed rank as its own exit 1), no trainer traceback."""
    if "ChildFailedError" in run.log:
        assert run.rc != 0 and "exitcode  : 2" in run.log, run.log[-4000:]
    else:
        assert run.rc == 2, run.log[-4000:]
    frames = [line for line in run.log.splitlines() if line.strip().startswith("File ")]
    assert not [f for f in frames if "orpo_dist/" in f], frames


def test_a_planted_pickle_in_a_zero_checkpoint_is_never_executed(tmp_path, tiny_model_dir, zero2_checkpoint):
    out = _copy(zero2_checkpoint, tmp_path)
    marker = tmp_path / "PWNED"
    (state,) = (out / f"checkpoint-{SAVE_AT}" / "state" / "pytorch_model").glob(
        "zero_pp_rank_0_*optim_states.pt"
    )
    state.write_bytes(pickle.dumps(_Payload(marker)))
    run = _launch_zero2(tmp_path, tiny_model_dir, out, 2, "--resume", "auto")
    _assert_refused(run)
    assert state.name in run.log and "refusing" in run.log, run.log[-4000:]
    assert not marker.exists()


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _launch_zero2(tmp_path, model_dir, out, processes: int, *flags):
    """A ZeRO-2 launch with `processes` ranks (launch() always starts 2)."""
    trace = tmp_path / f"trace-zero2-{processes}"
    trace.mkdir()
    cmd = [*accelerate_cmd(processes, config=ACCEL / "zero2.yaml"), "-m", "orpo_dist.train", "--config", str(TINY_YAML), "--model", str(model_dir), "--output_dir", str(out),
           *flags]  # fmt: skip
    proc = subprocess.run(cmd, env=launch_env(ORPO_DIST_TRACE_DIR=str(trace)), cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    rows = [row for f in sorted(trace.glob("rank*.jsonl")) for row in read_jsonl(f)]
    return Run(proc.returncode, proc.stdout + proc.stderr, out, [], rows)


# ------------------------------------------------------------------------------------------ a hung or lost rank

DDP_TIMEOUT = 20


def _start_long_ddp_run(tmp_path, model_dir) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "out"
    cmd = [*accelerate_cmd(2, config=ACCEL / "multi_gpu.yaml"), "-m", "orpo_dist.train", "--config", str(TINY_YAML), "--model", str(model_dir), "--output_dir", str(out),
           "--max_samples", "2000", "--max_steps", "100000", "--save_steps", "1000", "--ddp_timeout", str(DDP_TIMEOUT)]  # fmt: skip
    log = (tmp_path / "log.txt").open("w")
    proc = subprocess.Popen(cmd, env=launch_env(ACCELERATE_USE_CPU="true"), cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while len(read_jsonl(out / "metrics.jsonl")) < 3:  # training, on both ranks
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-4000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.5)
    return proc, out


def _ranks(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The trainer processes under the launcher (torchrun starts them in their own sessions)."""
    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and "orpo_dist.train" in " ".join(child.cmdline()):
            found[int(rank)] = child
    return found


def _kill_tree(proc: subprocess.Popen, ranks: dict[int, psutil.Process]) -> list[int]:
    """Whatever is still alive of the launcher and its ranks (continued, then killed); their pids."""
    alive = [
        p
        for p in [*ranks.values(), *_children(proc)]
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]
    for p in alive:
        try:
            p.send_signal(signal.SIGCONT)
            p.kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return [p.pid for p in alive]


def _children(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


@pytest.mark.parametrize(("how", "sig"), [("hung", signal.SIGSTOP), ("lost", signal.SIGKILL)])
def test_a_hung_or_lost_rank_ends_the_job_within_the_timeout(tmp_path, tiny_model_dir, how, sig):
    proc, out = _start_long_ddp_run(tmp_path, tiny_model_dir)
    ranks = _ranks(proc)
    try:
        assert sorted(ranks) == [0, 1], ranks
        stopped_at = time.monotonic()
        ranks[1].send_signal(sig)
        try:
            rc = proc.wait(timeout=DDP_TIMEOUT + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job outlived ddp_timeout={DDP_TIMEOUT}s + 60 s with rank 1 {how}")
        elapsed = time.monotonic() - stopped_at
        left = [p.pid for p in ranks.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        leftover = _kill_tree(proc, ranks)
    log = (tmp_path / "log.txt").read_text()
    assert rc != 0, log[-4000:]
    assert elapsed < DDP_TIMEOUT + 60
    assert not left and not leftover, f"processes left behind: {left or leftover}"
    # rank 0 says what happened in one line (a hung peer: after ddp_timeout; a lost one: at once)
    assert "orpo_dist: a rank stopped answering" in log, log[-4000:]
    if how == "hung":
        assert f"ddp_timeout={DDP_TIMEOUT}s" in log and elapsed >= DDP_TIMEOUT - 1
    assert not (out / "final").exists()
