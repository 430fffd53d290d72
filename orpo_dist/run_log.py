"""What a run prints for a person reading its log (a SLURM file as much as a terminal): how it runs
(precision, strategy with ZeRO stage / FSDP sharding, sequence parallelism), one compact line per logged
step (as TRL prints its metrics dict), and the end-of-run throughput line."""

from __future__ import annotations

from accelerate import Accelerator

from orpo_dist.config import Config

# the metrics a step line shows, in this order, with their format
STEP_KEYS = (
    ("loss", ".4f"), ("nll_loss", ".4f"), ("log_odds_ratio", ".4f"), ("rewards/accuracies", ".2f"),
    ("rewards/margins", ".4f"), ("grad_norm", ".3f"), ("learning_rate", ".2e"), ("epoch", ".2f"),
    ("tokens_per_second", ".0f"), ("mfu", ".3f"),
)  # fmt: skip


def how_it_runs(accelerator: Accelerator, cfg: Config) -> str:
    state, kind = accelerator.state, accelerator.distributed_type.value
    strategy = "none (one process)" if kind == "NO" else kind
    if kind == "DEEPSPEED" and getattr(state, "deepspeed_plugin", None):
        strategy = f"DeepSpeed ZeRO-{state.deepspeed_plugin.zero_stage}"
    elif kind == "FSDP" and getattr(state, "fsdp_plugin", None):
        plugin, version = state.fsdp_plugin, getattr(state.fsdp_plugin, "fsdp_version", 1)
        if (
            version == 2
        ):  # FSDP2: resharding after forward is FULL_SHARD, keeping the gathered weights SHARD_GRAD_OP
            sharding = "FULL_SHARD" if getattr(plugin, "reshard_after_forward", True) else "SHARD_GRAD_OP"
        else:
            sharding = getattr(plugin.sharding_strategy, "name", plugin.sharding_strategy)
        strategy = f"FSDP{version} ({sharding})"
    precision = accelerator.mixed_precision
    return (
        f"precision {precision if precision != 'no' else 'as the weights (no mixed precision)'}; "
        f"strategy {strategy} "
        f"over {accelerator.num_processes} process(es); sequence parallel size {cfg.train.sequence_parallel_size}"
    )


def step_line(row: dict) -> str:
    """`step 10: loss 0.6931 | nll_loss ... | tokens_per_second 1234`: the logged metrics of one step."""
    parts = [f"{k} {row[k]:{fmt}}" for k, fmt in STEP_KEYS if isinstance(row.get(k), (int, float))]
    return f"step {row['step']}: " + " | ".join(parts)


def end_line(seconds: float, steps: int, pairs_per_step: int, tokens: float, rows: list[dict]) -> str:
    """train_runtime, train_samples_per_second, tokens/s and (when known) the mean MFU of the run."""
    mfu = [r["mfu"] for r in rows if isinstance(r.get("mfu"), (int, float))]
    return (
        f"train_runtime {seconds:.1f} s | train_samples_per_second {steps * pairs_per_step / max(seconds, 1e-9):.2f} "
        f"| train_steps_per_second {steps / max(seconds, 1e-9):.3f} | tokens/s {tokens / max(seconds, 1e-9):.0f}"
        + (f" | mfu {sum(mfu) / len(mfu):.3f}" if mfu else "")
    )
