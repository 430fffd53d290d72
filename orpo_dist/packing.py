"""Padding-free batch layouts: no compute on pad tokens, and (shared prefix) each prompt run once.

Both fill collate.py's batch contract (`pos`, `tgt`, `seq`, `nll`, `pair`, ...), so the loss does not
know which layout it got. Both put the whole micro-batch in one row, with no pad token at all.

`packed`: the 2B sequences (prompt+chosen for every pair, then prompt+rejected) concatenated, with
`position_ids` restarting at 0 for each and no `attention_mask`. transformers then treats the row as
packed sequences (`masking_utils.find_packed_sequence_indices`): sdpa / eager / flex get a block-diagonal
causal mask, flash_attention_2 gets varlen `cu_seqlens`. A sequence never sees another one.

`shared_prefix`: per pair one segment [prompt, chosen, rejected]. Rejected's position ids continue from
the end of the prompt (as if it followed the prompt directly), and it attends to the prompt and to
itself but not to chosen. No 2D mask can say that, so the collator emits `segment_ids` (the pair's
segment) and `branch_ids` (0 prompt, 1 chosen, 2 rejected), and `forward_parts` turns them into a 4D
mask for the model's attention (`shared_prefix_attention_mask`): a dense boolean mask for sdpa, an
additive one for eager, a FlexAttention `BlockMask` for flex_attention (GPU; blocks that are fully
masked are skipped). The first rejected token is predicted from the last prompt position, so `pos`
points there for it (the same position also predicts chosen's first token).

Attention cost: flash_attention_2 (packed) and flex_attention skip what the mask excludes; sdpa and
eager get a dense [T, T] mask over the whole row (T = the micro-batch's tokens), so their attention
work and mask memory grow with T^2. Fine for CPU-sized batches; on a GPU use flash / flex attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

PROMPT, CHOSEN, REJECTED = 0, 1, 2


class _Scored:
    """Accumulates the scored positions of one batch (see collate.py for what each field means)."""

    def __init__(self, nll_scope: str):
        self.completion_only = nll_scope == "completion"
        self.pos: list[int] = []
        self.tgt: list[int] = []
        self.seq: list[int] = []
        self.nll: list[bool] = []
        self.pair: list[int] = []

    def add_sequence(self, flat, tokens, prompt_len, seq, pair, chosen):
        """Sequence `tokens` whose token j sits at flat index `flat[j]`: position j predicts token j+1."""
        for j in range(len(tokens) - 1):
            is_completion = j + 1 >= prompt_len
            nll = chosen and (is_completion or not self.completion_only)
            if is_completion or nll:
                self.pos.append(flat[j])
                self.tgt.append(tokens[j + 1])
                self.seq.append(seq if is_completion else -1)
                self.nll.append(nll)
                self.pair.append(pair)

    def tensors(self) -> dict[str, Tensor]:
        return {
            "pos": torch.tensor(self.pos, dtype=torch.long),
            "tgt": torch.tensor(self.tgt, dtype=torch.long),
            "seq": torch.tensor(self.seq, dtype=torch.long),
            "nll": torch.tensor(self.nll, dtype=torch.bool),
            "pair": torch.tensor(self.pair, dtype=torch.long),
        }


def _pair_fields(examples: list[dict]) -> dict[str, Tensor]:
    prompt_len = [len(ex["prompt_ids"]) for ex in examples]
    completions = [len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in examples]
    return {
        "pair_weight": torch.tensor([float(ex.get("weight", 1.0)) for ex in examples]),
        "ids": torch.tensor([int(ex.get("id", -1)) for ex in examples]),
        # tokens of prompt+chosen and prompt+rejected, as the padded layout counts them, so tokens/s
        # means the same in every layout (shared_prefix runs fewer: each prompt once)
        "num_tokens": torch.tensor(sum(2 * p + c for p, c in zip(prompt_len, completions))),
    }


@dataclass
class PackedCollator:
    """All 2B sequences in one row, positions restarting per sequence; zero pad tokens."""

    pad_token_id: int  # unused (no padding); kept so every layout is built the same way
    nll_scope: str = "prompt_completion"

    def __call__(self, examples: list[dict]) -> dict[str, Tensor]:
        num_pairs = len(examples)
        scored = _Scored(self.nll_scope)
        ids: list[int] = []
        positions: list[int] = []
        for s in range(2 * num_pairs):
            ex = examples[s % num_pairs]
            chosen = s < num_pairs
            tokens = ex["prompt_ids"] + (ex["chosen_ids"] if chosen else ex["rejected_ids"])
            start = len(ids)
            scored.add_sequence(
                range(start, start + len(tokens)), tokens, len(ex["prompt_ids"]), s, s % num_pairs, chosen
            )
            ids += tokens
            positions += range(len(tokens))
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            **scored.tensors(),
            **_pair_fields(examples),
        }


@dataclass
class SharedPrefixCollator:
    """Per pair one segment [prompt, chosen, rejected]; each prompt runs through the model once."""

    pad_token_id: int  # unused (no padding)
    nll_scope: str = "prompt_completion"

    def __call__(self, examples: list[dict]) -> dict[str, Tensor]:
        num_pairs = len(examples)
        scored = _Scored(self.nll_scope)
        ids: list[int] = []
        positions: list[int] = []
        segments: list[int] = []
        branches: list[int] = []
        for k, ex in enumerate(examples):
            prompt, chosen, rejected = ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]
            p, c, r = len(prompt), len(chosen), len(rejected)
            o = len(ids)
            # chosen = [prompt, chosen] laid out contiguously
            scored.add_sequence(range(o, o + p + c), prompt + chosen, p, k, k, True)
            # rejected = [prompt, rejected]; its token j >= p sits after chosen, at o + c + j
            flat = [o + j + (c if j >= p else 0) for j in range(p + r)]
            scored.add_sequence(flat, prompt + rejected, p, num_pairs + k, k, False)
            ids += prompt + chosen + rejected
            positions += [*range(p + c), *range(p, p + r)]
            segments += [k] * (p + c + r)
            branches += [PROMPT] * p + [CHOSEN] * c + [REJECTED] * r
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "segment_ids": torch.tensor([segments], dtype=torch.long),
            "branch_ids": torch.tensor([branches], dtype=torch.long),
            **scored.tensors(),
            **_pair_fields(examples),
        }


def _allowed(seg_q: Tensor, seg_k: Tensor, br_q: Tensor, br_k: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """Key k is visible to query q: same pair, causal, and a prompt key or one of q's own branch."""
    return (seg_q == seg_k) & (k <= q) & ((br_k == PROMPT) | (br_k == br_q))


