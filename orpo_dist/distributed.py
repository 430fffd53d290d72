"""Process-group set-up, launch checks, the agreed start-up and reductions over ranks. Which pairs each
rank trains on is loader.PairShards; the agreed stop on preemption is preemption.py. The rest of the package calls these and is otherwise written as if
single-process, with two exceptions kept beside what they guard: rank-0-only file writes
(`accelerator.is_main_process` in checkpoint.py and metrics.py, with a barrier after them), and the
ZeRO-3 gather of a frozen output head in logps.py (it feeds the log-prob kernel there).

Pitfalls handled where they bite:
- On CPU, several launch spellings silently give one process, or N unconnected processes that each
  think they are rank 0. `check_world_size` compares what the launcher asked for with the process
  group we got and stops loudly on a mismatch.
- DeepSpeed on CPU needs the gloo backend (its batch-size check fails otherwise).
- FSDP on CPU: accelerate turns an FSDP launch into DDP (`--cpu`) or a single-process job per rank (no
  CUDA), although torch's `fully_shard` runs over gloo. `_fsdp_on_cpu` restores what the launch asked
  for, so the GPU code path (`fsdp2_prepare_model`, sharded save/load) is the one that runs.
- A failure during start-up on one rank must stop every rank (`agreed_start`), or the others wait in
  the next collective until `ddp_timeout`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from orpo_dist import sequence_parallel
from orpo_dist.config import Config, ConfigError, SetupError

log = logging.getLogger("orpo_dist")


def make_accelerator(cfg: Config) -> Accelerator:
    """The Accelerator for this launch. Its sequence-parallel size is `cfg.train.sequence_parallel_size` as
    `sequence_parallel.resolve` settled it before (the one place that reads the launch config for it); from
    here on code asks the accelerator (`sequence_parallel.size`)."""
    kwargs = []
    launched = "LOCAL_RANK" in os.environ  # set by accelerate launch / torchrun / deepspeed, not by python
    if launched:
        # ddp_timeout bounds how long a collective waits for a hung or lost rank (gloo, NCCL, DeepSpeed's init)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        kwargs.append(
            InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=cfg.train.ddp_timeout))
        )
    if not launched:
        # accelerate keeps its state per process; a second run from the Python API (say with another
        # mixed_precision) would be refused. A single process owns no process group, so start clean.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    log_with = None if cfg.train.log == "none" else cfg.train.log
    accelerator = Accelerator(
        mixed_precision=None if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation,
        log_with=log_with,
        project_dir=cfg.train.output_dir,
        kwargs_handlers=kwargs,
        parallelism_config=sequence_parallel.parallelism_config(cfg),
    )
    _fsdp_on_cpu(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        # our dataloader is not passed to prepare(), so tell DeepSpeed the micro-batch itself
        ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        ds["gradient_accumulation_steps"] = cfg.train.gradient_accumulation
        ds["train_batch_size"] = (
            cfg.train.batch_size * cfg.train.gradient_accumulation * data_parallel(accelerator)[0]
        )
        # always ours: left "auto", accelerate fills in 1.0 and max_grad_norm: 0 would still clip (0 = off)
        ds["gradient_clipping"] = cfg.train.max_grad_norm
        if ds.get("zero_optimization", {}).get("stage") == 3:
            # save_model gathers the full weights with accelerator.get_state_dict, which needs this under ZeRO-3
            ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
            sequence_parallel.check_zero3(cfg, ds["zero_optimization"])
    return accelerator


def _fsdp_on_cpu(accelerator: Accelerator) -> None:
    """The CPU shim for FSDP (accelerate 1.16). A launch config with `distributed_type: FSDP` sets
    ACCELERATE_USE_FSDP=true; on a machine without CUDA, accelerate's state still connects the ranks
    (gloo, our InitProcessGroupKwargs) but records them as `NO` (one process each) and drops the FSDP
    plugin: it only switches to FSDP from a MULTI_<accelerator> type. torch's `fully_shard` itself runs
    over gloo, so this does what accelerate does on a GPU: record FSDP and hand the state the plugin
    (read from the same environment). Everything after it, `accelerator.prepare` -> `fsdp2_prepare_model`,
    `save_state`/`load_state` of sharded state, `get_state_dict`, is accelerate's unchanged GPU path.

    Only then: no CUDA, the launch asked for FSDP, and the ranks are connected. `accelerate launch` starts
    FSDP through torchrun even for one process, so a one-rank FSDP job is FSDP here as on one GPU (its
    checkpoints are sharded ones, which resume on any number of ranks)."""
    if (
        torch.cuda.is_available()
        or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"
        or accelerator.distributed_type != DistributedType.NO
        or not torch.distributed.is_initialized()
    ):
        return
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    state = accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def check_world_size(accelerator: Accelerator) -> None:
    """Fail if the launch did not give what it asked for: every process connected, with the asked strategy.

    Each case below otherwise trains without an error: one process, or ranks that never sync gradients,
    or plain DDP where DeepSpeed / FSDP was asked for.
    """
    asked = int(os.environ.get("WORLD_SIZE", "1"))
    got, kind = accelerator.num_processes, accelerator.distributed_type
    cpu_hint = (
        "On a CPU-only machine launch DDP with ACCELERATE_USE_CPU=true and --multi_gpu, and DeepSpeed configs "
        "without ACCELERATE_USE_CPU; `accelerate launch --cpu` and MULTI_CPU configs do not connect ranks."
    )
    if asked != got:
        raise SetupError(
            f"the launcher started WORLD_SIZE={asked} processes but the process group has {got}: the ranks are "
            f"not connected. {cpu_hint}"
        )
    if got > 1 and kind == DistributedType.NO:
        raise SetupError(
            f"{got} processes but accelerate runs each as a single-process job (distributed_type NO): gradients "
            f"would never be synchronised. {cpu_hint}"
        )
    asked_kinds = (
        ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED),
        ("ACCELERATE_USE_FSDP", DistributedType.FSDP),
    )
    for env, wanted in asked_kinds:
        if os.environ.get(env, "false").lower() == "true" and kind != wanted:
            raise SetupError(
                f"the launch config asks for {wanted.value} ({env}=true) but accelerate is running {kind.value}. "
                "ACCELERATE_USE_CPU=true turns DeepSpeed and FSDP off: launch them on CPU without it (the "
                "trainer uses gloo and runs FSDP's sharding over it)."
            )


def is_sharded(accelerator: Accelerator) -> bool:
    """ZeRO-3 or FSDP: parameters are split across ranks."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return accelerator.distributed_type == DistributedType.FSDP


