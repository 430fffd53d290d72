"""Numerics guard for refactors: the same runs give the same per-step numbers, to the 6 decimals of
metrics.jsonl, before and after a change.

    python scripts/numerics_guard.py record            # write tests/numerics/baseline.json (before a change)
    python scripts/numerics_guard.py check             # rerun and compare with it (after the change)
    python scripts/numerics_guard.py check --runs layout_padded,layout_packed

Runs (all on CPU, one intra-op thread each, so results do not depend on the machine's load):
  quickstart          the built-in quickstart preset, one process (113 steps, eval before and after)
  ddp                 2-rank DDP over gloo (accelerate launch, configs/accelerate/multi_gpu.yaml)
  zero3_lora          2-rank DeepSpeed ZeRO-3 with LoRA (configs/accelerate/zero3.yaml)
  layout_<name>       one process, the tiny model, layout padded / packed / shared_prefix, with eval
  qlora               one process, the tiny model in nf4 (bitsandbytes on CPU) with LoRA, completion-only NLL
  bench               bench/orpo_bench.py's per-step losses (TRL and each layout), 2 steps, 1 repeat
Every key of every metrics.jsonl row is compared except wall-clock ones (tokens_per_second, ...).
tests/test_numerics_guard.py runs the layout runs in the default suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from orpo_dist.metrics import WALL_CLOCK_KEYS

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "tests" / "numerics" / "baseline.json"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
QUICKSTART = REPO / "orpo_dist" / "presets" / "quickstart.yaml"
ACCEL = REPO / "configs" / "accelerate"
TIMING_KEYS = WALL_CLOCK_KEYS  # wall clock or machine-dependent: never equal twice
LAYOUTS = ("padded", "packed", "shared_prefix")
LAYOUT_ARGS = ["--eval_split", "0.2", "--eval_on_start", "true", "--max_samples", "40", "--eval_steps", "4"]


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "ORPO_", "SLURM_"))
        and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        TRL_EXPERIMENTAL_SILENCE="1",
        CUDA_VISIBLE_DEVICES="",
    )
    return env


def _train_cmd(name: str, out: Path) -> tuple[list[str], dict[str, str]]:
    env = _env()
    train = ["-m", "orpo_dist.train"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2"]
    accelerate += ["--mixed_precision", "no", "--main_process_port", str(_free_port())]
    if name == "quickstart":
        return [sys.executable, *train, "--config", str(QUICKSTART), "--output_dir", str(out)], env
    tiny = ["--config", str(TINY), "--output_dir", str(out)]
    if name == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"
        return [*accelerate, "--config_file", str(ACCEL / "multi_gpu.yaml"), *train, *tiny], env
    if name == "zero3_lora":
        return [*accelerate, "--config_file", str(ACCEL / "zero3.yaml"), *train, *tiny, "--peft", "true"], env
    if name.startswith("layout_"):
        layout = name.removeprefix("layout_")
        return [sys.executable, *train, *tiny, "--layout", layout, *LAYOUT_ARGS], env
    if name == "qlora":
        qlora = ["--peft", "true", "--quantization", "int4", "--nll_scope", "completion", "--max_steps", "4"]
        return [sys.executable, *train, *tiny, *qlora], env
    raise ValueError(f"unknown run {name!r}; runs: {RUNS}")


RUNS = ["quickstart", "ddp", "zero3_lora", *(f"layout_{name}" for name in LAYOUTS), "qlora", "bench"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, workdir: Path) -> list[dict]:
    """The per-step numbers of one run: metrics.jsonl rows (timing keys dropped), or bench losses."""
    out = workdir / name
    if name == "bench":
        cmd = [sys.executable, str(REPO / "bench" / "orpo_bench.py"), "--device", "cpu", "--steps", "2"]
        cmd += ["--warmup", "0", "--repeats", "1", "--out", str(out)]
        env = _env()
    else:
        cmd, env = _train_cmd(name, out)
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    if name == "bench":
        rows = json.loads((out / "cpu.json").read_text())["runs"]
        return [{"run": r["run"], "losses": [round(x, 6) for x in r["losses"]]} for r in rows]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def compare(name: str, want: list[dict], got: list[dict]) -> list[str]:
    """Every difference between two runs' rows, one line each (empty when identical)."""
    problems = []
    if len(want) != len(got):
        problems.append(f"{name}: {len(got)} rows, baseline has {len(want)}")
    for i, (w, g) in enumerate(zip(want, got)):
        for key in sorted(set(w) - TIMING_KEYS):
            if key not in g:
                problems.append(f"{name} row {i}: {key} missing (baseline {w[key]})")
            elif w[key] != g[key]:
                problems.append(f"{name} row {i} (step {w.get('step')}): {key} {g[key]} != baseline {w[key]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["record", "check"])
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {RUNS}")
    ap.add_argument("--baseline", default=str(BASELINE))
    args = ap.parse_args(argv)
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {RUNS}")
    path = Path(args.baseline)
    baseline = json.loads(path.read_text()) if path.exists() else {}
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="orpo_numerics_") as tmp:
        for name in names:
            rows = run(name, Path(tmp))
            if args.mode == "record":
                baseline[name] = rows
                print(f"{name}: recorded {len(rows)} rows", flush=True)
            elif name not in baseline:
                problems.append(f"{name}: not in the baseline {path}; record it first")
            else:
                diff = compare(name, baseline[name], rows)
                problems += diff
                print(f"{name}: {'identical' if not diff else f'{len(diff)} differences'} ({len(rows)} rows)")
    if args.mode == "record":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(baseline, indent=1) + "\n")
        print(f"wrote {path}")
        return 0
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
