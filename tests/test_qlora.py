"""QLoRA / LoRA on CPU (bitsandbytes 0.50 runs nf4 on CPU) and the backend choice."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_run

import orpo_dist
from orpo_dist.config import load_config
from orpo_dist.modeling import choose_backend, load_model, quantization_config


def test_qlora_int4_trains_on_cpu_and_saves_an_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tiny_run(
        tmp_path, max_samples=64, max_steps=4, eval_split=0.25, save_steps=2, peft=True, quantization="int4"
    )
    result = orpo_dist.train(run)
    losses = [r["loss"] for r in result.metrics if "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    final = result.final_dir
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    # the adapter loads on the 16-bit base and is not a no-op (LoRA B starts at zero)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base_model")
    model = PeftModel.from_pretrained(base, final)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and max(p.abs().max().item() for p in lora_b) > 0
    # a resumable checkpoint stores the adapter and optimizer, not the 4-bit base
    from safetensors.torch import load_file

    state = load_file(tmp_path / "checkpoint-2" / "state" / "model.safetensors")
    assert state and all("lora_" in k for k in state), sorted(state)[:5]


def test_int4_model_has_4bit_linears_and_kbit_prep(tiny_model_dir):
    import bitsandbytes as bnb

    cfg = load_config(None, {"model": str(tiny_model_dir), "peft": True, "load_in_4bit": True})
    model = load_model(cfg, str(tiny_model_dir), num_processes=1, device=torch.device("cpu"))
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert four_bit[0].weight.quant_type == "nf4"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_quant_storage_matches_compute_dtype_when_sharded():
    cfg = load_config(None, {"peft": True, "quantization": "int4"})
    sharded = quantization_config(cfg, distributed_sharded=True)
    assert sharded.bnb_4bit_quant_storage == sharded.bnb_4bit_compute_dtype
    assert quantization_config(cfg, distributed_sharded=False).bnb_4bit_quant_storage == torch.uint8
    assert sharded.bnb_4bit_use_double_quant and sharded.bnb_4bit_quant_type == "nf4"


def test_int8_under_zero3_is_refused_with_a_reason(tiny_model_dir):
    cfg = load_config(None, {"peft": True, "quantization": "int8"})
    with pytest.raises(RuntimeError, match="int8 cannot be sharded"):
        load_model(cfg, str(tiny_model_dir), num_processes=2, device=torch.device("cpu"), sharded=True)


def test_unsloth_style_keys_map_to_ours():
    cfg = load_config(
        None,
        {
            "load_in_4bit": True,
            "max_seq_length": 2048,
            "use_gradient_checkpointing": "unsloth",
            "use_peft": True,
        },
    )
    assert cfg.peft.quantization == "int4" and cfg.data.max_length == 2048
    assert cfg.model.gradient_checkpointing is True and cfg.peft.use_peft is True


def test_backend_auto_falls_back_with_reasons_and_unsloth_request_is_refused():
    cfg = load_config(None, {"peft": True, "backend": "auto"})
    backend, reason = choose_backend(cfg, num_processes=2, model_type="llama")
    assert backend == "hf"
    assert "2 processes" in reason
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in reason
    forced = load_config(None, {"peft": True, "backend": "unsloth"})
    with pytest.raises(RuntimeError, match="backend: unsloth cannot run here"):
        choose_backend(forced, num_processes=2, model_type="llama")
    assert choose_backend(load_config(None, {"backend": "hf"}), 1, "llama") == ("hf", "backend: hf requested")


def test_multi_process_never_picks_unsloth(monkeypatch):
    """Even with unsloth importable and CUDA present, 2 processes keep the HF path."""
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config(None, {"peft": True})
    assert choose_backend(cfg, 1, "llama")[0] == "unsloth"
    assert choose_backend(cfg, 2, "llama")[0] == "hf"
    assert choose_backend(cfg, 1, "gpt2")[0] == "hf"


def test_fused_kernels_are_optional_and_explain_themselves(tiny_model_dir):
    from orpo_dist.modeling import apply_fused_kernels

    said: list[str] = []
    cfg = load_config(None, {"model": str(tiny_model_dir)})
    model = load_model(cfg, str(tiny_model_dir), num_processes=1, device=torch.device("cpu"), say=said.append)
    if not torch.cuda.is_available():
        assert any(s.startswith("fused kernels: none (") for s in said), said
        with pytest.raises(RuntimeError, match="fused_kernels: liger cannot run here"):
            apply_fused_kernels(model, "liger")
    assert apply_fused_kernels(model, "none") == "none"
