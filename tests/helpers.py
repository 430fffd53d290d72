"""What many tests share: paths, the tiny run, an offline environment, launching and reading runs.

Nothing here downloads: the hub is unreachable in CI and on developer machines.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ACCEL = REPO / "configs" / "accelerate"
# The tiny run every training test starts from (also what launch tests pass as --config).
TINY_YAML = REPO / "tests" / "configs" / "tiny.yaml"
# No hub, no wandb network, no tokenizers threads: tests run offline and quiet.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "TRL_EXPERIMENTAL_SILENCE": "1",
}
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


def tiny_run(output_dir: str | Path, **overrides) -> dict:
    """tests/configs/tiny.yaml as a dict for `orpo_dist.train`, with `overrides` on top."""
    return {**yaml.safe_load(TINY_YAML.read_text()), "output_dir": str(output_dir), **overrides}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    """This environment minus anything a launcher, SLURM or an outer test run sets; offline; CPU only."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "ORPO_", "SLURM_")) and k not in LAUNCHER_VARS
    }
    env.update(
        OFFLINE_ENV,
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        OMP_NUM_THREADS="1",  # 2 ranks on 2 cores: one intra-op thread each avoids oversubscription stalls
        CUDA_VISIBLE_DEVICES="",  # CPU + gloo on any machine (2 ranks cannot share one GPU under NCCL)
    )
    env.update(extra)
    return env


def run_process(cmd: list[str], env: dict[str, str], cwd: Path, timeout: int = 600) -> tuple[int, str]:
    """Run in its own process group, so a timeout kills the launcher and every rank it started."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",  # ranks share the pipe: never fail a test on a split character
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s (hung collective?): {' '.join(cmd)}\n{out[-4000:]}")
    return proc.returncode, out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def orpo_forward(model, batch: dict, chunk_size: int = 1024, lm_head=None):
    """The trainer's forward for one collated batch: model inputs for its layout, log-probs, ORPO sums."""
    from orpo_dist.layouts import model_inputs
    from orpo_dist.logps import forward_parts

    head = model.get_output_embeddings() if lm_head is None else lm_head
    return forward_parts(model, head, model_inputs(batch, model), batch, chunk_size)


def tokenized_pair(tokenizer, prompt: str, chosen: str, rejected: str, pair_id: int = 0) -> dict:
    """One pair tokenised as the data pipeline does: BOS + prompt, completions + EOS."""
    eos = tokenizer.eos_token_id
    return {
        "id": pair_id,
        "prompt_ids": tokenizer(prompt)["input_ids"],
        "chosen_ids": tokenizer(chosen, add_special_tokens=False)["input_ids"] + [eos],
        "rejected_ids": tokenizer(rejected, add_special_tokens=False)["input_ids"] + [eos],
    }


def example_pairs(tokenizer) -> list[dict]:
    """Three pairs of different prompt / completion lengths."""
    rows = [
        ("Write in capitals: cat\n", "CAT", "cat"),
        ("Write in small letters: HORSES\n", "horses", "HORSES"),
        ("Say yes: ", "yes, of course", "no"),
    ]
    return [tokenized_pair(tokenizer, *row, i) for i, row in enumerate(rows)]


def signal_after_logging(monkeypatch, step: int, sig: int = signal.SIGUSR1) -> None:
    """Send `sig` to this process right after the training row of `step` is logged (a preemption there)."""
    from orpo_dist.metrics import MetricsLog

    write = MetricsLog.write

    def write_then_signal(self, row):
        write(self, row)
        if row.get("step") == step and "loss" in row:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(MetricsLog, "write", write_then_signal)


def pairs_jsonl(path: Path, n: int = 40, seed: int = 1) -> Path:
    """`n` pairs of the built-in task as a standard-format JSON lines file."""
    from orpo_dist.builtin import case_rule_pairs

    path.write_text("".join(json.dumps(p) + "\n" for p in case_rule_pairs(n, seed=seed)))
    return path


def conversations_jsonl(path: Path, n: int = 40, seed: int = 1) -> Path:
    """The built-in task as ultrafeedback-style conversations (chosen / rejected message lists)."""
    from orpo_dist.builtin import case_rule_pairs

    with path.open("w") as f:
        for p in case_rule_pairs(n, seed=seed):
            user = {"role": "user", "content": p["prompt"].strip()}
            chosen = [user, {"role": "assistant", "content": p["chosen"]}]
            rejected = [user, {"role": "assistant", "content": p["rejected"]}]
            f.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    return path
