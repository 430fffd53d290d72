"""Checkpoints: save (atomically), rotate and resume, so a run stopped at any step continues bit for bit.

What a checkpoint holds on disk is laid out in run_dir.py (the one home of those names): `state/`
(accelerate's `save_state`), `orpo_state.json` (our `Progress` -- the data position --, the scheduler,
the run's `Fingerprint`; JSON, so resuming never unpickles our own state), `model/` (weights or adapter
in safetensors, tokenizer, how prompts were rendered) and `COMPLETE`. A save is written to a hidden sibling,
`.checkpoint-<step>.partial/`, and renamed into place by rank 0 after every rank has finished, with
`COMPLETE` already inside: a crash at any moment leaves either the old checkpoint or the new one
complete, never a half-new one marked complete. Weights are gathered across ranks by accelerate (a
collective under ZeRO-3 / FSDP, so every rank calls `save_model`) and written by rank 0 alone.

Resuming checks every file of `state/` before loading it (`safe_load.audit_checkpoint`): nothing in a
checkpoint is ever executed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from orpo_dist.config import Config, ConfigError
from orpo_dist.console import one_line
from orpo_dist.distributed import all_sum, rank0_print
from orpo_dist.elastic import universal_state
from orpo_dist.resume import Fingerprint, ResumePoint, state_json
from orpo_dist.run_dir import (
    COMPLETE_MARKER,
    MODEL_DIR,
    STATE_DIR,
    STATE_FILE,
    checkpoint_dir,
    complete_checkpoints,
    partial_dir,
)
from orpo_dist.safe_load import audit_checkpoint, weights_only_deepspeed
from orpo_dist.templates import write_prompt_format

__all__ = ["Checkpointer", "CheckpointError", "Progress"]


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, permissions): the previous ones are intact."""


