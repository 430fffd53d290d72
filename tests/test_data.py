"""Data pipeline: every source kind, every format, every bad-input class, truncation, the report, the split.

Expected token ids are written from the char-level tokenizer's rules (one id per character, BOS
prepended to prompts, EOS appended to completions), not from the code under test.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import datasets
import pandas as pd
import pytest

from orpo_dist.config import DataConfig
from orpo_dist.data import DataError, build_datasets, truncate_pair

datasets.disable_progress_bars()

PAIRS = [
    {"prompt": "What colour is the sky?\n", "chosen": "Blue.", "rejected": "Green, usually."},
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Say hi.", "chosen": "hi", "rejected": "no"},
]
CONVERSATION = {
    "prompt": [{"role": "user", "content": "What?"}],
    "chosen": [{"role": "assistant", "content": "Blue"}],
    "rejected": [{"role": "assistant", "content": "Green"}],
}
TEMPLATED = {"prompt": "<s><|user|>What?</s><|assistant|>", "chosen": "Blue</s>", "rejected": "Green</s>"}


def cfg_for(path, **kw) -> DataConfig:
    return DataConfig(data_path=str(path), eval_split=kw.pop("eval_split", 0.0), **kw)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pairs_of(ds: datasets.Dataset) -> list[dict]:
    return ds.to_list()


def texts_of(ds: datasets.Dataset, tokenizer) -> list[dict[str, str]]:
    return [
        {k: tokenizer.decode(row[f"{k}_ids"]) for k in ("prompt", "chosen", "rejected")}
        for row in ds.to_list()
    ]


def ids_of(ds: datasets.Dataset) -> list[int]:
    return list(ds["id"])


def char_ids(tokenizer, text: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(c) for c in text]


# --- sources -------------------------------------------------------------------------------------


def _write(kind: str, tmp_path) -> tuple[str, dict]:
    rows = [{**p, "source": "web"} for p in PAIRS]  # extra columns are ignored
    if kind == "jsonl":
        return write_jsonl(tmp_path / "p.jsonl", rows), {}
    if kind == "json-list":
        (tmp_path / "p.json").write_text(json.dumps(rows, indent=2))
        return str(tmp_path / "p.json"), {}
    if kind == "json-lines":
        return write_jsonl(tmp_path / "p.json", rows), {}
    if kind == "csv":
        pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
        return str(tmp_path / "p.csv"), {}
    if kind == "parquet":
        pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
        return str(tmp_path / "p.parquet"), {}
    if kind == "save_to_disk":
        datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
        return str(tmp_path / "ds"), {}
    other = [{"prompt": "x", "chosen": "a", "rejected": "b"}]
    dd = datasets.DatasetDict(
        {"train_prefs": datasets.Dataset.from_list(rows), "test_prefs": datasets.Dataset.from_list(other)}
    )
    dd.save_to_disk(tmp_path / "dd")
    return str(tmp_path / "dd"), {"train_split": "train_prefs"}


@pytest.mark.parametrize(
    "kind", ["jsonl", "json-list", "json-lines", "csv", "parquet", "save_to_disk", "save_to_disk-dict"]
)
def test_every_source_kind_gives_the_same_tokenised_pairs(kind, tmp_path, tokenizer):
    path, extra = _write(kind, tmp_path)
    train, evaluation, report = build_datasets(cfg_for(path, **extra), tokenizer, seed=0)
    assert evaluation is None
    assert train.column_names == ["id", "prompt_ids", "chosen_ids", "rejected_ids", "length"]
    expected = [
        {
            "id": i,
            "prompt_ids": [tokenizer.bos_token_id] + char_ids(tokenizer, p["prompt"]),
            "chosen_ids": char_ids(tokenizer, p["chosen"]) + [tokenizer.eos_token_id],
            "rejected_ids": char_ids(tokenizer, p["rejected"]) + [tokenizer.eos_token_id],
            # prompt + the longer completion (BOS and EOS included), for length grouping
            "length": 1 + len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) + 1,
        }
        for i, p in enumerate(PAIRS)
    ]
    assert pairs_of(train) == expected
    assert (report.read, report.used_train, report.used_eval, report.dropped) == (3, 3, 0, {})


def test_ids_round_trip_with_bos_and_eos(tmp_path, tokenizer):
    train, _, _ = build_datasets(cfg_for(write_jsonl(tmp_path / "p.jsonl", PAIRS)), tokenizer, seed=0)
    for row, pair in zip(train.to_list(), PAIRS):
        assert (
            tokenizer.decode(row["prompt_ids"] + row["chosen_ids"])
            == f"<s>{pair['prompt']}{pair['chosen']}</s>"
        )
        assert (
            tokenizer.decode(row["prompt_ids"] + row["rejected_ids"])
            == f"<s>{pair['prompt']}{pair['rejected']}</s>"
        )
        assert row["prompt_ids"].count(tokenizer.bos_token_id) == 1
        assert row["chosen_ids"].count(tokenizer.eos_token_id) == 1


def test_builtin_case_rule_loads(tokenizer):
    train, evaluation, report = build_datasets(
        DataConfig(data_path="builtin:case_rule", eval_split=0.1), tokenizer, 0
    )
    # seed 0 draws 3 exact duplicates; the first copy of one was drawn for eval, so its twin follows it
    # there (exact duplicates are never split across train/eval): 201 held out instead of 200
    assert (report.read, report.used_train, report.used_eval, report.duplicates) == (2000, 1799, 201, 3)
    first = texts_of(train.select([0]), tokenizer)[0]
    assert first["prompt"].startswith("<s>Write in ") and first["chosen"].endswith("</s>")
    assert first["chosen"].lower() == first["rejected"].lower() and first["chosen"] != first["rejected"]


@pytest.mark.parametrize("path", ["nope/pairs.jsonl", "./missing", "pairs.txt"])
def test_unknown_or_missing_path_names_path_and_accepted_kinds(path, tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.txt").write_text("hello")
    with pytest.raises(DataError) as e:
        build_datasets(cfg_for(path), tokenizer, 0)
    assert path in str(e.value) and ".jsonl" in str(e.value) and "save_to_disk" in str(e.value)


def test_hub_name_goes_to_load_dataset_with_the_train_split(tokenizer, monkeypatch):
    calls = []

    def fake_load_dataset(name, split=None, **kw):  # stands in for the hub: nothing is downloaded
        calls.append((name, split))
        if name == "org/broken":
            raise ConnectionError("offline")
        return datasets.Dataset.from_list(PAIRS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train, _, _ = build_datasets(
        DataConfig(data_path="org/prefs", train_split="train_prefs", eval_split=0), tokenizer, 0
    )
    assert calls == [("org/prefs", "train_prefs")] and len(train) == 3
    with pytest.raises(DataError, match=r"org/broken: not a local file.*ConnectionError: offline"):
        build_datasets(DataConfig(data_path="org/broken", eval_split=0), tokenizer, 0)


def test_max_samples_keeps_the_first_pairs(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    train, _, report = build_datasets(cfg_for(path, max_samples=2), tokenizer, 0)
    assert ids_of(train) == [0, 1] and report.read == 2


# --- formats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row",
    [
        CONVERSATION,
        # ultrafeedback_binarized: a text prompt column, chosen/rejected are whole conversations
        {
            "prompt": "What?",
            "chosen": CONVERSATION["prompt"] + CONVERSATION["chosen"],
            "rejected": CONVERSATION["prompt"] + CONVERSATION["rejected"],
        },
        # no prompt column at all
        {
            "chosen": CONVERSATION["prompt"] + CONVERSATION["chosen"],
            "rejected": CONVERSATION["prompt"] + CONVERSATION["rejected"],
        },
    ],
    ids=["separate-prompt", "text-prompt-whole-conversations", "no-prompt-column"],
)
def test_conversational_applies_the_chat_template_once(row, tmp_path, tokenizer):
    train, _, report = build_datasets(cfg_for(write_jsonl(tmp_path / "c.jsonl", [row, row])), tokenizer, 0)
    assert texts_of(train, tokenizer) == [TEMPLATED, TEMPLATED]
    ids = train[0]
    # the template writes BOS and EOS itself: they must not be doubled
    assert ids["prompt_ids"][:2] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|user|>")]
    assert ids["chosen_ids"] == char_ids(tokenizer, "Blue") + [tokenizer.eos_token_id]
    assert report.format.startswith("conversational")


def test_implicit_prompt_is_the_shared_prefix(tmp_path, tokenizer):
    rows = [
        # HH-RLHF style, with single newlines: the test tokenizer turns "\n\n" into one <unk>
        {"chosen": "\nHuman: hi\nAssistant: Hello there", "rejected": "\nHuman: hi\nAssistant: Go away"},
        # trl splits at the first differing character, mid-word here (documented in data.py)
        {"chosen": "\nHuman: ok?\nAssistant: Sure thing", "rejected": "\nHuman: ok?\nAssistant: Sorry"},
    ]
    train, _, report = build_datasets(cfg_for(write_jsonl(tmp_path / "hh.jsonl", rows)), tokenizer, 0)
    assert texts_of(train, tokenizer) == [
        {"prompt": "<s>\nHuman: hi\nAssistant:", "chosen": " Hello there</s>", "rejected": " Go away</s>"},
        {"prompt": "<s>\nHuman: ok?\nAssistant: S", "chosen": "ure thing</s>", "rejected": "orry</s>"},
    ]
    assert report.format == "standard, implicit prompt"


def test_implicit_prompt_with_nothing_shared_gives_an_empty_prompt(tmp_path, tokenizer):
    rows = [{"chosen": "A ", "rejected": "B"}]  # trl alone would return prompt "A" here
    train, _, _ = build_datasets(cfg_for(write_jsonl(tmp_path / "x.jsonl", rows)), tokenizer, 0)
    assert texts_of(train, tokenizer) == [{"prompt": "<s>", "chosen": "A </s>", "rejected": "B</s>"}]


def test_column_mapping_and_extra_columns(tmp_path, tokenizer):
    mapped = [
        {"question": p["prompt"], "good": p["chosen"], "bad": p["rejected"], "chosen": 7, "score": 1}
        for p in PAIRS
    ]
    cfg = cfg_for(
        write_jsonl(tmp_path / "m.jsonl", mapped),
        prompt_column="question",
        chosen_column="good",
        rejected_column="bad",
    )
    train, _, _ = build_datasets(cfg, tokenizer, 0)
    reference, _, _ = build_datasets(cfg_for(write_jsonl(tmp_path / "p.jsonl", PAIRS)), tokenizer, 0)
    assert pairs_of(train) == pairs_of(reference)


# --- validation --------------------------------------------------------------------------------------

GOOD = {"prompt": "p", "chosen": "yes", "rejected": "no"}
BAD_ROWS = {
    # class: (raw line, field named in the message, fragment of the message, dropped reason)
    "malformed": ('{"prompt": "p", "chosen": "a" "rejected": "b"}', None, "malformed JSON", "malformed JSON"),
    "number": (json.dumps({**GOOD, "chosen": 3}), "chosen", "expected text, got number", "non-text value"),
    "null": (json.dumps({**GOOD, "rejected": None}), "rejected", "expected text, got null", "non-text value"),
    "dict": (json.dumps({**GOOD, "prompt": {"a": 1}}), "prompt", "got object", "non-text value"),
    "empty-chosen": (json.dumps({**GOOD, "chosen": ""}), "chosen", "empty", "empty chosen/rejected"),
    "blank-rejected": (
        json.dumps({**GOOD, "rejected": "  \n"}),
        "rejected",
        "empty",
        "empty chosen/rejected",
    ),
    "identical": (
        json.dumps({**GOOD, "rejected": "yes"}),
        "rejected",
        "identical",
        "chosen identical to rejected",
    ),
    "missing-key": (
        json.dumps({"prompt": "p", "chosen": "yes"}),
        "rejected",
        "missing",
        "missing column 'rejected'",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_first_bad_row_raises_with_file_line_and_field(kind, tmp_path, tokenizer):
    line, field, fragment, _ = BAD_ROWS[kind]
    # line 1 good, line 2 blank (still counted in line numbers), line 3 bad, line 4 good
    (tmp_path / "pairs.jsonl").write_text(f"{json.dumps(GOOD)}\n\n{line}\n{json.dumps(GOOD)}\n")
    with pytest.raises(DataError) as e:
        build_datasets(cfg_for(tmp_path / "pairs.jsonl"), tokenizer, 0)
    msg = str(e.value)
    assert "pairs.jsonl line 3" in msg and fragment in msg and "skip_invalid: true" in msg
    if field:
        assert f"field '{field}'" in msg


def test_bad_rows_in_csv_and_json_list_name_the_1_based_row(tmp_path, tokenizer):
    pd.DataFrame([GOOD, GOOD, {**GOOD, "chosen": None}]).to_csv(tmp_path / "pairs.csv", index=False)
    with pytest.raises(DataError, match=r"pairs\.csv row 3, field 'chosen': expected text, got null"):
        build_datasets(cfg_for(tmp_path / "pairs.csv"), tokenizer, 0)
    (tmp_path / "pairs.json").write_text(json.dumps([GOOD, {**GOOD, "rejected": 1.5}]))
    with pytest.raises(DataError, match=r"pairs\.json row 2, field 'rejected': expected text, got number"):
        build_datasets(cfg_for(tmp_path / "pairs.json"), tokenizer, 0)


def test_conversational_message_without_text_is_a_row_error(tmp_path, tokenizer):
    bad = {**CONVERSATION, "rejected": [{"role": "assistant", "content": None}]}
    path = write_jsonl(tmp_path / "c.jsonl", [CONVERSATION, bad])
    with pytest.raises(DataError, match=r"c\.jsonl line 2, field 'rejected': message 1 .* got null content"):
        build_datasets(cfg_for(path), tokenizer, 0)


def test_chat_template_failure_is_a_row_error(tmp_path, tokenizer):
    bad = {
        **CONVERSATION,
        "prompt": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be terse"}],
    }
    path = write_jsonl(tmp_path / "c.jsonl", [CONVERSATION, bad])
    with pytest.raises(DataError, match=r"c\.jsonl line 2, field 'chosen': the chat template failed"):
        build_datasets(cfg_for(path), tokenizer, 0)
    _, _, report = build_datasets(cfg_for(path, skip_invalid=True), tokenizer, 0)
    assert report.dropped == {"chat template error": 1}


@pytest.mark.parametrize("skip_invalid", [False, True])
def test_missing_column_is_a_file_error_even_with_skip_invalid(skip_invalid, tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "worse": "b"}])
    with pytest.raises(DataError) as e:
        build_datasets(cfg_for(path, skip_invalid=skip_invalid), tokenizer, 0)
    msg = str(e.value)
    assert "pairs.jsonl" in msg and "'rejected'" in msg and "['prompt', 'chosen', 'worse']" in msg
    assert "rejected_column: <name>" in msg


def test_mapped_prompt_column_that_is_missing_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(DataError, match="prompt_column: <name>"):
        build_datasets(cfg_for(path, prompt_column="question"), tokenizer, 0)


def test_skip_invalid_drops_and_counts_each_class(tmp_path, tokenizer):
    lines = (
        [json.dumps(GOOD)] + [line for line, *_ in BAD_ROWS.values()] + [json.dumps({**GOOD, "chosen": "si"})]
    )
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    train, _, report = build_datasets(cfg_for(tmp_path / "pairs.jsonl", skip_invalid=True), tokenizer, 0)
    assert report.dropped == dict(Counter(reason for *_, reason in BAD_ROWS.values()))
    assert ids_of(train) == [0, len(lines) - 1]  # ids are positions in the source, bad rows included
    assert report.read == len(lines) == report.used_train + report.used_eval + sum(report.dropped.values())
    assert any("dropped 8" in line and "3 non-text value" in line for line in report.lines())


# --- truncation -------------------------------------------------------------------------------------


def test_truncate_pair_rules():
    cfg = DataConfig(max_length=10, max_prompt_length=4, max_completion_length=5)
    prompt, chosen, rejected = list(range(100, 107)), list(range(8)), [1, 2]
    p, c, r, cut = truncate_pair(prompt, chosen, rejected, cfg)
    assert p == [103, 104, 105, 106]  # left truncation keeps the end of the prompt
    assert c == [0, 1, 2, 3, 4] and r == [1, 2]  # completions keep their start
    assert cut
    # max_length: 4 prompt tokens leave 6 for each completion
    p, c, r, cut = truncate_pair(
        [1, 2, 3], list(range(9)), [5], DataConfig(max_length=6, max_prompt_length=4)
    )
    assert (p, c, r, cut) == ([1, 2, 3], [0, 1, 2], [5], True)
    assert truncate_pair([1], [2], [3], cfg) == ([1], [2], [3], False)


def test_truncation_end_to_end_keeps_prompt_end_and_completion_start(tmp_path, tokenizer):
    rows = [
        {"prompt": "abcdefghij", "chosen": "KLMNOPQ", "rejected": "xy"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ]
    cfg = cfg_for(
        write_jsonl(tmp_path / "p.jsonl", rows), max_length=12, max_prompt_length=6, max_completion_length=4
    )
    train, _, report = build_datasets(cfg, tokenizer, 0)
    # prompt keeps its last 6 tokens (BOS cut off); chosen keeps its first 4 (EOS cut off)
    assert texts_of(train, tokenizer)[0] == {"prompt": "efghij", "chosen": "KLMN", "rejected": "xy</s>"}
    assert report.truncated == 1 and report.dropped == {}


def test_empty_completion_after_truncation_is_dropped_and_counted(tmp_path, tokenizer):
    rows = [
        {"prompt": "a long prompt", "chosen": "y", "rejected": "n"},
        {"prompt": "hi", "chosen": "y", "rejected": "n"},
    ]
    # max_prompt_length == max_length leaves no room (config.validate forbids it; data must still be safe)
    cfg = cfg_for(write_jsonl(tmp_path / "p.jsonl", rows), max_length=6, max_prompt_length=6)
    train, _, report = build_datasets(cfg, tokenizer, 0)
    assert ids_of(train) == [1]
    assert all(len(r["chosen_ids"]) > 0 and len(r["rejected_ids"]) > 0 for r in train.to_list())
    assert report.dropped == {"empty completion after truncation": 1}
    assert report.read == report.used_train + report.used_eval + 1


def test_every_pair_dropped_raises_with_numbers_and_setting(tmp_path, tokenizer):
    rows = [{"prompt": "a long prompt", "chosen": "y", "rejected": "n"}] * 2
    cfg = cfg_for(write_jsonl(tmp_path / "p.jsonl", rows), max_length=6, max_prompt_length=6)
    with pytest.raises(
        DataError, match=r"read 2, dropped 2 empty completion after truncation.*max_length \(now 6\)"
    ):
        build_datasets(cfg, tokenizer, 0)


# --- eval split and report -----------------------------------------------------------------------------


def test_eval_split_is_seeded_disjoint_and_complete(tmp_path, tokenizer):
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(50)]
    cfg = cfg_for(write_jsonl(tmp_path / "p.jsonl", rows), eval_split=0.2)
    train, evaluation, report = build_datasets(cfg, tokenizer, seed=1)
    again_train, again_eval, _ = build_datasets(cfg, tokenizer, seed=1)
    _, other_eval, _ = build_datasets(cfg, tokenizer, seed=2)
    assert ids_of(evaluation) == ids_of(again_eval) and ids_of(train) == ids_of(again_train)
    assert set(ids_of(other_eval)) != set(ids_of(evaluation))
    assert len(evaluation) == 10 and not set(ids_of(train)) & set(ids_of(evaluation))
    assert sorted(ids_of(train) + ids_of(evaluation)) == list(range(50))
    assert (report.used_train, report.used_eval) == (40, 10)
    assert "used 40 (train) + 10 (eval)" in report.lines()[1]


def test_eval_data_path_and_split_name(tmp_path, tokenizer):
    train_path = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", PAIRS[:2])
    train, evaluation, report = build_datasets(
        cfg_for(train_path, eval_data_path=eval_path, eval_split=0.5), tokenizer, 0
    )
    assert (len(train), len(evaluation), report.read) == (3, 2, 5)
    path, _ = _write("save_to_disk-dict", tmp_path)
    cfg = cfg_for(path, train_split="train_prefs", eval_data_path="test_prefs")
    _, evaluation, _ = build_datasets(cfg, tokenizer, 0)
    assert texts_of(evaluation, tokenizer) == [{"prompt": "<s>x", "chosen": "a</s>", "rejected": "b</s>"}]


def test_num_proc_gives_the_same_result(tmp_path, tokenizer):
    cfg = DataConfig(data_path="builtin:case_rule", eval_split=0.1, max_samples=200)
    one = build_datasets(cfg, tokenizer, 0)
    two = build_datasets(dataclasses.replace(cfg, num_proc=2), tokenizer, 0)
    assert one[0].to_list() == two[0].to_list() and one[1].to_list() == two[1].to_list()
