"""Batch layouts: how a list of tokenised pairs becomes model inputs plus the positions the loss scores.

The batch contract. Every layout describes each scored position i the same way (loss.orpo_parts reads it):
  pos  [N]  flat index into the model's [rows * seq] hidden states of each position that predicts a
            token the loss needs
  tgt  [N]  the token it predicts
  seq  [N]  which sequence's completion that token belongs to (0..B-1 chosen, B..2B-1 rejected) or -1
            (a prompt token, scored only for the NLL)
  nll  [N]  whether it counts in the NLL term (chosen tokens; prompt too unless nll_scope=completion)
  pair [N]  its pair index; pair_weight [B] is 1 for real pairs, 0 for fillers (see loader.PairShards)
plus `ids` [B] (pair ids, for traces) and `num_tokens` (prompt+chosen + prompt+rejected tokens, the same
in every layout, so tokens/s means the same). So the loss is layout-agnostic, and a new layout only has
to fill these in, and say in `model_inputs` how the model must be called.

`padded`: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, right-padded to one length.

`packed` and `shared_prefix` put the whole micro-batch in one row, with no pad token at all.

`packed`: the 2B sequences (prompt+chosen for every pair, then prompt+rejected) concatenated, with
`position_ids` restarting at 0 for each and no `attention_mask`. transformers then treats the row as
packed sequences (`masking_utils.find_packed_sequence_indices`): sdpa / eager / flex get a block-diagonal
causal mask, flash_attention_2 gets varlen `cu_seqlens`. A sequence never sees another one.

`shared_prefix`: per pair one segment [prompt, chosen, rejected]. Rejected's position ids continue from
the end of the prompt (as if it followed the prompt directly), and it attends to the prompt and to
itself but not to chosen. No 2D mask can say that, so the collator emits `segment_ids` (the pair's
segment) and `branch_ids` (0 prompt, 1 chosen, 2 rejected), and `model_inputs` turns them into a 4D
mask for the model's attention (`shared_prefix_attention_mask`): a dense boolean mask for sdpa, an
additive one for eager, a FlexAttention `BlockMask` for flex_attention (GPU; blocks that are fully
masked are skipped). The first rejected token is predicted from the last prompt position, so `pos`
points there for it (the same position also predicts chosen's first token).

Sequence parallelism (`SequenceShard`): every rank of a sequence-parallel group collates the same pairs,
pads the row length to a multiple of the group size `sp`, and keeps its own 1/sp slice of every row
(`input_ids`, `position_ids`; no `attention_mask`: the attention gathers the whole row and masks by
`position_ids`, see `restart_causal_mask`) and only the scored positions that fall in it, re-indexed into
the slice. Pair fields stay whole; `pair_share` (1 on the group's first rank, 0 on the others) and
`num_tokens` make each pair count once in pair counts and metrics.

Attention cost: flash_attention_2 (packed) and flex_attention skip what the mask excludes; sdpa and
eager get a dense [T, T] mask over the whole row (T = the micro-batch's tokens), so their attention
work and mask memory grow with T^2. Fine for CPU-sized batches; on a GPU use flash / flex attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class PaddedCollator:
    pad_token_id: int
    nll_scope: str = "prompt_completion"
    pad_to_multiple_of: int = 8

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        num_pairs = len(examples)
        prompts = [ex["prompt_ids"] for ex in examples] * 2
        completions = [ex["chosen_ids"] for ex in examples] + [ex["rejected_ids"] for ex in examples]
        rows = [p + c for p, c in zip(prompts, completions)]
        width = max(map(len, rows))
        width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of

        input_ids = torch.full((2 * num_pairs, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((2 * num_pairs, width), dtype=torch.long)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[r, : len(row)] = 1

        # position t predicts token t+1; keep t where token t+1 is real and needed by the loss
        lengths = torch.tensor([len(r) for r in rows])
        prompt_lens = torch.tensor([len(p) for p in prompts])
        target_idx = torch.arange(1, width).expand(2 * num_pairs, -1)
        real = target_idx < lengths[:, None]
        is_completion = real & (target_idx >= prompt_lens[:, None])
        is_chosen = (torch.arange(2 * num_pairs) < num_pairs)[:, None]
        nll = is_chosen & (real if self.nll_scope == "prompt_completion" else is_completion)
        keep = is_completion | nll
        rows_idx, cols = keep.nonzero(as_tuple=True)
        seq = torch.where(is_completion[rows_idx, cols], rows_idx, -1)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pos": rows_idx * width + cols,
            "tgt": input_ids[rows_idx, cols + 1],
            "seq": seq,
            "nll": nll[rows_idx, cols],
            "pair": rows_idx % num_pairs,
            **_pair_fields(examples),
        }


PROMPT, CHOSEN, REJECTED = 0, 1, 2


class _Row:
    """One packed row being built: its tokens and position ids (plus any per-token id lists the layout
    needs), and the scored positions of the batch contract (see the module docstring)."""

    def __init__(self, nll_scope: str, *extra: str):
        self.completion_only = nll_scope == "completion"
        self.tokens: dict[str, list[int]] = {name: [] for name in ("input_ids", "position_ids", *extra)}
        self.scored: dict[str, list] = {name: [] for name in ("pos", "tgt", "seq", "nll", "pair")}

    def __len__(self) -> int:
        return len(self.tokens["input_ids"])

    def append(self, **per_token: list[int]) -> None:
        for name, values in per_token.items():
            self.tokens[name] += values

    def add_sequence(self, flat, tokens, prompt_len, seq, pair, chosen):
        """Sequence `tokens` whose token j sits at flat index `flat[j]`: position j predicts token j+1."""
        for j in range(len(tokens) - 1):
            is_completion = j + 1 >= prompt_len
            nll = chosen and (is_completion or not self.completion_only)
            if is_completion or nll:
                for name, value in zip(
                    self.scored, (flat[j], tokens[j + 1], seq if is_completion else -1, nll, pair)
                ):
                    self.scored[name].append(value)

    def tensors(self) -> dict[str, Tensor]:
        out = {name: torch.tensor([values], dtype=torch.long) for name, values in self.tokens.items()}
        out.update({name: torch.tensor(values, dtype=torch.long) for name, values in self.scored.items()})
        out["nll"] = out["nll"].bool()
        return out


def _pair_fields(examples: list[dict]) -> dict[str, Tensor]:
    prompt_len = [len(ex["prompt_ids"]) for ex in examples]
    completions = [len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in examples]
    return {
        "pair_weight": torch.tensor([float(ex.get("weight", 1.0)) for ex in examples]),
        "ids": torch.tensor([int(ex.get("id", -1)) for ex in examples]),
        # tokens of prompt+chosen and prompt+rejected, so tokens/s means the same in every layout
        # (shared_prefix runs fewer: each prompt once)
        "num_tokens": torch.tensor(sum(2 * p + c for p, c in zip(prompt_len, completions))),
    }


@dataclass
class PackedCollator:
    """All 2B sequences in one row, positions restarting per sequence; zero pad tokens."""

    pad_token_id: int  # unused (no padding); kept so every layout is built the same way
    nll_scope: str = "prompt_completion"

    def __call__(self, examples: list[dict]) -> dict[str, Tensor]:
        num_pairs = len(examples)
        row = _Row(self.nll_scope)
        for s in range(2 * num_pairs):
            ex = examples[s % num_pairs]
            chosen = s < num_pairs
            tokens = ex["prompt_ids"] + (ex["chosen_ids"] if chosen else ex["rejected_ids"])
            flat = range(len(row), len(row) + len(tokens))
            row.add_sequence(flat, tokens, len(ex["prompt_ids"]), s, s % num_pairs, chosen)
            row.append(input_ids=tokens, position_ids=list(range(len(tokens))))
        return {**row.tensors(), **_pair_fields(examples)}


@dataclass
class SharedPrefixCollator:
    """Per pair one segment [prompt, chosen, rejected]; each prompt runs through the model once."""

    pad_token_id: int  # unused (no padding)
    nll_scope: str = "prompt_completion"

    def __call__(self, examples: list[dict]) -> dict[str, Tensor]:
        num_pairs = len(examples)
        row = _Row(self.nll_scope, "segment_ids", "branch_ids")
        for k, ex in enumerate(examples):
            prompt, chosen, rejected = ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]
            p, c, r = len(prompt), len(chosen), len(rejected)
            o = len(row)
            # chosen = [prompt, chosen] laid out contiguously
            row.add_sequence(range(o, o + p + c), prompt + chosen, p, k, k, True)
            # rejected = [prompt, rejected]; its token j >= p sits after chosen, at o + c + j
            flat = [o + j + (c if j >= p else 0) for j in range(p + r)]
            row.add_sequence(flat, prompt + rejected, p, num_pairs + k, k, False)
            row.append(
                input_ids=prompt + chosen + rejected,
                position_ids=[*range(p + c), *range(p, p + r)],
                segment_ids=[k] * (p + c + r),
                branch_ids=[PROMPT] * p + [CHOSEN] * c + [REJECTED] * r,
            )
        return {**row.tensors(), **_pair_fields(examples)}


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


def shard_batch(batch: dict[str, Tensor], rank: int, size: int, pad_token_id: int) -> dict[str, Tensor]:
    """This rank's slice of a collated batch under sequence parallelism (see the module docstring).

    The row length is padded to a multiple of `size` with pad tokens whose position ids continue the row (so
    they extend its last sequence, which never attends to them); rank r keeps columns [r*L, (r+1)*L).
    """
    if "segment_ids" in batch:
        raise ValueError(
            "layout 'shared_prefix' cannot be split along the sequence; use 'padded' or 'packed'"
        )
    ids = batch["input_ids"]
    rows, width = ids.shape
    positions = batch.get("position_ids", torch.arange(width).expand(rows, width))
    extra = -width % size
    if extra:
        ids = torch.cat([ids, ids.new_full((rows, extra), pad_token_id)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, extra + 1)], dim=1)
    local = (width + extra) // size
    start = rank * local
    row, col = batch["pos"] // width, batch["pos"] % width
    mine = (col >= start) & (col < start + local)
    first = rank == 0
    return {
        "input_ids": ids[:, start : start + local].contiguous(),
        "position_ids": positions[:, start : start + local].contiguous(),
        "pos": row[mine] * local + col[mine] - start,
        **{k: batch[k][mine] for k in ("tgt", "seq", "nll", "pair")},
        "pair_weight": batch["pair_weight"],
        "ids": batch["ids"],
        "num_tokens": batch["num_tokens"] * first,
        "pair_share": torch.tensor(float(first)),
    }


@dataclass
class SequenceShard:
    """A layout's collator, then `shard_batch` for sequence-parallel rank `rank` of `size`."""

    collate: Callable[[list[dict]], dict[str, Tensor]]
    rank: int
    size: int

    def __call__(self, examples: list[dict]) -> dict[str, Tensor]:
        return shard_batch(self.collate(examples), self.rank, self.size, self.collate.pad_token_id)


