"""Hardening, round 2: export never overwrites its inputs, the cache is verified before it is trusted,
odd cache and output locations, one line for environment faults, a report from any metrics.jsonl,
config files that say what they ignore, trackers and the Hub, conversations that end with the user."""

from __future__ import annotations

import json

import datasets
import pytest

from orpo_dist.config import DataConfig
from orpo_dist.data import DataError, build_datasets

datasets.disable_progress_bars()


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------------ 8. conversations


def _turn(role, text):
    return {"role": role, "content": text}


CONV_OK = {
    "chosen": [_turn("user", "Hi?"), _turn("assistant", "Hello")],
    "rejected": [_turn("user", "Hi?"), _turn("assistant", "Go away")],
}


@pytest.mark.parametrize(
    "field,tail",
    [
        ("chosen", [_turn("user", "thanks")]),
        ("rejected", [_turn("user", "thanks")]),
        ("chosen", [_turn("system", "be brief")]),
        ("rejected", [_turn("tool", "{}")]),
    ],
)
def test_a_conversation_not_ending_with_the_assistant_is_refused_or_skipped(tmp_path, tokenizer, field, tail):
    rows = [CONV_OK] * 4
    bad = {**CONV_OK, field: CONV_OK[field] + tail}
    rows = rows[:2] + [bad] + rows[2:]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match=rf"c\.jsonl line 3, field '{field}': the last message has role"):
        build_datasets(DataConfig(data_path=path, eval_split=0.0), tokenizer, 0)
    _, _, report = build_datasets(DataConfig(data_path=path, eval_split=0.0, skip_invalid=True), tokenizer, 0)
    assert report.dropped == {"last turn not the assistant's": 1}


def test_a_conversation_with_an_explicit_prompt_and_a_user_tail_is_refused(tmp_path, tokenizer):
    rows = [{"prompt": [_turn("user", "Hi?")], "chosen": [_turn("assistant", "Hello")],
             "rejected": [_turn("assistant", "No"), _turn("user", "why?")]}]  # fmt: skip
    with pytest.raises(DataError, match=r"line 1, field 'rejected': the last message has role 'user'"):
        build_datasets(DataConfig(data_path=write_jsonl(tmp_path / "c.jsonl", rows), eval_split=0.0), tokenizer, 0)
