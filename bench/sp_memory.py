"""Memory per rank under sequence parallelism: one long preference pair, sp=1 against sp=N, the real trainer.

    python bench/sp_memory.py                              # CPU: a 16k-token pair on builtin:tiny, sp 1 and 2
    python bench/sp_memory.py --prompt 4096 --completion 4096 --sp 1,2

Each size is one `accelerate launch` of configs/accelerate/zero2.yaml with `sp` processes (sp=1: one
process on the same DeepSpeed stack) that builds `orpo_dist.trainer.Trainer` on a data file holding one pair
(a prompt of --prompt tokens, chosen and rejected of --completion tokens each: two rows of prompt+completion
tokens, layout padded) and runs one optimizer step. Each rank reports its resident memory before the step
and its peak during the step (Linux: the peak is reset through /proc/self/clear_refs just before the step,
then read as VmHWM); "step" = peak - before: activations, gradients, the first Adam state. Chosen and
rejected have the same length and the rows are a multiple of 8 tokens, so the sp=1 run needs no padding
mask (sdpa then runs causal, as under sequence parallelism: no [T, T] mask on either side). The ranks
run with MALLOC_MMAP_THRESHOLD_=65536: glibc then maps every large tensor on its own and unmaps it when
freed, so resident memory follows live tensors (with its default, adaptive threshold the same step's
peak varied by ~10% between runs here).
Writes bench/results/sp_memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clean clone without installing
from orpo_dist.cpu_launch import accelerate_cmd, cpu_env  # noqa: E402


def _status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(out: Path, argv: list[str]) -> None:
    """One rank: build the trainer, reset the peak, run one optimizer step, record the memory."""
    from orpo_dist.cli import parse
    from orpo_dist.metrics import MetricWindow
    from orpo_dist.preemption import Preemption
    from orpo_dist.sequence_parallel import slice_of
    from orpo_dist.trainer import Trainer

    cfg, _ = parse(argv)
    trainer = Trainer(cfg, Preemption())  # not entered: no signal handlers in a benchmark
    batches = next(trainer.loader.steps(0, 0))
    trainer.accelerator.wait_for_everyone()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    window, start = MetricWindow(cfg.orpo.beta), time.perf_counter()
    trainer.optimizer_step(batches, window)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    metrics = window.reduce(trainer.accelerator)
    sp_rank, sp = slice_of(trainer.accelerator)
    row = {
        "rank": trainer.accelerator.process_index,
        "world_size": trainer.accelerator.num_processes,
        "sp": sp,
        "sp_rank": sp_rank,
        "tokens_per_rank": [int(b["input_ids"].numel()) for b in batches],
        "rss_before_mib": before / 2**20,
        "step_peak_mib": peak / 2**20,
        "step_mib": (peak - before) / 2**20,
        "step_seconds": seconds,
        "loss": metrics["loss"],
    }
    (out / f"rank{row['rank']}.json").write_text(json.dumps(row))
    trainer.accelerator.wait_for_everyone()


def write_pair(path: Path, prompt: int, completion: int, seed: int) -> None:
    """One pair of random letters: the built-in character tokenizer makes one token per character."""
    rng = random.Random(seed)
    text = lambda n: "".join(rng.choice(string.ascii_letters) for _ in range(n))  # noqa: E731
    # BOS + prompt, completions + EOS: prompt+completion+2 tokens per row
    pair = {"prompt": text(prompt - 1), "chosen": text(completion - 1), "rejected": text(completion - 1)}
    path.write_text(json.dumps(pair) + "\n")


def run_size(args, sp: int, data: Path, work: Path) -> list[dict]:
    out = work / f"sp{sp}"
    out.mkdir(parents=True)
    length = args.prompt + args.completion
    env = cpu_env(ROOT, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [*accelerate_cmd(sp, config=ROOT / "configs" / "accelerate" / "zero2.yaml"),
           __file__, "--child", str(out), "--model", args.model, "--data_path", str(data),
           "--output_dir", str(work / f"run{sp}"), "--max_length", str(length + 8),
           "--max_prompt_length", str(args.prompt + 4), "--eval_split", "0", "--eval_on_start", "false",
           "--batch_size", "1", "--gradient_accumulation", "1", "--max_steps", "1", "--save_steps", "none",
           "--logps_chunk_size", "1024", "--sequence_parallel_size", str(sp), "--lr", "1e-4",
           "--mixed_precision", "no", "--seed", str(args.seed)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"sp={sp} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(sp)]


def table(args, results: dict[int, list[dict]]) -> str:
    base = max(r["step_mib"] for r in results[min(results)])
    lines = [
        f"One pair: prompt {args.prompt} + chosen {args.completion} / rejected {args.completion} tokens "
        f"(2 rows of {args.prompt + args.completion}), {args.model}, layout padded, sdpa, fp32, ZeRO-2, "
        f"{args.threads} thread(s) per rank, {platform.machine()} CPU ({os.cpu_count()} cores).",
        "",
        "| sp | ranks | tokens per rank | RSS before step (MiB) | peak in step (MiB) | step memory (MiB) "
        "| vs sp=1 | step s | loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for sp, rows in sorted(results.items()):
        step = max(r["step_mib"] for r in rows)  # the worst rank
        lines.append(
            f"| {sp} | {len(rows)} | {rows[0]['tokens_per_rank'][0]} | {max(r['rss_before_mib'] for r in rows):.0f} "
            f"| {max(r['step_peak_mib'] for r in rows):.0f} | {step:.0f} | {step / base:.2f}x "
            f"| {max(r['step_seconds'] for r in rows):.1f} | {rows[0]['loss']:.6f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sp", default="1,2", help="comma-separated sequence-parallel sizes (ranks per run)")
    ap.add_argument("--prompt", type=int, default=8192, help="prompt tokens (with BOS)")
    ap.add_argument("--completion", type=int, default=8192, help="chosen and rejected tokens each (with EOS)")
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.child:
        child(Path(args.child), rest)
        return 0
    if (args.prompt + args.completion) % 8:
        ap.error(
            "--prompt + --completion must be a multiple of 8 (no padding mask at sp=1, see the docstring)"
        )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pair.jsonl"
        write_pair(data, args.prompt, args.completion, args.seed)
        for sp in [int(s) for s in args.sp.split(",")]:
            results[sp] = run_size(args, sp, data, Path(tmp))
            print(
                f"sp={sp}: step memory {max(r['step_mib'] for r in results[sp]):.0f} MiB per rank", flush=True
            )
    losses = {sp: rows[0]["loss"] for sp, rows in results.items()}
    text = table(args, results)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "child")}
    (out / "sp_memory.json").write_text(json.dumps({"args": settings, "results": results}, indent=1))
    (out / "sp_memory.md").write_text(text)
    if max(losses.values()) - min(losses.values()) > 1e-4 * abs(min(losses.values())):
        print(f"first-step losses differ between sizes: {losses}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
