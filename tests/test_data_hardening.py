"""Data is never silently wrong: near-miss column names, rows of different shapes, odd encodings and
layouts, CSV cells as text, duplicates and the split, pairs with no preference left, unknown roles."""

from __future__ import annotations

import codecs
import gzip
import json

import datasets
import numpy as np
import pandas as pd
import pytest

from orpo_dist.config import DataConfig
from orpo_dist.data import DataError, build_datasets

datasets.disable_progress_bars()

GOOD = {"prompt": "p", "chosen": "yes", "rejected": "no"}
CONV = {
    "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}],
    "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away"}],
}


def cfg_for(path, **kw) -> DataConfig:
    return DataConfig(data_path=str(path), eval_split=kw.pop("eval_split", 0.0), **kw)


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def texts(ds, tokenizer) -> list[dict]:
    return [
        {k: tokenizer.decode(r[f"{k}_ids"]) for k in ("prompt", "chosen", "rejected")} for r in ds.to_list()
    ]


# ------------------------------------------------------------------------------------------ column names


@pytest.mark.parametrize("typo", ["promt", "Prompt", "prompts", "PROMPT", "promtp"])
def test_a_near_miss_of_prompt_is_an_error_naming_both(tmp_path, tokenizer, typo):
    rows = [{typo: f"q{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    for skip_invalid in (False, True):  # a file-level mistake: skip_invalid does not hide it
        with pytest.raises(DataError) as e:
            build_datasets(
                cfg_for(write_jsonl(tmp_path / "p.jsonl", rows), skip_invalid=skip_invalid), tokenizer, 0
            )
        assert f"column {typo!r} looks like 'prompt'" in str(e.value) and f"prompt_column: {typo}" in str(
            e.value
        )


@pytest.mark.parametrize(
    "column,typo", [("chosen", "chosn"), ("rejected", "Rejected"), ("chosen", "choosen")]
)
def test_a_near_miss_of_chosen_or_rejected_names_it(tmp_path, tokenizer, column, typo):
    row = {**GOOD}
    row[typo] = row.pop(column)
    with pytest.raises(DataError, match=f"missing column '{column}'.*Did you mean '{typo}'"):
        build_datasets(cfg_for(write_jsonl(tmp_path / "p.jsonl", [row, row])), tokenizer, 0)


def test_an_unrelated_extra_column_is_still_the_implicit_prompt_format(tmp_path, tokenizer):
    rows = [{"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no", "source": "web", "id": 3}]
    _, _, report = build_datasets(cfg_for(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer, 0)
    assert report.format == "standard, implicit prompt"


# ------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("odd_line", [1, 3, 5])
def test_rows_of_another_shape_name_the_row_that_differs(tmp_path, tokenizer, odd_line):
    # conversational vs text: the majority decides the format, the odd row is the one named
    rows = [CONV] * 5
    rows[odd_line - 1] = {**GOOD}
    with pytest.raises(DataError, match=rf"p\.jsonl line {odd_line}, field '(prompt|chosen)'"):
        build_datasets(cfg_for(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer, 0)
    rows = [{**GOOD, "prompt": f"q{i}"} for i in range(5)]
    rows[odd_line - 1] = {**CONV, "prompt": "Hi?"}
    with pytest.raises(
        DataError, match=rf"q\.jsonl line {odd_line}, field 'chosen': expected text, got list"
    ):
        build_datasets(cfg_for(write_jsonl(tmp_path / "q.jsonl", rows)), tokenizer, 0)


@pytest.mark.parametrize("odd_line", [1, 4])
def test_a_row_with_a_prompt_among_implicit_prompt_rows_is_named(tmp_path, tokenizer, odd_line):
    rows = [{"chosen": f"Q{i}: yes", "rejected": f"Q{i}: no"} for i in range(4)]
    rows[odd_line - 1] = {**rows[odd_line - 1], "prompt": "Q: "}
    with pytest.raises(
        DataError, match=rf"line {odd_line}, field 'prompt': has a 'prompt' field that most rows lack"
    ):
        build_datasets(cfg_for(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer, 0)
    _, _, report = build_datasets(cfg_for(tmp_path / "p.jsonl", skip_invalid=True), tokenizer, 0)
    assert report.dropped == {"different shape": 1} and report.used_train == 3


def test_a_row_missing_the_prompt_among_prompt_rows_is_named(tmp_path, tokenizer):
    rows = [{**GOOD, "prompt": f"q{i}"} for i in range(4)]
    del rows[2]["prompt"]
    with pytest.raises(DataError, match=r"p\.jsonl line 3, field 'prompt': missing"):
        build_datasets(cfg_for(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer, 0)


# ------------------------------------------------------------------------------------------ file layouts and bytes


def test_a_jsonl_whose_first_line_is_an_array_is_json_lines(tmp_path, tokenizer):
    lines = ['["a", "b"]', json.dumps(GOOD), json.dumps({**GOOD, "prompt": "q"})]
    path = write_jsonl(tmp_path / "p.jsonl", lines)
    with pytest.raises(
        DataError, match=r"p\.jsonl line 1: malformed JSON \(expected an object \{\.\.\.\}, got list\)"
    ):
        build_datasets(cfg_for(path), tokenizer, 0)
    train, _, report = build_datasets(cfg_for(path, skip_invalid=True), tokenizer, 0)
    assert report.dropped == {"malformed JSON": 1} and list(train["id"]) == [1, 2]
    # the same bytes named .json: JSON lines too (the whole-file parse fails with "Extra data")
    (tmp_path / "p.json").write_text((tmp_path / "p.jsonl").read_text())
    _, _, report = build_datasets(cfg_for(tmp_path / "p.json", skip_invalid=True), tokenizer, 0)
    assert report.dropped == {"malformed JSON": 1} and report.used_train == 2


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_a_utf8_bom_is_accepted(tmp_path, tokenizer, kind):
    rows = [GOOD, {**GOOD, "prompt": "q"}]
    if kind == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif kind == "json":
        text = json.dumps(rows)
    else:
        text = pd.DataFrame(rows).to_csv(index=False)
    path = tmp_path / f"p.{kind}"
    path.write_bytes(codecs.BOM_UTF8 + text.encode())
    train, _, _ = build_datasets(cfg_for(path), tokenizer, 0)
    assert texts(train, tokenizer)[0] == {"prompt": "<s>p", "chosen": "yes</s>", "rejected": "no</s>"}


def test_latin1_lines_are_named_or_dropped(tmp_path, tokenizer):
    data = (
        json.dumps(GOOD).encode()
        + b"\n"
        + '{"prompt": "café", "chosen": "a", "rejected": "b"}'.encode("latin-1")
    )
    path = tmp_path / "p.jsonl"
    path.write_bytes(data + b"\n" + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(
        DataError, match=r"p\.jsonl line 2: not UTF-8 \(not UTF-8 text \(byte 0xe9 at column 16\)"
    ):
        build_datasets(cfg_for(path), tokenizer, 0)
    train, _, report = build_datasets(cfg_for(path, skip_invalid=True), tokenizer, 0)
    assert report.dropped == {"not UTF-8": 1} and list(train["id"]) == [0, 2]


@pytest.mark.parametrize("name", ["p.jsonl", "p.jsonl.gz", "p.json"])
def test_gzip_and_utf16_bytes_are_decoded(tmp_path, tokenizer, name):
    text = "".join(json.dumps({**GOOD, "prompt": f"q{i}"}) + "\n" for i in range(3))
    for data in (gzip.compress(text.encode()), text.encode("utf-16"), text.encode("utf-32")):
        (tmp_path / name).write_bytes(data)
        train, _, _ = build_datasets(cfg_for(tmp_path / name), tokenizer, 0)
        assert len(train) == 3


def test_csv_cells_are_text(tmp_path, tokenizer):
    path = tmp_path / "p.csv"
    path.write_text(
        "prompt,chosen,rejected\n1 + 1 =,2,3\nZip code?,007,7\nTrue?,True,False\nN/A?,NA,null\nx,1e5,1.0\n"
    )
    train, _, report = build_datasets(cfg_for(path), tokenizer, 0)
    assert [(t["chosen"], t["rejected"]) for t in texts(train, tokenizer)] == [
        ("2</s>", "3</s>"), ("007</s>", "7</s>"), ("True</s>", "False</s>"), ("NA</s>", "null</s>"), ("1e5</s>", "1.0</s>"),
    ]  # fmt: skip
    assert report.dropped == {}
    path.write_text(
        "prompt,chosen,rejected\np,yes,\n"
    )  # an empty cell is null (an error), never the text "nan"
    with pytest.raises(DataError, match=r"p\.csv row 1, field 'rejected': expected text, got null"):
        build_datasets(cfg_for(path), tokenizer, 0)


# ------------------------------------------------------------------------------------------ duplicates and the split


def _pairs_text(ds, tokenizer) -> set[tuple]:
    return {tuple(t.values()) for t in texts(ds, tokenizer)}


@pytest.mark.parametrize("seed", range(6))
def test_exact_duplicates_are_counted_and_never_split(tmp_path, tokenizer, seed):
    rng = np.random.default_rng(seed)
    unique = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(40)]
    rows = unique + [unique[int(i)] for i in rng.integers(0, 40, size=20)]  # 20 repeats, some repeated twice
    rows = [rows[int(i)] for i in rng.permutation(len(rows))]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    train, evaluation, report = build_datasets(cfg_for(path, eval_split=0.25), tokenizer, seed)
    assert report.duplicates == len(rows) - len({json.dumps(r, sort_keys=True) for r in rows}) > 0
    assert not _pairs_text(train, tokenizer) & _pairs_text(evaluation, tokenizer)
    assert len(train) + len(evaluation) == len(rows)  # counted, kept
    assert any(f"{report.duplicates} duplicate pairs" in line for line in report.lines())


def test_a_split_without_duplicates_is_unchanged(tmp_path, tokenizer):
    """The rule moves only duplicates: every other pair is held out exactly as before."""
    from orpo_dist.data import _eval_ids

    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(50)]
    train, evaluation, _ = build_datasets(
        cfg_for(write_jsonl(tmp_path / "p.jsonl", rows), eval_split=0.2), tokenizer, 1
    )
    assert set(evaluation["id"]) == _eval_ids(50, 0.2, 1)


def test_pairs_identical_after_tokenisation_or_truncation_are_dropped_and_counted(tmp_path, tokenizer):
    rows = [
        GOOD,
        {"prompt": "p", "chosen": "café", "rejected": "cafè"},  # é and è are both <unk> to this tokenizer
        {"prompt": "p", "chosen": "abcdefX", "rejected": "abcdefY"},  # the same once cut to 4 tokens
        {
            "prompt": "p",
            "chosen": "ab",
            "rejected": "abc",
        },  # differ: "ab</s>" vs "abc" (a cut answer loses EOS)
    ]
    train, _, report = build_datasets(
        cfg_for(write_jsonl(tmp_path / "p.jsonl", rows), max_completion_length=3), tokenizer, 0
    )
    assert list(train["id"]) == [0, 3]
    assert report.dropped == {"chosen identical to rejected after tokenisation/truncation": 2}
    assert report.read == report.used_train + report.used_eval + 2


# ------------------------------------------------------------------------------------------ roles


@pytest.mark.parametrize("role", ["gpt", "human", "bot", "Assistant", ""])
def test_an_unknown_role_in_a_completion_is_an_error(tmp_path, tokenizer, role):
    bad = {**CONV, "rejected": [CONV["rejected"][0], {"role": role, "content": "Go away"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [CONV, bad])
    with pytest.raises(
        DataError,
        match=rf"c\.jsonl line 2, field 'rejected': message 2 has role {role!r}; roles are system, user, assistant, tool",
    ):
        build_datasets(cfg_for(path), tokenizer, 0)
    _, _, report = build_datasets(cfg_for(path, skip_invalid=True), tokenizer, 0)
    assert report.dropped == {"unknown role": 1}


def test_every_known_role_is_accepted(tmp_path, tokenizer):
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
        "chosen": [
            {"role": "assistant", "content": "Let me look."},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],  # a completion ends with the assistant's turn
        "rejected": [{"role": "assistant", "content": "No idea."}],
    }
    train, _, _ = build_datasets(cfg_for(write_jsonl(tmp_path / "c.jsonl", [row])), tokenizer, 0)
    assert len(train) == 1
