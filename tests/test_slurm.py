"""`sbatch slurm/orpo.sh` for real, on a local one-node SLURM (`sudo bash scripts/ci_slurm_setup.sh`).

Skipped, with the reason, when there is no `sbatch` or no reachable idle node. The jobs train the tiny
built-in model on CPU with 2 ranks (ORPO_CPU=1): one runs to the end under the script's defaults
(DeepSpeed ZeRO-3, --resume auto); one is sent SIGUSR1 the way SLURM warns before a time limit, must
checkpoint, requeue itself, and finish from that checkpoint in the same job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import OFFLINE_ENV, TINY_YAML
from helpers import REPO as ROOT

# the tiny run, longer: ~20 s a job on 2 CPU ranks
RUN_FLAGS = ["--max_samples", "400", "--eval_split", "0.1", "--max_steps", "20", "--save_steps", "5"]
STEPS = 200  # optimizer steps of the preempted run
SETUP_HINT = "start one with `sudo bash scripts/ci_slurm_setup.sh`"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_op")]  # launches DeepSpeed ranks


def sh(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ranks() -> int:
    """Processes per job: 2 when the node has 2 CPUs (it should), else 1."""
    if shutil.which("sbatch") is None:
        pytest.skip(f"no SLURM here (sbatch not found); {SETUP_HINT}")
    try:
        out = sh("sinfo", "-h", "-o", "%T %c")
    except subprocess.TimeoutExpired:
        pytest.skip(f"SLURM not reachable (sinfo timed out); {SETUP_HINT}")
    if out.returncode != 0:
        pytest.skip(f"SLURM not reachable (sinfo: {out.stderr.strip()}); {SETUP_HINT}")
    nodes = [line.split() for line in out.stdout.splitlines() if line.strip()]
    usable = [int(cpus) for state, cpus in nodes if state in ("idle", "mixed")]
    if not usable:
        pytest.skip(f"no idle SLURM node (sinfo: {out.stdout.strip() or 'no nodes'})")
    return min(2, max(usable))


def submit(
    tmp_path: Path, ranks: int, extra: list[str], wait: bool, **env: str
) -> subprocess.CompletedProcess:
    job_env = {
        **os.environ,
        "ORPO_CPU": "1",
        "GPUS_PER_NODE": str(ranks),
        "PYTHON": sys.executable,
        **OFFLINE_ENV,
        **env,
    }
    cmd = [
        "sbatch",
        "--nodes=1",
        "--gpus-per-node=0",
        f"--cpus-per-task={ranks}",
        "--time=10",
        "--job-name=orpo-test",
        f"--output={tmp_path}/job-%j.out",
        "--wait" if wait else "--parsable",
        "slurm/orpo.sh",
        str(TINY_YAML),
        "--output_dir",
        str(tmp_path / "run"),
        *RUN_FLAGS,
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=300)


def job_log(tmp_path: Path) -> str:
    logs = sorted(tmp_path.glob("job-*.out"))
    assert len(logs) == 1, f"expected one job log, found {logs}"
    return logs[0].read_text(errors="replace")  # ranks write into one file: a character may be split


def train_rows(tmp_path: Path) -> list[dict]:
    """metrics.jsonl rows of optimizer steps (eval rows carry `eval_*` keys instead of `loss`)."""
    path = tmp_path / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if "loss" in r]


def test_sbatch_trains_to_the_end(tmp_path, ranks):
    """The script's defaults (ZeRO-3 config, --resume auto) on CPU ranks, through `sbatch --wait`."""
    t0 = time.time()
    out = submit(tmp_path, ranks, [], wait=True)
    log = job_log(tmp_path)
    assert out.returncode == 0, f"sbatch: {out.stdout}{out.stderr}\n--- job log ---\n{log[-4000:]}"
    assert f"world_size={ranks} distributed=DEEPSPEED" in log
    assert "--resume auto" in log and "resume: auto found no checkpoint; starting fresh" in log
    assert "[orpo.sh] finished with exit code 0" in log
    assert (tmp_path / "run" / "final" / "orpo_config.yaml").exists()
    rows = train_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 21))
    print(f"sbatch --wait round trip: {time.time() - t0:.0f} s")


def test_preempted_job_checkpoints_requeues_and_resumes(tmp_path, ranks):
    t0 = time.time()
    # A step takes 15 to 300 ms here depending on what else runs: signal at the first logged step, and
    # make the run long enough that even at full speed the signal lands well before the end.
    out = submit(
        tmp_path,
        ranks,
        ["--max_steps", str(STEPS), "--save_steps", "50"],
        wait=False,
        ACCEL_CONFIG="configs/accelerate/multi_gpu.yaml",
    )
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]

    def queued() -> bool:
        return bool(sh("squeue", "-h", "-j", job, "-o", "%T").stdout.strip())

    try:
        deadline = time.time() + 150
        while not train_rows(tmp_path):  # training has started: the trainer's handler is installed
            assert time.time() < deadline and queued(), (
                f"job {job} did not get going:\n{job_log(tmp_path)[-3000:]}"
            )
            time.sleep(0.05)
        # what SLURM does before the time limit (--signal), here to the batch shell and every step process
        assert sh("scancel", "--signal=USR1", "--full", job).returncode == 0
        deadline = time.time() + 240
        while queued():
            assert time.time() < deadline, f"job {job} still queued:\n{job_log(tmp_path)[-3000:]}"
            time.sleep(1)
    finally:
        sh("scancel", job)

    log = job_log(tmp_path)
    saved = re.search(r"preempted: checkpoint saved at step (\d+)", log)
    assert saved, log[-4000:]
    step = int(saved.group(1))
    assert 1 <= step < STEPS
    assert f"requeueing job {job}" in log
    assert f"job {job} restart 1:" in log  # the same job ran again, appending to the same log
    assert re.search(rf"resumed from \S+/checkpoint-{step} at step {step}\b", log), log[-4000:]
    assert "[orpo.sh] finished with exit code 0" in log
    assert (tmp_path / "run" / "final" / "orpo_config.yaml").exists()
    assert [r["step"] for r in train_rows(tmp_path)] == list(
        range(1, STEPS + 1)
    )  # nothing lost, nothing repeated
    state = sh("scontrol", "show", "job", job).stdout
    if state:  # still remembered by slurmctld (MinJobAge)
        assert "JobState=COMPLETED" in state and "Restarts=1" in state
    print(f"preempt + requeue + resume: {time.time() - t0:.0f} s")
