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


@pytest.mark.parametrize("name", ["layout_padded", "layout_packed", "layout_shared_prefix", "qlora"])
def test_tiny_runs_match_the_recorded_numbers(name, tmp_path):
    baseline = json.loads(guard.BASELINE.read_text())[name]
    got = guard.run(name, tmp_path)
    assert guard.compare(name, baseline, got) == []


def test_the_comparison_sees_a_changed_digit():
    rows = [{"step": 1, "loss": 1.234567, "tokens_per_second": 10.0}]
    assert guard.compare("x", rows, [dict(rows[0], tokens_per_second=99.0)]) == []
    assert guard.compare("x", rows, [dict(rows[0], loss=1.234568)]) != []
    assert guard.compare("x", rows, []) != []
