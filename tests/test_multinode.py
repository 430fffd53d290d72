"""A real 2-"node" job on loopback: two launcher invocations (1 process each, node ranks 0 and 1, main
address 127.0.0.1) that train, checkpoint and finish together, through the shipped launch scripts.

The nodes share one output_dir, as nodes on a cluster share a filesystem. Each launcher gets a timeout,
and a launcher that fails brings the other down, so a rendezvous that never completes fails the test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ACCEL, N_PAIRS, REPO, SAVE_AT, STEPS, TINY_YAML, free_port, launch_env, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_op")]  # launches DeepSpeed ranks

TIMEOUT = 420


def start_node(script: str, env: dict[str, str], args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(REPO / "launch" / script), *args],
        env=env,
        cwd=log.parent,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: killing it takes every rank with it
    )


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_nodes(script: str, envs: list[dict[str, str]], args: list[str], cwd: Path) -> list[tuple[int, str]]:
    """Head node first, then the other once the rendezvous port is up; wait for both; kill on hang.

    On loopback both launchers would bind the same port, and `accelerate launch` on machine rank 0 refuses a
    port already in use: on a cluster each node has its own, so here the head node simply starts first.
    """
    port = int(envs[0]["MASTER_PORT"])
    logs = [cwd / f"node{i}.log" for i in range(len(envs))]
    procs = [start_node(script, envs[0], args, logs[0])]
    deadline = time.monotonic() + 120
    while not port_open(port) and procs[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    procs += [start_node(script, env, args, log) for env, log in zip(envs[1:], logs[1:])]
    deadline = time.monotonic() + TIMEOUT
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):  # the other node would wait for its peer
            deadline = min(deadline, time.monotonic() + 60)
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return [(p.returncode, log.read_text(errors="replace")) for p, log in zip(procs, logs)]


@pytest.mark.parametrize(
    ("script", "accel_config", "distributed", "node_local_cache"),
    [
        ("multi_node_accelerate.sh", "multi_gpu.yaml", "MULTI_CPU", False),
        ("multi_node_accelerate.sh", "zero3.yaml", "DEEPSPEED", False),
        ("multi_node_torchrun.sh", None, "MULTI_CPU", True),
    ],
    ids=["accelerate-ddp", "accelerate-zero3", "torchrun-ddp-node-local-cache"],
)
def test_two_nodes_train_checkpoint_and_finish_together(
    tmp_path, tiny_model_dir, script, accel_config, distributed, node_local_cache
):
    out, trace = tmp_path / "out", tmp_path / "trace"
    trace.mkdir()
    common = dict(
        NNODES="2",
        GPUS_PER_NODE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RDZV_ID=f"orpo-test-{os.getpid()}",
        PYTHON=sys.executable,
        PATH=os.environ["PATH"],
        ORPO_DIST_TRACE_DIR=str(trace),
        ORPO_CPU="1",  # the scripts' CPU mode: gloo, fp32, ACCELERATE_USE_CPU only where it does not drop DeepSpeed
    )
    if accel_config:
        common["ACCEL_CONFIG"] = str(ACCEL / accel_config)
    # node-local scratch (as $TMPDIR on a cluster): each node's local main process tokenises once for its node
    scratch = [tmp_path / f"node{rank}-scratch" for rank in (0, 1)]
    envs = [launch_env(**common, NODE_RANK=str(rank), NODE_SCRATCH=str(scratch[rank])) for rank in (0, 1)]
    args = ["--config", str(TINY_YAML), "--model", str(tiny_model_dir), "--output_dir", str(out)]
    args += ["--cache_dir", "$NODE_SCRATCH/cache"] if node_local_cache else []
    results = run_nodes(script, envs, args, cwd=tmp_path)

    for node, (rc, log) in enumerate(results):
        assert rc == 0, f"node {node} exited {rc}:\n{log[-5000:]}"
    logs = "".join(log for _, log in results)
    # exactly one rank 0 over both nodes printed the launch summary, with both ranks in the group
    assert logs.count(f"world_size=2 distributed={distributed} ") == 1, logs[-5000:]
    rows = [row for f in sorted(trace.glob("rank*.jsonl")) for row in read_jsonl(f)]
    assert {r["rank"] for r in rows} == {0, 1} and {r["world_size"] for r in rows} == {2}
    for rank in (0, 1):
        assert sorted(r["step"] for r in rows if r["rank"] == rank) == list(range(1, STEPS + 1))
    first_epoch = [
        [i for r in rows if r["rank"] == rank and r["step"] <= 5 for i in r["ids"]] for rank in (0, 1)
    ]
    assert not set(first_epoch[0]) & set(first_epoch[1])
    assert sorted(first_epoch[0] + first_epoch[1]) == list(range(N_PAIRS))
    # they checkpointed and finished together: one metrics row per step, a complete checkpoint, a final model
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert (out / f"checkpoint-{SAVE_AT}" / "COMPLETE").exists()
    assert (out / "final" / "config.json").exists() and list((out / "final").glob("*.safetensors"))
    # the tokenised cache: built once, by rank 0, on the shared disk; or once per node on node-local disks
    data = {row["rank"]: row for f in trace.glob("data_rank*.json") for row in read_jsonl(f)}
    if node_local_cache:
        assert data[0]["built"] and data[1]["built"], data
        # (c10d rendezvous numbers the nodes as they join: which node is rank 1 is not fixed)
        assert {str(Path(data[r]["directory"]).parents[1]) for r in (0, 1)} == {str(p) for p in scratch}, data
        assert "rank 1: tokenised cache: miss: building (no cache in" in logs
    else:
        assert data[0]["built"] and not data[1]["built"], data
        assert data[0]["directory"] == data[1]["directory"] and data[0]["directory"].startswith(str(out))
    assert logs.count("tokenised cache: miss: building") == 1 + node_local_cache


def test_a_two_node_job_requeued_on_one_node_continues_with_the_same_global_batch(tmp_path, tiny_model_dir):
    """A 2-node ZeRO-3 job stopped one step after its step-4 checkpoint, requeued on 1 node (1 process,
    --batch_size 4: the same 8 pairs per step): it converts the checkpoint (universal), retrains step 5 to
    the first job's numbers and trains each pair of the first epoch exactly once over both jobs."""
    out, trace = tmp_path / "out", tmp_path / "trace"
    trace.mkdir()
    common = dict(
        GPUS_PER_NODE="1",
        MASTER_ADDR="127.0.0.1",
        RDZV_ID=f"orpo-test-{os.getpid()}",
        PYTHON=sys.executable,
        PATH=os.environ["PATH"],
        ORPO_DIST_TRACE_DIR=str(trace),
        ORPO_CPU="1",
        ACCEL_CONFIG=str(ACCEL / "zero3.yaml"),
    )
    args = ["--config", str(TINY_YAML), "--model", str(tiny_model_dir), "--output_dir", str(out)]
    port = str(free_port())
    two = [launch_env(**common, NNODES="2", NODE_RANK=str(r), MASTER_PORT=port) for r in (0, 1)]
    results = run_nodes("multi_node_accelerate.sh", two, [*args, "--max_steps", str(SAVE_AT + 1)], tmp_path)
    assert all(rc == 0 for rc, _ in results), results[0][1][-4000:]
    first_rows = read_jsonl(out / "metrics.jsonl")
    first_trace = [row for f in sorted(trace.glob("rank*.jsonl")) for row in read_jsonl(f)]
    for f in trace.glob("*"):
        f.unlink()

    one = [launch_env(**common, NNODES="1", NODE_RANK="0", MASTER_PORT=str(free_port()))]
    ((rc, log),) = run_nodes(
        "multi_node_accelerate.sh", one, [*args, "--batch_size", "4", "--resume", "auto"], tmp_path
    )
    assert rc == 0, log[-5000:]
    assert (
        "world_size=1 distributed=DEEPSPEED per_device_batch=4 gradient_accumulation=2 global_batch=8" in log
    )
    assert f"resumed from {out / f'checkpoint-{SAVE_AT}'} at step {SAVE_AT}" in log
    rows = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl")}
    assert sorted(rows) == list(range(1, STEPS + 1))
    step5 = next(r for r in first_rows if r["step"] == SAVE_AT + 1)
    for key in ("loss", "nll_loss", "log_odds_ratio", "rewards/margins", "grad_norm"):
        assert abs(rows[SAVE_AT + 1][key] - step5[key]) <= 1e-5, (key, rows[SAVE_AT + 1][key], step5[key])
    again = [row for f in sorted(trace.glob("rank*.jsonl")) for row in read_jsonl(f)]
    assert {r["world_size"] for r in first_trace} == {2} and {r["world_size"] for r in again} == {1}
    epoch1 = [i for r in first_trace if r["step"] <= SAVE_AT for i in r["ids"]]
    epoch1 += [i for r in again if r["step"] == SAVE_AT + 1 for i in r["ids"]]
    assert sorted(epoch1) == list(range(N_PAIRS))
    assert (out / "final" / "config.json").exists()
