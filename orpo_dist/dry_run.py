"""`--dry_run`: everything a run checks before training, and what it would train, without training.

The resolved config (as config.yaml would hold it), the start-up checks (output_dir, resume, launch),
the data (read, validated, tokenised and truncated: the counts and one rendered pair) and the model built
on the meta device (parameter counts and a memory estimate; no weight is read). Nothing is written to
output_dir except a built-in model's files.
"""

from __future__ import annotations

import logging

import torch
import yaml

from orpo_dist.config import Config

log = logging.getLogger("orpo_dist")
ADAM_BYTES = 4 + 4 + 4 + 4  # fp32 master / grad, and AdamW's two moments, per trainable parameter


def weight_bytes(cfg: Config) -> float:
    if cfg.peft.quantization == "int4":
        return 0.5
    if cfg.peft.quantization == "int8":
        return 1.0
    return {"bfloat16": 2.0, "float16": 2.0}.get(cfg.model.dtype, 2.0 if torch.cuda.is_available() else 4.0)


def dry_run(cfg: Config, say=print) -> dict:
    """Check and describe the run; returns the figures it printed (for tests)."""
    from orpo_dist.data import build_datasets
    from orpo_dist.modeling import load_tokenizer, resolve_model_path
    from orpo_dist.preflight import _meta_model, check_model, check_run, check_special_tokens
    from orpo_dist.templates import example_lines

    say("dry run: resolved config\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    check_run(cfg, 1, "NO")
    path = resolve_model_path(cfg)
    check_model(cfg, path, 1, False)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code, cfg.data.chat_template, say)
    check_special_tokens(cfg, tokenizer)
    train, _, report = build_datasets(cfg.data, tokenizer, cfg.train.seed)
    for line in report.lines() + example_lines(train, tokenizer, cfg.data.chat_template, report.format):
        say(line)
    model = _meta_model(cfg, path)
    figures = {"pairs": report.used_train, "eval_pairs": report.used_eval}
    if model is not None:
        total = sum(p.numel() for p in model.parameters())
        trainable = total
        if cfg.peft.use_peft:
            from peft import LoraConfig, get_peft_model

            from orpo_dist.modeling import _lora_kwargs

            peft_model = get_peft_model(model, LoraConfig(**_lora_kwargs(cfg), task_type="CAUSAL_LM"))
            trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        gib = (total * weight_bytes(cfg) + trainable * ADAM_BYTES) / 2**30
        figures.update(parameters=total, trainable=trainable, memory_gib=gib)
        say(f"model {path}: {total:,} parameters, {trainable:,} trainable; weights + gradients + AdamW state "
            f"~{f'{gib:.2f} GiB' if gib >= 0.1 else f'{gib * 1024:.1f} MiB'} per copy (activations extra: "
            "batch_size x max_length)")  # fmt: skip
    say("dry run: config, data and model checked; nothing trained (exit 0)")
    return figures
