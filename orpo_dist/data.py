"""Preference pairs: load, validate, apply the chat template, tokenise, truncate, split.

The flow is one direction, in three stages:

1. load: every source becomes a list-like of raw rows plus a way to say where a row lives
   (`line 17` in JSON lines, `row 5` elsewhere), so every message points at the user's file.
   JSON and JSON lines are read with the `json` module, line by line, because Arrow rejects a
   malformed line or a mixed-type column as a whole file with an opaque error; CSV, Parquet,
   `save_to_disk` directories and hub datasets are loaded by `datasets`.
2. validate + normalise (Python, per row, before any tokenisation): map columns to the standard
   names, check types and emptiness, extract implicit prompts and apply the chat template with
   `trl.data_utils`, ending with three strings per pair. The first bad row raises `DataError`,
   or with `skip_invalid` it is dropped and counted.
3. tokenise + truncate with a batched `Dataset.map(num_proc=...)`, drop pairs whose completion
   has no tokens left (they would be 0/0 in the loss), then hold out the eval pairs by `id`.

Every pair read is accounted for in `DataReport`: read == used_train + used_eval + sum(dropped).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from trl.data_utils import extract_prompt, is_conversational, maybe_apply_chat_template, maybe_extract_prompt

from orpo_dist.config import DataConfig
from orpo_dist.synthetic import BUILTIN_PREFIX, builtin_pairs

ACCEPTED = (
    "a .jsonl, .json, .csv or .parquet file, a directory written by datasets' save_to_disk, "
    f"a hub dataset name (owner/name), or {BUILTIN_PREFIX}<name>"
)
FILE_KINDS = (".jsonl", ".json", ".csv", ".parquet")
SKIP_HINT = "Fix the row, or set skip_invalid: true to drop such rows (they are counted in the log)."
EMPTY_AFTER_TRUNCATION = "empty completion after truncation"
COLUMNS = ("prompt", "chosen", "rejected")
TOKEN_FEATURES = datasets.Features(
    {"id": datasets.Value("int64"), **{f"{c}_ids": datasets.List(datasets.Value("int64")) for c in COLUMNS}}
)


class DataError(ValueError):
    """Bad data: the message names the file, the row, the field, what is wrong and how to fix it."""


@dataclass
class DataReport:
    """What happened to every pair, so nothing is dropped or cut silently."""

    source: str
    read: int = 0
    used_train: int = 0
    used_eval: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    format: str = ""

    def lines(self) -> list[str]:
        n_dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{n} {reason}" for reason, n in Counter(self.dropped).most_common())
        return [
            f"data: {self.source}" + (f" ({self.format})" if self.format else ""),
            f"read {self.read} pairs, used {self.used_train} (train) + {self.used_eval} (eval), "
            f"dropped {n_dropped}" + (f": {reasons}" if reasons else ""),
            f"truncated {self.truncated} pairs (kept) to fit max_prompt_length / max_completion_length / max_length",
        ]


@dataclass
class _Source:
    """Raw rows of one source. A row is a dict, or a string saying why its JSON line did not parse."""

    name: str
    columns: list[str]
    rows: Sequence[dict[str, Any] | str]
    line_numbers: list[int] | None = None  # JSON lines: 1-based line of each row

    def where(self, index: int) -> str:
        return f"line {self.line_numbers[index]}" if self.line_numbers else f"row {index + 1}"


class _BadRow(Exception):
    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


# ---------------------------------------------------------------------------------------------
# 1. Loading


def _load(path: str, split: str, seed: int, max_samples: int | None) -> _Source:
    """Any accepted kind of source -> `_Source`, keeping only the first `max_samples` pairs."""
    if path.startswith(BUILTIN_PREFIX):
        try:
            pairs = builtin_pairs(path, seed)
        except ValueError as e:
            raise DataError(str(e)) from None
        return _from_dataset(path, datasets.Dataset.from_list(pairs), max_samples)
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            return _from_dataset(path, _pick_split(path, datasets.load_from_disk(str(p)), split), max_samples)
        raise DataError(f"{path}: directory is not a datasets save_to_disk directory. Accepted: {ACCEPTED}.")
    suffix = p.suffix.lower()
    if p.is_file():
        if suffix in (".jsonl", ".json"):
            return _read_json(path, p.read_text(encoding="utf-8"), max_samples)
        if suffix in (".csv", ".parquet"):
            ds = datasets.load_dataset(suffix[1:], data_files=str(p), split="train")
            return _from_dataset(path, ds, max_samples)
        raise DataError(f"{path}: unknown file type {suffix or '(no extension)'!r}. Accepted: {ACCEPTED}.")
    if not _looks_like_hub(path):
        raise DataError(f"{path}: no such file or directory. Accepted: {ACCEPTED}.")
    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # hub errors come in many classes; the message is what helps
        raise DataError(
            f"{path}: not a local file or directory, and loading it as a hub dataset (split {split!r}) "
            f"failed: {type(e).__name__}: {e}. Accepted: {ACCEPTED}."
        ) from e
    return _from_dataset(path, ds, max_samples)


def _looks_like_hub(path: str) -> bool:
    """`owner/name` (or `name`) that is not a local path: anything else missing is a missing file."""
    p = Path(path).expanduser()
    if path.startswith((BUILTIN_PREFIX, "/", ".", "~")) or p.exists() or p.suffix.lower() in FILE_KINDS:
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) is not None


def _pick_split(path: str, loaded: datasets.Dataset | datasets.DatasetDict, split: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split not in loaded:
        raise DataError(f"{path}: no split {split!r}; splits found: {list(loaded)}. Set train_split: <name>.")
    return loaded[split]


def _from_dataset(name: str, ds: datasets.Dataset, max_samples: int | None) -> _Source:
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    return _Source(name, list(ds.column_names), ds)


def _read_json(name: str, text: str, max_samples: int | None) -> _Source:
    """A JSON list of objects (1-based rows), or JSON lines (1-based line numbers, blank lines skipped)."""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{name} line {e.lineno}: malformed JSON ({e.msg}); the whole file is unreadable."
            ) from None
        rows = [
            r if isinstance(r, dict) else f"expected an object {{...}}, got {_type_name(r)}" for r in rows
        ]
        rows = rows[:max_samples] if max_samples is not None else rows
        return _Source(name, _union_keys(rows), rows)
    rows, line_numbers = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if max_samples is not None and len(rows) >= max_samples:
            break
        try:
            row = json.loads(line)
            rows.append(
                row if isinstance(row, dict) else f"expected an object {{...}}, got {_type_name(row)}"
            )
        except json.JSONDecodeError as e:
            rows.append(f"{e.msg} at column {e.colno}")
        line_numbers.append(number)
    return _Source(name, _union_keys(rows), rows, line_numbers)


def _union_keys(rows: list[dict[str, Any] | str]) -> list[str]:
    return list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))


# ---------------------------------------------------------------------------------------------
# 2. Validation and normalisation to three strings per pair


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "text", dict: "object", list: "list"}.get(type(value), type(value).__name__)


def _column_map(cfg: DataConfig, source: _Source) -> dict[str, str]:
    """Standard name -> column in the source. Missing columns are a whole-file error, even with skip_invalid.

    No `prompt` column is the implicit-prompt format (HH-RLHF style), unless the user mapped one.
    """
    wanted = {"prompt": cfg.prompt_column, "chosen": cfg.chosen_column, "rejected": cfg.rejected_column}
    if cfg.prompt_column == "prompt" and "prompt" not in source.columns:
        del wanted["prompt"]
    for std, col in wanted.items():
        if col not in source.columns:
            raise DataError(
                f"{source.name}: missing column {col!r} (used as {std}); columns found: {source.columns}. "
                f"Map it with `{std}_column: <name>`."
            )
    return wanted


def _detect_conversational(source: _Source, chosen_col: str) -> bool:
    """Per dataset: the first row with a list-valued `chosen` decides (lists of {role, content} messages)."""
    for row in source.rows:
        value = row.get(chosen_col) if isinstance(row, dict) else None
        if isinstance(value, str):
            return False
        if isinstance(value, list) and value:
            return is_conversational({"chosen": value})
    return False


def _check_value(col: str, value: Any, conversational: bool, is_prompt: bool = False) -> None:
    """Type and emptiness of one field (named by its column); a prompt may be text in a chat dataset."""
    if conversational and (not is_prompt or isinstance(value, list)):
        if not isinstance(value, list):
            got = _type_name(value)
            raise _BadRow("non-text value", col, f"expected a list of {{role, content}} messages, got {got}")
        for i, m in enumerate(value, start=1):
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                got = _type_name(m.get("content")) + " content" if isinstance(m, dict) else _type_name(m)
                raise _BadRow(
                    "non-text value", col, f"message {i} should be {{role, content}} text, got {got}"
                )
        if not is_prompt and not any(m["content"].strip() for m in value):
            raise _BadRow("empty chosen/rejected", col, "no message with text")
    elif not isinstance(value, str):
        raise _BadRow("non-text value", col, f"expected text, got {_type_name(value)}")
    elif not is_prompt and not value.strip():
        raise _BadRow("empty chosen/rejected", col, "empty text")


def _split_implicit(chosen: str, rejected: str) -> dict[str, str]:
    """HH-RLHF style: the longest shared prefix is the prompt (`trl.data_utils.extract_prompt`).

    trl splits at the first differing character, so "Assistant: Sure" / "Assistant: Sorry" gives
    the prompt "...Assistant: S" (a mid-word split; the model still sees the same text in total).
    When one text is a prefix of the other it leaves one shared character in both completions.
    When the texts share nothing it can return a prompt that is not a prefix; then the prompt is empty.
    """
    out = extract_prompt({"chosen": chosen, "rejected": rejected})
    if out["prompt"] + out["chosen"] != chosen or out["prompt"] + out["rejected"] != rejected:
        return {"prompt": "", "chosen": chosen, "rejected": rejected}
    return out


def _normalise(
    row: dict[str, Any], columns: dict[str, str], conversational: bool, tokenizer
) -> dict[str, str]:
    """One raw row (standard names via `columns`) -> {prompt, chosen, rejected} strings, or `_BadRow`."""
    example = {}
    for std, col in columns.items():
        if col not in row:
            raise _BadRow(f"missing column {col!r}", col, f"missing (this row has {sorted(row)})")
        _check_value(col, row[col], conversational, is_prompt=std == "prompt")
        example[std] = row[col]
    if example["chosen"] == example["rejected"]:
        detail = "identical to chosen; a pair needs two different completions"
        raise _BadRow("chosen identical to rejected", columns["rejected"], detail)
    if "prompt" not in example or conversational:
        # implicit prompt: text (HH-RLHF) or whole conversations (ultrafeedback_binarized)
        example = maybe_extract_prompt(example) if conversational else _split_implicit(**example)
        for std in ("chosen", "rejected"):
            _check_value(columns[std], example[std], conversational)
    if not conversational:
        return example
    if not isinstance(example["prompt"], list) or not example["prompt"]:
        raise _BadRow(
            "no prompt", columns["chosen"], "chosen and rejected share no leading message (the prompt)"
        )
    try:
        return maybe_apply_chat_template(example, tokenizer)
    except Exception as e:  # templates raise their own errors (role order, missing template, ...)
        raise _BadRow("chat template error", columns["chosen"], f"the chat template failed: {e}") from None


def _texts(source: _Source, cfg: DataConfig, tokenizer, dropped: Counter) -> tuple[dict[str, list], str]:
    """Validate every row before any tokenisation; first bad row raises unless skip_invalid."""
    columns = _column_map(cfg, source)
    conversational = _detect_conversational(source, columns["chosen"])
    rows = source.rows
    if isinstance(rows, datasets.Dataset):  # decode only the columns we use
        rows = rows.select_columns(list(columns.values()))
    out: dict[str, list] = {"id": [], "prompt": [], "chosen": [], "rejected": []}
    for index, row in enumerate(rows):
        try:
            if isinstance(row, str):
                raise _BadRow("malformed JSON", "", row)
            pair = _normalise(row, columns, conversational, tokenizer)
        except _BadRow as bad:
            if not cfg.skip_invalid:
                where = f"{source.name} {source.where(index)}"
                if bad.reason == "malformed JSON":
                    raise DataError(f"{where}: malformed JSON ({bad.detail}). {SKIP_HINT}") from None
                raise DataError(f"{where}, field {bad.field!r}: {bad.detail}. {SKIP_HINT}") from None
            dropped[bad.reason] += 1
            continue
        out["id"].append(index)
        for std in COLUMNS:
            out[std].append(pair[std])
    fmt = "conversational" if conversational else "standard"
    return out, fmt + (", implicit prompt" if "prompt" not in columns else "")


# ---------------------------------------------------------------------------------------------
# 3. Tokenisation and truncation


def truncate_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], cfg: DataConfig
) -> tuple[list[int], list[int], list[int], bool]:
    """Prompt keeps its last tokens, completions their first; returns (prompt, chosen, rejected, truncated).

    The end of a prompt (the question, the assistant marker) matters most; the start of an answer
    is what the preference is about. A cut completion loses its EOS, as TRL does.
    """
    p, c, r = prompt, chosen, rejected
    if len(p) > cfg.max_prompt_length:
        p = p[len(p) - cfg.max_prompt_length :]
    if cfg.max_completion_length is not None:
        c, r = c[: cfg.max_completion_length], r[: cfg.max_completion_length]
    budget = max(cfg.max_length - len(p), 0)
    c, r = c[:budget], r[:budget]
    truncated = (len(p), len(c), len(r)) != (len(prompt), len(chosen), len(rejected))
    return p, c, r, truncated


def _tokenize_batch(batch: dict[str, list], tokenizer, cfg: DataConfig) -> dict[str, list]:
    """Batched map: ids for prompt (with BOS unless the template already wrote it) and completions (+EOS)."""
    bos, eos_id = tokenizer.bos_token, tokenizer.eos_token_id
    has_bos = [bool(bos) and p.startswith(bos) for p in batch["prompt"]]
    prompts: list[list[int]] = [[] for _ in has_bos]
    for flag in (False, True):
        idx = [i for i, h in enumerate(has_bos) if h == flag]
        if idx:
            ids = tokenizer([batch["prompt"][i] for i in idx], add_special_tokens=not flag)["input_ids"]
            for i, row in zip(idx, ids):
                prompts[i] = row

    def completions(texts: list[str]) -> list[list[int]]:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [row + [eos_id] if eos_id is not None and row[-1:] != [eos_id] else row for row in ids]

    out: dict[str, list] = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "truncated", "empty")}
    for p, c, r in zip(prompts, completions(batch["chosen"]), completions(batch["rejected"])):
        p, c, r, cut = truncate_pair(p, c, r, cfg)
        for key, value in zip(out, (p, c, r, cut, not c or not r)):
            out[key].append(value)
    return out


def _tokenize(texts: dict[str, list], tokenizer, cfg: DataConfig, report: DataReport) -> datasets.Dataset:
    if not texts["id"]:
        return datasets.Dataset.from_dict({k: [] for k in TOKEN_FEATURES}, features=TOKEN_FEATURES)
    ds = datasets.Dataset.from_dict(texts)
    ds = ds.map(
        _tokenize_batch,
        batched=True,
        num_proc=cfg.num_proc if cfg.num_proc > 1 and len(ds) > cfg.num_proc else None,
        remove_columns=list(COLUMNS),
        fn_kwargs={"tokenizer": tokenizer, "cfg": cfg},
        desc="Tokenizing pairs",
    )
    empty = np.asarray(ds["empty"], dtype=bool)
    truncated = np.asarray(ds["truncated"], dtype=bool)
    report.truncated += int((truncated & ~empty).sum())
    if empty.any():
        report.dropped[EMPTY_AFTER_TRUNCATION] += int(empty.sum())
        ds = ds.select(np.flatnonzero(~empty))
    return ds.remove_columns(["truncated", "empty"])


# ---------------------------------------------------------------------------------------------
# Public entry point


def _eval_ids(n: int, fraction: float, seed: int) -> set[int]:
    """A seeded held-out set of ids, chosen before validation so length settings never move pairs."""
    if fraction <= 0 or n < 2:
        return set()
    k = min(max(round(n * fraction), 1), n - 1)
    return {int(i) for i in np.random.default_rng(seed).permutation(n)[:k]}


def _eval_source(cfg: DataConfig, seed: int) -> _Source:
    """`eval_data_path` is a file/dataset, or (AutoTrain `valid_split`) a split name of the train source."""
    path, train = cfg.eval_data_path, Path(cfg.data_path).expanduser()
    is_split_name = re.fullmatch(r"[\w-]+", path) and not Path(path).expanduser().exists()
    train_has_splits = (train / "dataset_dict.json").exists() or _looks_like_hub(cfg.data_path)
    if is_split_name and train_has_splits:
        return _load(cfg.data_path, path, seed, None)
    return _load(path, cfg.train_split, seed, None)


def _all_dropped_error(report: DataReport, cfg: DataConfig) -> DataError:
    reasons = (
        ", ".join(f"{n} {reason}" for reason, n in report.dropped.items()) or "0 (the source has no pairs)"
    )
    if report.dropped.get(EMPTY_AFTER_TRUNCATION):
        fix = (
            f"Raise max_length (now {cfg.max_length}) above max_prompt_length (now {cfg.max_prompt_length})."
        )
    elif report.dropped:
        fix = "Fix the rows; run with skip_invalid: false to see the first bad one."
    else:
        fix = "Check data_path, train_split and max_samples."
    return DataError(f"{report.source}: no training pairs left: read {report.read}, dropped {reasons}. {fix}")


def build_datasets(
    cfg: DataConfig, tokenizer, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None, DataReport]:
    """Train and eval datasets with columns id, prompt_ids, chosen_ids, rejected_ids, plus the report.

    Eval is a seeded held-out `eval_split` of the train source, or the pairs of `eval_data_path`.
    """
    source = _load(cfg.data_path, cfg.train_split, seed, cfg.max_samples)
    report = DataReport(source=cfg.data_path, read=len(source.rows), dropped=Counter())
    texts, report.format = _texts(source, cfg, tokenizer, report.dropped)
    eval_texts = None
    if cfg.eval_data_path:
        eval_source = _eval_source(cfg, seed)
        report.source += f" + eval: {cfg.eval_data_path}"
        report.read += len(eval_source.rows)
        eval_texts, _ = _texts(eval_source, cfg, tokenizer, report.dropped)

    train = _tokenize(texts, tokenizer, cfg, report)
    if eval_texts is not None:
        evaluation = _tokenize(eval_texts, tokenizer, cfg, report)
    else:
        held_out = _eval_ids(len(source.rows), cfg.eval_split, seed)
        is_eval = np.isin(np.asarray(train["id"], dtype=np.int64), np.fromiter(held_out, dtype=np.int64))
        evaluation = train.select(np.flatnonzero(is_eval)) if held_out else None
        train = train.select(np.flatnonzero(~is_eval))
    report.dropped = {reason: n for reason, n in report.dropped.items() if n}
    if len(train) == 0:
        raise _all_dropped_error(report, cfg)
    report.used_train = len(train)
    report.used_eval = len(evaluation) if evaluation is not None else 0
    return train, (evaluation if report.used_eval else None), report
