"""Validation and normalisation of raw rows to three strings per pair, before any tokenisation.

Columns are mapped to the standard names, types and emptiness checked, implicit prompts extracted and
the chat template applied with `trl.data_utils`. The first bad row raises `DataError` naming the file,
row and field; with `skip_invalid` it is dropped and counted instead.
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
from typing import Any

import datasets
from trl.data_utils import extract_prompt, is_conversational, maybe_apply_chat_template, maybe_extract_prompt

from orpo_dist.config import DataConfig
from orpo_dist.data.sources import Source, type_name
from orpo_dist.data.summary import DataError

SKIP_HINT = "Fix the row, or set skip_invalid: true to drop such rows (they are counted in the log)."
COLUMNS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant", "tool")


class _BadRow(Exception):
    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


def column_map(cfg: DataConfig, source: Source) -> dict[str, str]:
    """Standard name -> column in the source. Missing columns are a whole-file error, even with skip_invalid.

    No `prompt` column (in most rows) is the implicit-prompt format (HH-RLHF style), unless the user mapped
    one -- or an unused column is a near miss of it (`promt`): then it is an error naming both.
    """
    wanted = {"prompt": cfg.prompt_column, "chosen": cfg.chosen_column, "rejected": cfg.rejected_column}
    unused = [c for c in source.columns if c not in wanted.values()]
    if cfg.prompt_column == "prompt" and _share(source, "prompt") < 0.5:
        close = _near_miss("prompt", unused)
        if close:
            raise DataError(
                f"{source.name}: column {close!r} looks like 'prompt' but is not used; without a 'prompt' column "
                f"the pairs are read as implicit-prompt pairs and {close!r} is ignored. Rename it to 'prompt', or "
                f"set prompt_column: {close}"
            )
        del wanted["prompt"]
    for std, col in wanted.items():
        if col not in source.columns:
            close = _near_miss(col, unused)
            hint = f" Did you mean {close!r}? Map it with `{std}_column: {close}`." if close else ""
            raise DataError(
                f"{source.name}: missing column {col!r} (used as {std}); columns found: {source.columns}.{hint or ''}"
                + ("" if hint else f" Map it with `{std}_column: <name>`.")
            )
    return wanted


def _near_miss(expected: str, columns: list[str]) -> str | None:
    """An unused column that is the expected name with a typo or other case (`promt`, `Prompt`, `prompts`)."""
    for col in columns:
        if col.lower() == expected.lower():
            return col
    close = difflib.get_close_matches(expected.lower(), [c.lower() for c in columns], n=1, cutoff=0.8)
    return next((c for c in columns if close and c.lower() == close[0]), None)


def _share(source: Source, column: str) -> float:
    """Fraction of rows holding `column` (1 or 0 for a table; per row in a JSON file, where rows may differ)."""
    if column not in source.columns:
        return 0.0
    rows = (
        [] if isinstance(source.rows, datasets.Dataset) else [r for r in source.rows if isinstance(r, dict)]
    )
    return sum(column in r for r in rows) / len(rows) if rows else 1.0


def _detect_conversational(source: Source, chosen_col: str) -> bool:
    """Per dataset: lists of {role, content} messages, or text. A table's first value decides; in a JSON
    file the majority of rows does, so the error names the row that differs, not a valid one."""
    votes = Counter()
    for row in source.rows:
        value = row.get(chosen_col) if isinstance(row, dict) else None
        if isinstance(value, str) or (isinstance(value, list) and value):
            votes[isinstance(value, list) and is_conversational({"chosen": value})] += 1
            if isinstance(source.rows, datasets.Dataset):
                break
    return votes[True] > votes[False]


def _check_value(col: str, value: Any, conversational: bool, is_prompt: bool = False) -> None:
    """Type and emptiness of one field (named by its column); a prompt may be text in a chat dataset."""
    if conversational and (not is_prompt or isinstance(value, list)):
        if not isinstance(value, list):
            got = type_name(value)
            raise _BadRow("non-text value", col, f"expected a list of {{role, content}} messages, got {got}")
        for i, m in enumerate(value, start=1):
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                got = type_name(m.get("content")) + " content" if isinstance(m, dict) else type_name(m)
                raise _BadRow(
                    "non-text value", col, f"message {i} should be {{role, content}} text, got {got}"
                )
            if not is_prompt and m["role"] not in ROLES:
                raise _BadRow(
                    "unknown role", col, f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)} "
                    "(ShareGPT's human / gpt: map them to user / assistant)",
                )  # fmt: skip
        if not is_prompt and not any(m["content"].strip() for m in value):
            raise _BadRow("empty chosen/rejected", col, "no message with text")
    elif not isinstance(value, str):
        raise _BadRow("non-text value", col, f"expected text, got {type_name(value)}")
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
    row: dict[str, Any], columns: dict[str, str], conversational: bool, tokenizer, prompt_column: str
) -> dict[str, str]:
    """One raw row (standard names via `columns`) -> {prompt, chosen, rejected} strings, or `_BadRow`."""
    if "prompt" not in columns and row.get(prompt_column) is not None:
        detail = f"has a {prompt_column!r} field that most rows lack (they are implicit-prompt pairs); rows must share one shape"
        raise _BadRow("different shape", prompt_column, detail)
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
    if conversational:
        for std in ("chosen", "rejected"):  # a trailing `user: thanks` would be trained as the completion
            last = example[std][-1]["role"] if example[std] else None
            if last != "assistant":
                raise _BadRow(
                    "last turn not the assistant's", columns[std],
                    f"the last message has role {last!r}; a completion must end with the assistant's turn",
                )  # fmt: skip
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


def duplicate_of(source: Source, cfg: DataConfig) -> list[int]:
    """For each row, the index of the first row with the same prompt, chosen and rejected (itself if none):
    exact duplicates are counted, and held out (or not) together."""
    columns = [c for c in (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column) if c in source.columns]
    rows = source.rows.select_columns(columns) if isinstance(source.rows, datasets.Dataset) else source.rows
    first: dict[str, int] = {}
    out = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            out.append(index)
            continue
        key = json.dumps([row.get(c) for c in columns], sort_keys=True, default=str)
        out.append(first.setdefault(key, index))
    return out


def is_conversational_source(source: Source, cfg: DataConfig, tokenizer) -> bool:
    """The dataset's format, decided once for the whole source; whole-source errors (a missing column,
    conversations without a chat template) raise here."""
    conversational = _detect_conversational(source, column_map(cfg, source)["chosen"])
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source.name}: the rows are conversations (lists of messages) and the tokenizer has no chat "
            "template: set chat_template: chatml (or zephyr, llama3, none for plain text, or a .jinja file)"
        )
    return conversational


def normalise_rows(
    source: Source,
    cfg: DataConfig,
    tokenizer,
    dropped: Counter,
    span: range | None = None,
    conversational: bool | None = None,
    columns: dict[str, str] | None = None,
) -> tuple[dict[str, list], str]:
    """Validate every row (of `span`) before any tokenisation; first bad row raises unless skip_invalid.

    `span`, `conversational` and `columns` (column_map, decided once per source) let workers take chunks
    of one source: ids and messages stay absolute.
    """
    columns = columns or column_map(cfg, source)
    if conversational is None:
        conversational = is_conversational_source(source, cfg, tokenizer)
    rows, span = source.rows, range(len(source.rows)) if span is None else span
    if isinstance(rows, datasets.Dataset):  # decode only the columns we use
        rows = rows.select_columns(list(columns.values())).select(span)
    else:
        rows = rows[span.start : span.stop]
    out: dict[str, list] = {"id": [], "prompt": [], "chosen": [], "rejected": []}
    for index, row in enumerate(rows, start=span.start):
        try:
            if isinstance(row, str):
                raise _BadRow(getattr(row, "reason", "malformed JSON"), "", row)
            pair = _normalise(row, columns, conversational, tokenizer, cfg.prompt_column)
        except _BadRow as bad:
            if not cfg.skip_invalid:
                where = f"{source.name} {source.where(index)}"
                if not bad.field:  # the line itself (JSON, encoding), not a field of a row
                    raise DataError(f"{where}: {bad.reason} ({bad.detail}). {SKIP_HINT}") from None
                raise DataError(f"{where}, field {bad.field!r}: {bad.detail}. {SKIP_HINT}") from None
            dropped[bad.reason] += 1
            continue
        out["id"].append(index)
        for std in COLUMNS:
            out[std].append(pair[std])
    fmt = "conversational" if conversational else "standard"
    return out, fmt + (", implicit prompt" if "prompt" not in columns else "")
