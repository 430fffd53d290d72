"""The data stage at scale, one command: cold and warm start, 1 and 2 ranks, pairs/s, peak RSS per rank,
and how much of a training step waits for data.

    python bench/data_bench.py                          # 10k and 100k pairs, CPU, writes bench/results/data_cpu.*
    python bench/data_bench.py --pairs 2000 --repeats 1 --before main   # also the code of a git ref

It writes a seeded UltraFeedback-like JSONL of N pairs (`conversational`: a text prompt plus chosen and
rejected as whole {role, content} conversations, as in ultrafeedback_binarized; or `standard`: three
strings), prompts 50-500 characters (log-normal, median 150) and completions 100-600 (median 250) of
random words; with the built-in character-level tokenizer a character is a token, and pairs are cut to
max_length 512 / max_prompt_length 256 (the tiny model's context). Then, for each N and rank count, it
launches the trainer's data stage as the trainer runs it (tokenizer, tokenised cache, the rank's loader
with its length column), under `python` for 1 rank and `ACCELERATE_USE_CPU=true accelerate launch
--multi_gpu --num_processes 2` for 2 ranks (real gloo ranks):
- cold: an empty cache_dir (the job tokenises), then warm: the same cache_dir again (a requeued job);
- data stage = from the first rank's start of the data stage to the barrier after it, max over ranks;
  pairs/s = N / that; peak RSS per rank (ru_maxrss, and the largest tokenising worker);
- `--before REF` runs the same stage on the code of a git ref (there: no cache, every rank tokenises).
Last, a 2-rank training run of the tiny model on the 10k-pair file for each `dataloader_num_workers`:
the fraction of step time the loop waited for its next batch (data_wait_seconds / window seconds, after
the first step) and steps/s. Each measurement runs `--repeats` times (median, and every repeat listed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clean clone without installing
from orpo_dist.cpu_launch import accelerate_cmd, cpu_env, cpu_model  # noqa: E402

DATA = dict(max_length=512, max_prompt_length=256, eval_split=0.01, seed=1, model="builtin:tiny")


# ---------------------------------------------------------------- the data file


def write_pairs(path: Path, n: int, kind: str, seed: int = 0) -> Path:
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(5000)
    ]

    def text(median: int, lo: int, hi: int) -> str:
        n_chars = int(min(max(rng.lognormvariate(math.log(median), 0.6), lo), hi))
        words, size = [], 0
        while size < n_chars:
            words.append(rng.choice(vocab))
            size += len(words[-1]) + 1
        return (" ".join(words)[: n_chars - 1] + ".").capitalize()

    with path.open("w") as f:
        for i in range(n):
            prompt, chosen, rejected = text(150, 50, 500), text(250, 100, 600), text(250, 100, 600)
            if kind == "standard":
                row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            else:
                user = {"role": "user", "content": prompt}
                row = {"prompt": prompt, "prompt_id": f"{i:08x}",
                       "chosen": [user, {"role": "assistant", "content": chosen}],
                       "rejected": [user, {"role": "assistant", "content": rejected}],
                       "score_chosen": 8.0, "score_rejected": 5.0}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return path


# ---------------------------------------------------------------- children (one per rank)


def peak_rss(who=resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024  # Linux: KiB


def rss_anon() -> int:
    """This process's resident anonymous memory now (not the file-backed pages of memory-mapped Arrow)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the tokenising workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def data_child(args) -> None:
    """The trainer's data stage on this rank; appends one JSON line per rank to args.result."""
    import importlib.util

    import orpo_dist
    from orpo_dist.config import load_config
    from orpo_dist.distributed import check_world_size, make_accelerator
    from orpo_dist.layouts import make_collator
    from orpo_dist.loader import make_loaders
    from orpo_dist.modeling import load_tokenizer, resolve_model_path

    new = importlib.util.find_spec("orpo_dist.data.cache") is not None  # else: the code before the cache
    overrides = {**DATA, "data_path": args.data, "output_dir": args.output_dir}
    cfg = load_config(None, {**overrides, "cache_dir": args.cache_dir} if new else overrides)
    accelerator = make_accelerator(cfg)
    check_world_size(accelerator)
    with accelerator.main_process_first():
        tokenizer = load_tokenizer(resolve_model_path(cfg))
    accelerator.wait_for_everyone()
    rss_before, start, cpu = peak_rss(), time.perf_counter(), cpu_seconds()
    if new:
        from orpo_dist.data.cache import tokenised_datasets

        data = tokenised_datasets(cfg, tokenizer, accelerator, lambda m: print(m, flush=True))
        train, evaluation, built = data.train, data.eval, data.built
    else:
        from orpo_dist.data import build_datasets

        with accelerator.main_process_first():
            train, evaluation, _ = build_datasets(cfg.data, tokenizer, cfg.train.seed)
        built = True
    collate = make_collator(cfg.orpo.layout, tokenizer.pad_token_id, cfg.orpo.nll_scope)
    loader, _ = make_loaders(cfg.train, train, evaluation, collate, accelerator)
    accelerator.wait_for_everyone()
    row = {
        "rank": accelerator.process_index, "world": accelerator.num_processes, "built": built,
        "seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu,
        "pairs": len(train) + (len(evaluation) if evaluation is not None else 0),
        "peak_rss": peak_rss(), "rss_before": rss_before, "worker_peak_rss": peak_rss(resource.RUSAGE_CHILDREN),
        "rss_anon_after": rss_anon(), "code": str(Path(orpo_dist.__file__).parents[1]),
    }  # fmt: skip
    with open(args.result, "a") as f:
        f.write(json.dumps(row) + "\n")


