"""Other tools' vocabulary: AutoTrain `LLMTrainingParams`, TRL / transformers, Axolotl and Unsloth names.

`ALIASES` renames a key to ours; `SWITCHES` are other tools' booleans that set one of our choices;
`VALUE_ALIASES` are other tools' spellings of one of our values; `OTHER_KEYS` are keys that are checked
or translated: each handler returns the (key, value) pairs to set, never sets anything itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orpo_dist.config.schema import ConfigError

Pairs = list[tuple[str, Any]]
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")

# Other tools' names -> ours.
ALIASES: dict[str, str] = {
    # AutoTrain LLMTrainingParams
    "project_name": "output_dir",
    "prompt_text_column": "prompt_column",
    "text_column": "chosen_column",
    "rejected_text_column": "rejected_column",
    "dpo_beta": "beta",
    "valid_split": "eval_data_path",
    "model_name_or_path": "model",
    "peft": "use_peft",
    "optimizer": "optim",
    "repo_id": "hub_model_id",
    # TRL / transformers TrainingArguments
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation",
    "learning_rate": "lr",
    "lr_scheduler_type": "scheduler",
    "resume_from_checkpoint": "resume",
    "dataset_name": "data_path",
    "dataset_train_split": "train_split",
    "dataset_test_split": "eval_data_path",
    # original ORPO code / Axolotl
    "alpha": "beta",
    "orpo_alpha": "beta",
    "lambda": "beta",
    "micro_batch_size": "batch_size",
    "num_epochs": "epochs",
    "dataset": "data_path",
    "val_set_size": "eval_split",
    "sequence_len": "max_length",
    "base_model": "model",
    "lr_scheduler": "scheduler",
    "wandb_name": "run_name",
    "torch_dtype": "dtype",
    "dataset_num_proc": "num_proc",
    "lora_modules_to_save": "modules_to_save",
    "eval_dataset": "eval_data_path",
    "lora_model_dir": "adapter_path",  # Axolotl
    # Axolotl
    "dataset_prepared_path": "cache_dir",
    "dataset_processes": "num_proc",
    # LLaMA-Factory
    "pref_beta": "beta",
    "cutoff_len": "max_length",
    "template": "chat_template",
    "preprocessing_num_workers": "num_proc",
    "val_size": "eval_split",
    # AutoTrain --config YAML (`data:` / `params:` sections)
    "path": "data_path",
    "block_size": "max_length",
    # Unsloth
    "max_seq_length": "max_length",
    "use_gradient_checkpointing": "gradient_checkpointing",
    # accelerate ParallelismConfig
    "sp_size": "sequence_parallel_size",
    # ours, by the section's name
    "export": "formats",
}
# Boolean switches from other tools that set one of our Literal fields.
SWITCHES = {
    "load_in_4bit": ("quantization", "int4"),
    "load_in_8bit": ("quantization", "int8"),
    "bf16": ("mixed_precision", "bf16"),
    "fp16": ("mixed_precision", "fp16"),
    "use_flash_attention_2": ("attn_implementation", "flash_attention_2"),  # AutoTrain
    "flash_attention": ("attn_implementation", "flash_attention_2"),  # Axolotl
    "lora_target_linear": ("target_modules", "all-linear"),  # Axolotl
    "sample_packing": (
        "layout",
        "packed",
    ),  # Axolotl: rows without pad tokens, each in its own attention block
    "padding_free": ("layout", "packed"),  # TRL
}
# Other tools' spellings of one of our values.
VALUE_ALIASES = {
    "optim": {"adamw_bnb_8bit": "adamw_8bit"},  # transformers' / Axolotl's older name
    "chat_template": {  # Axolotl, LLaMA-Factory and Unsloth spellings
        "tokenizer_default": "tokenizer",
        "default": "tokenizer",
        "llama-3": "llama3",
        "llama3.1": "llama-3.1",
        "llama31": "llama-3.1",
        "qwen2.5": "qwen-2.5",
        "qwen25": "qwen-2.5",
        "qwen": "qwen-2.5",
        "phi3": "phi-3",
        "phi": "phi-3",
    },  # fmt: skip
    "backend": {"local": "auto", "local-cli": "auto"},  # AutoTrain YAML `backend: local`: this machine
    "dtype": {
        "bf16": "bfloat16",
        "fp16": "float16",
        "fp32": "float32",
        "half": "float16",
        "float": "float32",
    },
}
# Other tools' keys that change nothing here: accepted, and named in one warning line with the reason.
IGNORED = {
    "remove_unused_columns": "rows are read by their column names; other columns are never passed on",
    "strict": "Axolotl's loader strictness; orpo_dist checks every key",
    "model_type": "the model class comes from the model's config.json",
    "tokenizer_type": "the tokenizer class comes from the model's tokenizer_config.json",
    "is_llama_derived_model": "the model class comes from the model's config.json",
    "pad_to_sequence_len": "padding is masked out of the loss; `layout` decides how pairs are padded",
    "padding": "padding is masked out of the loss (the side changes nothing)",
    "train_on_inputs": "ORPO's NLL term follows `nll_scope` (prompt_completion, as TRL/Axolotl's ORPO)",
    "local_rank": "set by the launcher",
    "debug": "Axolotl's debug dumps",
    "wandb_watch": "gradient histograms are not logged",
    "wandb_log_model": "models are not uploaded to wandb (push_to_hub uploads to the Hub)",
    "eval_table_size": "no generation table is logged",
    "eval_max_new_tokens": "no generation during evaluation",
    "plot_loss": "report.png is always written",
    "save_only_model": "checkpoints always hold what resume needs",
    "save_safetensors": "weights are always written as safetensors",
    "logging_dir": "tensorboard events go to <output_dir>",
    "do_eval": "evaluation follows eval_split / eval_data_path",
    "loss_watchdog_threshold": "training stops on a non-finite loss or grad norm instead",
    "loss_watchdog_patience": "training stops on a non-finite loss or grad norm instead",
    "xformers_attention": "attention follows attn_implementation (sdpa by default)",
    "lora_fan_in_fan_out": "peft sets it from the layer type",
    "add_eos_token": "completions always end with the eos token",
    "hf_use_auth_token": "the Hub token comes from HF_TOKEN / `hf auth login`",
    "model_ref": "ORPO has no reference model",
    "dataloader_pin_memory": "a loading-speed setting; orpo_dist's loader decides",
    "disable_tqdm": "the progress bar is off when stderr is not a terminal",
    "use_cpu": "the device comes from the launch (CPU when no GPU is visible: CUDA_VISIBLE_DEVICES=)",
    "label_pad_token_id": "padding is masked out of the loss",
    "padding_value": "padding is masked out of the loss",
    "ddp_find_unused_parameters": "DDP is built by the launch; every trainable parameter gets a gradient",
}
# Other tools' keys that would change training in a way orpo_dist cannot honour: refused when set
# (an empty value, `false` or `none` is accepted as "off" and warned about like IGNORED).
REFUSED = {
    "deepspeed": "DeepSpeed comes from the launch: accelerate launch --config_file configs/accelerate/zero3.yaml "
    "-m orpo_dist.train ...",
    "fsdp": "FSDP comes from the launch: accelerate launch --config_file configs/accelerate/fsdp2.yaml -m orpo_dist.train ...",
    "fsdp_config": "FSDP comes from the launch: accelerate launch --config_file configs/accelerate/fsdp2.yaml ...",
    "distributed_backend": "the strategy comes from the launch (accelerate launch --config_file configs/accelerate/X.yaml)",
    "early_stopping_patience": "there is no early stopping; set max_steps or epochs",
    "load_best_model_at_end": "final/ is the last step's model; pick a checkpoint by its eval metrics instead",
    "auto_find_batch_size": "the batch size is fixed (set batch_size); an OOM names the fix",
    "tokens": "adding tokens would grow the embeddings; add them to the tokenizer first",
    "neftune_noise_alpha": "NEFTune noise is not implemented",
    "wandb_entity": "the wandb entity comes from $WANDB_ENTITY; set it there",
    "dataloader_drop_last": "the ragged last step of an epoch is kept, weighted by its real pairs",
    "torch_compile": "torch.compile is not used",
    "generate_during_eval": "generation during evaluation is not implemented",
    "is_encoder_decoder": "orpo_dist trains decoder-only causal LMs",
    "model_init_kwargs": "use the keys dtype, attn_implementation, trust_remote_code, quantization",
    "do_predict": "orpo_dist has no prediction step",
    "packing": "SFT packing joins unrelated rows into one sequence; for pairs use layout: packed (no pad tokens)",
}


def as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in (*TRUE, "unsloth"):  # Unsloth: use_gradient_checkpointing="unsloth"
        return True
    if text in FALSE:
        return False
    raise ConfigError(f"{key}={value!r} is not a boolean (use true or false)")


def _only_orpo(value: Any, key: str) -> Pairs:
    """AutoTrain `--trainer` / Axolotl `rl`: accepted when it is `orpo` (the only thing orpo_dist trains)."""
    if str(value).lower() != "orpo":
        raise ConfigError(f"{key}={value!r}: orpo_dist trains ORPO only; use {key}: orpo (or leave it out)")
    return []


def _train_flag(value: Any, key: str) -> Pairs:
    """AutoTrain's `--train` (what `python -m orpo_dist.train` always does): accepted, nothing to set."""
    as_bool(value, key)
    return []


