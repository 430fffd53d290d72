"""Where log lines go: orpo_dist's own lines carry the `[orpo_dist]` prefix; every other library's keep
their own name, and a few known notices that tell a user nothing actionable are dropped.

Only `setup_logging()` (called once by the command line) changes global logging state. `one_line` makes any
message one stderr line (the `orpo_dist: ...` of a user mistake or a fault).
"""

from __future__ import annotations

import logging
import sys

PREFIX = "[orpo_dist] "
# (logger name, the start of a message): notices printed on every offline or CPU start that a user can do
# nothing about. Matched by prefix so a changed wording shows up again rather than hiding something else.
KNOWN_NOISE = (
    # kernels (pulled in by transformers / bitsandbytes) on every start with HF_HUB_OFFLINE=1
    ("kernels", "Skipping publisher trust check for "),
    # DeepSpeed imported on a machine without a GPU (the CPU test launches, CPU-only login nodes)
    ("DeepSpeed", "Setting accelerator to CPU."),
)
# libraries whose INFO lines are progress chatter; their warnings still show, under their own names
QUIET_BELOW_WARNING = ("httpx", "urllib3", "datasets", "accelerate", "matplotlib", "filelock")


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for name, start in KNOWN_NOISE:
            if (record.name == name or record.name.startswith(name + ".")) and message.startswith(start):
                return False
        return True


def setup_logging() -> None:
    """orpo_dist's logger prints `[orpo_dist] message` at INFO; the root logger prints other libraries'
    warnings as `name: LEVEL: message`. Idempotent."""
    ours = logging.getLogger("orpo_dist")
    if not any(getattr(h, "_orpo_dist", False) for h in ours.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(PREFIX + "%(message)s"))
        handler._orpo_dist = True  # type: ignore[attr-defined]
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    for name in QUIET_BELOW_WARNING:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernel notice, not actionable
    noise = _DropKnownNoise()
    # a logger's filter sees the records logged on that logger; DeepSpeed logs on "DeepSpeed" itself (with
    # its own handler), kernels on module loggers below "kernels": filter both the loggers and every handler
    for name, _ in KNOWN_NOISE:
        logging.getLogger(name).addFilter(noise)
    for handler in logging.getLogger().handlers:
        handler.addFilter(noise)
    for handler in logging.getLogger("DeepSpeed").handlers:
        handler.addFilter(noise)


def one_line(message: str) -> str:
    """A message for one stderr line: `invalid config:\n  - a\n  - b` -> `invalid config: a; b`."""
    lines = [line.strip().removeprefix("- ") for line in str(message).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {'; '.join(lines[1:])}"
    return "; ".join(lines)
