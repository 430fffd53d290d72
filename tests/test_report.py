"""The training report: report.png (its panels, opened and checked pixel by pixel) and report.md, written
by rank 0 at the end, redrawn by `python -m orpo_dist.report` (also mid-run), and optional matplotlib."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import launch_env, read_jsonl, tiny_run

import orpo_dist
from orpo_dist import report

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's tab:blue (train) and tab:orange (held-out)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    result = orpo_dist.train(tiny_run(out, max_steps=6, save_steps=None, eval_split=0.2, eval_on_start=True,
                                      eval_steps=3, logging_steps=1, lr=1e-2))  # fmt: skip
    return out, result


def _has_color(pixels: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return bool((np.abs(pixels[..., :3].astype(int) - rgb).sum(-1) < 30).sum() > 20)


def test_png_has_every_panel_with_train_curves_and_heldout_points(run):
    from PIL import Image

    out, result = run
    image = np.asarray(Image.open(out / "report.png").convert("RGB"))
    fig = report.figure(read_jsonl(out / "metrics.jsonl"), "t")  # the same drawing, to locate the panels
    fig.canvas.draw()
    assert image.shape[:2] == (fig.canvas.get_width_height()[1], fig.canvas.get_width_height()[0])
    assert [ax.get_title() for ax in fig.axes] == [title for title, _, _ in report.PANELS]
    rows = result.metrics
    for ax, (title, train_key, eval_key) in zip(fig.axes, report.PANELS):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines["train"].get_xdata()) == [r["step"] for r in rows if train_key in r], title
        if eval_key:
            assert list(lines["held-out"].get_xdata()) == [0, 3, 6], title  # eval points marked
        box = ax.get_window_extent()
        h = image.shape[0]
        panel = image[int(h - box.y1) : int(h - box.y0), int(box.x0) : int(box.x1)]
        assert panel.std() > 10, f"panel {title} is blank"
        assert _has_color(panel, BLUE), f"no train curve drawn in {title}"
        assert _has_color(panel, ORANGE) == bool(eval_key), f"held-out points in {title}"


def test_markdown_has_accuracy_before_after_metrics_speed_memory_settings(run):
    out, result = run
    text = (out / "report.md").read_text()
    evals = [r for r in result.metrics if "eval_loss" in r]
    train = [r for r in result.metrics if "loss" in r]
    acc = [r["eval_rewards/accuracies"] for r in evals]
    assert f"**{acc[0]:.3f} before** (step 0) -> **{acc[-1]:.3f} after** (step 6)" in text
    assert f"| `loss` | {train[-1]['loss']:.4g} | {evals[-1]['eval_loss']:.4g} |" in text
    assert "| tokens/s (mean of logged windows, all ranks) |" in text
    assert "| wall time (training, this process) |" in text and " GB |" in text
    assert (
        "| `lr` | `0.01` |" in text
        and "| `optim` | `adamw_torch` |" in text
        and "| `layout` | `padded` |" in text
    )
    assert all(r["peak_memory_gb"] > 0 and r["train_runtime"] > 0 for r in train)


def test_redraw_while_training_runs(run, tmp_path):
    out, _ = run
    lines = (out / "metrics.jsonl").read_text().splitlines()
    partial = tmp_path / "running"
    partial.mkdir()
    (partial / "config.yaml").write_text((out / "config.yaml").read_text())
    (partial / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:25])  # a row half-written
    proc = subprocess.run([sys.executable, "-m", "orpo_dist.report", str(partial)], env=launch_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (partial / "report.png").stat().st_size > 10_000
    assert "From metrics.jsonl (4 rows" in (partial / "report.md").read_text()
    # a resumed run appends the steps after its checkpoint again: the later rows are the run's
    redone = {**read_jsonl(out / "metrics.jsonl")[2], "loss": 123.0}
    (partial / "metrics.jsonl").write_text("\n".join([*lines[:4], json.dumps(redone)]) + "\n")
    rows = report.read_rows(partial)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[2]["loss"] == 123.0
    missing = subprocess.run([sys.executable, "-m", "orpo_dist.report", str(tmp_path / "nope")], env=launch_env(),
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "metrics.jsonl not found" in missing.stderr


def test_without_matplotlib_training_finishes_and_says_how(tmp_path, monkeypatch, capsys):
    real = report.importlib.util.find_spec
    monkeypatch.setattr(
        report.importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a)
    )
    result = orpo_dist.train(tiny_run(tmp_path, max_steps=2, save_steps=None))
    assert result.final_dir.is_dir()
    log = capsys.readouterr().out
    assert "report.png skipped: matplotlib is not installed; pip install 'orpo-dist[report]'" in log
    assert f"python -m orpo_dist.report {tmp_path}" in log
    assert (tmp_path / "report.md").is_file() and not (tmp_path / "report.png").exists()


def test_markdown_has_the_generations_before_and_after(tmp_path):
    """report.md's table: the same prompts at the first and the last eval, one line each, pipes escaped;
    the rule score before -> after; report.png's caption names one sample."""
    rows = [{"step": 0, "eval_loss": 5.0, "eval_rewards/accuracies": 0.5, "eval_generation/rule_followed": 0.1,
             "eval_generation/exact": 0.0},
            {"step": 9, "eval_loss": 1.0, "eval_rewards/accuracies": 1.0, "eval_generation/rule_followed": 0.95,
             "eval_generation/exact": 0.25}]  # fmt: skip
    samples = [
        (0, [{"step": 0, "prompt": "Write in capitals: cat\n", "completion": "a|b\nc", "chosen": "CAT", "rejected": "cat"}]),
        (5, [{"step": 5, "prompt": "Write in capitals: cat\n", "completion": "CA", "chosen": "CAT", "rejected": "cat"}]),
        (9, [{"step": 9, "prompt": "Write in capitals: cat\n", "completion": "CAT", "chosen": "CAT", "rejected": "cat"}]),
    ]  # fmt: skip
    text = report.summary(rows, {}, tmp_path, samples)
    assert "**0.10 before** -> **0.95 after**; exact answer 0.00 -> 0.25" in text
    assert "| prompt | before (step 0) | after (step 9) | chosen |" in text
    assert "| `Write in capitals: cat` | `a\\|b\\nc` | `CAT` | `CAT` |" in text
    caption = report.sample_caption(samples)
    assert "'Write in capitals: cat'" in caption and "step 9: 'CAT'" in caption
    assert report.summary(rows, {}, tmp_path, []).count("Generations") == 0  # samples off: no section
    (tmp_path / "samples.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for _, rs in samples for r in rs) + '{"step": 1'
    )
    assert [s for s, _ in report.read_samples(tmp_path)] == [0, 5, 9]  # a torn last line is skipped
