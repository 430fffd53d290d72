"""How the tests, the benchmarks and the numerics guard start orpo_dist on a CPU machine: an offline, quiet
environment, a free port, and the `accelerate launch` command line. One home, so every launcher of
theirs starts ranks the same way (one intra-op thread each, no GPU, nothing from the hub).

Not used by training itself; it imports nothing else of orpo_dist.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from pathlib import Path

# No hub, no wandb network, no tokenizers threads: runs are offline and quiet.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "TRL_EXPERIMENTAL_SILENCE": "1",
}
# What a launcher or an outer run sets, and a fresh launch must not inherit.
LAUNCHER_VARS = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "NNODES",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def cpu_env(code_dir: str | Path, **extra: str) -> dict[str, str]:
    """This environment minus anything a launcher, SLURM or an outer run sets; offline; CPU only; `code_dir`
    first on PYTHONPATH (the orpo_dist checkout to run); then `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "ORPO_", "SLURM_")) and k not in LAUNCHER_VARS
    }
    env.update(
        OFFLINE_ENV,
        PYTHONPATH=os.pathsep.join([str(code_dir), *filter(None, [os.environ.get("PYTHONPATH")])]),
        OMP_NUM_THREADS="1",  # 2 ranks on 2 cores: one intra-op thread each avoids oversubscription stalls
        CUDA_VISIBLE_DEVICES="",  # CPU + gloo on any machine (2 ranks cannot share one GPU under NCCL)
    )
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cmd(num_processes: int, *args: str, config: str | Path | None = None) -> list[str]:
    """`accelerate launch` of `num_processes` ranks in float32 on a free port; `args` follow (the launch's
    own flags, then the script or `-m module` and its arguments)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config is not None:
        cmd += ["--config_file", str(config)]
    cmd += ["--num_processes", str(num_processes), "--mixed_precision", "no"]
    return [*cmd, "--main_process_port", str(free_port()), *args]


def cpu_model() -> str:
    """The CPU's model name (benchmarks name the machine; another CPU sums floats in another order)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
