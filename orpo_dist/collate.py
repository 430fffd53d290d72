"""Batch layout: how a list of tokenised pairs becomes model inputs plus the scored positions.

Every layout produces the same description of what the loss reads (see loss.orpo_parts):
  pos  [N]  flat index into the model's [rows * seq] hidden states of each position that predicts a
            token the loss needs
  tgt  [N]  the token it predicts
  seq  [N]  which sequence's completion that token belongs to (0..B-1 chosen, B..2B-1 rejected) or -1
            (a prompt token, scored only for the NLL)
  nll  [N]  whether it counts in the NLL term (chosen tokens; prompt too unless nll_scope=completion)
  pair [N]  its pair index; pair_weight [B] is 1 for real pairs, 0 for fillers (see distributed.py)
So the loss is layout-agnostic, and a new layout only has to fill these in.

`padded`: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, right-padded to one length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
            "pair_weight": torch.tensor([float(ex.get("weight", 1.0)) for ex in examples]),
            "ids": torch.tensor([int(ex.get("id", -1)) for ex in examples]),
            "num_tokens": attention_mask.sum(),
        }


def make_collator(layout: str, pad_token_id: int, nll_scope: str):
    if layout == "padded":
        return PaddedCollator(pad_token_id, nll_scope)
    if layout == "packed":
        from orpo_dist.packing import PackedCollator

        return PackedCollator(pad_token_id, nll_scope)
    if layout == "shared_prefix":
        from orpo_dist.packing import SharedPrefixCollator

        return SharedPrefixCollator(pad_token_id, nll_scope)
    raise ValueError(f"unknown layout {layout!r}; choose 'padded', 'packed' or 'shared_prefix'")
