"""The training report: `report.png` (curves) and `report.md` (summary), drawn from `metrics.jsonl`.

    python -m orpo_dist.report OUTPUT_DIR     # redraw at any time, also while the run is training

Rank 0 writes both at the end of training. report.png has one panel per curve (loss, nll_loss,
log_odds_ratio, rewards/margins, train and held-out preference accuracy, learning rate) against the
optimizer step, held-out evaluations marked as points, and a caption with one held-out sample before -> after. report.md has the held-out preference accuracy
before -> after, the generations of a few held-out prompts before -> after (samples.jsonl, with the
rule score of a checkable built-in task), the final train and held-out metrics, tokens/s, wall time, peak memory and the key
settings from config.yaml. report.md needs nothing extra; report.png needs matplotlib
(`pip install 'orpo-dist[report]'`): without it the PNG is skipped with a line saying so, and training
never fails because of the report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

from orpo_dist.config.yaml_safe import load_yaml
from orpo_dist.console import one_line
from orpo_dist.exits import guarded

# (panel title, train key, held-out key)
PANELS = (
    ("loss", "loss", "eval_loss"),
    ("nll_loss", "nll_loss", "eval_nll_loss"),
    ("log_odds_ratio", "log_odds_ratio", "eval_log_odds_ratio"),
    ("rewards/margins", "rewards/margins", "eval_rewards/margins"),
    ("preference accuracy (rewards/accuracies)", "rewards/accuracies", "eval_rewards/accuracies"),
    ("learning_rate", "learning_rate", None),
)
FINAL_KEYS = (
    "loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
    "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
)  # fmt: skip
SETTINGS = (
    ("model", "model"), ("data", "data_path"), ("data", "chat_template"), ("orpo", "layout"),
    ("orpo", "beta"), ("peft", "use_peft"), ("peft", "lora_r"), ("peft", "quantization"), ("train", "optim"),
    ("train", "lr"), ("train", "scheduler"), ("train", "batch_size"), ("train", "gradient_accumulation"),
    ("train", "epochs"), ("train", "max_steps"), ("data", "max_length"), ("train", "mixed_precision"),
    ("train", "seed"),
)  # fmt: skip
INSTALL_HINT = "pip install 'orpo-dist[report]' (matplotlib)"
SAMPLES_FILE = "samples.jsonl"  # written by samples.py during training


def read_rows(out: Path) -> list[dict]:
    """metrics.jsonl rows by step; a line still being written (training in progress) is skipped, and a
    later row of the same step and kind replaces an earlier one (a resumed run redoes the steps after
    its checkpoint)."""
    return read_metrics(out)[0]


def read_metrics(out: Path) -> tuple[list[dict], list[str]]:
    """(rows, what could not be read): any file is read. Skipped and counted: lines that are not UTF-8,
    not JSON, not a JSON object (`NaN`, `42`, `[1,2]`, `null`), or without an integer `step`; values that
    are not numbers (a string) are dropped from their row and counted."""
    latest: dict[tuple[int, bool], dict] = {}
    path = Path(out) / "metrics.jsonl"
    skipped: Counter = Counter()
    for raw in path.read_bytes().splitlines() if path.is_file() else []:
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            skipped["lines that are not UTF-8"] += 1
            continue
        except (ValueError, RecursionError):  # not JSON, or nested too deep
            skipped["lines that are not JSON (or cut short)"] += 1
            continue
        if not isinstance(row, dict):
            skipped["lines that are not JSON objects"] += 1
            continue
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            skipped["rows without an integer step"] += 1
            continue
        values = {k: v for k, v in row.items() if _number(v)}
        skipped["values that are not numbers"] += len(row) - len(values)
        latest[(step, "eval_loss" in values)] = values
    notes = [f"{n} {what}" for what, n in skipped.items() if n]
    return [latest[key] for key in sorted(latest)], notes


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_config(out: Path) -> tuple[dict, list[str]]:
    """config.yaml's sections (mappings only), and what could not be read of it."""
    path = Path(out) / "config.yaml"
    if not path.exists():
        return {}, []
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as e:
        return {}, [f"config.yaml ({type(e).__name__}: {one_line(str(e))[:120]})"]
    if data is None:
        return {}, []
    if not isinstance(data, dict):
        return {}, [f"config.yaml (a {type(data).__name__}, not a mapping of sections)"]
    sections = {k: v for k, v in data.items() if isinstance(v, dict)}
    odd = sorted(str(k) for k in data if k not in sections)
    return sections, [f"config.yaml entries that are not sections ({', '.join(odd)})"] if odd else []


