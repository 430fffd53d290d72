"""Python objects where the config holds a path: a `datasets.Dataset` / `DatasetDict`, a list of dicts or a
pandas DataFrame as `data_path` / `eval_data_path`, a `PreTrainedModel` as `model`.

Each object is written once under `<output_dir>/inputs/`, named by a hash of its content (JSON lines for
data, `save_pretrained` for a model), and the config points at that file. So config.yaml records a path
saying what was passed (`in-memory-Dataset-<fingerprint>.jsonl`), never a repr; and the data cache and
the resume fingerprint work on it as on any file: the same rows give the same name, the same cache entry,
and a resume that continues.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from orpo_dist.config import ConfigError

log = logging.getLogger("orpo_dist")
DATA_KEYS = ("data_path", "eval_data_path")
MODEL_KEYS = ("model",)


def is_object(value: Any) -> bool:
    """Anything a config cannot hold as text: not a str / number / bool / None / list of those."""
    if value is None or isinstance(value, (str, int, float, bool, Path)):
        return False
    if isinstance(value, list):
        return any(isinstance(v, dict) or is_object(v) for v in value)
    return type(value) is not dict  # a DatasetDict is a dict too


def split_objects(items: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """({key: plain value}, {key: object}) for data_path / eval_data_path / model (and their aliases)."""
    from orpo_dist.config import canonical

    plain, objects = {}, {}
    for key, value in items.items():
        leaf = canonical(key)
        if leaf in (*DATA_KEYS, *MODEL_KEYS) and is_object(value):
            objects[leaf] = value
        else:
            plain[key] = value
    return plain, objects


def rows_of(data: Any, split: str = "train") -> tuple[str, list[dict]]:
    """(what it is, its rows) for a Dataset, a DatasetDict (its `split`), a list of dicts or a DataFrame."""
    import datasets

    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ConfigError(f"the DatasetDict passed has no split {split!r}; splits: {list(data)}")
        return "DatasetDict", data[split].to_list()
    if isinstance(data, datasets.Dataset):
        return "Dataset", data.to_list()
    if type(data).__name__ == "DataFrame":  # pandas, without importing it
        return "DataFrame", datasets.Dataset.from_pandas(data, preserve_index=False).to_list()
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return "list", data
    raise ConfigError(
        f"data: a {type(data).__name__} cannot be read; pass a path, a datasets.Dataset / DatasetDict, a list "
        "of dicts or a pandas DataFrame"
    )


def _write_once(target: Path, write) -> None:
    """Write through a temporary name and rename: ranks that all write the same content never see a half file."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    write(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another rank's directory is already there: the same content
        shutil.rmtree(tmp, ignore_errors=True)


def write_data(data: Any, out: Path, split: str = "train") -> Path:
    kind, rows = rows_of(data, split)
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True, default=str) + "\n" for r in rows)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = out / f"in-memory-{kind}-{digest}.jsonl"
    _write_once(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    log.info(f"data: in-memory {kind}, fingerprint {digest} ({len(rows)} rows) -> {path}")
    return path


def write_adapter(model: Any, out: Path) -> tuple[str, Path]:
    """A PeftModel: (its base model's name or path, its adapter saved by content under out/)."""
    config = model.peft_config["default"]
    base = config.base_model_name_or_path
    if not base:
        raise ConfigError("model: this PeftModel does not name its base model; pass the base with peft_config=...")
    digest = hashlib.sha256(base.encode())
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name or "modules_to_save" in name:
            digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    path = out / f"in-memory-PeftModel-{digest.hexdigest()[:16]}"
    _write_once(path, lambda tmp: model.save_pretrained(tmp, safe_serialization=True))
    log.info(f"model: in-memory PeftModel on {base}, adapter fingerprint {path.name.rsplit('-', 1)[1]} -> {path}")
    return base, path


def write_model(model: Any, out: Path, tokenizer: Any = None) -> Path:
    """A PreTrainedModel (and its tokenizer) saved by content (a PeftModel: see write_adapter)."""
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(
            f"model: a {type(model).__name__} is not a transformers PreTrainedModel, hub id or path"
        )
    import torch

    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    path = out / f"in-memory-{type(model).__name__}-{digest.hexdigest()[:16]}"
    if tokenizer is None:
        from transformers import AutoTokenizer

        source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"model: pass processing_class=<its tokenizer> (none found at {source!r}: {e})"
            ) from None

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    _write_once(path, save)
    log.info(f"model: in-memory {type(model).__name__}, fingerprint {path.name.rsplit('-', 1)[1]} -> {path}")
    return path


def bind(cfg, objects: dict[str, Any], tokenizer: Any = None) -> None:
    """Write the objects under <output_dir>/inputs/ and point the config at them."""
    out = Path(cfg.train.output_dir) / "inputs"
    for key, value in objects.items():
        if key == "model" and hasattr(value, "peft_config") and hasattr(value, "get_base_model"):
            base, adapter = write_adapter(value, out)
            cfg.model.model, cfg.peft.adapter_path, cfg.peft.use_peft = base, str(adapter), True
        elif key == "model":
            cfg.model.model = str(write_model(value, out, tokenizer))
        elif key == "data_path":
            cfg.data.data_path = str(write_data(value, out, cfg.data.train_split))
        else:
            split = "test" if _is_dict(value) and "test" in value else "validation"
            cfg.data.eval_data_path = str(write_data(value, out, split))


def _is_dict(value: Any) -> bool:
    return type(value).__name__ == "DatasetDict"
