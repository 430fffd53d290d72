"""Tokenisation and truncation, batched through `Dataset.map(num_proc=...)`.

Pairs whose completion has no tokens left are dropped and counted (they would be 0/0 in the loss).
"""

from __future__ import annotations

import datasets
import numpy as np

from orpo_dist.config import DataConfig
from orpo_dist.data.report import EMPTY_AFTER_TRUNCATION, IDENTICAL_AFTER_TOKENISATION, DataReport
from orpo_dist.data.rows import COLUMNS

TOKEN_FEATURES = datasets.Features(
    {"id": datasets.Value("int64"), **{f"{c}_ids": datasets.List(datasets.Value("int64")) for c in COLUMNS}}
)


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

    keys = ("prompt_ids", "chosen_ids", "rejected_ids", "truncated", "empty", "identical")
    out: dict[str, list] = {k: [] for k in keys}
    for p, c, r in zip(prompts, completions(batch["chosen"]), completions(batch["rejected"])):
        p, c, r, cut = truncate_pair(p, c, r, cfg)
        for key, value in zip(out, (p, c, r, cut, not c or not r, c == r)):
            out[key].append(value)
    return out


def tokenize_pairs(
    texts: dict[str, list], tokenizer, cfg: DataConfig, report: DataReport
) -> datasets.Dataset:
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
    identical = np.asarray(ds["identical"], dtype=bool) & ~empty  # no preference signal left
    truncated = np.asarray(ds["truncated"], dtype=bool)
    report.truncated += int((truncated & ~empty & ~identical).sum())
    report.dropped[EMPTY_AFTER_TRUNCATION] += int(empty.sum())
    report.dropped[IDENTICAL_AFTER_TOKENISATION] += int(identical.sum())
    if (empty | identical).any():
        ds = ds.select(np.flatnonzero(~(empty | identical)))
    return ds.remove_columns(["truncated", "empty", "identical"])
