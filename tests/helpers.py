"""What many tests share: paths, the tiny run, an offline environment, launching and reading runs.

Nothing here downloads: the hub is unreachable in CI and on developer machines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from orpo_dist.cpu_launch import LAUNCHER_VARS, OFFLINE_ENV, accelerate_cmd, cpu_env, free_port  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
ACCEL = REPO / "configs" / "accelerate"
# The tiny run every training test starts from (also what launch tests pass as --config).
TINY_YAML = REPO / "tests" / "configs" / "tiny.yaml"
# The tiny run's size (tests/configs/tiny.yaml): 34 pairs, 8 steps, a checkpoint at step 4, 5 steps per epoch
N_PAIRS, STEPS, SAVE_AT = 34, 8, 4
LAUNCH_TIMEOUT = 600  # a hung collective fails the test instead of blocking CI
# name -> (accelerate launch args, extra env, the distributed type the trainer must report)
STRATEGIES = {
    "ddp": (["--config_file", str(ACCEL / "multi_gpu.yaml")], {"ACCELERATE_USE_CPU": "true"}, "MULTI_CPU"),
    "zero2": (["--config_file", str(ACCEL / "zero2.yaml")], {}, "DEEPSPEED"),
    "zero3": (["--config_file", str(ACCEL / "zero3.yaml")], {}, "DEEPSPEED"),
}


def tiny_run(output_dir: str | Path, **overrides) -> dict:
    """tests/configs/tiny.yaml as a dict for `orpo_dist.train`, with `overrides` on top."""
    return {**yaml.safe_load(TINY_YAML.read_text()), "output_dir": str(output_dir), **overrides}


def launch_env(**extra: str) -> dict[str, str]:
    """This environment minus anything a launcher, SLURM or an outer test run sets; offline; CPU only."""
    return cpu_env(REPO, **extra)


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


def our_lines(stream: str) -> list[str]:
    """orpo_dist's own lines in a captured stream: `[orpo_dist] ...` log lines and `orpo_dist: ...` errors.
    Other libraries' lines (which keep their own names) are not ours and are left out."""
    return [line for line in stream.splitlines() if line.startswith(("orpo_dist:", "[orpo_dist]"))]


def assert_one_error_line(stream: str, *needles: str) -> str:
    """The stream holds no traceback and, of orpo_dist's own lines, exactly one: the `orpo_dist: ...` error
    (so it fails when our output grows, not when a third-party library adds a notice). Returns that line."""
    assert "Traceback" not in stream, stream[-3000:]
    ours = our_lines(stream)
    assert len(ours) == 1 and ours[0].startswith("orpo_dist: "), stream[-3000:]
    for needle in needles:
        assert needle in ours[0], (needle, ours[0])
    return ours[0]


@dataclass
class Run:
    """One launched training run as the multi-process tests read it."""

    rc: int
    log: str
    out: Path
    rows: list[dict]  # metrics.jsonl rows written by this launch
    trace: list[dict]  # every rank's {rank, world_size, step, ids}
    data: dict[int, dict] = field(
        default_factory=dict
    )  # rank -> {rank, built, directory}: tokenised or mapped
    resumed_from: Run | None = field(default=None, repr=False)

    def check_ok(self) -> None:
        assert self.rc == 0, self.log[-6000:]

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.rows if "loss" in r}

    def ids(self, rank: int, step: int) -> list[int]:
        (row,) = [t for t in self.trace if t["rank"] == rank and t["step"] == step]
        return row["ids"]

    def weights(self, sub: str = "final") -> dict:
        from safetensors.torch import load_file

        files = sorted((self.out / sub).glob("*.safetensors"))
        assert files, f"no safetensors in {self.out / sub}"
        return {k: v for f in files for k, v in load_file(f).items()}


def launch(
    tmp: Path,
    name: str,
    strategy: str | None,
    model_dir: Path,
    *overrides: str,
    out: Path | None = None,
    ranks: int = 2,
) -> Run:
    """One training run: `strategy` None is a plain single process; else `ranks` ranks under accelerate
    launch (STRATEGIES). Every rank's trace (`ORPO_DIST_TRACE_DIR`) says which pairs it trained on."""
    out = out or tmp / name
    trace = tmp / f"trace-{name}"
    trace.mkdir(parents=True)
    train = ["-m", "orpo_dist.train", "--config", str(TINY_YAML)]
    train += ["--model", str(model_dir), "--output_dir", str(out)]
    env = launch_env(ORPO_DIST_TRACE_DIR=str(trace))
    if strategy is None:
        cmd = [sys.executable, *train]
    else:
        args, strategy_env, _ = STRATEGIES[strategy]
        env.update(strategy_env)
        cmd = accelerate_cmd(ranks, *args, *train)
    rc, log = run_process([*cmd, *overrides], env, cwd=tmp, timeout=LAUNCH_TIMEOUT)
    trace_rows = [row for f in sorted(trace.glob("rank*.jsonl")) for row in read_jsonl(f)]
    # a resume keeps the rows up to its checkpoint and logs the steps after it (each step once)
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    start = int(resumed.group(1)) if resumed else -1
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["step"] > start]
    data = {row["rank"]: row for f in trace.glob("data_rank*.json") for row in read_jsonl(f)}
    return Run(rc, log, out, rows, trace_rows, data)


# FSDP2 over gloo on CPU ranks, launched as on GPUs (orpo_dist/distributed.py, the CPU shim); and FSDP2 with
# parameters kept gathered after forward (ZeRO-2-like) and activation checkpointing
FSDP2_ARGS = ["--config_file", str(ACCEL / "fsdp2.yaml")]
KEEP_AC = ["--fsdp_reshard_after_forward", "false", "--fsdp_activation_checkpointing", "true"]
STRATEGIES["fsdp2"] = (FSDP2_ARGS, {}, "FSDP")
STRATEGIES["fsdp2_keep_ac"] = ([*FSDP2_ARGS, *KEEP_AC], {}, "FSDP")
STRATEGIES["zero1"] = (["--config_file", str(ACCEL / "zero1.yaml")], {}, "DEEPSPEED")


def per_rank(ranks: int) -> tuple[str, ...]:
    """--batch_size that keeps the tiny run's global batch of 8 (accumulation 2) on `ranks` ranks."""
    return ("--batch_size", str(8 // (2 * ranks)))


class LaunchedRuns:
    """Named launched runs, each made once per module on first use (subclasses say how, in `_make`)."""

    def __init__(self, tmp: Path, model_dir: Path):
        self.tmp, self.model_dir, self.cache = tmp, model_dir, {}

    def __getitem__(self, name: str):
        if name not in self.cache:
            self.cache[name] = self._make(name)
        return self.cache[name]

    def _make(self, name: str):
        raise NotImplementedError