def restart_causal_mask(position_ids: Tensor) -> Tensor | None:
    """Causal attention within each sequence of a row, sequences told apart by `position_ids` that do not
    continue (+1) from the previous token; None when every row holds one sequence (plain causal).

    Under sequence parallelism the attention sees the gathered, unsharded `position_ids` and no mask: this
    rebuilds what transformers builds for `packed` rows on sdpa (a dense [rows, 1, T, T] boolean mask).
    """
    restart = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not restart.any():
        return None
    segment = torch.cat([torch.zeros_like(position_ids[:, :1]), restart.long().cumsum(-1)], dim=-1)
    idx = torch.arange(position_ids.shape[-1], device=position_ids.device)
    same = segment[:, :, None] == segment[:, None, :]
    return (same & (idx[:, None] >= idx[None, :]))[:, None]


def make_collator(layout: str, pad_token_id: int, nll_scope: str, sp_rank: int = 0, sp_size: int = 1):
    """The layout's collator; with `sp_size` > 1 each batch is cut to sequence-parallel rank `sp_rank`'s slice."""
    collators = {"padded": PaddedCollator, "packed": PackedCollator, "shared_prefix": SharedPrefixCollator}
    if layout not in collators:
        raise ValueError(f"unknown layout {layout!r}; choose 'padded', 'packed' or 'shared_prefix'")
    collate = collators[layout](pad_token_id, nll_scope)
    return SequenceShard(collate, sp_rank, sp_size) if sp_size > 1 else collate


def model_inputs(batch: dict[str, Tensor], model: nn.Module) -> dict:
    """The keyword arguments the model is called with for `batch`: ids, positions, and the attention
    mask in the form the model's attention implementation takes (a 4D one for shared prefix)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "segment_ids" in batch:
        inputs["attention_mask"] = shared_prefix_attention_mask(model, batch)
    return inputs
