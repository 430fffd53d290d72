"""What happened to every pair read, so nothing is dropped or cut silently; and the data error.

Every pair read is accounted for: read == used_train + used_eval + sum(dropped).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

EMPTY_AFTER_TRUNCATION = "empty completion after truncation"
IDENTICAL_AFTER_TOKENISATION = "chosen identical to rejected after tokenisation/truncation"


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
    duplicates: int = 0  # rows that repeat an earlier row exactly (kept; held out together with it)

    def lines(self) -> list[str]:
        n_dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{n} {reason}" for reason, n in Counter(self.dropped).most_common())
        return [
            f"data: {self.source}" + (f" ({self.format})" if self.format else ""),
            f"read {self.read} pairs, used {self.used_train} (train) + {self.used_eval} (eval), "
            f"dropped {n_dropped}" + (f": {reasons}" if reasons else ""),
            f"truncated {self.truncated} pairs (kept) to fit max_prompt_length / max_completion_length / max_length",
        ] + (
            [
                f"{self.duplicates} duplicate pairs (exact repeats of an earlier pair; kept, never split across train/eval)"
            ]
            if self.duplicates
            else []
        )
