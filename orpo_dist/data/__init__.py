"""Preference pairs: load, validate, apply the chat template, tokenise, truncate, split.

The flow is one direction, in three stages:

1. load: every source becomes a list-like of raw rows plus a way to say where a row lives
   (`line 17` in JSON lines, `row 5` elsewhere), so every message points at the user's file.
   JSON and JSON lines are read with the `json` module, line by line, because Arrow rejects a
   malformed line or a mixed-type column as a whole file with an opaque error; CSV, Parquet,
   `save_to_disk` directories and hub datasets are loaded by `datasets`.
2. validate + normalise (per row, before that row is tokenised): map columns to the standard
   names, check types and emptiness, extract implicit prompts and apply the chat template with
   `trl.data_utils`, ending with three strings per pair. The first bad row raises `DataError`,
   or with `skip_invalid` it is dropped and counted.
3. tokenise + truncate, drop pairs whose completion has no tokens left (they would be 0/0 in the
   loss), and hold out the eval pairs by `id` (chosen before validation, so settings never move pairs).
   Stages 2 and 3 run over chunks of rows on `num_proc` workers, in row order (`parallel`).

The result is in memory; `cache` writes it once per job as Arrow files that every rank memory-maps.

Modules: `sources` (1), `rows` (2), `tokens` (3), `parallel` (2 + 3 in chunks), `report` (what happened
to every pair), `cache` (the tokenised cache).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import datasets
import numpy as np

from orpo_dist.config import DataConfig
from orpo_dist.data.mix import load_mixture, specs, standard_columns
from orpo_dist.data.parallel import AllRows, resolve_num_proc, tokenise_source
from orpo_dist.data.rows import duplicate_of
from orpo_dist.data.sources import load_source, looks_like_hub
from orpo_dist.data.summary import EMPTY_AFTER_TRUNCATION, DataError, DataReport
from orpo_dist.data.tokens import truncate_pair

__all__ = ["DataError", "DataReport", "build_datasets", "truncate_pair"]


def _eval_ids(n: int, fraction: float, seed: int, first_of: list[int] | None = None) -> set[int]:
    """A seeded held-out set of ids, chosen before validation so length settings never move pairs.

    With `first_of` (rows.duplicate_of), an exact duplicate goes wherever its first copy goes, so the
    same pair never sits on both sides of the split."""
    if fraction <= 0 or n < 2:
        return set()
    k = min(max(round(n * fraction), 1), n - 1)
    held = {int(i) for i in np.random.default_rng(seed).permutation(n)[:k]}
    return held if first_of is None else {i for i in range(n) if first_of[i] in held}


def eval_source_args(cfg: DataConfig) -> tuple[str, str]:
    """(path, split) of `eval_data_path`: a file/dataset, or (AutoTrain `valid_split`) a split of the train source."""
    path, train = cfg.eval_data_path, Path(cfg.data_path).expanduser()
    is_split_name = re.fullmatch(r"[\w-]+", path) and not Path(path).expanduser().exists()
    # a DatasetDict directory, a hub dataset, or AutoTrain's DIR holding <valid_split>.csv
    single = (train / "state.json").exists()  # a save_to_disk Dataset, not a DatasetDict: it has no splits
    train_has_splits = (train.is_dir() and not single) or looks_like_hub(cfg.data_path)
    if is_split_name and train_has_splits:
        return cfg.data_path, path
    return path, cfg.train_split


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
    """Train and eval datasets (columns id, prompt_ids, chosen_ids, rejected_ids, length) and the report.

    Eval is a seeded held-out `eval_split` of the train source, or the pairs of `eval_data_path`.
    """
    mixture = specs(cfg)
    if mixture:  # several sources: each read with its own columns, then one source with the standard names
        source, counts = load_mixture(mixture, seed, cfg.dataset_config)
    else:
        source = load_source(cfg.data_path, cfg.train_split, seed, cfg.max_samples, cfg.dataset_config)
    report = DataReport(source=" + ".join(counts) if mixture else cfg.data_path, read=len(source.rows),
                        dropped=Counter())  # fmt: skip
    train_cfg = standard_columns(cfg) if mixture else cfg
    first_of = duplicate_of(source, train_cfg)
    report.duplicates = len(first_of) - len(set(first_of))
    num_proc = resolve_num_proc(cfg.num_proc, len(source.rows))
    held_out = set() if cfg.eval_data_path else _eval_ids(len(source.rows), cfg.eval_split, seed, first_of)
    train, evaluation, report.format = tokenise_source(source, train_cfg, tokenizer, report, held_out, num_proc)
    if cfg.eval_data_path:
        eval_source = load_source(*eval_source_args(cfg), seed, None)
        report.source += f" + eval: {cfg.eval_data_path}"
        report.read += len(eval_source.rows)
        num_proc = resolve_num_proc(cfg.num_proc, len(eval_source.rows))
        _, evaluation, _ = tokenise_source(eval_source, cfg, tokenizer, report, AllRows(), num_proc)
    report.dropped = {reason: n for reason, n in report.dropped.items() if n}
    if len(train) == 0:
        raise _all_dropped_error(report, cfg)
    report.used_train = len(train)
    report.used_eval = len(evaluation)
    return train, (evaluation if report.used_eval else None), report
