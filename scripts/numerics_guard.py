"""Numerics guard for refactors: the same runs give the same per-step numbers, to the 6 decimals of
metrics.jsonl (within last-digit noise, see TOLERANCE), before and after a change.

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
Every key of every metrics.jsonl row is compared except wall-clock ones (tokens_per_second, ...), within
TOLERANCE. The library versions a baseline was recorded with are kept beside it and printed on a mismatch,
so a number moved by a new release names the release. tests/test_numerics_guard.py runs the layout runs.

The quickstart trains 113 steps at lr 3e-3: last-digit noise grows along such a trajectory, so it matches
only on the CPU (and libraries) that recorded it. Measured: the unchanged code of 41fe73c on an Intel Xeon
against its AMD EPYC baseline differs in 111 values (grad_norm at step 30: 5.148443 vs 5.146109). A
mismatch prints the recorded and the current CPU and versions; re-record it there, saying so in the commit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from orpo_dist.cpu_launch import accelerate_cmd, cpu_env, cpu_model
from orpo_dist.metrics import WALL_CLOCK_KEYS

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "tests" / "numerics" / "baseline.json"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
QUICKSTART = REPO / "orpo_dist" / "presets" / "quickstart.yaml"
ACCEL = REPO / "configs" / "accelerate"
TIMING_KEYS = WALL_CLOCK_KEYS  # wall clock or machine-dependent: never equal twice
LAYOUTS = ("padded", "packed", "shared_prefix")
# |got - want| <= ABS + REL * |want|. Values are printed with 6 decimals, so the same computation summed in
# another order (another CPU's BLAS kernels, a new torch) moves the last digit: 1e-6 from rounding alone,
# measured up to 1e-6 between an AMD EPYC and an Intel Xeon. 2e-6 absorbs that; the relative part covers
# values above 1 (a loss of 12 holds ~1e-6 float32 noise). A real change - a 1e-4 nudge of the loss, a
# token more or less in a mean, another data order - moves numbers by 1e-4 or more (test_numerics_guard).
TOLERANCE = {"abs": 2e-6, "rel": 1e-6}
# A gradient norm sums the squares of every gradient entry (87k-1M float32 values in these runs), so its
# own rounding noise is larger: measured 2.0e-6 relative between the two CPUs above (layout_padded step 7:
# 9.282887 vs 9.282906). 1e-5 relative absorbs that; a changed objective moves it by far more.
KEY_TOLERANCE = {"grad_norm": {"abs": 2e-6, "rel": 1e-5}}
VERSIONS_KEY = "_versions"  # baseline.json: {run: rows, ..., "_versions": {run: {library: version}}}
LIBRARIES = (
    "torch",
    "transformers",
    "accelerate",
    "deepspeed",
    "peft",
    "trl",
    "bitsandbytes",
    "datasets",
    "numpy",
)
LAYOUT_ARGS = ["--eval_split", "0.2", "--eval_on_start", "true", "--max_samples", "40", "--eval_steps", "4"]


def _train_cmd(name: str, out: Path) -> tuple[list[str], dict[str, str]]:
    env = cpu_env(REPO)
    train = ["-m", "orpo_dist.train"]
    accelerate = accelerate_cmd(2)
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


def run(name: str, workdir: Path) -> list[dict]:
    """The per-step numbers of one run: metrics.jsonl rows (timing keys dropped), or bench losses."""
    out = workdir / name
    if name == "bench":
        cmd = [sys.executable, str(REPO / "bench" / "orpo_bench.py"), "--device", "cpu", "--steps", "2"]
        cmd += ["--warmup", "0", "--repeats", "1", "--out", str(out)]
        env = cpu_env(REPO)
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


def versions() -> dict[str, str]:
    """The versions of the libraries that decide the numbers, as installed now."""
    import importlib.metadata as md
    import platform

    found = {"python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_model()}
    for lib in LIBRARIES:
        try:
            found[lib] = md.version(lib)
        except md.PackageNotFoundError:
            found[lib] = "not installed"
    return found


def close(want, got, key: str = "") -> bool:
    """Equal, or both numbers within the tolerance for `key` (bools and strings must be equal)."""
    if isinstance(want, bool) or isinstance(got, bool) or not isinstance(want, (int, float)):
        return want == got
    if not isinstance(got, (int, float)):
        return False
    tol = KEY_TOLERANCE.get(key, TOLERANCE)
    return abs(got - want) <= tol["abs"] + tol["rel"] * abs(want)


def _values_close(want, got, key: str) -> bool:
    if isinstance(want, list) and isinstance(got, list):
        return len(want) == len(got) and all(close(w, g, key) for w, g in zip(want, got))
    return close(want, got, key)


def compare(name: str, want: list[dict], got: list[dict]) -> list[str]:
    """Every difference beyond TOLERANCE between two runs' rows, one line each (empty when they match)."""
    problems = []
    if len(want) != len(got):
        problems.append(f"{name}: {len(got)} rows, baseline has {len(want)}")
    for i, (w, g) in enumerate(zip(want, got)):
        for key in sorted(set(w) - TIMING_KEYS):
            if key not in g:
                problems.append(f"{name} row {i}: {key} missing (baseline {w[key]})")
            elif not _values_close(w[key], g[key], key):
                problems.append(f"{name} row {i} (step {w.get('step')}): {key} {g[key]} != baseline {w[key]}")
    return problems


def version_changes(recorded: dict[str, str] | None, now: dict[str, str]) -> str:
    """One line: which library versions differ from the baseline's (what may have moved a number)."""
    if not recorded:
        return "library versions of the baseline: not recorded"
    moved = [f"{lib} {recorded.get(lib, '?')} -> {now.get(lib, '?')}" for lib in sorted(set(recorded) | set(now))
             if recorded.get(lib) != now.get(lib)]  # fmt: skip
    return "versions changed since the baseline: " + (", ".join(moved) if moved else "none (same versions)")


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
    recorded_versions = baseline.setdefault(VERSIONS_KEY, {})
    now = versions()
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="orpo_numerics_") as tmp:
        for name in names:
            rows = run(name, Path(tmp))
            if args.mode == "record":
                baseline[name] = rows
                recorded_versions[name] = now
                print(f"{name}: recorded {len(rows)} rows", flush=True)
            elif name not in baseline:
                problems.append(f"{name}: not in the baseline {path}; record it first")
            else:
                diff = compare(name, baseline[name], rows)
                if diff:
                    diff.append(f"{name}: {version_changes(recorded_versions.get(name), now)}")
                problems += diff
                print(
                    f"{name}: {'matches' if not diff else f'{len(diff) - 1} differences'} ({len(rows)} rows)"
                )
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
