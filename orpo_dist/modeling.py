"""Loading the model to train: full, LoRA, QLoRA (bitsandbytes), or Unsloth's fast path.

The backend choice is made once, logged with its reason, and never silently changes what is
trained: asking for `unsloth` where it cannot run is an error; `auto` falls back to transformers.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from orpo_dist.builtin import BUILTIN_PREFIX, save_builtin_model
from orpo_dist.config import Config, SetupError
from orpo_dist.templates import set_chat_template

log = logging.getLogger("orpo_dist")

# Architectures Unsloth's FastLanguageModel patches (model_type in config.json).
UNSLOTH_ARCHS = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "cohere",
    "granite",
}


def resolve_model_path(cfg: Config) -> str:
    """A hub id, or an absolute local path: adapters record it as their base, so they load from any
    directory. `builtin:*` models are written once under output_dir (call on the main process first)."""
    name = cfg.model.model
    if name.startswith(BUILTIN_PREFIX):
        name = str(save_builtin_model(name, Path(cfg.train.output_dir) / "base_model", seed=cfg.train.seed))
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


def load_tokenizer(
    path: str, trust_remote_code: bool = False, chat_template: str | None = "tokenizer", say=log.info
) -> PreTrainedTokenizerBase:
    """The model's tokenizer (a pad token added if it has none) with the configured chat template."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:  # Llama-style tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token
    set_chat_template(tokenizer, chat_template, say)
    return tokenizer


def torch_dtype(cfg: Config) -> torch.dtype:
    """`auto`: bf16 base for LoRA/QLoRA on a bf16-capable GPU; otherwise fp32 master weights."""
    if cfg.model.dtype != "auto":
        return getattr(torch, cfg.model.dtype)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported() and cfg.peft.use_peft:
        return torch.bfloat16
    return torch.float32


def choose_backend(cfg: Config, num_processes: int, model_type: str | None) -> tuple[str, str]:
    """Return (backend, reason). Unsloth only with 1 process, CUDA, a supported arch, and PEFT."""
    blockers = []
    if importlib.util.find_spec("unsloth") is None:
        blockers.append("unsloth is not installed (pip install unsloth)")
    if num_processes > 1:
        blockers.append(f"{num_processes} processes (Unsloth is single-GPU only)")
    if not torch.cuda.is_available():
        blockers.append("no CUDA GPU")
    if model_type not in UNSLOTH_ARCHS:
        blockers.append(f"architecture {model_type!r} is not one Unsloth patches ({sorted(UNSLOTH_ARCHS)})")
    if not cfg.peft.use_peft:
        blockers.append("peft is off (the Unsloth path trains LoRA/QLoRA adapters)")
    if cfg.model.backend == "hf":
        return "hf", "backend: hf requested"
    if cfg.model.backend == "unsloth":
        if blockers:
            raise SetupError(
                "backend: unsloth cannot run here: " + "; ".join(blockers) + ". Use backend: auto or hf."
            )
        return "unsloth", "backend: unsloth requested"
    if blockers:
        return "hf", "auto: transformers + PEFT because " + "; ".join(blockers)
    return "unsloth", "auto: Unsloth is installed, 1 process, CUDA, supported architecture"


def fused_kernel_blockers(mode: str) -> list[str]:
    """Why Liger's kernels cannot run here; `fused_kernels: liger` with any is a ConfigError."""
    blockers = []
    if importlib.util.find_spec("liger_kernel") is None:
        blockers.append("liger-kernel is not installed (pip install liger-kernel)")
    if not torch.cuda.is_available():
        blockers.append("no CUDA GPU (Liger kernels are Triton)")
    if blockers and mode == "liger":
        raise SetupError(
            "fused_kernels: liger cannot run here: " + "; ".join(blockers) + ". Use auto or none."
        )
    return blockers


