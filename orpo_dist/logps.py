"""Completion log-probs without materialising full logits, and the model forward that feeds them.

Log-probs are computed only at the positions the loss needs, `chunk_size` positions at a time: the
float32 `[positions, vocab]` logits exist for one chunk at a time in forward and backward, never for
the whole `[2*batch, seq, vocab]` tensor. A plain `nn.Linear` head goes through `LinearTokenLogps`, which
keeps only the per-row log-sum-exp and, in backward, recomputes each chunk's logits once and turns them
into the gradient in place (one matmul recomputed, no autograd graph over vocab-wide tensors). A frozen
head partitioned by DeepSpeed ZeRO-3 (LoRA runs) is gathered once per forward for the same kernel. An
FSDP2-sharded linear head is unsharded (accelerate's FSDP2 keeps it so after the forward) and uses the
kernel too: its weight's gradient goes to FSDP's unsharded parameter, which FSDP reduce-scatters at the
end of backward. (Called as a module under checkpointing, its FSDP hooks would run again inside
backward's recompute, which crashes.) Any other head (PEFT-wrapped, hooked, softcapped) is called as a
module under activation checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from orpo_dist.loss import OrpoParts, orpo_parts


def _chunk_logps(hidden: Tensor, targets: Tensor, lm_head: nn.Module) -> Tensor:
    logits = lm_head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class LinearTokenLogps(torch.autograd.Function):
    """log P(targets | hidden) through a linear head, chunked, with a hand-written backward.

    lp_i = z_i[t_i] - lse(z_i) with z = h W^T + b. With delta_i = softmax(z_i) - onehot(t_i) and an
    upstream gradient g_i:  d/dh_i = -g_i delta_i W,  d/dW = -sum_i g_i delta_i^T h_i,  d/db = -sum_i g_i delta_i.
    Forward keeps only `lse` [N]. Backward recomputes each chunk's logits into one reused buffer, turns
    them into delta in place, and applies g as a row scale on the [rows, H] side of each matmul. So the
    vocab-wide work is the matmuls plus two elementwise passes per chunk (autograd through `_chunk_logps`
    under checkpointing does several more, each allocating a fresh [rows, vocab] tensor).
    """

    @staticmethod
    def _buffer(hidden, weight, rows):
        """One float32 [rows, vocab] buffer reused by every chunk, when the matmul itself is float32
        (fresh vocab-wide allocations per chunk cost page faults on CPU); None otherwise."""
        autocast = torch.is_autocast_enabled(hidden.device.type)
        fp32 = hidden.dtype == weight.dtype == torch.float32 and not autocast
        return hidden.new_empty(rows, weight.shape[0], dtype=torch.float32) if fp32 else None

    @staticmethod
    def _logits(h, weight, bias, buffer):
        """Chunk logits in float32."""
        if buffer is not None:
            out = torch.mm(h, weight.t(), out=buffer[: h.shape[0]])
            return out if bias is None else out.add_(bias)
        return F.linear(h, weight, bias).float()

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        n = hidden.shape[0]
        lse = hidden.new_empty(n, dtype=torch.float32)
        target_logit = torch.empty_like(lse)
        buffer = LinearTokenLogps._buffer(hidden, weight, min(chunk_size, n))
        compute_dtype = hidden.dtype
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end]
            if torch.is_autocast_enabled(h.device.type):
                compute_dtype = torch.get_autocast_dtype(h.device.type)
            logits = LinearTokenLogps._logits(h, weight, bias, buffer)
            target_logit[start:end] = logits.gather(-1, targets[start:end, None]).squeeze(-1)
            row_max = logits.amax(-1, keepdim=True)
            lse[start:end] = logits.sub_(row_max).exp_().sum(-1).log_().add_(row_max.squeeze(-1))
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.compute_dtype = chunk_size, compute_dtype
        return target_logit - lse

    @staticmethod
    def backward(ctx, grad_lp):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dt, n = ctx.compute_dtype, hidden.shape[0]
        w, b = weight.to(dt), None if bias is None else bias.to(dt)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None  # accumulate in fp32
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        grad_lp = grad_lp.float()
        with torch.autocast(hidden.device.type, enabled=False):
            buffer = LinearTokenLogps._buffer(hidden.to(dt), w, min(ctx.chunk_size, n))
            for start in range(0, n, ctx.chunk_size):
                end = min(start + ctx.chunk_size, n)
                h, g, t = hidden[start:end].to(dt), grad_lp[start:end, None], targets[start:end, None]
                # delta = softmax - onehot(target) = -d lp / d logits, built in the recomputed logits
                delta = LinearTokenLogps._logits(h, w, b, buffer).sub_(lse[start:end, None]).exp_()
                delta = delta.scatter_add_(1, t, delta.new_full(t.shape, -1.0)).to(dt)
                if grad_hidden is not None:
                    grad_hidden[start:end] = (-g * (delta @ w).float()).to(hidden.dtype)
                if grad_weight is not None:
                    gh = (g * h.float()).to(dt)
                    if dt == torch.float32:  # in place: no [vocab, H] temporary per chunk
                        grad_weight.addmm_(delta.t(), gh, alpha=-1)
                    else:  # a bf16 / fp16 chunk product, accumulated in fp32 (as autocast's backward does)
                        grad_weight.sub_(delta.t() @ gh)
                if grad_bias is not None:
                    grad_bias.sub_((delta.t() @ g.to(dt)).squeeze(1))
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
        )


def _plain_linear(lm_head: nn.Module) -> bool:
    """A head whose weight we may use directly: not wrapped, sharded (ZeRO-3 / FSDP2) or hooked."""
    weight = getattr(lm_head, "weight", None)
    return (
        type(lm_head) is nn.Linear
        and type(weight) in (torch.Tensor, nn.Parameter)
        and weight.numel() > 0
        and not hasattr(weight, "ds_id")  # DeepSpeed ZeRO-3 partitioned parameter
        and not (lm_head._forward_hooks or lm_head._forward_pre_hooks)
    )


def _zero3_frozen_linear(lm_head: nn.Module) -> bool:
    params = list(lm_head.parameters())
    return (
        isinstance(lm_head, nn.Linear)
        and bool(params)
        and all(hasattr(p, "ds_id") for p in params)
        and not any(p.requires_grad for p in params)
    )


def _fsdp2_linear(lm_head: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(lm_head, FSDPModule) and isinstance(lm_head, nn.Linear)


def token_logps(
    hidden: Tensor, lm_head: nn.Module, targets: Tensor, chunk_size: int = 1024, fused: bool = True
) -> Tensor:
    """log P(targets[i] | hidden[i]) for `hidden` [N, H], in float32, `chunk_size` rows at a time.

    `fused=False` forces the generic path (module call under activation checkpointing).
    """
    if fused and hidden.shape[0] > 0 and _plain_linear(lm_head):
        return LinearTokenLogps.apply(hidden, lm_head.weight, lm_head.bias, targets, chunk_size)
    if fused and hidden.shape[0] > 0 and _fsdp2_linear(lm_head):
        lm_head.unshard()  # a no-op after the model's forward left it gathered
        return LinearTokenLogps.apply(hidden, lm_head.weight, lm_head.bias, targets, chunk_size)
    if hidden.shape[0] > 0 and _zero3_frozen_linear(lm_head):
        # LoRA under ZeRO-3: the frozen head is partitioned, and re-partitioned again before a checkpointed
        # recompute could use it in backward. Gather it once, keep a private copy for backward (no grad to it).
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(lm_head.parameters())):
            weight = lm_head.weight.detach().clone()
            bias = None if lm_head.bias is None else lm_head.bias.detach().clone()
        return LinearTokenLogps.apply(hidden, weight, bias, targets, chunk_size)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_logps, h, t, lm_head, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(h, t, lm_head))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def forward_parts(
    model: nn.Module,
    lm_head: nn.Module,
    inputs: dict,
    batch: dict[str, Tensor],
    chunk_size: int,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> OrpoParts:
    """One forward of the (possibly wrapped) model on `inputs` (layouts.model_inputs); log-probs only at
    the positions `batch` scores, combined into ORPO sums.

    The model is called through its wrapper (DDP / DeepSpeed / PEFT hooks must run) with
    `logits_to_keep=1`, so it projects one position to the vocabulary; we take the final hidden states
    and project just the positions the loss needs, in chunks.

    Under sequence parallelism `batch` is this rank's slice of the rows (its `pos` index the slice) and
    `reduce` sums per-sequence sums over the ranks of the slices (see loss.orpo_parts).
    """
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    states = out.hidden_states[-1].flatten(0, 1)
    parts = orpo_parts(token_logps(states[batch["pos"]], lm_head, batch["tgt"], chunk_size), batch, reduce)
    if reduce is not None:
        # (+0) a slice with no scored position must still run backward through the model: its attention
        # exchanges pair up with the other ranks' (a rank that skipped them would hang the group)
        parts.nll_sum = parts.nll_sum + states[:0].sum()
    return parts
