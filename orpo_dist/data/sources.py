"""Loading: every kind of source becomes raw rows plus a way to say where a row lives.

`line 17` in JSON lines, `row 5` elsewhere, so every message points at the user's file. JSON and JSON
lines are read with the `json` module, line by line, because Arrow rejects a malformed line or a
mixed-type column as a whole file with an opaque error; CSV, Parquet, `save_to_disk` directories and
hub datasets are loaded by `datasets`.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import io
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from orpo_dist.builtin import BUILTIN_PREFIX, builtin_pairs
from orpo_dist.data.summary import DataError

ACCEPTED = (
    "a .jsonl, .json, .csv or .parquet file, a directory holding train.jsonl|csv|parquet (AutoTrain's "
    "layout), a directory written by datasets' save_to_disk, a hub dataset name (owner/name), or "
    f"{BUILTIN_PREFIX}<name>"
)
FILE_KINDS = (".jsonl", ".json", ".csv", ".parquet", ".gz")
GZIP_MAGIC = b"\x1f\x8b"


class BadLine(str):
    """A line that is not a row (its text says why); `reason` is the count key when skip_invalid drops it."""

    def __new__(cls, detail: str, reason: str = "malformed JSON"):
        line = super().__new__(cls, detail)
        line.reason = reason
        return line


@dataclass
class Source:
    """Raw rows of one source. A row is a dict, or a string (`BadLine`) saying why its line is not a row."""

    name: str
    columns: list[str]
    rows: Sequence[dict[str, Any] | str]
    line_numbers: list[int] | None = None  # JSON lines: 1-based line of each row

    def where(self, index: int) -> str:
        return f"line {self.line_numbers[index]}" if self.line_numbers else f"row {index + 1}"


def load_source(path: str, split: str, seed: int, max_samples: int | None, name: str | None = None) -> Source:
    """Any accepted kind of source -> `Source`, keeping only the first `max_samples` pairs; `name` is a hub
    dataset's configuration (TRL `dataset_config`)."""
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
    suffixes = [x.lower() for x in p.suffixes[-2:]]
    suffix = suffixes[-2] if suffixes[-1:] == [".gz"] and len(suffixes) == 2 else p.suffix.lower()
    if p.is_file():
        if suffix in (".jsonl", ".json"):
            return _json_rows(path, _read_bytes(p), max_samples, lines_only=suffix == ".jsonl")
        if suffix == ".csv":
            return _read_csv(path, _read_bytes(p), max_samples)
        if suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
            return _non_empty(_from_dataset(path, ds, max_samples))
        raise DataError(f"{path}: unknown file type {suffix or '(no extension)'!r}. Accepted: {ACCEPTED}.")
    if not looks_like_hub(path):
        raise DataError(f"{path}: no such file or directory. Accepted: {ACCEPTED}.")
    return _from_dataset(path, hub_dataset(path, split, name), max_samples)


@functools.lru_cache(maxsize=8)
def hub_dataset(path: str, split: str, name: str | None = None) -> datasets.Dataset:
    """A hub dataset's split, loaded once per process: the cache key (its datasets fingerprint) and the
    data build both read it from here (an Arrow file memory-mapped by datasets, not a copy)."""
    try:
        return datasets.load_dataset(path, split=split, **({"name": name} if name else {}))
    except Exception as e:  # hub errors come in many classes; the message is what helps
        raise DataError(
            f"{path}: not a local file or directory, and loading it as a hub dataset (split {split!r}) "
            f"failed: {type(e).__name__}: {e}. Accepted: {ACCEPTED}."
        ) from e


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


def _read_bytes(p: Path) -> bytes:
    """The file's bytes, gunzipped if they are gzip (whatever the name says)."""
    data = p.read_bytes()
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{p}: looks gzip-compressed but does not decompress ({e})") from None
    return data