def _adapter(value: Any, key: str) -> Pairs:
    """Axolotl: `lora` sets peft: true; `qlora` sets peft: true and quantization: int4."""
    text = str(value).lower() if value is not None else ""
    if text not in ("lora", "qlora", "", "none", "null"):
        raise ConfigError(f"{key}={value!r} must be lora or qlora (or leave it out for a full fine-tune)")
    return [("use_peft", True)] * (text in ("lora", "qlora")) + [("quantization", "int4")] * (text == "qlora")


DATASET_ENTRY = ("path", "split", "name", "prompt_column", "chosen_column", "rejected_column", "max_samples")


def _datasets(value: Any, key: str) -> Pairs:
    """Axolotl / TRL `datasets:` list of `{path, split, name, type, *_column, max_samples}` (`type` is ignored:
    the format is detected); one entry sets data_path, several are mixed (`sources`)."""
    entries = value if isinstance(value, list) else [value]
    if all(not isinstance(e, dict) for e in entries):
        return [("data_path", ",".join(map(str, entries)))]
    kept = []
    for i, entry in enumerate(entries):
        entry = entry if isinstance(entry, dict) else {"path": entry}
        unknown = sorted(set(entry) - {*DATASET_ENTRY, "type"})
        if "path" not in entry or unknown:
            raise ConfigError(
                f"{key}[{i}]={entry!r}: an entry takes path (a file, directory or hub dataset), split, name, "
                "prompt_column / chosen_column / rejected_column, max_samples and type (ignored: the format is "
                f"detected from the rows){'; not ' + ', '.join(unknown) if unknown else ''}"
            )
        kept.append({k: v for k, v in entry.items() if k != "type"})
    if len(kept) == 1 and set(kept[0]) <= {"path", "split"}:
        return [("data_path", kept[0]["path"])] + (
            [("train_split", kept[0]["split"])] if kept[0].get("split") else []
        )
    return [("sources", kept), ("data_path", ",".join(str(e["path"]) for e in kept))]