def apply_fused_kernels(model, mode: str, say=log.info) -> str:
    """Liger's Triton kernels for RoPE, RMSNorm and SwiGLU, patched into this model instance.

    Liger's fused linear-cross-entropy stays off: ORPO needs per-token log-probs at chosen positions,
    which logps.py computes in chunks. Returns what was applied ("liger" or "none").
    """
    if mode == "none":
        return "none"
    blockers = fused_kernel_blockers(mode)
    if blockers:
        say("fused kernels: none (" + "; ".join(blockers) + ")")
        return "none"
    from liger_kernel.transformers import _apply_liger_kernel_to_instance  # pragma: no cover - CUDA only

    _apply_liger_kernel_to_instance(  # pragma: no cover
        model=model,
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )
    say(f"fused kernels: liger (rope, rms_norm, swiglu) on {model.config.model_type}")  # pragma: no cover
    return "liger"  # pragma: no cover


def quantization_config(cfg: Config, distributed_sharded: bool):
    from transformers import BitsAndBytesConfig

    if cfg.peft.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = (
        torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.peft.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.peft.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=compute,
        # ZeRO-3 / FSDP flatten parameters of one dtype: store the 4-bit data in the compute dtype
        bnb_4bit_quant_storage=compute if distributed_sharded else torch.uint8,
    )


def load_model(
    cfg: Config, path: str, num_processes: int, device: torch.device, sharded: bool = False, say=log.info
):
    """Build the trainable model. `sharded`: ZeRO-3 or FSDP will shard the parameters."""
    from transformers import AutoConfig

    if cfg.model.tf32 is not None:  # transformers' `tf32`: TF32 matmuls and convolutions on Ampere+ GPUs
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.model.tf32
    model_type = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code).model_type
    backend, reason = choose_backend(cfg, num_processes, model_type)
    say(f"model backend: {backend} ({reason})")
    if backend == "unsloth":
        return _load_unsloth(cfg, path)

    kwargs = dict(dtype=torch_dtype(cfg), trust_remote_code=cfg.model.trust_remote_code, use_safetensors=True)
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if cfg.peft.quantization:
        if sharded and cfg.peft.quantization == "int8":  # preflight refuses it earlier; kept for API callers
            raise SetupError(
                "quantization: int8 cannot be sharded by ZeRO-3/FSDP; use int4 (QLoRA) or ZeRO-2/DDP."
            )
        kwargs["quantization_config"] = quantization_config(cfg, sharded)
        if not sharded:  # bnb quantises while loading onto the target device
            kwargs["device_map"] = {"": device.index if device.type == "cuda" else str(device)}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    apply_fused_kernels(model, cfg.model.fused_kernels, say)

    if cfg.peft.quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.model.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs(cfg),
        )
    elif cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(cfg))
    if cfg.peft.adapter_path:  # a saved adapter, trained further (or evaluated)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.peft.adapter_path, is_trainable=True)
    elif cfg.peft.use_peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**_lora_kwargs(cfg), task_type="CAUSAL_LM"))
    if cfg.model.disable_dropout:  # TRL's ORPOConfig default: after peft, so LoRA's dropout goes too
        disable_dropout(model)
    return model


def checkpointing_kwargs(cfg: Config) -> dict:
    return cfg.model.gradient_checkpointing_kwargs or {"use_reentrant": False}