@dataclass
class Progress:
    """The data position, saved with every checkpoint so resume continues the same data order."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update({k: int(state[k]) for k in ("epoch", "step_in_epoch", "global_step")})

    def advance(self, steps_per_epoch: int) -> None:
        """One optimizer step done; the epoch wraps after its last step."""
        self.global_step += 1
        self.step_in_epoch += 1
        if self.step_in_epoch == steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0


class Checkpointer:
    """Saves and restores everything a run needs to continue."""

    def __init__(
        self, accelerator: Accelerator, cfg: Config, tokenizer, scheduler, fingerprint: Fingerprint,
        data_format: str = "standard",
    ):  # fmt: skip
        self.accelerator, self.cfg, self.tokenizer = accelerator, cfg, tokenizer
        self.data_format = data_format  # how prompts were rendered, saved for orpo_dist.generate
        self.scheduler, self.fingerprint = scheduler, fingerprint
        self.out = Path(cfg.train.output_dir)
        self.progress = Progress()
        self.last_eval_step: int | None = None
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if cfg.peft.use_peft and not self.deepspeed:
            accelerator.register_save_state_pre_hook(_keep_trainable_only)

    def save(self, model) -> Path:
        """Write checkpoint-<step>/ atomically (see the module docstring); rotate old ones.

        A write that fails on any rank (a full disk, a quota; torch and safetensors report it as their own
        errors) fails the save on every rank, each at the same point, so none is left waiting; the partial
        directory is removed and its space freed."""
        accelerator, step = self.accelerator, self.progress.global_step
        path, partial = checkpoint_dir(self.out, step), partial_dir(self.out, step)

        def write() -> None:
            if accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)  # what a crash during an earlier save left
            accelerator.wait_for_everyone()
            accelerator.save_state(str(partial / STATE_DIR))
            self.save_model(model, partial / MODEL_DIR)

        def publish() -> None:
            if accelerator.is_main_process:
                state = state_json(
                    self.progress.state_dict(),
                    self.scheduler.state_dict(),
                    self.fingerprint,
                    self.last_eval_step,
                )
                (partial / STATE_FILE).write_text(state)
                (partial / COMPLETE_MARKER).write_text(json.dumps(self.progress.state_dict()))
                if path.exists():  # re-saving a step: it stops being complete before anything is replaced
                    (path / COMPLETE_MARKER).unlink(missing_ok=True)
                    shutil.rmtree(path)
                os.replace(partial, path)
                self._rotate(keep=path)

        for stage in (write, publish):
            error = self._agreed(stage)
            if error is not None:
                if accelerator.is_main_process:
                    shutil.rmtree(partial, ignore_errors=True)
                done = complete_checkpoints(self.out)
                why = f"{getattr(error, 'strerror', None) or one_line(str(error))[:200]} ({type(error).__name__})"
                raise CheckpointError(
                    f"could not write checkpoint-{step} in {self.out}: {why}; the last complete checkpoint is "
                    f"{done[-1] if done else 'none'}: free space, then --resume auto"
                ) from error if isinstance(error, BaseException) else None
        accelerator.wait_for_everyone()
        rank0_print(accelerator, f"saved checkpoint {path}")
        return path

    def _agreed(self, stage) -> BaseException | str | None:
        """Run one stage of a save on every rank; the write failure of this rank, or a note that another
        rank failed (one all-reduce, so every rank stops at the same point). Other errors raise."""
        error = None
        try:
            stage()
        except Exception as e:  # noqa: BLE001 - sorted just below
            if not _write_failure(e):
                raise
            error = e
        if all_sum(self.accelerator, torch.tensor([float(error is not None)])).item() > 0 and error is None:
            error = "another rank could not write its part"
        return error

    def save_model(self, model, path: Path) -> None:
        """Weights (adapter for PEFT) gathered across ranks by accelerate; written by rank 0."""
        accelerator = self.accelerator
        state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3 / FSDP: every rank calls it
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            if not _save_wrapped_adapter(unwrapped, state_dict, path):
                unwrapped.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
            self.tokenizer.save_pretrained(path)
            self.cfg.save(path / "orpo_config.yaml")
            write_prompt_format(path, self.data_format, self.cfg.data.chat_template)

    def _rotate(self, keep: Path) -> None:
        limit = self.cfg.train.save_total_limit
        if limit is None:
            return
        done = [p for p in complete_checkpoints(self.out) if p != keep]
        for old in done[: max(len(done) - (limit - 1), 0)]:
            (old / COMPLETE_MARKER).unlink(missing_ok=True)  # incomplete first: a crash mid-delete is ignored
            shutil.rmtree(old, ignore_errors=True)

    def load(self, point: ResumePoint) -> None:
        """Load a checkpoint (checked by resume.py, audited here) into the model, optimizer, scheduler, RNG."""
        accelerator = self.accelerator
        audit_checkpoint(point.path / STATE_DIR)
        if self.deepspeed:
            weights_only_deepspeed(accelerator.deepspeed_engine_wrapped.engine)
        kwargs = {} if self.deepspeed else {"strict": not self.cfg.peft.use_peft}
        state = point.path / STATE_DIR
        if self.deepspeed and point.fingerprint.world_size != accelerator.num_processes:
            state = universal_state(accelerator, point.path)  # ZeRO cut for another world size
        try:
            accelerator.load_state(str(state), **kwargs)
        except RuntimeError as e:
            if "size mismatch" not in str(e) and "shape" not in str(e):
                raise
            shapes = [
                line.strip() for line in str(e).splitlines() if "size mismatch" in line or "shape" in line
            ]
            raise ConfigError(
                f"resume: the model {self.cfg.model.model} has other weight shapes than when {point.path} was "
                f"saved ({(shapes or ['?'])[0][:200]}); the files at that path changed since: resume with the "
                "model the checkpoint was trained from, or start a new output_dir"
            ) from None
        self.scheduler.load_state_dict(
            _checked_scheduler_state(self.scheduler.state_dict(), point.state["scheduler"])
        )
        self.progress.load_state_dict(point.state["progress"])
        self.last_eval_step = point.state.get("last_eval_step")
        # accelerate counts micro-batches to find the accumulation boundary: restart it at a step boundary
        # (the saved count belongs to the saved accumulation, which may differ under DDP)
        accelerator.step = 0
        p = self.progress
        rank0_print(
            accelerator,
            f"resumed from {point.path} at step {p.global_step} (epoch {p.epoch}, step {p.step_in_epoch} of it)",
        )


def _write_failure(e: BaseException) -> bool:
    """A failed write: an OSError, or torch.save's / safetensors' own error for one (a full disk)."""
    text = str(e).lower()
    return isinstance(e, OSError) or (
        type(e).__name__ in ("RuntimeError", "SafetensorError")
        and any(k in text for k in ("write", "no space", "storagefull", "quota", "i/o error"))
    )


def _checked_scheduler_state(fresh: dict, saved: dict) -> dict:
    """The saved scheduler state, if it has exactly the keys and value types of this run's scheduler."""
    same = set(fresh) == set(saved) and all(
        type(saved[k]) is type(fresh[k]) or (isinstance(fresh[k], float) and isinstance(saved[k], int))
        for k in fresh
    )
    if not same:
        raise ConfigError(
            f"resume: the checkpoint's scheduler state is damaged or from another scheduler ({sorted(saved)})"
        )
    return saved


def _keep_trainable_only(models, weights, output_dir) -> None:
    """PEFT runs: checkpoint the adapter, not a copy of the frozen (maybe 4-bit) base."""
    for model, state in zip(models, weights):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in trainable]:
            del state[key]


CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module."


def _save_wrapped_adapter(model, state_dict: dict, path: Path) -> bool:
    """A PEFT model whose layers accelerate wrapped for FSDP activation checkpointing: PEFT picks the adapter
    by module names, which carry `_checkpoint_wrapped_module.`, while the gathered state dict's keys do not,
    so PEFT's own save would write an empty adapter. Write the trainable entries with PEFT's key names
    (adapter name dropped) and the adapter config. False (nothing written) for any other model."""
    config = getattr(model, "peft_config", {}).get("default")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if config is None or not any(CHECKPOINT_WRAPPER in n for n in names):
        return False
    from safetensors.torch import save_file

    trainable = {n.replace(CHECKPOINT_WRAPPER, "") for n in names}
    adapter = {k.replace(".default.", "."): v.contiguous() for k, v in state_dict.items() if k in trainable}
    path.mkdir(parents=True, exist_ok=True)
    save_file(adapter, path / "adapter_model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(path)
    return True
