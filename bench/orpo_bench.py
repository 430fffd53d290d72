"""orpo_dist vs trl.experimental.orpo.ORPOTrainer: same model, data, batch and precision, one command.

    python bench/orpo_bench.py --device cpu
    python bench/orpo_bench.py --device cuda --shapes qwen2.5-0.5b,qwen2.5-1.5b

Every run is a training step loop (forward + backward + AdamW step) on a random-init Qwen2-like model
(no download) over the same seeded synthetic batches, each run in a fresh subprocess so its peak memory
is its own (CPU: peak RSS of the process, GPU: torch.cuda.max_memory_allocated). Runs are ordered
A B C D, then D C B A, ... so warm-up and machine drift do not favour one; the table shows medians.

TRL runs its real code: `ORPOTrainer.compute_loss` (-> `get_batch_loss_metrics` -> `concatenated_forward`)
on batches made by its `DPODataCollatorWithPadding` from pre-tokenised rows in its format. orpo_dist
runs `logps.forward_parts` on each of its layouts. Both use the same fused AdamW (transformers' default
`adamw_torch_fused`). The first step's loss (before any update) must agree. Collation is not timed.

Data: an UltraFeedback-like length mix: prompts 50-500 tokens (log-normal, median 150), completions
100-600 (median 250), chosen and rejected drawn independently, random token ids. `--length-scale`
multiplies every length (CPU default 0.25, so a whole CPU run takes minutes on 2 cores; the mix keeps
its shape). Tokens counted = prompt+chosen + prompt+rejected without padding, the same for every run.
MFU (GPU) = 6 * N * tokens / time / peak, N = weights in matmuls (every Linear: projections + lm_head),
attention FLOPs not counted, peak = dense bf16 TFLOP/s of the GPU (H100 SXM / H200: 989, H100 PCIe: 756):
the FLOPs model and peak table the trainer's `mfu` metric uses (orpo_dist/throughput.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clean clone without installing
from orpo_dist.cpu_launch import cpu_model  # noqa: E402

# name: (hidden, layers, heads, kv_heads, intermediate, vocab, tied embeddings)
SHAPES = {
    "cpu-small": (256, 4, 4, 2, 1024, 151936, True),
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, 151936, True),
}
RUNS = ["trl", "padded", "packed", "shared_prefix"]
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 2e-2}


# ---------------------------------------------------------------- data and model


def make_pairs(n: int, vocab: int, seed: int, scale: float) -> list[dict]:
    """Seeded pairs with an UltraFeedback-like length mix (see module docstring)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def length(median, lo, hi):
        return max(1, round(float(np.clip(rng.lognormal(math.log(median), 0.6), lo, hi)) * scale))

    pairs = []
    for _ in range(n):
        p, c, r = length(150, 50, 500), length(250, 100, 600), length(250, 100, 600)
        ids = rng.integers(1, vocab, p + c + r).tolist()  # 0 is the pad id
        pairs.append({"prompt_ids": ids[:p], "chosen_ids": ids[p : p + c], "rejected_ids": ids[p + c :]})
    return pairs


def batches(args, vocab: int) -> list[list[dict]]:
    steps = args.warmup + args.steps
    pairs = make_pairs(steps * args.batch_size, vocab, args.seed, args.length_scale)
    return [pairs[i * args.batch_size : (i + 1) * args.batch_size] for i in range(steps)]


def build_model(shape: str, dtype, device: str, attn: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=32768,
        tie_word_embeddings=tied, attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.train()
    return model


# ---------------------------------------------------------------- one run (child process)


def trl_step_fn(model, opt, device: str, workdir: str):
    """Return (collate, step) that train through TRL's own ORPO code path."""
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    from trl.experimental.utils import DPODataCollatorWithPadding

    from orpo_dist.builtin import build_tokenizer

    args = ORPOConfig(
        output_dir=workdir, bf16=False, beta=0.1, max_length=1 << 20, report_to=[], use_cpu=device == "cpu",
        per_device_train_batch_size=1, disable_dropout=True, dataset_num_proc=None,
    )  # fmt: skip
    tiny = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # TRL insists on one
    trainer = ORPOTrainer(model=model, args=args, train_dataset=tiny, processing_class=build_tokenizer())
    collator = DPODataCollatorWithPadding(pad_token_id=0)

    def collate(pairs):
        rows = []
        for ex in pairs:  # TRL's tokenize_row output format: labels -100 on the prompt
            p = ex["prompt_ids"]
            row = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
            for k in ("chosen", "rejected"):
                ids = p + ex[f"{k}_ids"]
                row |= {f"{k}_input_ids": ids, f"{k}_attention_mask": [1] * len(ids),
                        f"{k}_labels": [-100] * len(p) + ex[f"{k}_ids"]}  # fmt: skip
            rows.append(row)
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in collator(rows).items()}

    def step(batch):
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return collate, step


