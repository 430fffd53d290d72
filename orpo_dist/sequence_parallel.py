"""Sequence parallelism for long pairs: DeepSpeed's Ulysses attention (ALST) through accelerate, and what
ORPO needs on top of it.

world = dp x sp. Consecutive ranks form a sequence-parallel (SP) group (DeepSpeed's `parallel_state_sp`);
the groups are the data-parallel ranks. Every rank of a group trains on the same pairs (`PairShards` deals
over the dp ranks), keeps 1/sp of every row (`layouts.shard_batch`), and the attention trades heads for
sequence with all-to-alls, so each rank attends over whole rows for 1/sp of the heads. Activations per
rank scale with 1/sp; the weights are sharded by ZeRO as usual.

accelerate does the DeepSpeed side when given `ParallelismConfig(sp_size, sp_backend="deepspeed")`: it
creates the groups, hands them to DeepSpeed, which then sums gradients over every rank and divides by dp
under ZeRO-1/2 but by the whole world under ZeRO-3's reduce-scatter (`distributed.gradient_average`: the
trainer undoes whichever it is), and installs DeepSpeed's `UlyssesSPAttentionHF` for the model's attention
kernel. `enable` then installs our own instance of that class, for three things ORPO needs:
- any number of rows per micro-batch (`padded`: 2 per pair, `packed`: 1; DeepSpeed's is fixed at start);
- sequence restarts on sdpa: Ulysses drops the model's mask (it was built for one slice), so the causal
  mask within each sequence of a `packed` row is rebuilt from the gathered position ids
  (`layouts.restart_causal_mask`); flash attention reads the restarts from the position ids itself;
- sequence parallelism in evaluation too (accelerate turns it off in eval, for unsharded eval batches).

The ORPO reduce (`enable` returns it; `loss.orpo_parts` applies it): per-sequence log-prob sums and token
counts are summed over the group in forward, and in backward each rank's gradient goes to its own part.
So every rank computes the exact odds ratio of every pair, and the group's gradients add up to that pair's
gradient once (tests/test_sequence_parallel.py checks it against one rank).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch
from accelerate import Accelerator

from orpo_dist.config import Config, ConfigError
from orpo_dist.config.checks import sequence_parallel_problems
from orpo_dist.layouts import restart_causal_mask

LAUNCH_CONFIGS = "configs/accelerate/zero3_sp.yaml (or any zero*.yaml with --sequence_parallel_size)"


def resolve(cfg: Config, env: Mapping[str, str] = os.environ) -> int:
    """Settle the run's sequence-parallel size in `cfg` (called once, before the accelerator is built):
    `sequence_parallel_size`, or the accelerate config's `parallelism_config_sp_size` when ours is 1. Under SP the attention defaults to the launch config's
    (sdpa unless set). Raises ConfigError, every number in it, if this launch cannot run it."""
    t = cfg.train
    launched = int(env.get("PARALLELISM_CONFIG_SP_SIZE", "1") or 1)
    if env.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() != "true":
        launched = 1
    found = []
    if launched > 1 and t.sequence_parallel_size not in (1, launched):
        found.append(
            f"sequence_parallel_size={t.sequence_parallel_size} but the accelerate config says "
            f"parallelism_config_sp_size={launched}: set one of them, or both to the same value"
        )
    elif launched > 1:
        t.sequence_parallel_size = launched
    sp = t.sequence_parallel_size
    if sp > 1:
        if cfg.model.attn_implementation is None:
            cfg.model.attn_implementation = env.get("PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION") or "sdpa"
        world = int(env.get("WORLD_SIZE", "1"))
        if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
            found.append(
                f"sequence_parallel_size={sp} needs a DeepSpeed launch (this one is not: world size {world}); "
                f"use accelerate launch --config_file {LAUNCH_CONFIGS}"
            )
        if world % sp:
            found.append(
                f"world size {world} is not a multiple of sequence_parallel_size={sp} (world = data-parallel "
                f"groups x {sp}): launch a multiple of {sp} processes"
            )
        found += sequence_parallel_problems(cfg)  # again, for a size that came from the launch config
    if found:
        raise ConfigError("; ".join(found))
    return sp


def parallelism_config(cfg: Config, env: Mapping[str, str] = os.environ):
    """accelerate's ParallelismConfig for DeepSpeed Ulysses, or None without sequence parallelism. The
    data-parallel size goes in too: accelerate sets DeepSpeed's train_batch_size from it."""
    sp = cfg.train.sequence_parallel_size
    if sp <= 1:
        return None
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    handler = DeepSpeedSequenceParallelConfig(
        sp_seq_length_is_variable=True, sp_attn_implementation=cfg.model.attn_implementation
    )
    dp = int(env.get("WORLD_SIZE", "1")) // sp
    return ParallelismConfig(dp_shard_size=dp, sp_size=sp, sp_backend="deepspeed", sp_handler=handler)


