"""Validation and normalisation of raw rows to three strings per pair, before any tokenisation.

Columns are mapped to the standard names, types and emptiness checked, implicit prompts extracted and
the chat template applied with `trl.data_utils`. The first bad row raises `DataError` naming the file,
row and field; with `skip_invalid` it is dropped and counted instead.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import datasets
from trl.data_utils import extract_prompt, is_conversational, maybe_apply_chat_template, maybe_extract_prompt

from orpo_dist.config import DataConfig
from orpo_dist.data.report import DataError
from orpo_dist.data.sources import Source, type_name

SKIP_HINT = "Fix the row, or set skip_invalid: true to drop such rows (they are counted in the log)."
COLUMNS = ("prompt", "chosen", "rejected")


class _BadRow(Exception):
    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


def _column_map(cfg: DataConfig, source: Source) -> dict[str, str]:
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


def _detect_conversational(source: Source, chosen_col: str) -> bool:
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


def is_conversational_source(source: Source, cfg: DataConfig, tokenizer) -> bool:
    """The dataset's format, decided once for the whole source; whole-source errors (a missing column,
    conversations without a chat template) raise here."""
    conversational = _detect_conversational(source, _column_map(cfg, source)["chosen"])
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
) -> tuple[dict[str, list], str]:
    """Validate every row (of `span`) before any tokenisation; first bad row raises unless skip_invalid.

    `span` and `conversational` let workers take chunks of one source: ids and messages stay absolute.
    """
    columns = _column_map(cfg, source)
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
