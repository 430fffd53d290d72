"""Model FLOPs utilisation (`mfu`): the FLOPs model, and the GPUs' peaks (shared with bench/orpo_bench.py).

Training FLOPs per token = 2·N (forward) + 2·N (backward: gradients of the activations) + 2·N_trainable
(backward: gradients of the weights), where N counts the weights that take part in matmuls (every Linear
and Conv1D weight: attention and MLP projections and the output head; not the embedding lookup, which is
a gather). So a full fine-tune costs 6·N per token and LoRA / QLoRA about 4·N (the frozen base gets no
weight gradients; the small adapters count 6× their size). Not counted: attention's own matmuls (QKᵀ and
AV, about 12 · layers · hidden · context tokens per token for forward + backward: small next to 6·N
below a few thousand tokens, so `mfu` reads slightly low for long sequences), and the forward that
gradient checkpointing recomputes (MFU, not hardware FLOPs utilisation). Tokens are those of
`tokens_per_second` (prompt + chosen and prompt + rejected, no padding): a layout that skips work, such
as `shared_prefix` running each prompt once, is credited with the FLOPs of both full sequences.

    mfu = tokens_per_second · flops_per_token / (peak FLOP/s of one GPU · number of GPUs)

The peak is the dense bf16 tensor-core figure of the GPU, looked up by its name, or `peak_tflops`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Dense bf16 TFLOP/s by a substring of torch.cuda.get_device_name(); the most specific name first.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "H200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
}


def peak_tflops_for(device_name: str, override: float | None = None) -> float | None:
    """`override` if given, else the table's entry for the device name; None if unknown."""
    if override:
        return override
    return next((tflops for name, tflops in PEAK_BF16_TFLOPS.items() if name in device_name), None)


def flops_per_token(model: nn.Module) -> float:
    """Training FLOPs per token: 6 per trainable matmul weight, 4 per frozen one (see the module docstring)."""
    from transformers.pytorch_utils import Conv1D

    total = 0.0
    for module in model.modules():
        if isinstance(module, nn.Linear):  # bitsandbytes' 4/8-bit layers are Linear subclasses
            weights = module.in_features * module.out_features  # not weight.numel(): packed or sharded
        elif isinstance(module, Conv1D):
            weights = module.nx * module.nf
        else:
            continue
        total += (6 if module.weight.requires_grad else 4) * weights
    return total


@dataclass
class FlopsModel:
    flops_per_token: float
    peak_tflops: float  # of one device

    def mfu(self, tokens_per_second: float, devices: int) -> float:
        return tokens_per_second * self.flops_per_token / (self.peak_tflops * 1e12 * devices)


def flops_model(model: nn.Module, device: torch.device, peak_tflops: float | None, say) -> FlopsModel | None:
    """The MFU inputs on a CUDA device with a known peak; None on CPU, or for an unknown GPU (said once)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops_for(name, peak_tflops)
    if peak is None:
        say(f"mfu: not logged: no peak known for {name!r}; set peak_tflops (dense bf16 TFLOP/s of one GPU)")
        return None
    return FlopsModel(flops_per_token(model), peak)
