"""Several sources trained as one: `data_path` as a list, a comma list or a glob (`data/*.jsonl`), LLaMA-Factory's
`dataset: a,b`, or `sources:` entries (Axolotl / TRL `datasets:` lists) each with its own split, column
mapping, hub configuration and `max_samples`.

Each source is loaded and checked as it would be alone (its own columns, its own line numbers in messages),
its rows renamed to prompt / chosen / rejected, and the rows concatenated in the order given. The report
counts pairs per source; the cache key describes every source; the resume fingerprint hashes the mixed
training pairs, so a changed mixture is refused like changed data.
"""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass
from typing import Any

from orpo_dist.config import DataConfig
from orpo_dist.data.rows import column_map
from orpo_dist.data.sources import Source, load_source
from orpo_dist.data.summary import DataError

ENTRY_KEYS = ("path", "split", "name", "prompt_column", "chosen_column", "rejected_column", "max_samples")
GLOB = set("*?[")


@dataclass
class Spec:
    path: str
    split: str
    name: str | None
    columns: DataConfig  # the column names (and max_samples) this source is read with

    @property
    def label(self) -> str:
        return self.path + (f"[{self.split}]" if self.split != "train" else "")


def specs(cfg: DataConfig) -> list[Spec] | None:
    """The sources of a mixture, or None for a single source (read as before)."""
    if cfg.sources:
        return [_spec(cfg, entry) for entry in cfg.sources]
    parts = [p.strip() for p in cfg.data_path.split(",") if p.strip()]
    if len(parts) == 1 and not GLOB & set(parts[0]):
        return None
    paths: list[str] = []
    for part in parts:
        matched = sorted(glob.glob(part)) if GLOB & set(part) else [part]
        if not matched:
            raise DataError(f"data_path: {part} matches no file")
        paths += matched
    return [_spec(cfg, {"path": p}) for p in paths]


def _spec(cfg: DataConfig, entry: dict[str, Any]) -> Spec:
    columns = dataclasses.replace(cfg, **{k: entry[k] for k in ENTRY_KEYS[3:] if entry.get(k) is not None})
    return Spec(str(entry["path"]), entry.get("split") or cfg.train_split, entry.get("name"), columns)


class MixedSource(Source):
    """Rows of several sources; `where` names the source and its own line or row."""

    def __init__(self, name: str, rows: list, origins: list[tuple[Source, int]]):
        super().__init__(name, ["prompt", "chosen", "rejected"], rows)
        self.origins = origins

    def where(self, index: int) -> str:
        source, own = self.origins[index]
        return f"({source.name}) {source.where(own)}"


def load_mixture(sources: list[Spec], seed: int, dataset_config: str | None) -> tuple[MixedSource, list[str]]:
    """(the concatenated source, one `name (N pairs)` per source)."""
    rows, origins, counts = [], [], []
    for spec in sources:
        source = load_source(
            spec.path, spec.split, seed, spec.columns.max_samples, spec.name or dataset_config
        )
        mapping = column_map(spec.columns, source)
        for i, row in enumerate(source.rows):
            rows.append(row if isinstance(row, str) else {std: row.get(col) for std, col in mapping.items()})
            origins.append((source, i))
        counts.append(f"{spec.label} ({len(source.rows)} pairs)")
    return MixedSource(" + ".join(s.label for s in sources), rows, origins), counts


def standard_columns(cfg: DataConfig) -> DataConfig:
    """The config the mixed rows are read with: they already carry the standard column names."""
    return dataclasses.replace(
        cfg, prompt_column="prompt", chosen_column="chosen", rejected_column="rejected"
    )
