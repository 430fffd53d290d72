"""Validation of a whole config: every bad value and bad combination, each with its value and the fix."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from orpo_dist.config.schema import CHAT_TEMPLATES, Config, ConfigError

FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")
FLOAT32_MAX = 3.4028234663852886e38


def problems(cfg: Config) -> list[str]:
    d, t, o, pe = cfg.data, cfg.train, cfg.orpo, cfg.peft
    at_least_one = dict(
        batch_size=t.batch_size, gradient_accumulation=t.gradient_accumulation, logging_steps=t.logging_steps,
        max_length=d.max_length, max_prompt_length=d.max_prompt_length, logps_chunk_size=o.logps_chunk_size,
        lora_r=pe.lora_r, ddp_timeout=t.ddp_timeout, sequence_parallel_size=t.sequence_parallel_size,
    )  # fmt: skip
    at_least_one.update({k: v for k, v in dict(evals_per_epoch=t.evals_per_epoch,
                                               saves_per_epoch=t.saves_per_epoch).items() if v is not None})  # fmt: skip
    at_least = dict(num_proc=(d.num_proc, 1), dataloader_num_workers=(t.dataloader_num_workers, 0))
    unset_or_at_least_one = dict(
        save_steps=t.save_steps, eval_steps=t.eval_steps, eval_batch_size=t.eval_batch_size,
        max_completion_length=d.max_completion_length, max_samples=d.max_samples,
        save_total_limit=t.save_total_limit,
    )  # fmt: skip
    p = [f"{name}={value} must be >= 1" for name, value in at_least_one.items() if value < 1]
    p += [
        f"{name}={value} must be >= {low} or auto"
        for name, (value, low) in at_least.items()
        if value != "auto" and value < low
    ]
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        p.append(f"peak_tflops={t.peak_tflops} must be > 0 (or unset: taken from the GPU's name)")
    p += [
        f"{name}={value} must be >= 1 (or unset)"
        for name, value in unset_or_at_least_one.items()
        if value is not None and value < 1
    ]
    if t.sample_prompts < 0:
        p.append(f"sample_prompts={t.sample_prompts} must be >= 0 (0 turns samples off)")
    if t.lr <= 0:
        p.append(f"lr={t.lr} must be > 0")
    if o.beta < 0:
        p.append(f"beta={o.beta} must be >= 0 (0 trains plain SFT on the chosen answers)")
    if t.max_steps < 0 and t.epochs <= 0:
        p.append(f"epochs={t.epochs} and max_steps={t.max_steps}: set epochs > 0 or max_steps > 0")
    if t.max_steps < -1:
        p.append(f"max_steps={t.max_steps} must be -1 (run epochs), 0 (evaluate only) or a step count")
    if t.eval_only and d.eval_split == 0 and not d.eval_data_path:
        p.append("eval_only (or max_steps: 0) needs held-out pairs: set eval_split > 0 or eval_data_path")
    if t.warmup_steps is not None and t.warmup_steps < 0:
        p.append(f"warmup_steps={t.warmup_steps} must be >= 0 (a count, or a fraction below 1)")
    if t.scheduler == "cosine_with_min_lr" and not {"min_lr", "min_lr_rate"} & set(t.lr_scheduler_kwargs or {}):
        p.append("scheduler=cosine_with_min_lr needs lr_scheduler_kwargs: {min_lr: <lr>} or {min_lr_rate: <fraction>}")
    if not 0 <= t.warmup_ratio < 1:
        p.append(f"warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    if t.max_grad_norm < 0:
        p.append(f"max_grad_norm={t.max_grad_norm} must be >= 0 (0 disables clipping)")
    if t.weight_decay < 0:
        p.append(f"weight_decay={t.weight_decay} must be >= 0")
    if not 0 <= d.eval_split < 1:
        p.append(f"eval_split={d.eval_split} must be a fraction in [0, 1)")
    if d.max_prompt_length >= d.max_length:
        p.append(
            f"max_prompt_length={d.max_prompt_length} must be < max_length={d.max_length} "
            "so completions keep at least one token"
        )
    if not 0 <= pe.lora_dropout < 1:
        p.append(f"lora_dropout={pe.lora_dropout} must be in [0, 1)")
    if pe.quantization and not pe.use_peft:
        p.append(
            f"quantization={pe.quantization} needs peft: true (4/8-bit weights can only train through LoRA)"
        )
    if o.layout == "shared_prefix" and cfg.model.attn_implementation in FLASH_ATTENTION:
        p.append(
            f"layout=shared_prefix with attn_implementation={cfg.model.attn_implementation}: flash attention "
            "cannot express 'rejected sees the prompt but not chosen'. Use attn_implementation: flex_attention "
            "(GPU), sdpa or eager, or layout: packed with flash attention."
        )
    template = d.chat_template
    if template is not None and template not in CHAT_TEMPLATES and not Path(template).expanduser().is_file():
        p.append(
            f"chat_template={template!r} is not one of {list(CHAT_TEMPLATES)} nor an existing .jinja file"
        )
    e = cfg.export
    if e.push_to_hub and not e.hub_model_id:
        p.append("push_to_hub: true needs hub_model_id: <owner>/<name> (the Hub repository to upload to)")
    if e.hub_model_id and e.hub_model_id.count("/") != 1:
        p.append(f"hub_model_id={e.hub_model_id!r} must be <owner>/<name>")
    p += sequence_parallel_problems(cfg)
    not_finite = _not_finite(cfg)
    flagged = tuple(f"{problem.split('=')[0]}=" for problem in not_finite)
    return not_finite + [problem for problem in p if not problem.startswith(flagged)]


def _not_finite(cfg: Config) -> list[str]:
    """Every float setting must be a finite number, in float32 too: `lr: inf`, `beta: nan` or `beta: 1e39`
    (inf once the loss is computed in float32) would train NaN into a model."""
    return [
        f"{f.name}={value} must be a finite number"
        + (" (float32 holds up to 3.4e38)" if math.isfinite(value) else "")
        for section in dataclasses.fields(cfg)
        for f in dataclasses.fields(getattr(cfg, section.name))
        if isinstance(value := getattr(getattr(cfg, section.name), f.name), float)
        and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX)
    ]


# attention kernels DeepSpeed's Ulysses attention runs on (eager materialises a full 4D mask; flex is refused
# by accelerate's sequence-parallel config)
SEQUENCE_PARALLEL_ATTENTION = ("sdpa", *FLASH_ATTENTION)


def sequence_parallel_problems(cfg: Config) -> list[str]:
    sp, attn = cfg.train.sequence_parallel_size, cfg.model.attn_implementation
    if sp <= 1:
        return []
    p = []
    if cfg.orpo.layout == "shared_prefix":
        p.append(
            f"layout=shared_prefix with sequence_parallel_size={sp}: its 'rejected sees the prompt but not "
            "chosen' mask cannot follow a row split across ranks. Use layout: padded (or packed)."
        )
    if attn is not None and attn not in SEQUENCE_PARALLEL_ATTENTION:
        p.append(
            f"attn_implementation={attn} with sequence_parallel_size={sp}: sequence parallelism runs on "
            f"{', '.join(SEQUENCE_PARALLEL_ATTENTION)}. Use sdpa (the default under sequence parallelism)."
        )
    return p


def invalid(found: list[str]) -> ConfigError:
    """The one "invalid config" error: every problem on its own line (cli.one_line joins them)."""
    return ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in found))


def validate(cfg: Config) -> None:
    """Raise one ConfigError listing every problem, each with its value and the fix."""
    found = problems(cfg)
    if found:
        raise invalid(found)
