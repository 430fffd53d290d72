"""Refactors are guarded by numbers: the tiny runs of scripts/numerics_guard.py give, step after step, the
metrics recorded in tests/numerics/baseline.json before the change, to the 6 decimals of metrics.jsonl.

The multi-process, quickstart and bench runs take minutes; run them with
`python scripts/numerics_guard.py check` before landing a change to the loop, the loss or the layouts.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("numerics_guard", REPO / "scripts" / "numerics_guard.py")
guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guard)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["layout_padded", "layout_packed", "layout_shared_prefix", "qlora"])
def test_tiny_runs_match_the_recorded_numbers(name, tmp_path):
    baseline = json.loads(guard.BASELINE.read_text())
    got = guard.run(name, tmp_path)
    problems = guard.compare(name, baseline[name], got)
    assert problems == [], "\n".join(
        [*problems, guard.version_changes(baseline.get(guard.VERSIONS_KEY, {}).get(name), guard.versions())]
    )


def test_last_digit_noise_passes_and_a_real_change_fails():
    rows = [{"step": 1, "loss": 1.234567, "rewards/chosen": -2.327874, "eval_loss": 12.062981,
             "n_pairs": 16, "tokens_per_second": 10.0}]  # fmt: skip
    assert guard.compare("x", rows, [dict(rows[0], tokens_per_second=99.0)]) == []  # wall clock: ignored
    # the last printed digit moved (another CPU's summation order): within tolerance
    noise = dict(rows[0], loss=1.234568, **{"rewards/chosen": -2.327875}, eval_loss=12.062983)
    assert guard.compare("x", rows, [noise]) == []
    # a real change: the loss nudged by 1e-4, a count off by one, a row missing
    assert guard.compare("x", rows, [dict(rows[0], loss=1.234567 + 1e-4)]) != []
    assert guard.compare("x", rows, [dict(rows[0], loss=1.234567 + 1e-5)]) != []
    assert guard.compare("x", rows, [dict(rows[0], n_pairs=17)]) != []
    assert guard.compare("x", rows, []) != []
    # a gradient norm (a sum over every gradient entry) has its own, measured tolerance
    norm = [{"step": 7, "grad_norm": 9.282887}]
    assert guard.compare("x", norm, [{"step": 7, "grad_norm": 9.282906}]) == []  # AMD EPYC vs Intel Xeon
    assert guard.compare("x", norm, [{"step": 7, "grad_norm": 9.283887}]) != []  # 1e-3: a real change


@pytest.mark.slow
def test_a_real_run_with_the_loss_moved_by_1e_4_fails_the_guard(tmp_path, monkeypatch):
    """The guard's layout_padded run, in this process, twice: as it is (it matches the baseline), and with
    the objective moved by a constant 1e-4 (the gradients, and so the trajectory, unchanged; the logged
    loss moved): then every loss row fails, and nothing else."""
    from orpo_dist import cli, loss, metrics

    def rows(out: Path) -> list[dict]:
        argv = ["--config", str(guard.TINY), "--output_dir", str(out), "--layout", "padded", *guard.LAYOUT_ARGS]
        assert cli.main(argv) == 0
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in guard.TIMING_KEYS} for line in lines]

    want = json.loads(guard.BASELINE.read_text())["layout_padded"]
    assert guard.compare("layout_padded", want, rows(tmp_path / "as_is")) == []
    real = loss.orpo_loss
    nudged = lambda *a, **k: real(*a, **k) + 1e-4  # noqa: E731
    monkeypatch.setattr(loss, "orpo_loss", nudged)
    monkeypatch.setattr(metrics, "orpo_loss", nudged)
    problems = guard.compare("layout_padded", want, rows(tmp_path / "nudged"))
    moved = {p.split(": ")[1].split(" ")[0] for p in problems}
    assert moved == {"loss", "eval_loss"}, problems
    assert len(problems) == sum(("loss" in r) + ("eval_loss" in r) for r in want)


def test_a_mismatch_names_the_libraries_that_changed():
    line = guard.version_changes({"torch": "2.12.0", "numpy": "2.3.0"}, {"torch": "2.13.0", "numpy": "2.3.0"})
    assert line == "versions changed since the baseline: torch 2.12.0 -> 2.13.0"
    assert "not recorded" in guard.version_changes(None, guard.versions())
    assert guard.versions()["torch"].startswith("2.")