def _refuse_token(value: Any, key: str) -> Pairs:
    """AutoTrain `--token`: refused; a secret on the command line ends up in shell history and logs
    (AutoTrain YAML's `token: ${HF_TOKEN}` is accepted: the token comes from the environment)."""
    if isinstance(value, str) and value.strip().startswith("${"):
        return []
    raise ConfigError(
        f"--{key}: orpo_dist takes no secrets as options (they would land in shell history and logs); "
        "set HF_TOKEN in the environment or run `hf auth login`"
    )


def _report_to(value: Any, key: str) -> Pairs:
    """TRL `report_to`: `none`, a tracker, `[]`, `[wandb]`, or `all` (the one installed tracker)."""
    names = value if isinstance(value, list) else [v.strip() for v in str(value or "none").split(",")]
    names = [str(n).lower() for n in names if str(n).lower() not in ("none", "")]
    if names == ["all"]:
        import importlib.util

        names = [n for n in ("wandb", "tensorboard") if importlib.util.find_spec(n) is not None]
        if not names:
            return [("log", "none")]
    if len(names) > 1:
        raise ConfigError(
            f"{key}={value!r}: orpo_dist logs to one tracker ({', '.join(names)} given); name one: "
            "report_to: wandb or report_to: tensorboard (metrics.jsonl is always written)"
        )
    return [("log", names[0] if names else "none")]


def _use_liger(value: Any, key: str) -> Pairs:
    """TRL `use_liger_kernel`: true uses Liger's kernels (fused_kernels: liger), false none."""
    return [("fused_kernels", "liger" if as_bool(value, key) else "none")]


def _min_lr(value: Any, key: str) -> Pairs:
    """Axolotl `cosine_min_lr_ratio`: the cosine schedule ends at this fraction of lr (cosine_with_min_lr)."""
    return [("scheduler", "cosine_with_min_lr"), ("lr_scheduler_kwargs", {"min_lr_rate": float(value)})]


