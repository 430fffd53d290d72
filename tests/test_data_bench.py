"""A smoke run of bench/data_bench.py (the benchmark itself is not part of the suite: it takes ~an hour)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, launch_env

sys.path.insert(0, str(REPO / "bench"))
import data_bench  # noqa: E402


def test_the_data_file_is_seeded_and_ultrafeedback_shaped(tmp_path):
    conv = data_bench.write_pairs(tmp_path / "c.jsonl", 20, "conversational")
    again = data_bench.write_pairs(tmp_path / "again.jsonl", 20, "conversational")
    assert conv.read_text() == again.read_text()
    row = json.loads(conv.read_text().splitlines()[3])
    assert [m["role"] for m in row["chosen"]] == ["user", "assistant"] == [m["role"] for m in row["rejected"]]
    assert row["chosen"][0]["content"] == row["prompt"] and 50 <= len(row["prompt"]) <= 500
    std = json.loads(data_bench.write_pairs(tmp_path / "s.jsonl", 5, "standard").read_text().splitlines()[0])
    assert sorted(std) == ["chosen", "prompt", "rejected"] and all(isinstance(v, str) for v in std.values())


@pytest.mark.slow
def test_one_command_measures_cold_and_warm(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "data_bench.py"), "--pairs", "300", "--formats", "conversational",
           "--ranks", "1", "--repeats", "1", "--train-steps", "0", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "data_cpu.json").read_text())["data"]
    assert [(r["pairs"], r["ranks"], r["start"], r["built_by"]) for r in rows] == [
        (300, 1, "cold", [0]),
        (300, 1, "warm", []),
    ]
    assert all(r["pairs_per_s"] > 0 and r["peak_rss_gib"][0] > 0 for r in rows)
    table = (tmp_path / "data_cpu.md").read_text()
    assert (
        "| 300 | conversational | after | 1 | cold |" in table
        and "| 300 | conversational | after | 1 | warm |" in table
    )