def read_samples(out: Path) -> list[tuple[int, list[dict]]]:
    """samples.jsonl as [(step, rows)] in step order (a line torn by a kill is skipped)."""
    path = Path(out) / SAMPLES_FILE
    steps: dict[int, list[dict]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
            steps.setdefault(int(row["step"]), []).append(row)
        except (ValueError, KeyError, TypeError):
            continue
    return sorted(steps.items())


def _series(rows: list[dict], key: str | None) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key and key in r]
    return [s for s, _ in points], [v for _, v in points]


def figure(rows: list[dict], title: str):
    """A matplotlib Figure with one panel per curve (no pyplot: nothing global is touched)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8.5), dpi=100)
    axes = fig.subplots(2, 3)
    for ax, (name, train_key, eval_key) in zip(axes.flat, PANELS):
        steps, values = _series(rows, train_key)
        ax.plot(steps, values, color="tab:blue", marker=".", label="train")
        steps, values = _series(rows, eval_key)
        if steps:
            ax.plot(
                steps, values, color="tab:orange", marker="o", markersize=7, linestyle="--", label="held-out"
            )
        ax.set_title(name)
        if train_key == "rewards/accuracies":
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    if not 0 <= seconds < 366 * 86400:  # what gmtime cannot show (a huge, negative or non-finite value)
        return f"{seconds:.4g} s"
    return f"{seconds:.1f} s" if seconds < 60 else time.strftime("%H:%M:%S", time.gmtime(seconds))


def generation_lines(rows: list[dict], samples: list[tuple[int, list[dict]]]) -> list[str]:
    """report.md's generations: the rule score before -> after (a checkable built-in task) and a table of
    the same held-out prompts' completions at the first and the last eval (samples.jsonl)."""
    if not samples:
        return []
    lines = ["## Generations (held-out prompts, greedy)", ""]
    scores = [r for r in rows if "eval_generation/rule_followed" in r]
    if len(scores) >= 2:
        first, last = scores[0], scores[-1]
        lines += [
            f"Completions that follow the instruction: **{first['eval_generation/rule_followed']:.2f} before** "
            f"-> **{last['eval_generation/rule_followed']:.2f} after**; exact answer "
            f"{first['eval_generation/exact']:.2f} -> {last['eval_generation/exact']:.2f}.",
            "",
        ]
    (s0, before), (s1, after) = samples[0], samples[-1]
    lines += [f"| prompt | before (step {s0}) | after (step {s1}) | chosen |", "|---|---|---|---|"]
    for b, a in zip(before, after):
        cells = (b["prompt"], b["completion"], a["completion"], b["chosen"])
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines + [""]


def _cell(text: str, width: int = 120) -> str:
    """Text in a markdown table cell: one line, pipes escaped, long text cut, empty shown as such."""
    text = text.strip().replace("|", "\\|").replace("\n", "\\n")
    text = text if len(text) <= width else text[:width] + "…"
    return f"`{text}`" if text and "`" not in text else (text or "*(empty)*")


