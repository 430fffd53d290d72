"""Resuming a DeepSpeed ZeRO checkpoint on another world size, through DeepSpeed's universal checkpoint.

ZeRO-1/2/3 save each rank's partition of the optimizer (and, ZeRO-3, of the weights) in its own file, cut
for the world size that wrote it. When a resume runs on another world size (resume.check_settings lets
it through when the global batch is the same), rank 0 converts the audited checkpoint once with
`deepspeed.checkpoint.ds_to_universal` into `checkpoint-<step>/universal/`: one file per parameter
(fp32 weight, Adam moments, step), independent of the split. The engine is switched to
`load_universal` and accelerate's `load_state` reads it from there; DeepSpeed cuts each tensor for the
new ranks. FSDP needs none of this: its DCP checkpoints reshard on load.

The converter unpickles DeepSpeed's files with `weights_only=False`; it only ever reads a checkpoint that
`safe_load.audit_checkpoint` has passed, and its output is audited again before the engine reads it.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from argparse import Namespace
from pathlib import Path

from accelerate import Accelerator

from orpo_dist.distributed import agreed_start
from orpo_dist.run_dir import STATE_DIR, UNIVERSAL_DIR
from orpo_dist.safe_load import audit_checkpoint

TAG = "pytorch_model"  # accelerate's save_state: state/pytorch_model/ holds DeepSpeed's files


def universal_state(accelerator: Accelerator, checkpoint: Path) -> Path:
    """The directory for `load_state` of a ZeRO checkpoint written on another world size: its universal
    form, made by rank 0 (the others wait), audited, and the engine set to load it."""
    out = checkpoint / UNIVERSAL_DIR

    def convert():
        from deepspeed.checkpoint.ds_to_universal import main

        shutil.rmtree(out, ignore_errors=True)  # never trust a conversion left from before
        args = Namespace(
            input_folder=str(checkpoint / STATE_DIR / TAG),
            output_folder=str(out / TAG),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # accelerate saves no `universal_checkpoint_info`: the version only
        )
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines are not ours
            main(args)

    agreed_start(accelerator, convert if accelerator.is_main_process else lambda: None, first="main")
    audit_checkpoint(out)
    engine = accelerator.deepspeed_engine_wrapped.engine
    engine._config.load_universal_checkpoint = True  # what `"checkpoint": {"load_universal": true}` sets
    return out