def _target_modules(value: Any, key: str) -> Pairs:
    """A list of module names (Axolotl `lora_target_modules`, LLaMA-Factory `lora_target`; `all`: all-linear)."""
    names = value if isinstance(value, list) else [v.strip() for v in str(value).split(",") if v.strip()]
    if not names:
        return []
    joined = "all-linear" if names in (["all"], ["all-linear"]) else ",".join(map(str, names))
    return (
        [(IF_UNSET + "target_modules", joined)]
        if key == "lora_target_modules"
        else [("target_modules", joined)]
    )


def _column_mapping(value: Any, key: str) -> Pairs:
    """AutoTrain YAML `data.column_mapping`: {prompt_text_column, text_column, rejected_text_column}."""
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r} must map prompt_text_column / text_column / rejected_text_column")
    return list(value.items())


def _task(value: Any, key: str) -> Pairs:
    """AutoTrain YAML `task`: `llm-orpo` (or `llm` with `trainer: orpo`)."""
    if str(value).lower() not in ("llm-orpo", "llm"):
        raise ConfigError(f"{key}={value!r}: orpo_dist trains ORPO only; use task: llm-orpo")
    return []


def _stage(value: Any, key: str) -> Pairs:
    """LLaMA-Factory `stage`: `dpo` (with `pref_loss: orpo`) or `orpo`."""
    if str(value).lower() not in ("dpo", "orpo"):
        raise ConfigError(f"{key}={value!r}: orpo_dist trains ORPO only; use stage: dpo with pref_loss: orpo")
    return []


def _pref_loss(value: Any, key: str) -> Pairs:
    """LLaMA-Factory `pref_loss: orpo`; its ORPO takes the NLL over the completion (nll_scope: completion)."""
    if str(value).lower() != "orpo":
        raise ConfigError(f"{key}={value!r}: orpo_dist trains ORPO only; use pref_loss: orpo")
    return [(IF_UNSET + "nll_scope", "completion")]


def _finetuning_type(value: Any, key: str) -> Pairs:
    """LLaMA-Factory `finetuning_type`: `lora` (peft: true) or `full`; `freeze` is refused."""
    text = str(value).lower()
    if text not in ("lora", "full"):
        raise ConfigError(f"{key}={value!r}: use lora or full (freezing layers is not supported)")
    return [("use_peft", text == "lora")]


def _lf_lora_rank(value: Any, key: str) -> Pairs:
    """LLaMA-Factory `lora_rank`: lora_r, and lora_alpha = 2 x rank unless lora_alpha is set (its default)."""
    return [("lora_r", value), (IF_UNSET + "lora_alpha", int(float(value)) * 2)]


def _merge_adapter(value: Any, key: str) -> Pairs:
    """AutoTrain `merge_adapter: true`: write the merged 16-bit model at the end (export: [merged_16bit])."""
    return [("formats", ["merged_16bit"])] if as_bool(value, key) else []


def _unsloth(value: Any, key: str) -> Pairs:
    """AutoTrain `unsloth`: true asks for the Unsloth backend (backend: unsloth), false for transformers."""
    return [("backend", "unsloth" if as_bool(value, key) else "hf")]


def _no_gradient_checkpointing(value: Any, key: str) -> Pairs:
    """AutoTrain `disable_gradient_checkpointing`: the inverse of gradient_checkpointing."""
    return [("gradient_checkpointing", not as_bool(value, key))]


def _model_max_length(value: Any, key: str) -> Pairs:
    """AutoTrain `model_max_length`: max_length unless block_size / max_length is set."""
    return [(IF_UNSET + "max_length", value)]


def _truncation_mode(value: Any, key: str) -> Pairs:
    """TRL `truncation_mode`: `keep_end` (long prompts keep their last tokens) is what orpo_dist does."""
    if str(value).lower() != "keep_end":
        raise ConfigError(
            f"{key}={value!r} cannot be honoured: long prompts keep their last tokens (keep_end)"
        )
    return []


def _do_train(value: Any, key: str) -> Pairs:
    """LLaMA-Factory `do_train`: must be true (orpo_dist trains; use --eval_only to only evaluate)."""
    if not as_bool(value, key):
        raise ConfigError(f"{key}=false: orpo_dist trains; remove it")
    return []