def data_parallel(accelerator: Accelerator) -> tuple[int, int]:
    """(size, rank) over the ranks that train on different pairs: every rank, or one per SP group (whose
    ranks are consecutive: see sequence_parallel.py)."""
    sp = sequence_parallel.size(accelerator)
    return accelerator.num_processes // sp, accelerator.process_index // sp


def gradient_average(accelerator: Accelerator) -> int:
    """What DDP / DeepSpeed divide the gradients summed over ranks by: the data-parallel size, except ZeRO-3
    under sequence parallelism, whose reduce-scatter averages over every rank (ZeRO-1/2 divide by dp).
    DeepSpeed 0.19; tests/test_sequence_parallel.py pins both against one process."""
    if sequence_parallel.size(accelerator) > 1 and is_sharded(accelerator):
        return accelerator.num_processes
    return data_parallel(accelerator)[0]


def describe(accelerator: Accelerator, cfg: Config) -> str:
    t, (dp, _), sp = cfg.train, data_parallel(accelerator), sequence_parallel.size(accelerator)
    split = (
        f" sequence_parallel_size={sp} (data-parallel groups={dp} x sp={sp}; each row padded to a multiple "
        f"of {sp} tokens, split over the {sp} ranks of its group; attention {cfg.model.attn_implementation})"
    )
    return (
        f"world_size={accelerator.num_processes} distributed={accelerator.distributed_type.value} "
        f"per_device_batch={t.batch_size} gradient_accumulation={t.gradient_accumulation} "
        f"global_batch={t.batch_size * t.gradient_accumulation * dp} pairs/step"
        + (split if sp > 1 else "")
        + _fsdp_sharding(accelerator)
    )


def _fsdp_sharding(accelerator: Accelerator) -> str:
    """How FSDP shards, for the start line ("" for other strategies)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return ""
    p, n = accelerator.state.fsdp_plugin, accelerator.num_processes
    return (
        f" (FSDP{p.fsdp_version}: parameters, gradients and optimizer state sharded over "
        f"{n} rank{'s' * (n > 1)} per decoder layer; reshard_after_forward={p.reshard_after_forward}, "
        f"activation_checkpointing={p.activation_checkpointing}, checkpoints {p.state_dict_type.name})"
    )


def rank0_print(accelerator: Accelerator, msg: str) -> None:
    """The run's log lines: printed once, by the global main process."""
    if accelerator.is_main_process:
        print(f"[orpo_dist] {msg}", flush=True)


def all_sum(accelerator: Accelerator, values: torch.Tensor) -> torch.Tensor:
    """Sum a float tensor over ranks (metrics and loss normalisers are sums, never rank 0's mean)."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.reduce(values.to(accelerator.device), reduction="sum")


def agreed_start(accelerator: Accelerator, fn: Callable, first: str | None = None):
    """Run a start-up stage on every rank; if it fails on any rank, every rank raises, so no rank is left
    waiting in a collective for one that stopped (one all-reduce). `first`: "main" runs it on rank 0
    before the others, "local" on each node's local rank 0 before that node's others."""
    goes_first = {
        None: True,
        "main": accelerator.is_main_process,
        "local": accelerator.is_local_main_process,
    }[first]
    if not goes_first:
        accelerator.wait_for_everyone()
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # re-raised below, on this rank; the others learn of it from the flag
        error = e
    if first and goes_first:
        accelerator.wait_for_everyone()
    failed = all_sum(accelerator, torch.tensor([float(error is not None)])).item() > 0
    if error is not None:
        raise error
    if failed:
        raise ConfigError("stopped: another rank reported a problem during start-up (see its message above)")
    return result