def summary(rows: list[dict], config: dict, out: Path, samples=()) -> str:
    """report.md: before -> after held-out accuracy, generations, final metrics, speed, time, memory, settings."""
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    lines = [f"# ORPO training report: {out.resolve()}", ""]
    lines += [f"From metrics.jsonl ({len(rows)} rows, last step {rows[-1]['step'] if rows else 0}), "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}. Curves: [report.png](report.png).", ""]  # fmt: skip
    lines += ["## Held-out preference accuracy", ""]
    accuracy = [r for r in evals if "eval_rewards/accuracies" in r]
    if len(accuracy) >= 2:
        first, last = accuracy[0], accuracy[-1]
        lines.append(
            f"**{first['eval_rewards/accuracies']:.3f} before** (step {first['step']}) -> "
            f"**{last['eval_rewards/accuracies']:.3f} after** (step {last['step']})"
        )
    elif accuracy:
        lines.append(
            f"{accuracy[0]['eval_rewards/accuracies']:.3f} at step {accuracy[0]['step']} (one evaluation)"
        )
    else:
        lines.append("no held-out evaluation (eval_split: 0 and no eval_data_path)")
    lines += ["", *generation_lines(rows, list(samples))]
    lines += [
        "## Final metrics",
        "",
        "| metric | train (last logged window) | held-out (last eval) |",
        "|---|---|---|",
    ]
    for key in FINAL_KEYS:
        t = _fmt(train[-1][key]) if train and key in train[-1] else ""
        e = _fmt(evals[-1][f"eval_{key}"]) if evals and f"eval_{key}" in evals[-1] else ""
        lines.append(f"| `{key}` | {t} | {e} |")
    lines += ["", "## Run", "", "| | |", "|---|---|"]
    if train:
        speeds = [r["tokens_per_second"] for r in train if "tokens_per_second" in r]
        last = train[-1]
        lines.append(f"| steps | {last['step']} (epoch {_fmt(last.get('epoch', 0.0))}) |")
        if speeds:
            lines.append(
                f"| tokens/s (mean of logged windows, all ranks) | {sum(speeds) / len(speeds):,.0f} |"
            )
        if "train_runtime" in last:
            lines.append(f"| wall time (training, this process) | {_duration(last['train_runtime'])} |")
        if "peak_memory_gb" in last:
            lines.append(
                f"| peak memory (rank 0: CUDA allocated, else RSS) | {last['peak_memory_gb']:.2f} GB |"
            )
    lines += ["", "## Key settings (config.yaml)", "", "| key | value |", "|---|---|"]
    for section, key in SETTINGS:
        if key in config.get(section, {}):
            lines.append(f"| `{key}` | `{config[section][key]}` |")
    return "\n".join(lines) + "\n"


def sample_caption(samples: list[tuple[int, list[dict]]], width: int = 40) -> str:
    """One held-out sample before -> after, for report.png's caption ('' without two evals)."""
    if len(samples) < 2 or not samples[0][1] or not samples[-1][1]:
        return ""
    (s0, before), (s1, after) = samples[0], samples[-1]

    def show(text: str) -> str:
        text = text.strip()
        return repr(text if len(text) <= width else text[:width] + "…")

    return (
        f"held-out sample: {show(before[0]['prompt'])} -> step {s0}: {show(before[0]['completion'])}, "
        f"step {s1}: {show(after[0]['completion'])} (chosen: {show(after[0]['chosen'])})"
    )


def write_report(out: str | Path, say=print) -> list[Path]:
    """Write report.md and (with matplotlib) report.png into `out`; returns what was written."""
    out = Path(out)
    rows, skipped = read_metrics(out)
    config, unread = read_config(out)
    unread += [f"metrics.jsonl: skipped {note}" for note in skipped]
    written = [out / "report.md"]
    samples = read_samples(out)
    written[0].write_text(summary(rows, config, out, samples) + _unread(unread))
    for note in unread:
        say(f"report: could not read {note}")
    if importlib.util.find_spec("matplotlib") is None:
        say(
            f"report.png skipped: matplotlib is not installed; {INSTALL_HINT}, then python -m orpo_dist.report {out}"
        )
    else:
        model = config.get("model", {}).get("model", "")
        fig = figure(rows, f"ORPO: {model}  ({out.name})")
        caption = sample_caption(samples)
        if caption:
            fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=10, family="monospace")
            fig.subplots_adjust(bottom=0.1)
        fig.savefig(out / "report.png")
        written.append(out / "report.png")
    say(f"report: {', '.join(str(p) for p in written)}")
    return written


def _unread(notes: list[str]) -> str:
    if not notes:
        return ""
    return "\n## Not read\n\n" + "".join(f"- {note}\n" for note in notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orpo_dist.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="a run's output_dir (holding metrics.jsonl)")
    args = parser.parse_args(argv)
    if not (Path(args.output_dir) / "metrics.jsonl").is_file():
        print(
            f"orpo_dist: {args.output_dir}/metrics.jsonl not found: pass a run's output_dir", file=sys.stderr
        )
        return 2
    return guarded(lambda: write_report(args.output_dir, say=lambda msg: print(f"[orpo_dist] {msg}")) and 0)


if __name__ == "__main__":
    sys.exit(main())