def _decode(name: str, data: bytes) -> tuple[list[str], list[str | None]]:
    """Lines of text and, per line, None or why it is not UTF-8 (a UTF-8 BOM is dropped; UTF-16/32 with a
    BOM is decoded). One bad byte costs its line, not the file."""
    for bom, codec in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                       (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):  # fmt: skip
        if data.startswith(bom):
            try:
                return data.decode(codec).splitlines(), []
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{name}: starts with a {codec.upper()} byte-order mark but is not {codec} ({e.reason})"
                ) from None
    data = data.removeprefix(codecs.BOM_UTF8)
    if b"\x00" in data[:4096]:
        raise DataError(
            f"{name}: contains NUL bytes (UTF-16 without a byte-order mark, or not text); save it as UTF-8"
        )
    try:
        return data.decode("utf-8").splitlines(), []
    except UnicodeDecodeError:
        pass
    lines, errors = [], []
    for raw in data.splitlines():
        try:
            lines.append(raw.decode("utf-8"))
            errors.append(None)
        except UnicodeDecodeError as e:
            lines.append("")
            errors.append(
                f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}): save the file as UTF-8 "
                "(e.g. iconv -f latin1 -t utf-8)"
            )
    return lines, errors


def _json_rows(name: str, data: bytes, max_samples: int | None, lines_only: bool = False) -> Source:
    """A JSON list of objects (1-based rows), or JSON lines (1-based line numbers, blank lines skipped).

    A `.jsonl` file is always JSON lines (a line holding an array is a bad row, not the whole file).
    """
    lines, errors = _decode(name, data)
    text = "\n".join(lines)
    if not lines_only and not any(errors) and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # else: JSON lines whose first line is an array
                raise DataError(
                    f"{name} line {e.lineno}: malformed JSON ({e.msg}); the whole file is unreadable."
                ) from None
        else:
            rows = [
                r if isinstance(r, dict) else BadLine(f"expected an object {{...}}, got {type_name(r)}")
                for r in rows
            ]
            rows = rows[:max_samples] if max_samples is not None else rows
            return _non_empty(Source(name, _union_keys(rows), rows))
    rows, line_numbers = [], []
    for number, (line, error) in enumerate(itertools.zip_longest(lines, errors), start=1):
        if error is None and not line.strip():
            continue
        if max_samples is not None and len(rows) >= max_samples:
            break
        if error:
            rows.append(BadLine(error, "not UTF-8"))
        else:
            try:
                row = json.loads(line)
                rows.append(
                    row
                    if isinstance(row, dict)
                    else BadLine(f"expected an object {{...}}, got {type_name(row)}")
                )
            except json.JSONDecodeError as e:
                rows.append(BadLine(f"{e.msg} at column {e.colno}"))
        line_numbers.append(number)
    return _non_empty(Source(name, _union_keys(rows), rows, line_numbers))


def _read_csv(name: str, data: bytes, max_samples: int | None) -> Source:
    """Every cell as text ("2" is a valid answer); an empty cell is null. Errors name the CSV line."""
    import pandas as pd

    lines, errors = _decode(name, data)
    bad = next((i for i, e in enumerate(errors) if e), None)
    if bad is not None:
        raise DataError(f"{name} line {bad + 1}: {errors[bad]}")
    try:
        frame = pd.read_csv(io.StringIO("\n".join(lines)), dtype=str, keep_default_na=False, na_values=[""],
                            nrows=max_samples)  # fmt: skip
    except pd.errors.EmptyDataError:
        raise DataError(f"{name}: the file is empty (no header, no rows)") from None
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError(f"{name}: malformed CSV ({squash_whitespace(str(e))})") from None
    if frame.empty:
        raise DataError(f"{name}: no rows, only a header ({', '.join(map(str, frame.columns))})")
    rows = [{k: (None if v is None or v != v else v) for k, v in r.items()} for r in frame.to_dict("records")]
    return Source(name, [str(c) for c in frame.columns], rows)


def _non_empty(source: Source) -> Source:
    if not len(source.rows):
        raise DataError(f"{source.name}: no rows (the file is empty); check data_path")
    return source


def squash_whitespace(text: str) -> str:
    """All whitespace runs (newlines included) as one space: a library message inside ours."""
    return " ".join(text.split())


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