def ours_step_fn(model, opt, device: str, layout: str, chunk_size: int):
    from orpo_dist.layouts import make_collator, model_inputs
    from orpo_dist.logps import forward_parts

    collator = make_collator(layout, 0, "prompt_completion")  # TRL's NLL scope
    lm_head = model.get_output_embeddings()

    def collate(pairs):
        return {k: v.to(device) for k, v in collator(pairs).items()}

    def step(batch):
        loss = forward_parts(model, lm_head, model_inputs(batch, model), batch, chunk_size).loss(0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return collate, step


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(args) -> dict:
    import torch

    from orpo_dist.throughput import flops_per_token

    warnings.filterwarnings("ignore")
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    run, device = args.run, args.device
    attn = args.attn or ("sdpa" if run in ("trl", "padded") or device == "cpu" else "flex_attention")
    model = build_model(args.shape, dtype, device, attn)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # transformers' default optimizer
    with tempfile.TemporaryDirectory() as workdir:
        if run == "trl":
            collate, step = trl_step_fn(model, opt, device, workdir)
        else:
            collate, step = ours_step_fn(model, opt, device, run, args.chunk_size)
        data = batches(args, SHAPES[args.shape][5])
        rss_before = peak_rss_bytes()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        losses, times, cpu_times, tokens = [], [], [], 0
        for i, pairs in enumerate(data):
            batch = collate(pairs)  # not timed: a dataloader worker does this in training
            if device == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            losses.append(step(batch))
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
                tokens += sum(
                    2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs
                )
    out = {
        "run": run, "shape": args.shape, "attn": attn, "first_loss": losses[0], "losses": losses,
        "seconds": sum(times), "cpu_seconds": sum(cpu_times), "tokens": tokens,
        "examples": args.steps * args.batch_size, "peak_rss": peak_rss_bytes(), "rss_before_steps": rss_before,
        "flops_per_token": flops_per_token(model),  # 6 x matmul weights: a full fine-tune
    }  # fmt: skip
    if device == "cuda":
        out["peak_gpu_mem"] = torch.cuda.max_memory_allocated()
        out["gpu"] = torch.cuda.get_device_name()
    return out


# ---------------------------------------------------------------- orchestration (parent process)


def run_child(args, shape: str, run: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--run", run, "--shape", shape] + args.passthrough
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"run {run} on {shape} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(args, shape: str, results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    base = results["trl"] if "trl" in results else None
    for run, reps in results.items():
        secs = statistics.median(r["seconds"] for r in reps)
        r0 = reps[0]
        row = {
            "shape": shape, "run": run, "attn": r0["attn"], "examples_per_s": r0["examples"] / secs,
            "tokens_per_s": r0["tokens"] / secs, "cpu_s_per_step": statistics.median(r["cpu_seconds"] for r in reps) / args.steps,
            "first_loss": r0["first_loss"], "repeats": len(reps), "seconds": [r["seconds"] for r in reps],
        }  # fmt: skip
        if args.device == "cuda":
            row["peak_mem_gib"] = max(r["peak_gpu_mem"] for r in reps) / 2**30
            from orpo_dist.throughput import peak_tflops_for

            peak = peak_tflops_for(r0["gpu"], args.peak_tflops) or float("nan")
            row["mfu"] = r0["flops_per_token"] * row["tokens_per_s"] / (peak * 1e12)
            row["gpu"] = r0["gpu"]
        else:
            row["peak_mem_gib"] = max(r["peak_rss"] for r in reps) / 2**30
        if base:
            b_secs = statistics.median(r["seconds"] for r in base)
            row["speedup_vs_trl"] = b_secs / secs
            # best of repeats: contention on a shared machine only ever slows a run down
            row["best_speedup_vs_trl"] = min(r["seconds"] for r in base) / min(r["seconds"] for r in reps)
            row["mem_vs_trl"] = row["peak_mem_gib"] / (
                max(r["peak_gpu_mem" if args.device == "cuda" else "peak_rss"] for r in base) / 2**30
            )
            row["loss_rel_diff"] = abs(row["first_loss"] - base[0]["first_loss"]) / abs(base[0]["first_loss"])
        rows.append(row)
    return rows


def table(rows: list[dict], device: str) -> str:
    nan = float("nan")
    columns = [  # (header, cell)
        ("shape", lambda r: r["shape"]),
        ("run", lambda r: r["run"]),
        ("attention", lambda r: r["attn"]),
        ("examples/s", lambda r: f"{r['examples_per_s']:.3f}"),
        ("tokens/s", lambda r: f"{r['tokens_per_s']:.0f}"),
        (
            "peak GPU mem (GiB)" if device == "cuda" else "peak RSS (GiB)",
            lambda r: f"{r['peak_mem_gib']:.2f}",
        ),
        ("vs TRL speed", lambda r: f"{r.get('speedup_vs_trl', nan):.2f}x"),
        ("(best of repeats)", lambda r: f"{r.get('best_speedup_vs_trl', nan):.2f}x"),
        ("vs TRL mem", lambda r: f"{r.get('mem_vs_trl', nan):.2f}x"),
        ("CPU s/step", lambda r: f"{r['cpu_s_per_step']:.2f}"),
        ("first-step loss", lambda r: f"{r['first_loss']:.6f}"),
    ]
    if device == "cuda":
        columns.append(("MFU", lambda r: f"{100 * r['mfu']:.1f}%"))
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--shapes", default=None, help=f"comma-separated, of {list(SHAPES)}")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {RUNS}")
    ap.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (cpu 3, cuda 10)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first; the first gives the loss check (cpu 1, cuda 2: torch.compile of "
                         "FlexAttention recompiles once for dynamic lengths)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3, help="runs of each config, order reversed each time")
    ap.add_argument("--length-scale", type=float, default=None, help="x every length (cpu 0.25, cuda 1.0)")
    ap.add_argument("--chunk-size", type=int, default=None, help="orpo_dist logps chunk (cpu 128, cuda 512)")
    ap.add_argument("--attn", default=None, help="force one attn_implementation for every run")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU (default: by name)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    args.shapes = (args.shapes or ("cpu-small" if cpu else "qwen2.5-0.5b")).split(",")
    args.length_scale = args.length_scale or (0.25 if cpu else 1.0)
    args.steps = args.steps or (3 if cpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 2)
    args.chunk_size = args.chunk_size or (128 if cpu else 512)
    args.passthrough = [
        "--device", args.device, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--length-scale", str(args.length_scale), "--chunk-size",
        str(args.chunk_size), "--seed", str(args.seed),
    ] + (["--attn", args.attn] if args.attn else [])  # fmt: skip
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    runs = args.runs.split(",")
    unknown = [s for s in args.shapes if s not in SHAPES] + [r for r in runs if r not in RUNS]
    if unknown:
        sys.exit(f"unknown shape/run {unknown}; shapes: {list(SHAPES)}, runs: {RUNS}")
    all_rows, raw, failures = [], [], []
    t_start = time.time()
    for shape in args.shapes:
        results: dict[str, list[dict]] = {r: [] for r in runs}
        for rep in range(args.repeats):
            for run in runs if rep % 2 == 0 else runs[::-1]:
                res = run_child(args, shape, run)
                results[run].append(res)
                print(f"[bench] {shape} rep {rep} {run:>13}: {res['seconds']:.2f} s for {args.steps} steps, "
                      f"cpu {res['cpu_seconds']:.1f} s, first loss {res['first_loss']:.6f}", flush=True)  # fmt: skip
        rows = summarise(args, shape, results)
        raw += [r for reps in results.values() for r in reps]
        all_rows += rows
        rtol = LOSS_RTOL["float32" if args.device == "cpu" else "bfloat16"]
        failures += [f"{shape}/{r['run']}: first-step loss differs from TRL by {r['loss_rel_diff']:.2e} (> {rtol})"
                     for r in rows if r.get("loss_rel_diff", 0) > rtol]  # fmt: skip
    md = table(all_rows, args.device)
    machine = f"{cpu_model()}, {os.cpu_count()} CPUs, torch threads {threads()}; {versions()}"
    if args.device == "cuda":
        machine = f"{all_rows[0]['gpu']}; host {machine}"
    cmd = "python bench/orpo_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = (
        f"# orpo_dist vs TRL ORPOTrainer ({args.device})\n\n{md}\n\n"
        f"- command: `{cmd}`\n- machine: {machine}\n"
        f"- batch {args.batch_size} pairs, {args.steps} timed steps after {args.warmup} warm-up, "
        f"{args.repeats} repeats in alternating order (median), length scale {args.length_scale}, "
        f"logps chunk {args.chunk_size}, {'float32' if args.device == 'cpu' else 'bfloat16'} weights\n"
        f"- wall time of the whole benchmark: {time.time() - t_start:.0f} s; seconds of the timed steps per "
        f"repeat (spread = machine noise): "
        + "; ".join(
            f"{r['shape']}/{r['run']} {', '.join(f'{x:.1f}' for x in r['seconds'])}" for r in all_rows
        )
        + "\n"
    )
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.device}.md").write_text(text)
    (out / f"{args.device}.json").write_text(
        json.dumps({"args": vars(args), "rows": all_rows, "runs": raw}, indent=1)
    )
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    return 0


def threads() -> int:
    import torch

    return torch.get_num_threads()


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "trl"))


if __name__ == "__main__":
    sys.exit(main())