def check_zero3(cfg: Config, zero: dict) -> None:
    """ZeRO-3 averages gradients over every rank in its reduce-scatter, but over the data-parallel ranks in
    its other reduction path, bucket by bucket when reduce_scatter is off: no single loss scale is right then."""
    if cfg.train.sequence_parallel_size > 1 and not zero.get("reduce_scatter", True):
        raise ConfigError(
            f"sequence_parallel_size={cfg.train.sequence_parallel_size} with ZeRO-3 and reduce_scatter: false: "
            "DeepSpeed then averages some gradient buckets over every rank and others over the data-parallel "
            "ranks. Remove reduce_scatter: false from the DeepSpeed config (or use ZeRO-2)."
        )


def size(accelerator: Accelerator) -> int:
    pc = accelerator.parallelism_config
    return pc.sp_size if pc is not None and pc.sp_size else 1


def slice_of(accelerator: Accelerator) -> tuple[int, int]:
    """(this rank's place in its SP group, sp): the groups are runs of consecutive ranks."""
    sp = size(accelerator)
    return accelerator.process_index % sp, sp


def check_heads(cfg: Config, model_path: str) -> None:
    """Attention heads and KV heads must split over the group: read from the model's config, before loading."""
    sp = cfg.train.sequence_parallel_size
    if sp <= 1:
        return
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    text = model_config.get_text_config()
    heads, kv = text.num_attention_heads, text.num_key_value_heads or text.num_attention_heads
    found = []
    if heads % sp:
        found.append(f"num_attention_heads={heads} is not divisible by sequence_parallel_size={sp}")
    if kv % sp and sp % kv:
        found.append(
            f"num_key_value_heads={kv} and sequence_parallel_size={sp}: one must divide the other (KV heads "
            "are split over the group, or replicated when there are fewer than sp)"
        )
    if found:
        raise ConfigError("; ".join(found) + f" (model {cfg.model.model})")


def enable(accelerator: Accelerator, model) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """After `accelerator.prepare`: install our Ulysses attention; return the ORPO reduce over the SP group
    (None without sequence parallelism)."""
    sp = size(accelerator)
    if sp <= 1:
        return None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    group = parallel_state_sp.get_sequence_parallel_group()
    got = (
        parallel_state_sp.get_sequence_parallel_rank(),
        parallel_state_sp.get_sequence_parallel_world_size(),
    )
    if got != slice_of(accelerator):
        raise RuntimeError(f"DeepSpeed's SP group gives (rank, size) {got}, the batches were cut for "
                           f"{slice_of(accelerator)}: the group layout changed")  # fmt: skip
    config = accelerator.unwrap_model(model).config
    impl = config._attn_implementation
    core = AttentionInterface()[impl]  # transformers' own kernel (the shared instance holds accelerate's)
    attention = _ulysses(_with_restarts(core) if impl == "sdpa" else core, config.get_text_config(), group)
    attention.core_attn_implementation = impl
    ALL_ATTENTION_FUNCTIONS[impl] = attention
    return lambda x: reduce_over_group(x, group)


def reduce_over_group(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of `x` over the group in forward; in backward the gradient goes to this rank's `x` alone."""
    total = x.detach().clone()
    torch.distributed.all_reduce(total, group=group)
    return total + (x - x.detach())


def _with_restarts(core: Callable) -> Callable:
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if attention_mask is None:
            attention_mask = restart_causal_mask(kwargs["position_ids"])
        return core(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


def _ulysses(core: Callable, text_config, group):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    class Ulysses(UlyssesSPAttentionHF):
        """DeepSpeed's Ulysses attention for any number of rows per call, the model's mask dropped."""

        def forward(self, module, query, key, value, attention_mask, *args, **kwargs):
            rows = query.shape[0]
            if rows != self.batch_size:  # the shapes it checks carry the rows in dim 1
                self.batch_size = rows
                for name in ("required_query_shape", "required_key_value_shape", "required_context_shape"):
                    shape = list(getattr(self, name))
                    setattr(self, name, torch.Size([shape[0], rows, *shape[2:]]))
            return super().forward(module, query, key, value, None, *args, **kwargs)

    heads = text_config.num_attention_heads
    attention = Ulysses(
        attn=core,
        batch_size=1,
        attn_head_count=heads,
        attn_head_size=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
        kv_head_count=text_config.num_key_value_heads or heads,
        num_hidden_layers=text_config.num_hidden_layers,
        process_group=group,
        seq_length_is_variable=True,
        disable_in_eval=False,
    )
    return attention