def disable_dropout(model: torch.nn.Module) -> None:
    """Every `nn.Dropout` to p=0, as TRL's `disable_dropout_in_model`."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _numel(p: torch.nn.Parameter) -> int:
    """Elements of a parameter, also when ZeRO-3 has already partitioned it, or bitsandbytes packed it."""
    n = getattr(p, "ds_numel", None) or p.numel()
    return n * 2 if p.dtype == torch.uint8 and hasattr(p, "quant_state") else n  # 4-bit: two per byte


def describe_model(model) -> list[str]:
    """What was built, read back from the model itself: class, weights dtype, quantisation, attention,
    LoRA targets and trainable parameters (so `nf4` in the log means nf4 weights were really loaded)."""
    config = model.config
    base, adapter, quantized = Counter(), Counter(), Counter()
    for name, p in model.named_parameters():
        if hasattr(p, "quant_state") or p.dtype in (torch.uint8, torch.int8):
            continue
        (adapter if "lora_" in name else base)[str(p.dtype).removeprefix("torch.")] += _numel(p)
    for module in model.modules():
        weight = module._parameters.get("weight")  # its own, not a LoRA wrapper's view of its base layer
        if type(weight).__name__ == "Params4bit":
            quantized[f"4-bit {weight.quant_type}"] += 1
        elif type(weight).__name__ == "Int8Params":
            quantized["8-bit int8"] += 1
    dtype = "/".join(base) or "n/a"
    if adapter:
        dtype += f" (LoRA adapters {'/'.join(adapter)})"
    quant = ", ".join(f"{kind} in {n} linear layers" for kind, n in quantized.items()) or "none"
    qc = getattr(config, "quantization_config", None)
    if quantized and qc is not None and getattr(qc, "load_in_4bit", False):
        compute = str(qc.bnb_4bit_compute_dtype).removeprefix("torch.")
        quant += f" (bitsandbytes, double quantisation {qc.bnb_4bit_use_double_quant}, compute {compute})"
    arch = (config.architectures or [type(model).__name__])[0]
    lines = [
        f"built: {arch} ({config.model_type}); weights {dtype}; quantisation {quant}; "
        f"attention {getattr(config, '_attn_implementation', None) or 'default'}"
    ]
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    peft_config = getattr(model, "peft_config", {}).get("default")
    if peft_config is not None:
        targets = ", ".join(sorted({name.split(".")[-1] for name in peft_config.target_modules}))
        lines.append(
            f"LoRA r={peft_config.r} alpha={peft_config.lora_alpha} dropout={peft_config.lora_dropout} "
            f"on {targets}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
        )
    else:
        lines.append(f"full fine-tune: {trainable:,} trainable of {total:,} parameters")
    return lines


class _LogitTransform(torch.nn.Module):
    """The logit post-processing some architectures apply after lm_head (softcap, scale)."""

    def __init__(self, softcap: float | None, scale: float):
        super().__init__()
        self.softcap, self.scale = softcap, scale

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits * self.scale
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def output_head(model) -> torch.nn.Module:
    """lm_head plus whatever the model does to its logits after it, so our chunked log-probs equal
    the model's own: Gemma 2/3 soft-cap (`final_logit_softcapping`), Cohere multiplies by
    `logit_scale`, Granite divides by `logits_scaling`."""
    head = model.get_output_embeddings()
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = float(getattr(config, "logit_scale", None) or 1.0) / float(
        getattr(config, "logits_scaling", None) or 1.0
    )
    if softcap or scale != 1.0:
        return torch.nn.Sequential(head, _LogitTransform(softcap, scale))
    return head


def _lora_kwargs(cfg: Config) -> dict:
    targets = cfg.peft.target_modules
    return dict(
        r=cfg.peft.lora_r,
        lora_alpha=cfg.peft.lora_alpha,
        lora_dropout=cfg.peft.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        use_rslora=cfg.peft.use_rslora,
        use_dora=cfg.peft.use_dora,
        modules_to_save=[m.strip() for m in cfg.peft.modules_to_save.split(",")] if cfg.peft.modules_to_save else None,
    )


def _load_unsloth(cfg: Config, path: str):  # pragma: no cover - needs CUDA + unsloth (GPU machine)
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=path,
        max_seq_length=cfg.data.max_length,
        dtype=None if cfg.model.dtype == "auto" else getattr(torch, cfg.model.dtype),
        load_in_4bit=cfg.peft.quantization == "int4",
        load_in_8bit=cfg.peft.quantization == "int8",
        trust_remote_code=cfg.model.trust_remote_code,
    )
    kwargs = _lora_kwargs(cfg)
    if kwargs["target_modules"] == "all-linear":
        kwargs["target_modules"] = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    return FastLanguageModel.get_peft_model(
        model,
        **kwargs,
        use_gradient_checkpointing="unsloth" if cfg.model.gradient_checkpointing else False,
        random_state=cfg.train.seed,
    )
