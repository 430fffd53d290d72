"""Which checkpoint a run resumes from, and whether it can continue it: refused (exit 2) when it cannot.

Every checkpoint records a `Fingerprint` of what its data position means: the training pairs (count
and a hash of their tokens), the global batch and how it was split (world size, per-device batch,
accumulation), the seed, length grouping, the strategy and the model. A resume compares it with the
new run before anything is loaded:

- other data, another global batch, seed or length grouping, another model or adapter: the step
  position would point at other pairs or weights -> refused, with every value that differs;
- another world size / per-device batch / accumulation with the same global batch: `PairShards`
  deals one global batch per step, so each step trains on the same pairs and the same gradient.
  One process and DDP save weights and optimizer whole; FSDP's sharded (DCP) checkpoints reshard on
  load; DeepSpeed ZeRO checkpoints are converted to DeepSpeed's universal checkpoint (elastic.py).
  Another strategy (say ZeRO -> DDP, or FSDP -> a plain `python` process) is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from orpo_dist.config import Config, ConfigError
from orpo_dist.run_dir import COMPLETE_MARKER, STATE_FILE, complete_checkpoints

# distributed types whose checkpoints hold whole weights and optimizer state (any world size can load them)
WHOLE_STATE = {
    "NO",
    "MULTI_CPU",
    "MULTI_GPU",
    "MULTI_XPU",
    "MULTI_NPU",
    "MULTI_MLU",
    "MULTI_MUSA",
    "MULTI_HPU",
}
# distributed types whose sharded checkpoints load on another world size: FSDP's torch.distributed.checkpoint
# (DCP) records each tensor's global shape and offsets and reshards on load; DeepSpeed ZeRO is converted to
# its universal checkpoint first (elastic.py)
RESHARDED_ON_LOAD = {"FSDP", "DEEPSPEED"}


@dataclass
class Fingerprint:
    """What a checkpoint's data position means; compared field by field on resume."""

    pairs: int = -1  # training pairs (after validation, de-duplication rules and the eval split)
    data_sha256: str = ""  # hash of the training pairs' ids and tokens
    data_path: str = ""
    global_batch: int = 0
    world_size: int = 0
    per_device_batch: int = 0
    gradient_accumulation: int = 0
    seed: int = 0
    group_by_length: bool = False
    strategy: str = ""  # accelerate's distributed type
    model: str = ""
    adapter: str = ""  # "full" or the LoRA / quantization settings
    model_sha256: str = ""  # a local model's config + weight files: a moved copy of the same weights resumes


def run_fingerprint(cfg: Config, world_size: int, strategy: str) -> Fingerprint:
    """The parts known before the data is read (`pairs` and `data_sha256` are filled in after)."""
    t, pe = cfg.train, cfg.peft
    adapter = (
        f"lora r={pe.lora_r} alpha={pe.lora_alpha} targets={pe.target_modules} quantization={pe.quantization}"
        if pe.use_peft
        else "full"
    )
    return Fingerprint(
        data_path=cfg.data.data_path,
        global_batch=t.batch_size * t.gradient_accumulation * world_size,
        world_size=world_size,
        per_device_batch=t.batch_size,
        gradient_accumulation=t.gradient_accumulation,
        seed=t.seed,
        group_by_length=t.group_by_length,
        strategy=strategy,
        model=str(local.resolve())
        if (local := Path(cfg.model.model).expanduser()).exists()
        else cfg.model.model,
        adapter=adapter,
        model_sha256=model_sha256(local) if local.is_dir() else "",
    )


WEIGHT_FILES = ("config.json", "*.safetensors", "*.bin", "*.index.json")


def model_sha256(directory: Path) -> str:
    """sha256 over a model directory's config and weight files (names and contents), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    for path in sorted({p for pattern in WEIGHT_FILES for p in directory.glob(pattern) if p.is_file()}):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def data_sha256(dataset) -> str:
    """A hash of the tokenised training pairs (ids and every token), computed from Arrow buffers."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    h = hashlib.sha256()  # ~1 GB/s: a second for 100M tokens, next to the minutes their tokenisation took
    for table in dataset.with_format("arrow").iter(batch_size=8192):
        for name in ("id", "prompt_ids", "chosen_ids", "rejected_ids"):
            column = table.column(name).combine_chunks()
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                h.update(np.asarray(pc.list_value_length(column)).astype("<i8", copy=False))
                column = pc.list_flatten(column)
            h.update(np.asarray(column).astype("<i8", copy=False))  # the same hash for int32 or int64 storage
    return h.hexdigest()


@dataclass
class ResumePoint:
    """A complete checkpoint to resume from, with its JSON state (validated) and its fingerprint."""

    path: Path
    state: dict
    fingerprint: Fingerprint
    notes: list[str] = field(default_factory=list)  # what the resume accepted and the user should know

    @property
    def step(self) -> int:
        return self.state["progress"]["global_step"]


