"""Checkpoints: save, rotate and resume, so a run stopped at any step continues bit for bit.

`checkpoint-<step>/` holds `state/` (accelerate's `save_state`: model or adapter, optimizer,
scheduler, RNG, and our `Progress`), `model/` (weights or adapter in safetensors, tokenizer, the run's
config) and `COMPLETE`, written by rank 0 after every rank has finished writing: a checkpoint without
it is never resumed or counted. Weights are gathered across ranks by accelerate (a collective under
ZeRO-3 / FSDP, so every rank calls `save_model`) and written by rank 0 alone.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType

from orpo_dist.config import Config
from orpo_dist.distributed import rank0_print

COMPLETE_MARKER = "COMPLETE"


@dataclass
class Progress:
    """The data position, saved with every checkpoint so resume continues the same data order."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)

    def advance(self, steps_per_epoch: int) -> None:
        """One optimizer step done; the epoch wraps after its last step."""
        self.global_step += 1
        self.step_in_epoch += 1
        if self.step_in_epoch == steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoints whose save finished on every rank, oldest first."""
    found = [p for p in out.glob("checkpoint-*") if (p / COMPLETE_MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


class Checkpointer:
    """Saves and restores everything a run needs to continue: registered with accelerate at start."""

    def __init__(self, accelerator: Accelerator, cfg: Config, tokenizer, scheduler):
        self.accelerator, self.cfg, self.tokenizer = accelerator, cfg, tokenizer
        self.out = Path(cfg.train.output_dir)
        self.progress = Progress()
        accelerator.register_for_checkpointing(scheduler, self.progress)
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if cfg.peft.use_peft and not self.deepspeed:
            accelerator.register_save_state_pre_hook(_keep_trainable_only)

    def save(self, model) -> Path:
        accelerator = self.accelerator
        path = self.out / f"checkpoint-{self.progress.global_step}"
        accelerator.save_state(str(path / "state"))
        self.save_model(model, path / "model")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (path / COMPLETE_MARKER).write_text(json.dumps(self.progress.state_dict()))
            self._rotate()
        accelerator.wait_for_everyone()
        rank0_print(accelerator, f"saved checkpoint {path}")
        return path

    def save_model(self, model, path: Path) -> None:
        """Weights (adapter for PEFT) gathered across ranks by accelerate; written by rank 0."""
        accelerator = self.accelerator
        state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3 / FSDP: every rank calls it
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(
                path, state_dict=state_dict, safe_serialization=True
            )
            self.tokenizer.save_pretrained(path)
            self.cfg.save(path / "orpo_config.yaml")

    def _rotate(self) -> None:
        limit = self.cfg.train.save_total_limit
        done = complete_checkpoints(self.out)
        for old in done[:-limit] if limit else []:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> None:
        """Load the checkpoint `resume` names (auto / latest / a path), if any, into every registered object."""
        resume = self.cfg.train.resume
        if not resume:
            return
        if resume in ("auto", "latest"):
            found = complete_checkpoints(self.out)
            if not found:
                if resume == "latest":
                    raise FileNotFoundError(f"resume: latest but no complete checkpoint in {self.out}")
                rank0_print(self.accelerator, "resume: auto found no checkpoint; starting fresh")
                return
            path = found[-1]
        else:
            path = Path(resume)
            if not (path / COMPLETE_MARKER).exists():
                raise FileNotFoundError(
                    f"resume: {path} is not a complete checkpoint (no {COMPLETE_MARKER} file)"
                )
        kwargs = {} if self.deepspeed else {"strict": not self.cfg.peft.use_peft}
        self.accelerator.load_state(str(path / "state"), **kwargs)
        p = self.progress
        rank0_print(
            self.accelerator,
            f"resumed from {path} at step {p.global_step} (epoch {p.epoch}, step {p.step_in_epoch} of it)",
        )


def _keep_trainable_only(models, weights, output_dir) -> None:
    """PEFT runs: checkpoint the adapter, not a copy of the frozen (maybe 4-bit) base."""
    for model, state in zip(models, weights):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in trainable]:
            del state[key]
