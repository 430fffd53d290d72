"""Loading: every kind of source becomes raw rows plus a way to say where a row lives.

`line 17` in JSON lines, `row 5` elsewhere, so every message points at the user's file. JSON and JSON
lines are read with the `json` module, line by line, because Arrow rejects a malformed line or a
mixed-type column as a whole file with an opaque error; CSV, Parquet, `save_to_disk` directories and
hub datasets are loaded by `datasets`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from orpo_dist.builtin import BUILTIN_PREFIX, builtin_pairs
from orpo_dist.data.report import DataError

ACCEPTED = (
    "a .jsonl, .json, .csv or .parquet file, a directory holding train.jsonl|csv|parquet (AutoTrain's "
    "layout), a directory written by datasets' save_to_disk, a hub dataset name (owner/name), or "
    f"{BUILTIN_PREFIX}<name>"
)
FILE_KINDS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Source:
    """Raw rows of one source. A row is a dict, or a string saying why its JSON line did not parse."""

    name: str
    columns: list[str]
    rows: Sequence[dict[str, Any] | str]
    line_numbers: list[int] | None = None  # JSON lines: 1-based line of each row

    def where(self, index: int) -> str:
        return f"line {self.line_numbers[index]}" if self.line_numbers else f"row {index + 1}"


def load_source(path: str, split: str, seed: int, max_samples: int | None) -> Source:
    """Any accepted kind of source -> `Source`, keeping only the first `max_samples` pairs."""
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
        if split_file := split_file_in(p, split):  # AutoTrain: --data-path DIR holding train.csv
            return load_source(str(split_file), split, seed, max_samples)
        raise DataError(
            f"{path}: directory holds no {split}.jsonl|json|csv|parquet and is not a save_to_disk directory. "
            f"Accepted: {ACCEPTED}."
        )
    suffix = p.suffix.lower()
    if p.is_file():
        if suffix in (".jsonl", ".json"):
            return _read_json(path, p.read_text(encoding="utf-8"), max_samples)
        if suffix in (".csv", ".parquet"):
            ds = datasets.load_dataset(suffix[1:], data_files=str(p), split="train")
            return _from_dataset(path, ds, max_samples)
        raise DataError(f"{path}: unknown file type {suffix or '(no extension)'!r}. Accepted: {ACCEPTED}.")
    if not looks_like_hub(path):
        raise DataError(f"{path}: no such file or directory. Accepted: {ACCEPTED}.")
    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # hub errors come in many classes; the message is what helps
        raise DataError(
            f"{path}: not a local file or directory, and loading it as a hub dataset (split {split!r}) "
            f"failed: {type(e).__name__}: {e}. Accepted: {ACCEPTED}."
        ) from e
    return _from_dataset(path, ds, max_samples)


def split_file_in(directory: Path, split: str) -> Path | None:
    """AutoTrain's local layout: the split `train` (or `--valid-split NAME`) is DIR/<split>.<jsonl|csv|...>."""
    found = [directory / f"{split}{kind}" for kind in FILE_KINDS if (directory / f"{split}{kind}").is_file()]
    return found[0] if found else None


def looks_like_hub(path: str) -> bool:
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


def _from_dataset(name: str, ds: datasets.Dataset, max_samples: int | None) -> Source:
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    return Source(name, list(ds.column_names), ds)


def _read_json(name: str, text: str, max_samples: int | None) -> Source:
    """A JSON list of objects (1-based rows), or JSON lines (1-based line numbers, blank lines skipped)."""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{name} line {e.lineno}: malformed JSON ({e.msg}); the whole file is unreadable."
            ) from None
        rows = [r if isinstance(r, dict) else f"expected an object {{...}}, got {type_name(r)}" for r in rows]
        rows = rows[:max_samples] if max_samples is not None else rows
        return Source(name, _union_keys(rows), rows)
    rows, line_numbers = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if max_samples is not None and len(rows) >= max_samples:
            break
        try:
            row = json.loads(line)
            rows.append(row if isinstance(row, dict) else f"expected an object {{...}}, got {type_name(row)}")
        except json.JSONDecodeError as e:
            rows.append(f"{e.msg} at column {e.colno}")
        line_numbers.append(number)
    return Source(name, _union_keys(rows), rows, line_numbers)


def _union_keys(rows: list[dict[str, Any] | str]) -> list[str]:
    return list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "text", dict: "object", list: "list"}.get(type(value), type(value).__name__)
