"""How a command ends: a user mistake or an environment fault as one `orpo_dist: ...` line on stderr and an
exit code (2 a mistake or a path to fix, 1 a fault), a bug with its traceback. Every command (`train`,
`export`, `report`, `hub`, `generate`) runs its body through `guarded`; `ORPO_DIST_DEBUG=1` shows the
traceback of anything it would have turned into one line.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

from orpo_dist.config import ConfigError
from orpo_dist.console import one_line


def fail(message: str, code: int) -> int:
    """Print `orpo_dist: <message>` as one line on stderr; return the exit code. The line and its newline
    go out in one write: stderr writes through, and ranks sharing a log would otherwise splice their lines."""
    sys.stderr.write(f"orpo_dist: {one_line(message)}\n")
    sys.stderr.flush()
    return code


# The machine's or the network's faults, not orpo_dist's: one line, not a traceback (ORPO_DIST_DEBUG=1 shows it).
# A full disk, a quota, an I/O error or the network: exit 1; an OSError naming a path to fix: exit 2.
DISK_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)
NETWORK = {"ConnectionError", "ConnectError", "NetworkError", "TimeoutException", "URLError", "HTTPError",
           "ProxyError", "SSLError", "Timeout", "RemoteDisconnected"}  # fmt: skip
PATH_MISTAKES = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


def debugging() -> bool:
    return os.environ.get("ORPO_DIST_DEBUG", "").lower() in ("1", "true", "yes")


def environment_fault(e: BaseException) -> tuple[str, int] | None:
    """(one line, exit code) for a network error or an OSError (read-only, disk full, not a directory,
    file exists, ...), naming the path; None for anything else (a bug keeps its traceback)."""
    names = {k.__name__ for k in type(e).__mro__}
    if names & NETWORK:
        detail = f"{type(e).__name__}: {one_line(str(e))[:300]}"
        return (
            f"network error ({detail}); check the connection (or HF_HUB_OFFLINE=1 with everything cached)",
            1,
        )
    if not isinstance(e, OSError):
        return None
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    what = e.strerror or one_line(str(e))[:300] or type(e).__name__
    where = f"{what}: {paths}" if paths else what
    if e.errno in DISK_FAULTS:
        return f"{where} ({type(e).__name__}); free space (or check the disk), then run again", 1
    if isinstance(e, PATH_MISTAKES) or e.errno == errno.EROFS:
        writable = e.errno in (errno.EACCES, errno.EROFS, errno.EPERM)
        return (
            f"{where} ({type(e).__name__}); {'choose a writable location' if writable else 'check the path'}",
            2,
        )
    return f"{where} ({type(e).__name__})", 1


def guarded(body: Callable[[], int]) -> int:
    """Run a command's body: mistakes (ConfigError, DataError) exit 2 and environment faults exit 1 or 2,
    each as one `orpo_dist: ...` line on stderr; with ORPO_DIST_DEBUG=1 they raise with their traceback."""
    try:
        return body()
    except Exception as e:
        if debugging():
            raise
        data = sys.modules.get("orpo_dist.data.summary")  # not imported: no DataError was raised
        if isinstance(e, ConfigError):
            return fail(str(e), 2)
        if data and isinstance(e, data.DataError):
            return fail(f"data error: {e}", 2)
        fault = environment_fault(e)
        if fault is None:
            raise
        return fail(*fault)