def train_child(args) -> None:
    """A short 2-rank training run; records each logging window's seconds and data wait on every rank."""
    from orpo_dist.config import load_config
    from orpo_dist.metrics import MetricsLog
    from orpo_dist.preemption import Preemption
    from orpo_dist.trainer import Trainer

    windows = []
    log_train = MetricsLog.log_train

    def record(self, window, seconds, data_wait, **fields):
        windows.append((seconds, data_wait))
        return log_train(self, window, seconds, data_wait, **fields)

    MetricsLog.log_train = record
    cfg = load_config(None, {**DATA, "data_path": args.data, "output_dir": args.output_dir,
                             "cache_dir": args.cache_dir, "eval_split": 0, "eval_on_start": False,
                             "max_steps": args.train_steps, "logging_steps": 1, "save_steps": None,
                             "batch_size": 4, "dataloader_num_workers": args.workers[0]})  # fmt: skip
    trainer = Trainer(cfg, Preemption())  # not entered: no signal handlers in a benchmark
    trainer.train()
    rank = trainer.accelerator.process_index
    with open(args.result, "a") as f:
        f.write(json.dumps({"rank": rank, "windows": windows}) + "\n")


# ---------------------------------------------------------------- the parent


def launch(args, mode: str, ranks: int, result: Path, code: Path, **kw) -> list[dict]:
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    script = [str(Path(__file__).resolve()), f"--child={mode}", f"--result={result}", *extra]
    env = cpu_env(code)
    if ranks == 1:
        cmd = [sys.executable, *script]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = accelerate_cmd(ranks, "--multi_gpu", *script)
    result.unlink(missing_ok=True)
    proc = subprocess.run(cmd, env=env, cwd=code, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    assert sorted(r["rank"] for r in rows) == list(range(ranks)), rows
    assert all(r.get("code", str(code)) == str(code) for r in rows), (rows, code)  # the code asked for ran
    return sorted(rows, key=lambda r: r["rank"])


def export_ref(ref: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def measure_data(args, work: Path, codes: dict[str, Path]) -> list[dict]:
    """Repeats outermost, so each configuration's repeats are spread over the run (a shared machine's load drifts)."""
    rows = []
    for n in args.pairs:
        for kind in args.formats:
            data = write_pairs(work / f"{kind}-{n}.jsonl", n, kind)
            configs = [
                (c, r, s)
                for c in codes
                for r in args.ranks
                for s in (["cold", "warm"] if c == "after" else ["cold"])
            ]
            reps: dict[tuple, list] = {config: [] for config in configs}
            for rep in range(args.repeats):
                for code_name, ranks, start in configs:
                    cache = work / f"cache-{code_name}-{kind}-{n}-{ranks}-{rep}"  # warm reads what cold wrote
                    got = launch(args, "data", ranks, work / "result.jsonl", codes[code_name], data=data,
                                 cache_dir=cache, output_dir=work / "out")  # fmt: skip
                    reps[(code_name, ranks, start)].append(got)
                    print(f"{n} {kind} {code_name} ranks={ranks} {start} rep {rep}: "
                          f"{max(r['seconds'] for r in got):.1f} s", flush=True)  # fmt: skip
            rows += [summarise(n, kind, *config, runs) for config, runs in reps.items()]
    return rows


def summarise(n, kind, code, ranks, start, runs: list[list[dict]]) -> dict:
    seconds = [max(r["seconds"] for r in run) for run in runs]
    median = statistics.median(seconds)
    return {
        "pairs": n, "format": kind, "code": code, "ranks": ranks, "start": start, "seconds": median,
        "repeats": seconds, "best": min(seconds), "pairs_per_s": n / median,
        "built_by": sorted({r["rank"] for run in runs for r in run if r["built"]}),
        "peak_rss_gib": [max(run[r]["peak_rss"] for run in runs) / 2**30 for r in range(ranks)],
        "worker_peak_rss_gib": max(r["worker_peak_rss"] for run in runs for r in run) / 2**30,
        "rss_anon_after_gib": [max(run[r]["rss_anon_after"] for run in runs) / 2**30 for r in range(ranks)],
        "cpu_seconds": statistics.median(sum(r["cpu_seconds"] for r in run) for run in runs),  # all ranks
    }  # fmt: skip


def measure_wait(args, work: Path, code: Path) -> list[dict]:
    data = write_pairs(work / "train-10000.jsonl", 10_000, "conversational")
    fractions = {w: [] for w in args.workers}
    rates = {w: [] for w in args.workers}
    for rep in range(args.repeats):
        for workers in args.workers:
            got = launch(args, "train", 2, work / "result.jsonl", code, data=data, cache_dir=work / "train-cache",
                         output_dir=work / f"train-{workers}-{rep}", workers=workers, train_steps=args.train_steps)  # fmt: skip
            windows = [w for r in got for w in r["windows"][1:]]  # every rank, after the first step
            fractions[workers].append(sum(w for _, w in windows) / sum(s for s, _ in windows))
            rates[workers].append(len(got[0]["windows"][1:]) / sum(s for s, _ in got[0]["windows"][1:]))
            print(f"train workers={workers} rep {rep}: wait {100 * fractions[workers][-1]:.1f}%, "
                  f"{rates[workers][-1]:.2f} steps/s", flush=True)  # fmt: skip
    return [{"workers": w, "wait_fraction": statistics.median(fractions[w]), "repeats": fractions[w],
             "steps_per_s": statistics.median(rates[w]), "steps_per_s_repeats": rates[w]} for w in args.workers]  # fmt: skip


def tables(data_rows: list[dict], wait_rows: list[dict]) -> str:
    out = ["| pairs | format | code | ranks | start | data stage (s) | best of repeats (s) | pairs/s | CPU s (all ranks + workers) "
           "| peak RSS per rank (GiB) | anonymous RSS after, per rank (GiB) | tokenising worker (GiB) | tokenised by rank "
           "| repeats (s) |", "|" + "---|" * 14]  # fmt: skip
    for r in data_rows:
        rss = " / ".join(f"{g:.2f}" for g in r["peak_rss_gib"])
        anon = " / ".join(f"{g:.2f}" for g in r["rss_anon_after_gib"])
        reps = ", ".join(f"{s:.1f}" for s in r["repeats"])
        out.append(f"| {r['pairs']:,} | {r['format']} | {r['code']} | {r['ranks']} | {r['start']} | {r['seconds']:.1f} | {r['best']:.1f} "
                   f"| {r['pairs_per_s']:,.0f} | {r['cpu_seconds']:.1f} | {rss} | {anon} | {r['worker_peak_rss_gib']:.2f} | {r['built_by'] or '-'} | {reps} |")  # fmt: skip
    if wait_rows:
        out += [
            "",
            "| dataloader_num_workers | data wait / step time | steps/s | repeats (wait %) |",
            "|---|---|---|---|",
        ]
        for r in wait_rows:
            reps = ", ".join(f"{100 * f:.1f}" for f in r["repeats"])
            out.append(
                f"| {r['workers']} | {100 * r['wait_fraction']:.1f}% | {r['steps_per_s']:.2f} | {reps} |"
            )
    return "\n".join(out) + "\n"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--pairs", type=ints, default=[10_000, 100_000])
    ap.add_argument("--formats", type=lambda s: s.split(","), default=["conversational", "standard"])
    ap.add_argument("--ranks", type=ints, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", help="also measure this git ref's code (e.g. main)")
    ap.add_argument(
        "--workers", type=ints, default=[0, 1, 2], help="dataloader_num_workers to time training with"
    )
    ap.add_argument("--train-steps", type=int, default=40, help="0: skip the training measurement")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="writes data_cpu.md/.json")
    # child mode (internal)
    for name in ("child", "result", "data", "cache-dir", "output-dir"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:  # a rank of a launched child
        if args.child == "train":
            train_child(args)
        else:
            data_child(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="orpo_data_bench_") as tmp:
        work = Path(tmp)
        codes = {"after": ROOT}
        if args.before:
            codes = {"before": export_ref(args.before, work / "before"), **codes}
        data_rows = measure_data(args, work, codes)
        wait_rows = measure_wait(args, work, ROOT) if args.train_steps else []
    from orpo_bench import versions  # bench/ is this script's directory

    text = tables(data_rows, wait_rows)
    header = (f"# Data stage, CPU ({cpu_model()}, {os.cpu_count()} cores, shared; {versions()})\n\n"
              f"`python bench/data_bench.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_cpu.md").write_text(header + text)
    (args.out / "data_cpu.json").write_text(json.dumps({"data": data_rows, "wait": wait_rows}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
