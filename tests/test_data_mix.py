"""Several data sources as users write them: a list, `a,b`, a glob, Axolotl / TRL `datasets:` entries with
their own columns, split and max_samples, LLaMA-Factory's `dataset: a,b`."""

from __future__ import annotations

import json

import pytest
from helpers import pairs_jsonl

from orpo_dist.builtin import build_tokenizer
from orpo_dist.config import ConfigError, load_config
from orpo_dist.data import DataError, build_datasets
from orpo_dist.data.cache import cache_key, key_inputs


@pytest.fixture
def files(tmp_path):
    a = pairs_jsonl(tmp_path / "a.jsonl", n=10, seed=1)
    b = pairs_jsonl(tmp_path / "b.jsonl", n=6, seed=2)
    renamed = tmp_path / "other" / "c.jsonl"  # other column names, as another tool's export
    renamed.parent.mkdir()
    rows = [json.loads(line) for line in a.read_text().splitlines()][:4]
    renamed.write_text("".join(json.dumps({"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}) + "\n"
                               for r in rows))  # fmt: skip
    return a, b, renamed


def _build(keys: dict):
    cfg = load_config(
        None, {"eval_split": 0, "max_length": 96, "max_prompt_length": 48, "num_proc": 1, **keys}
    )
    return build_datasets(cfg.data, build_tokenizer(), seed=0)


@pytest.mark.parametrize("form", ["list", "comma", "glob", "llamafactory"])
def test_several_files_are_one_training_set_counted_per_source(form, files):
    a, b, _ = files
    value = {"list": [str(a), str(b)], "comma": f"{a},{b}", "glob": str(a.parent / "*.jsonl"),
             "llamafactory": f"{a}, {b}"}[form]  # fmt: skip
    key = "dataset" if form == "llamafactory" else "data_path"
    train, _, report = _build({key: value})
    assert len(train) == 16 and report.read == 16
    assert report.source == f"{a} (10 pairs) + {b} (6 pairs)"
    assert "list" not in report.lines()[0] and "[" not in report.source  # no Python list in the log


def test_datasets_entries_have_their_own_columns_split_and_max_samples(files):
    a, b, renamed = files
    entries = [
        {"path": str(a), "type": "chat_template.argilla", "max_samples": 3},
        {
            "path": str(renamed),
            "prompt_column": "question",
            "chosen_column": "good",
            "rejected_column": "bad",
        },
        {"path": str(b), "split": "train"},
    ]
    train, _, report = _build({"datasets": entries})
    assert len(train) == 3 + 4 + 6
    assert report.source == f"{a} (3 pairs) + {renamed} (4 pairs) + {b} (6 pairs)"


def test_the_cache_key_covers_every_source(files):
    a, b, _ = files
    tokenizer = build_tokenizer()
    key = lambda cfg: cache_key(key_inputs(cfg.data, tokenizer, 0))  # noqa: E731
    both = load_config(None, {"data_path": [str(a), str(b)]})
    before = key(both)
    assert before != key(load_config(None, {"data_path": str(a)}))
    b.write_text(b.read_text() + b.read_text().splitlines(keepends=True)[0])  # one source changes
    assert key(both) != before


def test_a_bad_row_names_its_own_file_and_line(files, tmp_path):
    a, _, _ = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": 5, "rejected": "r"}\n'
    )
    with pytest.raises(DataError, match=rf"\({bad}\) line 2"):
        _build({"data_path": [str(a), str(bad)]})
    with pytest.raises(DataError, match="matches no file"):
        _build({"data_path": str(tmp_path / "none-*.jsonl")})


def test_unknown_entry_keys_are_refused_naming_the_accepted_ones():
    with pytest.raises(ConfigError, match=r"datasets\[1\].*an entry takes path.*not data_files"):
        load_config(None, {"datasets": [{"path": "a.jsonl"}, {"path": "org/x", "data_files": ["a.json"]}]})


def test_dataset_config_reaches_load_dataset_per_source(monkeypatch):
    import datasets

    from orpo_dist.builtin import case_rule_pairs

    calls = []

    def fake_load_dataset(path, split=None, name=None):  # stands in for the hub: nothing is downloaded
        calls.append((path, split, name))
        return datasets.Dataset.from_list(case_rule_pairs(4, seed=1))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    _build({"dataset_name": "org/prefs", "dataset_config": "en", "dataset_train_split": "train_prefs"})
    assert calls == [("org/prefs", "train_prefs", "en")]
    calls.clear()
    _build(
        {
            "datasets": [{"path": "org/a", "name": "fr"}, {"path": "org/b", "split": "test"}],
            "dataset_config": "en",
        }
    )
    assert calls == [("org/a", "train", "fr"), ("org/b", "test", "en")]
