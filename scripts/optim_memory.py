"""Optimizer-state memory of each `optim` for an 8B QLoRA run (Llama-3.1-8B shapes, LoRA r=16 on all
linear layers), COMPUTED on CPU: the trainable LoRA shapes come from PEFT on a meta-device model (no
weights), and each optimizer's state bytes are measured by running one real step of that optimizer on one
decoder layer's LoRA matrices, then multiplied by the number of layers.

    python scripts/optim_memory.py            # prints docs/one-gpu.md's optimizer table

Paged optimizers keep the same bytes, in CUDA unified memory that is paged out to CPU RAM when the GPU
runs short (bitsandbytes falls back to ordinary tensors on CPU, so the sizes here are the same).
"""

from __future__ import annotations

import warnings

import torch

from orpo_dist.config import OPTIMIZERS as NAMES
from orpo_dist.config import load_config
from orpo_dist.optim import build_optimizer

LLAMA_31_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
)  # fmt: skip


def lora_shapes(r: int = 16) -> tuple[list[torch.Size], int, int]:
    """(one layer's trainable shapes, layers, all trainable params) of the 8B model with LoRA on all-linear."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_31_8B)
    with init_empty_weights():
        model = get_peft_model(
            LlamaForCausalLM(config), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")
        )
    trainable = [(n, p.shape) for n, p in model.named_parameters() if p.requires_grad]
    layer0 = [shape for n, shape in trainable if ".layers.0." in n]
    return layer0, config.num_hidden_layers, sum(s.numel() for _, s in trainable)


def state_bytes(optim: str, shapes: list[torch.Size]) -> int:
    """Bytes of optimizer state after one real step over parameters of these shapes."""
    params = [torch.nn.Parameter(torch.randn(s) * 0.01) for s in shapes]
    module = torch.nn.ParameterList(params)
    cfg = load_config(None, {"optim": optim, "lr": 1e-4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: "paged optimizers are not supported on CPU"
        optimizer, _ = build_optimizer(cfg.train, module, total_steps=10)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        optimizer.step()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total


def main() -> None:
    shapes, layers, trainable = lora_shapes()
    per_layer = sum(s.numel() for s in shapes)
    print(
        f"8B QLoRA, r=16 all-linear: {trainable:,} trainable parameters ({per_layer:,} per layer x {layers})"
    )
    print("| optim | optimizer state (8B QLoRA, r=16) | bytes / trainable param | saved vs adamw_torch |")
    print("|---|---|---|---|")
    base = None
    for optim in NAMES:
        total = state_bytes(optim, shapes) * layers
        base = base or total
        print(
            f"| `{optim}` | {total / 2**20:,.0f} MiB | {total / trainable:.2f} | {(base - total) / 2**20:,.0f} MiB |"
        )


if __name__ == "__main__":
    main()
