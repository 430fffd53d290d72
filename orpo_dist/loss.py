"""The ORPO objective, as pure functions of tensors (Hong, Lee & Thorne 2024, arXiv 2403.07691).

    logp(y|x)  = mean over completion tokens of log P(token | prefix)
    log_odds   = (logp_w - logp_l) - (log1mexp(logp_w) - log1mexp(logp_l))
    L          = L_NLL + beta * mean(-logsigmoid(log_odds))

Everything here returns *sums* and *counts* rather than means, so the trainer can normalise by the
token and pair counts of the whole accumulated, all-rank batch: k micro-batches then give exactly the
gradient of one k-times-larger batch (a per-micro-batch mean would weight short batches too much).
The inputs are per-position log-probs (logps.py) and the batch contract (layouts.py); nothing here
knows about models, layouts or ranks.

Sequence parallelism: a rank scores only its slice of each sequence, so `orpo_parts` takes a `reduce` that
sums the per-sequence log-prob sums and token counts over the slices *before* the length normalisation and
the odds ratio (which is not linear: summing per-slice losses would be wrong). The NLL sums stay per slice
(their sum over ranks is exact), and `pair_share` keeps each pair counted once in pair counts and metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LN_HALF = -math.log(2.0)
# Per-pair metrics, named as TRL logs them (the dashboards users bring rely on these names).
PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "log_odds_ratio",
    "log_odds_chosen",
)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable in float32 on both sides of -ln 2 (Maechler 2012).

    Near 0, 1 - exp(x) cancels, so use log(-expm1(x)); far below, exp(x) is tiny, so log1p(-exp(x)).
    `torch.where` evaluates both branches, so each is fed only inputs where it is finite.
    """
    x = x.float().clamp(max=-1e-7)  # logp == 0 exactly (a certain completion) would give -inf
    near_zero = x > LN_HALF
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(torch.where(near_zero, x, LN_HALF))),
        torch.log1p(-torch.exp(torch.where(near_zero, LN_HALF, x))),
    )


def odds_ratio(chosen_logps: Tensor, rejected_logps: Tensor) -> tuple[Tensor, Tensor]:
    """Per pair: (-logsigmoid(log_odds), log_odds), in float32."""
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    return -F.logsigmoid(log_odds), log_odds


def orpo_loss(nll_sum, nll_tokens, or_sum, pairs, beta: float):
    """The objective from its sums: L_NLL + beta * L_OR = nll_sum / nll_tokens + beta * or_sum / pairs.
    The one place it is written: the trainer's loss and the logged `loss` both come from here."""
    return nll_sum / nll_tokens + beta * or_sum / pairs


@dataclass
class OrpoParts:
    """Sums over one micro-batch; the trainer divides by all-rank counts (see module docstring)."""

    nll_sum: Tensor  # sum of -log P over NLL tokens (weighted)
    nll_tokens: Tensor  # number of NLL tokens (weighted)
    or_sum: Tensor  # sum over pairs of -logsigmoid(log_odds) (weighted)
    pairs: Tensor  # number of real pairs (sum of pair weights)
    chosen_logps: Tensor  # [B] per-pair length-normalised log-probs
    rejected_logps: Tensor  # [B]
    log_odds: Tensor  # [B]
    pair_weight: Tensor  # [B] 1 for a real pair, 0 for a filler that keeps ranks in step
    share: Tensor | float = 1.0  # this rank's share of the pair counts and metrics (0 on SP ranks but one)

    def loss(
        self, beta: float, nll_tokens: Tensor | float | None = None, pairs: Tensor | float | None = None
    ):
        """L_NLL + beta * L_OR, normalised by the given counts (default: this micro-batch's own)."""
        nll_tokens = self.nll_tokens if nll_tokens is None else nll_tokens
        pairs = self.pairs if pairs is None else pairs
        return orpo_loss(self.nll_sum, nll_tokens, self.or_sum, pairs, beta)

    def metric_sums(self, beta: float) -> dict[str, Tensor]:
        """Per-pair metric sums (divide by `pairs`), in the order and with the names of PAIR_METRICS."""
        w = self.pair_weight * self.share
        chosen, rejected = self.chosen_logps.detach(), self.rejected_logps.detach()
        chosen_r, rejected_r, log_odds = beta * chosen, beta * rejected, self.log_odds.detach()
        per_pair = [
            chosen_r,
            rejected_r,
            chosen_r - rejected_r,
            (chosen_r > rejected_r).float(),
            chosen,
            rejected,
            F.logsigmoid(log_odds),
            log_odds,
        ]
        return {name: (w * values).sum() for name, values in zip(PAIR_METRICS, per_pair, strict=True)}


def orpo_parts(
    token_lp: Tensor, batch: dict[str, Tensor], reduce: Callable[[Tensor], Tensor] | None = None
) -> OrpoParts:
    """Combine per-position log-probs into ORPO sums, for any batch layout.

    `batch` describes each scored position i (the batch contract of layouts.py): `seq[i]` is the sequence (0..B-1
    chosen, B..2B-1 rejected) whose completion token it scores, or -1; `nll[i]` whether it counts in
    the NLL term; `pair[i]` its pair; `pair_weight` [B]. `reduce`, under sequence parallelism, sums the
    [2, 2B] per-sequence (log-prob sums, token counts) over the ranks holding slices of the same rows.
    """
    seq, nll, pair, w = batch["seq"], batch["nll"], batch["pair"], batch["pair_weight"].float()
    num_pairs = w.shape[0]
    scored = seq >= 0
    sums = token_lp.new_zeros(2 * num_pairs).index_add(0, seq[scored], token_lp[scored])
    counts = token_lp.new_zeros(2 * num_pairs).index_add(0, seq[scored], torch.ones_like(token_lp[scored]))
    if reduce is not None:
        sums, counts = reduce(torch.stack([sums, counts]))
    # collate drops pairs with an empty completion, so counts > 0; clamp only guards filler rows
    logps = sums / counts.clamp(min=1)
    chosen, rejected = logps[:num_pairs], logps[num_pairs:]
    or_loss, log_odds = odds_ratio(chosen, rejected)
    tok_w = w[pair] * nll.float()
    return OrpoParts(
        nll_sum=-(token_lp * tok_w).sum(),
        nll_tokens=tok_w.sum(),
        or_sum=(or_loss * w).sum(),
        pairs=w.sum(),
        chosen_logps=chosen,
        rejected_logps=rejected,
        log_odds=log_odds,
        pair_weight=w,
        share=batch.get("pair_share", 1.0),
    )


def batch_counts(batch: dict[str, Tensor]) -> Tensor:
    """(NLL tokens, pairs) of a micro-batch, computable before the forward: the normalisers of a step."""
    w = batch["pair_weight"].float()
    return torch.stack(
        [(w[batch["pair"]] * batch["nll"].float()).sum(), w.sum() * batch.get("pair_share", 1.0)]
    )
