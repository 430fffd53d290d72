"""The settings, as typed dataclasses: one section per part of the run, one docstring per key.

Every key (leaf) name is unique across sections, so a key can be written flat (`lr: 1e-4`) or under
its section (`train: {lr: 1e-4}`). A `Literal` type is the list of choices; `load.py` coerces values
to these types and `checks.py` validates combinations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

Layout = Literal["padded", "packed", "shared_prefix"]
Optim = Literal[
    "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor"
]
ExportFormat = Literal["merged_16bit", "gguf"]
GgufQuant = Literal["q4_k_m", "q8_0", "f16"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
GGUF_QUANTS: tuple[str, ...] = get_args(GgufQuant)
OPTIMIZERS: tuple[str, ...] = get_args(Optim)
# `chat_template` names (templates.py holds the templates); anything else must be a .jinja file
CHAT_TEMPLATES = (
    "tokenizer", "chatml", "zephyr", "llama3", "llama-3.1", "qwen-2.5", "gemma", "mistral", "phi-3", "alpaca",
    "vicuna", "none",
)  # fmt: skip


class ConfigError(ValueError):
    """Bad configuration: the message lists every problem with its value and the fix."""


class SetupError(ConfigError, RuntimeError):
    """A setting this machine or launch cannot honour (backend, kernels, process group), found at start-up:
    exit 2 like any ConfigError; also a RuntimeError, as these were before."""


@dataclass
class ModelConfig:
    model: str = "builtin:tiny"
    """HF hub id, a local directory, or `builtin:tiny` / `builtin:small` (made locally, no download)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype on load; `auto` = float32 on CPU, bf16 on GPUs that support it."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless you trust the repository."""
    attn_implementation: str | None = None
    """`sdpa`, `eager`, `flash_attention_2`, ... (None = transformers' default)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% slower."""
    backend: Literal["auto", "hf", "unsloth"] = "auto"
    """`auto` picks Unsloth only when it can run (1 process, CUDA, supported model); else transformers."""
    fused_kernels: Literal["auto", "liger", "none"] = "auto"
    """Liger's Triton kernels (RoPE, RMSNorm, SwiGLU): `auto` uses them on CUDA when installed; never required."""
    disable_dropout: bool = True
    """Set every dropout of the model (LoRA's too) to 0 before training, as TRL's ORPOConfig does by default."""
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    """Arguments of `gradient_checkpointing_enable` (None: `{use_reentrant: false}`)."""
    tf32: bool | None = None
    """Allow TF32 matmuls on Ampere+ GPUs (None: torch's default)."""
    special_tokens: dict[str, str] | None = None
    """Axolotl's `special_tokens` ({pad_token: ..., eos_token: ...}): accepted when each is already a token of
    the tokenizer (pad is masked out of the loss); a new token would grow the embeddings and is refused."""


@dataclass
class DataConfig:
    data_path: str = "builtin:case_rule"
    """JSONL/JSON/CSV/Parquet file, a directory holding train.jsonl|csv|parquet (AutoTrain), a `save_to_disk`
    directory, a hub dataset, or `builtin:case_rule`; several: a list, `a,b` or a glob (`data/*.jsonl`)."""
    sources: list[dict[str, Any]] = field(default_factory=list)
    """Several sources mixed in order, each `{path, split, name, prompt_column, chosen_column, rejected_column,
    max_samples}` (Axolotl / TRL `datasets:` lists); replaces data_path."""
    train_split: str = "train"
    """Split to read from a hub dataset, a DatasetDict directory, or a directory's `<split>.jsonl|csv|parquet`."""
    prompt_column: str = "prompt"
    """Column holding the prompt (absent: the implicit-prompt format, the shared prefix of chosen and rejected)."""
    chosen_column: str = "chosen"
    """Column holding the preferred completion (text, or a list of messages)."""
    rejected_column: str = "rejected"
    """Column holding the dispreferred completion (text, or a list of messages)."""
    chat_template: str | None = "tokenizer"
    """Template for conversational rows: `tokenizer` (its own), `chatml`, `zephyr`, `llama3`, `none` (plain
    text) or a .jinja file; saved with the tokenizer in every checkpoint, final/ and export."""
    max_length: int = 1024
    """Max tokens of prompt + completion; longer pairs are truncated (prompt first, then completions)."""
    max_prompt_length: int = 512
    """Prompts longer than this keep their last tokens (unset and >= max_length: half of max_length)."""
    max_completion_length: int | None = None
    """Completions longer than this keep their first tokens (None: only `max_length` applies)."""
    eval_split: float = 0.1
    """Fraction of pairs held out for evaluation (0 = no eval)."""
    eval_data_path: str | None = None
    """A separate evaluation file/dataset instead of a held-out fraction, or a split name of data_path (AutoTrain
    `--valid-split NAME`: NAME.jsonl|csv|parquet beside train.*)."""
    skip_invalid: bool = False
    """Drop (and count) malformed rows instead of stopping with an error."""
    max_samples: int | None = None
    """Use only the first N pairs (quick experiments)."""
    num_proc: int | Literal["auto"] = "auto"
    """Processes that validate and tokenise; `auto`: min(CPU cores, 8) above 5000 pairs, else 1."""
    cache_dir: str | None = None
    """Tokenised cache (None: `<output_dir>/data_cache`); node-local (`$TMPDIR/orpo_cache`): one build per node."""
    overwrite_cache: bool = False
    """Rebuild the tokenised cache even when one with the same fingerprint exists."""
    dataset_config: str | None = None
    """Configuration (subset) name of a hub dataset (TRL `dataset_config`; `load_dataset(path, name)`)."""


