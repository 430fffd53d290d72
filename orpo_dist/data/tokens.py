"""Tokenisation and truncation of normalised pairs, one chunk of pairs at a time (see `data.parallel`).

Pairs whose completion has no tokens left (0/0 in the loss) or whose chosen and rejected are identical
after tokenisation (no preference signal) are dropped and counted. Each
pair also gets its `length` (prompt + its longer completion), so length grouping reads one small column
instead of every token id.
"""

from __future__ import annotations

from collections import Counter

import datasets

from orpo_dist.config import DataConfig
from orpo_dist.data.rows import COLUMNS
from orpo_dist.data.summary import EMPTY_AFTER_TRUNCATION, IDENTICAL_AFTER_TOKENISATION

TOKEN_FEATURES = datasets.Features(
    {
        "id": datasets.Value("int64"),
        **{f"{c}_ids": datasets.List(datasets.Value("int32")) for c in COLUMNS},
        "length": datasets.Value("int32"),
    }
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


def prompt_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of rendered prompts, with BOS unless the chat template already wrote it (training and
    `orpo_dist.generate` both tokenise prompts here, so they see the same ids)."""
    bos = tokenizer.bos_token
    has_bos = [bool(bos) and p.startswith(bos) for p in texts]
    prompts: list[list[int]] = [[] for _ in has_bos]
    for flag in (False, True):
        idx = [i for i, h in enumerate(has_bos) if h == flag]
        if idx:
            ids = tokenizer([texts[i] for i in idx], add_special_tokens=not flag)["input_ids"]
            for i, row in zip(idx, ids):
                prompts[i] = row
    return prompts


def _tokenize_batch(batch: dict[str, list], tokenizer, cfg: DataConfig) -> dict[str, list]:
    """Ids for prompts (with BOS unless the template already wrote it) and completions (+EOS), truncated."""
    eos_id = tokenizer.eos_token_id
    prompts = prompt_ids(tokenizer, batch["prompt"])

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
    texts: dict[str, list], tokenizer, cfg: DataConfig, dropped: Counter
) -> tuple[dict[str, list], int]:
    """Columns of TOKEN_FEATURES for a chunk of normalised pairs, and how many kept pairs were truncated."""
    columns: dict[str, list] = {k: [] for k in TOKEN_FEATURES}
    if not texts["id"]:
        return columns, 0
    out = _tokenize_batch(texts, tokenizer, cfg)
    truncated = 0
    for pair_id, p, c, r, cut, empty, identical in zip(texts["id"], *out.values()):
        if empty or identical:  # 0/0 in the loss, or no preference signal left
            dropped[EMPTY_AFTER_TRUNCATION if empty else IDENTICAL_AFTER_TOKENISATION] += 1
            continue
        truncated += cut
        for key, value in zip(columns, (pair_id, p, c, r, len(p) + max(len(c), len(r)))):
            columns[key].append(value)
    return columns, truncated
