"""The tokenised cache: built once per job (once per node with a node-local `cache_dir`), memory-mapped by all.

`<cache_dir>/<key>/` holds `train/` and `eval/` (datasets' `save_to_disk`: Arrow files that
`load_from_disk` memory-maps, so a rank holds only the pages it reads), `report.json` (the DataReport and
how the build went) and `key.json` (what the key covers, readable, so a miss can say what
changed). The key hashes everything that changes the result: the data-format version, every data setting
except num_proc / cache_dir / overwrite_cache, the seed (eval split), the data source (a file's path, size
and mtime; every file of a directory; a hub dataset's fingerprint; a builtin's name), and the tokenizer
(its saved files and its chat template).

A build is written to `.tmp-<key>-...` and renamed into place, so a crash never leaves a partial cache
under the key. Who builds: the global main process, while the other ranks wait at a barrier
(`distributed.agreed_start`, first="main", so a bad row stops every rank instead of leaving them waiting)
and then memory-map what it wrote. A rank that does not see that cache (a node-local `cache_dir`) waits
for its node's local main process (first="local"), which builds the same thing on that node. With
`overwrite_cache: true` the main process's build carries a fresh build id, broadcast to every rank, so
no rank takes an older copy.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import gc
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import datasets
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from orpo_dist.builtin import BUILTIN_PREFIX
from orpo_dist.config import Config, ConfigError, DataConfig
from orpo_dist.config.expand import expand
from orpo_dist.data import build_datasets, eval_source_args
from orpo_dist.data.mix import specs
from orpo_dist.data.parallel import AUTO_MIN_PAIRS, resolve_num_proc
from orpo_dist.data.sources import hub_dataset
from orpo_dist.data.summary import DataError, DataReport
from orpo_dist.distributed import agreed_start

DATA_FORMAT_VERSION = 2  # bump when the same inputs would tokenise differently (2: identical pairs dropped, duplicates held out together)
NOT_IN_KEY = ("num_proc", "cache_dir", "overwrite_cache")  # how it is built, not what
KEY_FILE = "key.json"  # beside each build: what its key covers, so a later miss can say what changed
STALE_TMP_SECONDS = 24 * 3600  # a `.tmp-*` build older than this was left by a crash: removed


@dataclass
class Tokenised:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    report: DataReport
    directory: Path
    built: bool  # this process built it (else it memory-mapped an existing build)


def cache_root(cfg: Config) -> Path:
    """`cache_dir` with `~` and environment variables expanded on each node (`$TMPDIR/orpo`: node-local)."""
    if cfg.data.cache_dir:
        return Path(expand(cfg.data.cache_dir, "cache_dir"))
    return Path(cfg.train.output_dir) / "data_cache"


def _digest(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def source_identity(path: str, split: str, name: str | None = None) -> dict:
    """What identifies a source's content without reading it all (a hub dataset: its datasets fingerprint)."""
    if path.startswith(BUILTIN_PREFIX):
        return {"builtin": path}
    p = Path(path).expanduser()
    if p.is_file():
        stat = p.stat()
        return {"file": str(p.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if p.is_dir():
        files = [(str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in p.rglob("*")]
        return {"directory": str(p.resolve()), "split": split, "files": _digest(json.dumps(sorted(files)))}
    try:  # the split is loaded once per process: the build takes it from the same place (hub_dataset)
        return {"hub": path, "split": split, "fingerprint": hub_dataset(path, split, name)._fingerprint}
    except (DataError, AttributeError):  # not loadable: the build reports why
        return {"missing": path, "split": split}


def tokenizer_digest(tokenizer) -> str:
    """A hash of the files `save_pretrained` writes (vocabulary, merges, special tokens, template)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = sorted(Path(tmp).rglob("*"))
        return _digest(b"".join(f.name.encode() + b"\0" + f.read_bytes() for f in files if f.is_file()))


def key_inputs(cfg: DataConfig, tokenizer, seed: int) -> dict:
    """What the cache key covers (written beside each build as `key.json`, so a miss can say what changed)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_KEY}
    template = tokenizer.chat_template
    return {
        "format": DATA_FORMAT_VERSION,
        "settings": {**settings, "seed": seed},
        "source": [source_identity(s.path, s.split, s.name or cfg.dataset_config) for s in mixture]
        if (mixture := specs(cfg))
        else source_identity(cfg.data_path, cfg.train_split, cfg.dataset_config),
        "eval_source": source_identity(*eval_source_args(cfg)) if cfg.eval_data_path else None,
        "tokenizer": tokenizer_digest(tokenizer),
        "chat_template": _digest(json.dumps(template, sort_keys=True)) if template else None,
    }


def cache_key(fp: dict) -> str:
    return _digest(json.dumps(fp, sort_keys=True, default=str))


COMPONENTS = {
    "format": "data-format version",
    "source": "data source",
    "eval_source": "eval data source",
    "tokenizer": "tokenizer files",
    "chat_template": "chat template",
}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON, nested too deep
        return None


def miss_reason(root: Path, fp: dict) -> str:
    """What changed since the newest other cache in `root` (or that there is none)."""
    builds = sorted(root.glob("*/report.json"), key=lambda f: f.lstat().st_mtime, reverse=True)
    old = next(
        (prev for f in builds if isinstance(prev := _read_json(f.parent / KEY_FILE), dict)), None
    )
    if old is None:
        return f"no cache in {root} yet"
    old_settings, new_settings = old.get("settings"), fp["settings"]
    old_settings = old_settings if isinstance(old_settings, dict) else {}
    changed = [
        f"{k} {old_settings.get(k)!r} -> {new_settings.get(k)!r}"
        for k in sorted(set(old_settings) | set(new_settings))
        if old_settings.get(k) != new_settings.get(k)
    ]
    changed += [name for key, name in COMPONENTS.items() if old.get(key) != fp[key]]
    return "changed since the last cache: " + (", ".join(changed) or "nothing recorded")


SPLITS = ("train", "eval")
SAMPLE_BLOCKS, BLOCK = 16, 1 << 16  # the content hash reads 16 blocks of 64 KiB per file, at most


def _file_digest(path: Path) -> str:
    """A content hash that is cheap on any size: the size and 16 blocks spread over the file (all of a small one)."""
    size = path.stat().st_size
    offsets = range(0, size, BLOCK) if size <= SAMPLE_BLOCKS * BLOCK else (
        size * i // SAMPLE_BLOCKS for i in range(SAMPLE_BLOCKS))  # fmt: skip
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            h.update(f.read(BLOCK))
    return h.hexdigest()[:16]


def manifest(entry: Path, rows: dict[str, int]) -> dict:
    """What an entry holds: per split its row count and every file with its size and content hash."""
    out = {}
    for split, n in rows.items():
        files = sorted(f for f in (entry / split).rglob("*") if f.is_file())
        out[split] = {
            "rows": n,
            "files": {str(f.relative_to(entry)): [f.stat().st_size, _file_digest(f)] for f in files},
        }
    return out


def _problem(entry: Path, info) -> str | None:
    """Why the entry cannot be trusted (its report.json is malformed, a symlink inside it, a file that
    differs from its manifest), or None. Nothing in a cache is trusted before this says so."""
    if entry.is_symlink():
        return f"{entry} is a symlink"
    for d, dirs, files in os.walk(entry):
        for name in dirs + files:
            if Path(d, name).is_symlink():
                return f"{Path(d, name)} is a symlink"
    want = {"build_id": str, "report": dict, "manifest": dict}
    if not isinstance(info, dict) or any(not isinstance(info.get(k), t) for k, t in want.items()):
        return "its report.json is malformed"
    try:
        report = DataReport(**info["report"])
    except TypeError:
        return "its report.json is malformed"
    counts = (report.read, report.used_train, report.used_eval, report.truncated, report.duplicates)
    if not all(isinstance(n, int) for n in counts) or not isinstance(report.dropped, dict):
        return "its report.json is malformed"
    recorded = info["manifest"]
    if not set(recorded) <= set(SPLITS) or "train" not in recorded:
        return "its report.json is malformed"
    if not all(isinstance(m, dict) and isinstance(m.get("rows"), int) for m in recorded.values()):
        return "its report.json is malformed"
    if {s for s in SPLITS if (entry / s).exists()} != set(recorded):
        return "its splits differ from what was recorded"
    try:
        now = manifest(entry, {split: m["rows"] for split, m in recorded.items()})
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    for split, part in now.items():
        if recorded[split].get("files") != {k: list(v) for k, v in part["files"].items()}:
            return f"the files of its {split}/ split differ from what was recorded"
    return None


def _open(entry: Path, build_id: str, why: list[str] | None = None) -> Tokenised | None:
    """The build in `entry` if it is complete, verified and the one wanted, memory-mapped; else None
    (and the reason appended to `why`)."""
    if not (entry / "report.json").exists():
        return None
    info = _read_json(entry / "report.json")
    problem = _problem(entry, info) if info is not None else "its report.json is not JSON"
    if problem is None and info.get("build_id") != build_id:
        return None  # another build (overwrite_cache): not a fault of the entry
    try:
        if problem is None:
            train = datasets.load_from_disk(str(entry / "train"))
            evaluation = datasets.load_from_disk(str(entry / "eval")) if (entry / "eval").exists() else None
            loaded = {"train": train, **({"eval": evaluation} if evaluation is not None else {})}
            if any(ds.num_rows != info["manifest"][split]["rows"] for split, ds in loaded.items()):
                problem = "its splits hold other row counts than recorded"
    except (OSError, ValueError, KeyError) as e:  # unreadable: rebuilt by whoever builds
        problem = f"it cannot be loaded ({type(e).__name__})"
    if problem is not None:
        if why is not None:
            why.append(problem)
        return None
    return Tokenised(train, evaluation, DataReport(**info["report"]), entry, built=False)


def _build(entry: Path, fp: dict, cfg: Config, tokenizer, build_id: str, note) -> Tokenised:
    """Tokenise into a temporary directory, then rename it into place (atomic: never a partial cache)."""
    root = entry.parent
    try:  # before the (long) tokenisation: the cache can be written here
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=root))
    except OSError as e:
        raise _write_error(root, e) from None
    for old in root.glob(".tmp-*"):
        if old != tmp and time.time() - old.stat().st_mtime > STALE_TMP_SECONDS:
            shutil.rmtree(old, ignore_errors=True)
    reason = "overwrite_cache: true" if cfg.data.overwrite_cache else miss_reason(root, fp)
    if (entry / "report.json").exists() and not cfg.data.overwrite_cache:
        why: list[str] = []
        _open(entry, build_id, why)
        reason = f"the cache in {entry} is unreadable or stale" + (f": {why[0]}" if why else "")
    note(f"tokenised cache: miss: building ({reason})")
    start = time.perf_counter()
    quiet = writing = False
    try:
        train, evaluation, report = build_datasets(cfg.data, tokenizer, cfg.train.seed)
        writing = True
        quiet = report.read < AUTO_MIN_PAIRS and not are_progress_bars_disabled()  # a moment's work: no bars
        if quiet:
            disable_progress_bars()
        train.save_to_disk(str(tmp / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(tmp / "eval"))
        seconds = time.perf_counter() - start
        rows = {"train": len(train), **({"eval": len(evaluation)} if evaluation is not None else {})}
        (tmp / KEY_FILE).write_text(json.dumps(fp, indent=1, sort_keys=True, default=str))
        info = {
            "build_id": build_id,
            "report": dataclasses.asdict(report),
            "seconds": round(seconds, 3),
            "num_proc": resolve_num_proc(cfg.data.num_proc, report.read),
            "manifest": manifest(tmp, rows),
        }
        (tmp / "report.json").write_text(json.dumps(info, indent=1))  # last: the mark of a whole build
        _publish(tmp, entry, build_id)
    except OSError as e:  # the finally below removes the partial build, and frees its space
        if not writing:
            raise
        raise _write_error(root, e) from None
    finally:
        if quiet:
            enable_progress_bars()
        shutil.rmtree(tmp, ignore_errors=True)
    del train, evaluation  # from here on, the memory-mapped copy
    _release_freed_memory()
    got = _open(entry, build_id)
    if got is None:
        raise RuntimeError(f"tokenised cache: {entry} was written but cannot be read back")
    pairs_per_second = report.read / max(seconds, 1e-9)
    note(f"tokenised cache: built {entry} in {seconds:.1f} s ({pairs_per_second:.0f} pairs/s, "
         f"num_proc {info['num_proc']})")  # fmt: skip
    return dataclasses.replace(got, built=True)


def _write_error(root: Path, e: OSError) -> Exception:
    """One line for a cache that cannot be written: a full disk is a fault (exit 1), a path that cannot
    hold a cache (read-only, a file, no permission) a mistake to fix in cache_dir (exit 2)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(
            e.errno, f"{e.strerror} while writing the tokenised cache (nothing partial kept) in", str(root)
        )
    return ConfigError(
        f"cache_dir {root}: cannot write the tokenised cache there ({e.strerror or e}: {e.filename or root}); "
        "set cache_dir to a writable directory (unset, it is <output_dir>/data_cache)"
    )


def _release_freed_memory() -> None:
    """Hand the build's freed heap (the rows, the in-memory tables) back to the OS: glibc keeps it otherwise,
    and the building rank would carry it through training."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _publish(tmp: Path, entry: Path, build_id: str) -> None:
    """Move a finished build into place, replacing a stale or unreadable one; an equal one stays."""
    if _open(entry, build_id) is not None:
        return  # another process published this very build meanwhile (a shared cache_dir seen late)
    old = entry.with_name(f".old-{entry.name}-{uuid.uuid4().hex[:8]}")
    if entry.exists():
        os.rename(entry, old)
    os.rename(tmp, entry)
    shutil.rmtree(old, ignore_errors=True)


def _get(entry: Path, fp: dict, cfg: Config, tokenizer, build_id: str, build: bool, note) -> Tokenised | None:
    got = _open(entry, build_id)
    if got is None and build:
        got = _build(entry, fp, cfg, tokenizer, build_id, note)
    return got


def tokenised_datasets(cfg: Config, tokenizer, accelerator: Accelerator, say) -> Tokenised:
    """Train/eval datasets and report, from the cache: one process builds, every rank memory-maps.

    A collective: every rank calls it. `say` prints on the main process.
    """
    fp = key_inputs(cfg.data, tokenizer, cfg.train.seed)
    entry = cache_root(cfg) / cache_key(fp)
    build_id = [entry.name + (f"@{uuid.uuid4().hex}" if cfg.data.overwrite_cache else "")]
    if accelerator.num_processes > 1 and cfg.data.overwrite_cache:
        broadcast_object_list(build_id)  # the main process's fresh id: nobody takes the old build

    def note(msg: str) -> None:  # a local main process building on its node says so too
        if accelerator.is_main_process:
            say(msg)
        else:
            print(f"[orpo_dist] rank {accelerator.process_index}: {msg}", flush=True)

    # a bad row stops every rank with its message (agreed_start), never leaves one waiting in a barrier
    seen = agreed_start(
        accelerator,
        lambda: _get(entry, fp, cfg, tokenizer, build_id[0], accelerator.is_main_process, note),
        "main",
    )
    # this node does not see the main process's build: a node-local cache_dir
    got = agreed_start(
        accelerator, lambda: seen or _get(entry, fp, cfg, tokenizer, build_id[0], True, note), "local"
    )
    if not got.built:
        say(f"tokenised cache: hit {entry}")
    _trace(accelerator, got)
    return got


def _trace(accelerator: Accelerator, got: Tokenised) -> None:
    """ORPO_DIST_TRACE_DIR=dir: each rank records whether it built the cache (for tests and audits)."""
    trace_dir = os.environ.get("ORPO_DIST_TRACE_DIR")
    if trace_dir:
        row = {"rank": accelerator.process_index, "built": got.built, "directory": str(got.directory)}
        Path(trace_dir, f"data_rank{accelerator.process_index}.json").write_text(json.dumps(row))