@dataclass
class OrpoConfig:
    beta: float = 0.1
    """Weight of the odds-ratio term (paper lambda; TRL `beta`; AutoTrain `dpo_beta`; Axolotl `orpo_alpha`)."""
    nll_scope: Literal["prompt_completion", "completion"] = "prompt_completion"
    """Tokens in the chosen NLL term: prompt + completion (paper, TRL) or completion only (LLaMA-Factory)."""
    logps_chunk_size: int = 1024
    """Token positions per chunk when computing log-probs; the vocab-wide logits exist for one chunk at a time."""
    layout: Layout = "padded"
    """Batch layout: `padded` (chosen and rejected padded to one length), `packed` (no pad tokens), or
    `shared_prefix` (no pad tokens, each prompt run once; needs sdpa, eager or flex_attention)."""


@dataclass
class PeftConfig:
    use_peft: bool = False
    """Train LoRA adapters instead of all weights."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch's input."""
    target_modules: str = "all-linear"
    """Comma-separated module names, or `all-linear`."""
    quantization: Literal["int4", "int8"] | None = None
    """Load the base in 4-bit (nf4, QLoRA) or 8-bit with bitsandbytes; needs `peft: true`."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of `quantization: int4`."""
    use_bnb_nested_quant: bool = True
    """Quantise the 4-bit quantisation constants too (double quantisation: ~0.4 bits/param less)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale the update by lora_alpha / sqrt(lora_r)."""
    use_dora: bool = False
    """DoRA: train a magnitude vector beside the LoRA direction."""
    modules_to_save: str | None = None
    """Comma-separated modules trained in full beside the adapters (e.g. `lm_head,embed_tokens`)."""
    adapter_path: str | None = None
    """A saved LoRA adapter loaded onto `model` and trained further, or evaluated (`model: <adapter dir>`
    sets both, from its adapter_config.json; Axolotl `lora_model_dir`)."""