def find_resume_point(cfg: Config) -> ResumePoint | None:
    """The checkpoint `resume` names (auto / latest / a path), or None; a ConfigError if it cannot be used."""
    resume, out = cfg.train.resume, Path(cfg.train.output_dir)
    found = complete_checkpoints(out) if out.is_dir() else []
    if not resume:
        if cfg.train.overwrite_output_dir:
            return None
        if found:
            names = [p.name for p in found]
            names = names if len(names) <= 3 else [names[0], "...", names[-1]]
            raise ConfigError(
                f"output_dir {out} already holds checkpoints of an earlier run ({', '.join(names)}): "
                "continue it with --resume auto, or start over in another output_dir (or delete them, or set "
                "overwrite_output_dir: true)"
            )
        if finished_model(out):
            raise ConfigError(
                f"output_dir {out} already holds a finished model ({out / 'final'}) and its metrics.jsonl: a new "
                "run would overwrite them. Choose another output_dir, or set overwrite_output_dir: true"
            )
        return None
    if resume in ("auto", "latest"):
        if not found:
            if resume == "latest":
                raise ConfigError(
                    f"resume: latest, but {out} has no complete checkpoint; use --resume auto to start fresh "
                    "when there is none"
                )
            return None
        path = found[-1]
    else:
        path = Path(resume).expanduser()
        if not path.exists():
            raise ConfigError(f"resume: {resume}: no such checkpoint directory")
        if not path.is_dir() or not (path / COMPLETE_MARKER).is_file():
            inside = complete_checkpoints(path) if path.is_dir() else []
            hint = f" (it holds {inside[-1].name}: use --resume latest)" if inside else ""
            raise ConfigError(
                f"resume: {resume} is not a complete checkpoint (no {COMPLETE_MARKER} file){hint}"
            )
    state = read_state(path)
    fields_ = {f.name for f in fields(Fingerprint)}
    fingerprint = Fingerprint(**{k: v for k, v in state["fingerprint"].items() if k in fields_})
    return ResumePoint(path, state, fingerprint)


def finished_model(out: Path) -> bool:
    final = out / "final"
    return any((final / name).is_file() for name in ("config.json", "adapter_config.json"))


def read_state(path: Path) -> dict:
    """`orpo_state.json`, checked for shape and types (it is data from disk, never trusted blindly)."""
    file = path / STATE_FILE
    if not file.is_file():
        raise ConfigError(
            f"resume: {path} has no {STATE_FILE} (written by an older orpo_dist, or not a checkpoint): "
            "it cannot be resumed safely; start a new output_dir"
        )
    try:
        state = json.loads(file.read_text())
        progress = state["progress"]
        ok = isinstance(state["fingerprint"], dict) and isinstance(state["scheduler"], dict)
        ok = ok and all(
            isinstance(progress[k], int) and progress[k] >= 0
            for k in ("epoch", "step_in_epoch", "global_step")
        )
        last_eval = state.get("last_eval_step")
        ok = ok and (last_eval is None or isinstance(last_eval, int))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"resume: {file} is damaged ({type(e).__name__}: {e}); resume an older checkpoint"
        ) from None
    if not ok:
        raise ConfigError(f"resume: {file} is damaged (unexpected values); resume an older checkpoint")
    return state


def check_settings(point: ResumePoint, now: Fingerprint) -> None:
    """Refuse (ConfigError) a resume whose batch split, seed, strategy or model cannot continue the checkpoint."""
    saved, problems = point.fingerprint, []
    for name in ("global_batch", "seed", "group_by_length", "model", "adapter"):
        if getattr(saved, name) != getattr(now, name):
            problems.append(f"{name} {getattr(saved, name)} -> {getattr(now, name)}")
    if saved.model != now.model and saved.model_sha256 and saved.model_sha256 == now.model_sha256:
        problems.remove(f"model {saved.model} -> {now.model}")  # copied or moved: the same weights
        point.notes.append(f"resume: the model moved ({saved.model} -> {now.model}) but its config and weight "
                           f"files are the same (sha256 {now.model_sha256[:12]}); continuing")  # fmt: skip
    split = ("world_size", "per_device_batch", "gradient_accumulation")
    changed = [
        f"{n} {getattr(saved, n)} -> {getattr(now, n)}" for n in split if getattr(saved, n) != getattr(now, n)
    ]
    kinds = {saved.strategy, now.strategy}
    if len(kinds) > 1 and not kinds <= WHOLE_STATE:
        problems.append(f"strategy {saved.strategy} -> {now.strategy}")
    elif changed and not (kinds <= WHOLE_STATE or kinds <= RESHARDED_ON_LOAD):
        problems.append(
            f"{', '.join(changed)} under {now.strategy} (its optimizer state is partitioned by rank: resume on "
            "the same world size and split)"
        )
    _refuse(point, problems)


def check_data(point: ResumePoint, now: Fingerprint, steps_per_epoch: int) -> None:
    """Refuse a resume on other training pairs, or at a position outside the epoch (ConfigError)."""
    saved, problems = point.fingerprint, []
    if (saved.pairs, saved.data_sha256) != (now.pairs, now.data_sha256):
        problems.append(
            f"training data {saved.pairs} pairs (sha256 {saved.data_sha256[:12]}, {saved.data_path}) -> "
            f"{now.pairs} pairs (sha256 {now.data_sha256[:12]}, {now.data_path})"
        )
    step_in_epoch = point.state["progress"]["step_in_epoch"]
    if not problems and step_in_epoch >= steps_per_epoch:
        problems.append(f"step_in_epoch {step_in_epoch} is past the {steps_per_epoch} steps of an epoch")
    _refuse(point, problems)


def _refuse(point: ResumePoint, problems: list[str]) -> None:
    if problems:
        raise ConfigError(
            f"cannot resume from {point.path}: {'; '.join(problems)}. Resume with the settings and data it was "
            "saved with, or start a new output_dir"
        )


def state_json(progress: dict, scheduler: dict, fingerprint: Fingerprint, last_eval_step: int | None) -> str:
    return json.dumps(
        {
            "progress": progress,
            "scheduler": scheduler,
            "fingerprint": asdict(fingerprint),
            "last_eval_step": last_eval_step,
        },
        indent=1,
    )
