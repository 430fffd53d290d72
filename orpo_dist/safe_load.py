"""Resume never executes code from a checkpoint: every file a resume may unpickle is checked first.

accelerate's `load_state`, DeepSpeed's engine and torch.distributed.checkpoint (FSDP's sharded state)
read pickles; some of them with `weights_only=False` (DeepSpeed's model and optimizer states, DCP's
`.metadata` and its non-tensor items), where a planted `__reduce__` runs whatever it names. So before
anything is loaded, `audit_checkpoint` reads every file under the checkpoint's `state/` without
executing it:

- torch zip archives (`*.bin`, `*.pt`, `*.pkl` from `torch.save`): `torch.serialization.
  get_unsafe_globals_in_checkpoint` lists the globals the pickle would import, statically; anything
  outside torch's weights-only set and `SAFE_GLOBALS` (numpy RNG arrays, a few DeepSpeed data classes)
  refuses the checkpoint;
- DCP `.metadata`: unpickled with a `find_class` allowlist of DCP's own metadata classes, then each
  non-tensor item it points to is scanned like a torch archive;
- safetensors, JSON, DeepSpeed's `latest` tag and the `zero_to_fp32.py` script it copies are data or
  never run; any other file (a raw or legacy pickle) refuses the checkpoint.

The real loads then run with `weights_only=True` where the libraries let us choose: accelerate's own
`load` defaults to it, and `weights_only_deepspeed` switches DeepSpeed's checkpoint engine to it.
Our own state (data position, scheduler, fingerprint) is JSON (`checkpoint.py`).
"""

from __future__ import annotations

import io
import pathlib
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch.serialization import get_unsafe_globals_in_checkpoint

# Globals a legitimate checkpoint holds beyond torch's weights-only set, as "module.name".
SAFE_GLOBALS = {
    # accelerate's random_states_<rank>.pkl: numpy's RNG state
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.dtypes.UInt32DType",
    # DeepSpeed's ZeRO optimizer states: the loss scaler (plain attributes) and the stage enum
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    # ZeRO-1/2's param_slice_mappings: a dataclass of two ints (numel, start)
    "deepspeed.utils.tensor_fragment.fragment_address",
}
TEXT_FILES = re.compile(r"^(latest|latest_universal|.*\.(json|py|txt|md|yaml))$")
ZIP_MAGIC, SAFETENSORS_MIN = b"PK\x03\x04", 8


class UnsafeCheckpoint(ValueError):
    """A checkpoint file would import code when unpickled (or cannot be checked): it is not loaded."""


def audit_checkpoint(state_dir: Path) -> None:
    """Raise UnsafeCheckpoint naming the first file that could execute code when a resume reads it."""
    for path in sorted(p for p in Path(state_dir).rglob("*") if p.is_file()):
        if TEXT_FILES.match(path.name) or _is_safetensors(path):
            continue
        if path.name == ".metadata":
            _audit_dcp(path)
        elif path.suffix == ".distcp":
            continue  # DCP data: tensors load weights-only; its non-tensor items are checked via .metadata
        else:
            _audit_torch_file(path, path)


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header (never executed)."""
    if path.suffix != ".safetensors":
        return False
    with path.open("rb") as f:
        head = f.read(SAFETENSORS_MIN + 1)
    return len(head) == SAFETENSORS_MIN + 1 and head[-1:] == b"{"


def _audit_torch_file(source: Path | io.BytesIO, path: Path, what: str = "") -> None:
    """A torch.save zip archive (a file, or an item inside one) whose pickle imports only safe globals."""
    if isinstance(source, io.BytesIO):
        head = source.getvalue()[:4]
    else:
        with source.open("rb") as f:
            head = f.read(4)
    if head != ZIP_MAGIC:
        raise UnsafeCheckpoint(
            f"{path}{what}: not a torch zip archive (a raw or legacy pickle could run code when loaded); "
            "refusing to resume from it"
        )
    try:
        unsafe = sorted(set(get_unsafe_globals_in_checkpoint(source)) - SAFE_GLOBALS)
    except Exception as e:  # a damaged or hand-made archive: cannot be proven safe
        raise UnsafeCheckpoint(f"{path}{what}: unreadable torch archive ({type(e).__name__}: {e})") from None
    if unsafe:
        raise UnsafeCheckpoint(
            f"{path}{what}: its pickle imports {', '.join(unsafe)}, which could run code when loaded; "
            "refusing to resume from this checkpoint (was it written by orpo_dist?)"
        )


class _MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint's `.metadata`: its own data classes and nothing that can run code."""

    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.filesystem as dcp_fs
        import torch.distributed.checkpoint.metadata as dcp_md

        found = None
        if module == dcp_md.__name__:
            found = getattr(dcp_md, name, None)
            found = found if isinstance(found, type) and found.__module__ == module else None
        elif (module, name) == (dcp_fs.__name__, "_StorageInfo"):
            found = dcp_fs._StorageInfo
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            found = getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            found = torch.serialization._get_layout
        elif module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            found = getattr(pathlib, name)
        elif (module, name) == ("collections", "OrderedDict"):
            found = OrderedDict
        if found is None:
            raise UnsafeCheckpoint(f"imports {module}.{name}")
        return found


def _audit_dcp(path: Path) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except UnsafeCheckpoint as e:
        raise UnsafeCheckpoint(
            f"{path}: its pickle {e}, which could run code when loaded; refusing to resume"
        ) from None
    except Exception as e:
        raise UnsafeCheckpoint(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
    byte_items = {
        fqn for fqn, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)
    }
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in byte_items:
            continue
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpoint(
                f"{path}: item {index.fqn} is stored transformed; cannot check it, refusing"
            )
        with (path.parent / info.relative_path).open("rb") as f:
            f.seek(info.offset)
            blob = io.BytesIO(f.read(info.length))
        _audit_torch_file(blob, path.parent / info.relative_path, f" (item {index.fqn})")


def weights_only_deepspeed(engine) -> None:
    """Make a DeepSpeed engine read its checkpoint files with torch.load(weights_only=True)."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None:
        return
    safe = [obj for name in SAFE_GLOBALS if (obj := _resolve(name)) is not None]

    def load(path, map_location=None):
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load


def _resolve(name: str):
    module, _, attr = name.rpartition(".")
    try:
        obj = __import__(module, fromlist=[attr])
        return getattr(obj, attr)
    except (ImportError, AttributeError):
        return None
