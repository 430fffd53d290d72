"""Validation, normalisation and tokenisation in chunks of rows, on `num_proc` forked workers, in row order.

Each chunk runs `rows.normalise_rows` then `tokens.tokenize_pairs` and comes back as two small Arrow
datasets (training pairs and held-out pairs), so no Python list of token ids crosses a process boundary.
Workers read the rows from the parent's memory (fork, copy-on-write): the source is never pickled.
Chunks are collected in row order, so the first bad row of the file raises, with the same message one
process gives, and ids, drop counts and the result are the same for any `num_proc`.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from collections.abc import Container
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import datasets
from datasets.utils import tqdm

from orpo_dist.config import DataConfig
from orpo_dist.data.rows import column_map, is_conversational_source, normalise_rows
from orpo_dist.data.sources import Source
from orpo_dist.data.summary import DataError, DataReport
from orpo_dist.data.tokens import TOKEN_FEATURES, tokenize_pairs

CHUNK_PAIRS = 1000
AUTO_MIN_PAIRS = 5000  # `num_proc: auto` uses workers above this many pairs
AUTO_MAX_PROC = 8


def resolve_num_proc(num_proc: int | str, pairs: int) -> int:
    """`auto`: min(CPU cores this process may use, 8) above AUTO_MIN_PAIRS pairs, else 1."""
    if num_proc != "auto":
        return int(num_proc)
    return min(len(os.sched_getaffinity(0)), AUTO_MAX_PROC) if pairs > AUTO_MIN_PAIRS else 1


class AllRows:
    """`held_out` for a separate eval source: every row is held out."""

    def __contains__(self, index: object) -> bool:
        return True


@dataclass
class _Job:
    source: Source
    cfg: DataConfig
    tokenizer: object
    conversational: bool
    held_out: Container[int]
    columns: dict[str, str]


_JOB: _Job | None = None  # set in the parent before the workers fork; they inherit it


def _run_chunk(span: range) -> tuple[datasets.Dataset, datasets.Dataset, Counter, int, str]:
    job, dropped = _JOB, Counter()
    texts, fmt = normalise_rows(
        job.source, job.cfg, job.tokenizer, dropped, span, job.conversational, job.columns
    )
    columns, truncated = tokenize_pairs(texts, job.tokenizer, job.cfg, dropped)
    is_eval = [i in job.held_out for i in columns["id"]]
    parts = [
        datasets.Dataset.from_dict(
            {k: [v for v, e in zip(values, is_eval) if e == want] for k, values in columns.items()},
            features=TOKEN_FEATURES,
        )
        for want in (False, True)
    ]
    return parts[0], parts[1], dropped, truncated, fmt


def tokenise_source(
    source: Source, cfg: DataConfig, tokenizer, report: DataReport, held_out: Container[int], num_proc: int
) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """(train, held-out, format) of one source; drops and truncations are added to `report`."""
    global _JOB
    n = len(source.rows)
    spans = [range(a, min(a + CHUNK_PAIRS, n)) for a in range(0, n, CHUNK_PAIRS)] or [range(0)]
    conversational = is_conversational_source(source, cfg, tokenizer)  # whole-source errors raise here
    _JOB = _Job(source, cfg, tokenizer, conversational, held_out, column_map(cfg, source))
    bar = tqdm(total=n, desc="Tokenizing pairs", unit=" pairs", disable=n < AUTO_MIN_PAIRS)
    try:
        if num_proc > 1 and len(spans) > 1:
            fork = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(min(num_proc, len(spans)), mp_context=fork) as pool:
                try:  # in chunk order; a worker that dies (OOM) breaks the pool instead of hanging it
                    results = [_counted(r, bar) for r in pool.map(_run_chunk, spans)]
                except BaseException as e:
                    pool.shutdown(wait=False, cancel_futures=True)  # the first error is enough
                    if isinstance(e, BrokenProcessPool):
                        raise DataError(
                            f"{source.name}: a tokenising worker process died (out of memory?) with num_proc="
                            f"{num_proc}. Set num_proc lower (1 uses no worker processes)."
                        ) from None
                    raise
        else:
            results = [_counted(_run_chunk(span), bar) for span in spans]
    finally:
        _JOB = None
        bar.close()
    for _, _, dropped, truncated, _ in results:
        report.dropped.update(dropped)
        report.truncated += truncated
    train, held = (datasets.concatenate_datasets([r[i] for r in results]) for i in (0, 1))
    return train, held, results[0][4]


def _counted(result: tuple, bar) -> tuple:
    bar.update(sum(len(part) for part in result[:2]) + sum(result[2].values()))
    return result