def _model_config(model: nn.Module):
    while not hasattr(model, "config") and hasattr(model, "module"):  # DDP / DeepSpeed wrappers
        model = model.module
    return model.config


def shared_prefix_attention_mask(model: nn.Module, batch: dict[str, Tensor]):
    """The 4D mask for `batch`'s shared-prefix layout, in the form the model's attention takes.

    transformers passes a 4D mask (tensor or BlockMask) to the attention functions as it is.
    """
    seg, br = batch["segment_ids"], batch["branch_ids"]
    rows, length = seg.shape
    config = _model_config(model)
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q_idx, kv_idx):
            return _allowed(seg[b, q_idx], seg[b, kv_idx], br[b, q_idx], br[b, kv_idx], q_idx, kv_idx)

        return create_block_mask(mask_mod, rows, None, length, length, device=seg.device)
    if impl not in ("sdpa", "eager"):
        raise ValueError(
            f"layout 'shared_prefix' needs attn_implementation sdpa, eager or flex_attention, not {impl!r}: "
            "flash attention kernels cannot express 'rejected sees the prompt but not chosen'. "
            "Use flex_attention on GPU, or layout 'packed' with flash_attention_2."
        )
    idx = torch.arange(length, device=seg.device)
    sq, sk, bq, bk = seg[:, :, None], seg[:, None, :], br[:, :, None], br[:, None, :]
    allowed = _allowed(sq, sk, bq, bk, idx[:, None], idx[None, :])[:, None]  # [rows, 1, q, k]
    if impl == "sdpa":
        return allowed
    dtype = next(model.parameters()).dtype  # eager adds the mask to the attention scores
    additive = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    return additive.masked_fill_(~allowed, torch.finfo(dtype).min)