def _llamafactory_datasets(seen: dict[str, Any]) -> tuple[Pairs, list[str]]:
    """LLaMA-Factory `dataset: name1,name2` resolved through `<dataset_dir>/dataset_info.json` (default `data`):
    a ranking dataset in alpaca format becomes a source with its file and columns."""
    directory = Path(str(seen.get("dataset_dir") or "data"))
    info_file = directory / "dataset_info.json"
    names = [n.strip() for n in str(seen.get("data_path") or "").split(",") if n.strip()]
    if not names or not info_file.is_file() or "sources" in seen:
        return [], []
    import json

    info = json.loads(info_file.read_text())
    if not any(n in info for n in names):
        return [], []
    sources, problems = [], []
    for name in names:
        entry = info.get(name)
        if entry is None:
            sources.append({"path": name})  # a path or hub dataset beside the named ones
            continue
        columns = entry.get("columns", {})
        if not entry.get("ranking") or entry.get("formatting", "alpaca") != "alpaca" or "query" in columns:
            problems.append(
                f"dataset={name}: {info_file} describes it as {entry.get('formatting', 'alpaca')}"
                f"{'' if entry.get('ranking') else ', not ranking'}{' with a query column' if 'query' in columns else ''};"
                " orpo_dist reads preference pairs with prompt / chosen / rejected columns (text or role/content"
                " messages): point data_path at such a file"
            )
            continue
        path = entry.get("file_name") or entry.get("hf_hub_url")
        sources.append({"path": str(directory / path) if entry.get("file_name") else path,
                        "prompt_column": columns.get("prompt", "instruction"),
                        "chosen_column": columns.get("chosen", "chosen"),
                        "rejected_column": columns.get("rejected", "rejected")})  # fmt: skip
    if problems or not sources:
        return [], problems
    return [("sources", sources), ("data_path", ",".join(str(s["path"]) for s in sources))], problems


def _dataset_dir(value: Any, key: str) -> Pairs:
    """LLaMA-Factory `dataset_dir`: where `dataset: name` is looked up in dataset_info.json (default `data`)."""
    return []


def _username(value: Any, key: str) -> Pairs:
    """AutoTrain YAML `hub.username`: with project_name, the Hub repository <username>/<project_name>."""
    return []


IF_UNSET = "if_unset:"  # a handler's pair that applies only when the user sets that key nowhere
# Other tools' keys that are checked or translated, not stored: key -> (handler, is a boolean flag).
OTHER_KEYS: dict[str, tuple[Callable[[Any, str], Pairs], bool]] = {
    "trainer": (_only_orpo, False),
    "rl": (_only_orpo, False),
    "train": (_train_flag, True),
    "adapter": (_adapter, False),
    "datasets": (_datasets, False),
    "token": (_refuse_token, False),
    "report_to": (_report_to, False),
    "use_liger_kernel": (_use_liger, True),
    "cosine_min_lr_ratio": (_min_lr, False),
    "lora_target_modules": (_target_modules, False),
    "lora_target": (_target_modules, False),
    "column_mapping": (_column_mapping, False),
    "task": (_task, False),
    "stage": (_stage, False),
    "pref_loss": (_pref_loss, False),
    "finetuning_type": (_finetuning_type, False),
    "lora_rank": (_lf_lora_rank, False),
    "merge_adapter": (_merge_adapter, True),
    "unsloth": (_unsloth, True),
    "disable_gradient_checkpointing": (_no_gradient_checkpointing, True),
    "model_max_length": (_model_max_length, False),
    "do_train": (_do_train, True),
    "username": (_username, False),
    "dataset_dir": (_dataset_dir, False),
    "truncation_mode": (_truncation_mode, False),
}
# AutoTrain's `--config` YAML nests keys under these (beside `data:`, which is our section's name too).
FOREIGN_SECTIONS = ("params", "hub")


def combined(seen: dict[str, Any]) -> tuple[Pairs, list[str]]:
    """What keys mean together: LLaMA-Factory's `stage: dpo` alone trains DPO; AutoTrain's `hub.username`
    with `project_name` names the Hub repository (`${HF_USERNAME}` read from the environment)."""
    pairs, problems = [], []
    if str(seen.get("stage", "")).lower() == "dpo" and "pref_loss" not in seen:
        problems.append("stage=dpo without pref_loss trains DPO in LLaMA-Factory; add pref_loss: orpo")
    lf_pairs, lf_problems = _llamafactory_datasets(seen)
    pairs += lf_pairs
    problems += lf_problems
    user = seen.get("username")
    if user and "hub_model_id" not in seen and "output_dir" in seen:
        user = os.path.expandvars(str(user))
        if "$" in user:
            problems.append(
                f"username={seen['username']!r}: set that variable, or hub_model_id: <owner>/<name>"
            )
        else:
            pairs.append(("hub_model_id", f"{user}/{Path(str(seen['output_dir'])).name}"))
    return pairs, problems