@dataclass
class TrainConfig:
    output_dir: str = "outputs/orpo"
    """Where config.yaml, metrics.jsonl, checkpoints, final/, export/ and the report are written."""
    epochs: float = 1.0
    """Passes over the training pairs (fractions allowed)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run `epochs`; 0: evaluate only, as `eval_only`)."""
    eval_only: bool = False
    """Only evaluate the model (or `resume`'s checkpoint) on the held-out pairs; nothing is trained or saved."""
    dry_run: bool = False
    """Check config, data (counts, truncation, one rendered pair) and model (on the meta device: parameter
    counts, memory estimate), print the resolved config, and exit without training."""
    batch_size: int = 8
    """Pairs per device per micro-batch."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step (global batch = batch_size x this x world size)."""
    lr: float = 5e-5
    """Peak learning rate."""
    optim: Optim = "adamw_torch"
    """Optimizer, by its transformers name: torch AdamW (fused), bitsandbytes 8-bit / paged (CUDA) AdamW, Adafactor."""
    scheduler: Literal[
        "linear",
        "cosine",
        "cosine_with_restarts",
        "constant",
        "constant_with_warmup",
        "polynomial",
        "inverse_sqrt",
        "cosine_with_min_lr",
    ] = "linear"
    """Learning-rate schedule (transformers' `get_scheduler`)."""
    lr_scheduler_kwargs: dict[str, Any] | None = None
    """The schedule's own arguments, as transformers takes them: `num_cycles`, `min_lr` / `min_lr_rate`
    (cosine_with_min_lr), `power` (polynomial), ..."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent warming the learning rate up from 0."""
    warmup_steps: int | float | None = None
    """Warmup as transformers 5 takes it: an int >= 1 is a step count, a number in (0, 1) a fraction of
    the steps; overrides warmup_ratio when set."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the optimizer."""
    max_grad_norm: float = 1.0
    """Clip gradients to this norm (0 = no clipping)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """`auto`: what the accelerate launch config says (`no` without one); else forces this."""
    seed: int = 42
    """Seed of the data order, the eval split, LoRA init and dropout."""
    logging_steps: int = 10
    """Log metrics every N optimizer steps (and at the last step)."""
    logging_strategy: Literal["steps", "epoch", "no"] = "steps"
    """`steps`: every logging_steps; `epoch`: at each epoch's end; `no`: only the last step (the report's row)."""
    logging_first_step: bool = False
    """Also log the first optimizer step."""
    eval_steps: int | None = None
    """Evaluate every N optimizer steps (None: at the end of each epoch)."""
    eval_strategy: Literal["auto", "steps", "epoch", "no"] = "auto"
    """`auto`: every eval_steps if set, else each epoch; `steps`: every eval_steps (logging_steps if unset);
    `epoch`: each epoch's end; `no`: no evaluation during training."""
    evals_per_epoch: int | None = None
    """Evaluate this many times per epoch (Axolotl); sets the eval interval from the epoch's steps."""
    save_steps: int | None = 500
    """Checkpoint every N optimizer steps (None: only at the end)."""
    save_strategy: Literal["auto", "steps", "epoch", "no"] = "auto"
    """`auto` / `steps`: every save_steps; `epoch`: each epoch's end; `no`: no step checkpoints (final/ only)."""
    saves_per_epoch: int | None = None
    """Checkpoint this many times per epoch (Axolotl); sets the save interval from the epoch's steps."""
    save_total_limit: int | None = 2
    """Keep this many step checkpoints (None: keep all; at least 1)."""
    log: Literal["none", "wandb", "tensorboard"] = "none"
    """Tracker for the metrics (metrics.jsonl is always written); keys as TRL logs them (`train/loss`, ...)."""
    run_name: str | None = None
    """Tracker run name (wandb; None: wandb picks one)."""
    wandb_project: str | None = None
    """wandb project (None: $WANDB_PROJECT, else orpo_dist); the entity comes from $WANDB_ENTITY."""
    resume: str | None = None
    """`auto`: newest complete checkpoint in output_dir if any, else start fresh (use on SLURM);
    `latest` / `true`: that checkpoint, which must exist; or a checkpoint path."""
    eval_on_start: bool = True
    """Evaluate before the first step, so the log shows the starting held-out preference accuracy."""
    sample_prompts: int = 4
    """Held-out prompts (drawn once with the seed) whose greedy completions are generated at each eval, before
    training and at the end: samples.jsonl, the tracker (`eval/samples`) and report.md (0 = off)."""
    group_by_length: bool = False
    """Shard so ranks get similar token counts per step (fewer stragglers)."""
    eval_batch_size: int | None = None
    """Pairs per device per evaluation micro-batch (None: batch_size)."""
    dataloader_num_workers: int | Literal["auto"] = "auto"
    """Processes that collate the next micro-batches during the step; `auto`: 2 on CUDA, 0 on CPU."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one accelerator for `mfu` (None: from the GPU's name; bf16 dense)."""
    overwrite_output_dir: bool = False
    """Train into an output_dir that already holds a finished model (final/) or checkpoints, replacing them."""
    ddp_timeout: int = 1800
    """Seconds a collective waits for a silent (hung or lost) rank before the job fails (gloo and NCCL)."""
    sequence_parallel_size: int = 1
    """Split each row along the sequence over this many ranks (DeepSpeed Ulysses); world = data-parallel x this."""


@dataclass
class ExportConfig:
    formats: list[ExportFormat] = field(default_factory=list)
    """At the end of training: any of `merged_16bit`, `gguf` (key `export`)."""
    gguf_quant: GgufQuant = "q4_k_m"
    """GGUF quantisation type (llama.cpp)."""
    push_to_hub: bool = False
    """Upload the result to the Hugging Face Hub at the end (the export if any, else final/); needs a token."""
    hub_model_id: str | None = None
    """Hub repository for push_to_hub, `owner/name`."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    orpo: OrpoConfig = field(default_factory=OrpoConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (no secrets: no field holds one)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}
