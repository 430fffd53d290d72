"""The ORPO loss against numbers worked by hand, and against a brute-force full-logits computation.

Hand-worked identity used below: for logp_w = -a and logp_l = -2a,

    odds(p) = p / (1 - p),  p = e^logp
    odds_w / odds_l = [e^-a / (1 - e^-a)] / [e^-2a / (1 - e^-2a)] = (e^2a - 1) / (e^a - 1) = e^a + 1

so log_odds = log(e^a + 1), and -logsigmoid(log_odds) = log(1 + 1/(e^a + 1)) = log((e^a + 2) / (e^a + 1)).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import example_pairs

from orpo_dist.layouts import PaddedCollator
from orpo_dist.loss import LN_HALF, log1mexp, odds_ratio, orpo_parts

E = math.e


# ------------------------------------------------------------------------------------------ (a) log1mexp


def _log1mexp_reference(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) at 40 significant digits (mpmath ships with torch's sympy dependency).

    Not float64 `log(1 - exp(x))`: that too cancels, to 0 below x = -37 and to ~1e-16 error near 0.
    """
    import mpmath

    with mpmath.workdps(40):
        return torch.tensor(
            [float(mpmath.log(1 - mpmath.exp(v))) for v in x.double().tolist()], dtype=torch.float64
        )


def test_log1mexp_matches_high_precision_reference_on_both_sides_of_ln2():
    x = torch.cat(
        [
            -torch.logspace(-7, 4, 2000),  # -1e-7 .. -1e4
            torch.tensor([LN_HALF, LN_HALF + 1e-6, LN_HALF - 1e-6, -0.69, -0.70, -1e-7, -1e4]),
        ]
    ).float()
    got = log1mexp(x)
    assert got.dtype == torch.float32
    want = _log1mexp_reference(x)  # on the same (float32-rounded) inputs
    # a few float32 ulps of relative accuracy everywhere, down to results of ~1e-38 (x ~ -87), below
    # which float32 has only denormals. log(-expm1(x)) alone is off by 100% at x < -17 (expm1 -> -1), and
    # log1p(-exp(x)) alone by ~1% at x = -1e-7 (exp(x) rounds): both branches are needed to pass.
    torch.testing.assert_close(got.double(), want, rtol=4e-6, atol=1e-40)
    # near 0 the naive float32 formula cancels to log(0) = -inf
    assert torch.isinf(torch.log(1 - torch.exp(torch.tensor(-1e-8))))
    assert log1mexp(torch.tensor(-1e-8)).item() == pytest.approx(math.log(1e-7), rel=1e-6)  # clamped to -1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log1mexp_finite_values_and_grads_over_whole_range(dtype):
    x = torch.cat([-torch.logspace(-10, 30, 500), torch.tensor([0.0, -0.0, LN_HALF, -1e-30, -1e30])]).to(
        dtype
    )
    x.requires_grad_(True)
    y = log1mexp(x)
    assert y.dtype == torch.float32  # computed in float32 even for bf16 input
    assert torch.isfinite(y).all(), x[~torch.isfinite(y)]
    assert (y <= 0).all()
    y.sum().backward()
    assert torch.isfinite(x.grad.float()).all()


def test_log1mexp_gradient_matches_analytic():
    # d/dx log(1 - e^x) = -e^x / (1 - e^x) = -1 / (e^-x - 1)
    x = torch.tensor(
        [-1e-4, -0.1, -0.5, LN_HALF + 1e-3, LN_HALF - 1e-3, -1.0, -5.0, -30.0], requires_grad=True
    )
    log1mexp(x).sum().backward()
    want = -1 / torch.expm1(-x.detach().double())
    torch.testing.assert_close(x.grad.double(), want, rtol=1e-5, atol=1e-12)


# ------------------------------------------------------------------------------------------ (b) odds ratio


def test_odds_ratio_hand_worked_pair():
    # logp_w = -1, logp_l = -2:
    #   log(1 - e^-1) = log(0.6321205588) = -0.4586751454
    #   log(1 - e^-2) = log(0.8646647168) = -0.1454134579
    #   log_odds = (-1 - -2) - (-0.4586751454 - -0.1454134579) = 1 + 0.3132616875 = 1.3132616875 (= log(e + 1))
    #   loss = -logsigmoid(1.3132616875) = log(1 + e^-1.3132616875) = log((e + 2)/(e + 1)) = 0.2381830264
    or_loss, log_odds = odds_ratio(torch.tensor([-1.0]), torch.tensor([-2.0]))
    assert log_odds.item() == pytest.approx(1.3132616875182228, abs=1e-6)
    assert log_odds.item() == pytest.approx(math.log(E + 1), abs=1e-6)
    assert or_loss.item() == pytest.approx(0.23818302641382816, abs=1e-6)
    # swapping chosen and rejected flips the sign of log_odds: loss = log(1 + (e + 1)) = log(e + 2)
    or_loss_swapped, log_odds_swapped = odds_ratio(torch.tensor([-2.0]), torch.tensor([-1.0]))
    assert log_odds_swapped.item() == pytest.approx(-1.3132616875182228, abs=1e-6)
    assert or_loss_swapped.item() == pytest.approx(math.log(E + 2), abs=1e-6)
    # equal log-probs: log_odds = 0, loss = log 2
    or_loss_eq, log_odds_eq = odds_ratio(torch.tensor([-0.3]), torch.tensor([-0.3]))
    assert log_odds_eq.item() == 0.0
    assert or_loss_eq.item() == pytest.approx(math.log(2), abs=1e-7)


def test_odds_ratio_batch_and_bf16_inputs():
    a = torch.tensor([0.5, 1.0, 2.0, 4.0])
    or_loss, log_odds = odds_ratio(-a, -2 * a)
    torch.testing.assert_close(log_odds, torch.log(torch.exp(a) + 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        or_loss, torch.log((torch.exp(a) + 2) / (torch.exp(a) + 1)), rtol=1e-6, atol=1e-6
    )
    # bf16 inputs (what a bf16 model produces) are upcast: finite and float32
    or_bf, lo_bf = odds_ratio((-a).bfloat16(), (-2 * a).bfloat16())
    assert or_bf.dtype == lo_bf.dtype == torch.float32
    torch.testing.assert_close(lo_bf, log_odds, rtol=1e-6, atol=1e-6)  # these values are exact in bf16


# ------------------------------------------------------------------------------------------ (c) orpo_parts

# A hand-made batch of 2 real pairs + 1 filler (weight 0). Each row is one scored position:
#   (seq, nll, pair, token log-prob); seq 0..2 chosen, 3..5 rejected, -1 = prompt token (NLL only).
HAND_ROWS = [
    # pair 0: chosen prompt tokens, chosen completion (mean -2, sum -4), rejected completion (mean -4, sum -12)
    (-1, True, 0, -0.2),
    (-1, True, 0, -0.4),
    (0, True, 0, -1.0),
    (0, True, 0, -3.0),
    (3, False, 0, -2.0),
    (3, False, 0, -4.0),
    (3, False, 0, -6.0),
    # pair 1: the pair of test_odds_ratio_hand_worked_pair: chosen mean -1, rejected mean -2
    (-1, True, 1, -0.6),
    (1, True, 1, -1.0),
    (4, False, 1, -2.0),
    (4, False, 1, -2.0),
    # pair 2: filler (weight 0) with wild values that must not leak into any sum
    (-1, True, 2, -50.0),
    (2, True, 2, -100.0),
    (5, False, 2, -1e-6),
]
HAND_WEIGHTS = [1.0, 1.0, 0.0]


def hand_batch(rows=HAND_ROWS, weights=HAND_WEIGHTS, scope="prompt_completion"):
    seq = torch.tensor([r[0] for r in rows])
    nll = torch.tensor([r[1] for r in rows])
    if scope == "completion":
        nll = nll & (seq >= 0)
    batch = {
        "seq": seq,
        "nll": nll,
        "pair": torch.tensor([r[2] for r in rows]),
        "pair_weight": torch.tensor(weights),
    }
    return torch.tensor([r[3] for r in rows]), batch


def test_orpo_parts_hand_worked_prompt_completion_scope():
    token_lp, batch = hand_batch()
    p = orpo_parts(token_lp, batch)
    # length-normalised (mean): pair 0 = (-2, -4); pair 1 = (-1, -2). A sum would give (-4, -12) and (-1, -4).
    torch.testing.assert_close(p.chosen_logps[:2], torch.tensor([-2.0, -1.0]))
    torch.testing.assert_close(p.rejected_logps[:2], torch.tensor([-4.0, -2.0]))
    # log_odds = log(e^a + 1) with a = 2 and a = 1 (module docstring)
    torch.testing.assert_close(p.log_odds[:2], torch.tensor([math.log(E**2 + 1), math.log(E + 1)]))
    # NLL over chosen prompt + completion tokens of real pairs: 0.2+0.4+1+3 + 0.6+1 = 6.2 over 6 tokens
    assert p.nll_sum.item() == pytest.approx(6.2, abs=1e-6)
    assert p.nll_tokens.item() == 6
    # OR: log((e^2+2)/(e^2+1)) + log((e+2)/(e+1)) = 0.1126167552 + 0.2381830264 over 2 pairs
    or_sum = math.log((E**2 + 2) / (E**2 + 1)) + math.log((E + 2) / (E + 1))
    assert p.or_sum.item() == pytest.approx(or_sum, abs=1e-6)
    assert p.pairs.item() == 2
    # loss = 6.2/6 + beta * or_sum / 2
    assert p.loss(0.5).item() == pytest.approx(6.2 / 6 + 0.5 * or_sum / 2, abs=1e-6)
    assert p.loss(0.0).item() == pytest.approx(6.2 / 6, abs=1e-6)
    # explicit counts (the trainer passes the whole accumulated batch's): sums divided by them
    assert p.loss(0.1, nll_tokens=12.0, pairs=4.0).item() == pytest.approx(
        6.2 / 12 + 0.1 * or_sum / 4, abs=1e-6
    )


def test_orpo_parts_completion_scope_counts_only_completion_tokens():
    token_lp, batch = hand_batch(scope="completion")
    p = orpo_parts(token_lp, batch)
    # chosen completion tokens only: 1 + 3 + 1 = 5 over 3 tokens; the OR term does not change
    assert p.nll_sum.item() == pytest.approx(5.0, abs=1e-6)
    assert p.nll_tokens.item() == 3
    full = orpo_parts(*hand_batch())
    torch.testing.assert_close(p.or_sum, full.or_sum)
    torch.testing.assert_close(p.log_odds, full.log_odds)


def test_metric_sums_hand_worked():
    p = orpo_parts(*hand_batch())
    beta = 0.5
    m = {k: v.item() for k, v in p.metric_sums(beta).items()}
    # chosen logps -2, -1; rejected -4, -2 (filler excluded)
    assert m["logps/chosen"] == pytest.approx(-3.0)
    assert m["logps/rejected"] == pytest.approx(-6.0)
    assert m["rewards/chosen"] == pytest.approx(beta * -3.0)
    assert m["rewards/rejected"] == pytest.approx(beta * -6.0)
    assert m["rewards/margins"] == pytest.approx(beta * 3.0)
    assert m["rewards/accuracies"] == 2.0
    assert m["log_odds_chosen"] == pytest.approx(math.log(E**2 + 1) + math.log(E + 1), abs=1e-6)
    assert m["log_odds_ratio"] == pytest.approx(
        -(math.log((E**2 + 2) / (E**2 + 1)) + math.log((E + 2) / (E + 1))), abs=1e-6
    )


def test_filler_pairs_contribute_nothing_to_loss_metrics_or_gradient():
    token_lp, batch = hand_batch()
    token_lp.requires_grad_(True)
    with_filler = orpo_parts(token_lp, batch)
    real = [r for r in HAND_ROWS if r[2] != 2]
    # without the filler: same 2 pairs, sequences renumbered for B = 2 (rejected 3, 4 -> 2, 3)
    real = [(s - 1 if s >= 3 else s, n, pr, lp) for s, n, pr, lp in real]
    token_lp2, batch2 = hand_batch(real, [1.0, 1.0])
    without = orpo_parts(token_lp2, batch2)
    for name in ("nll_sum", "nll_tokens", "or_sum", "pairs"):
        torch.testing.assert_close(
            getattr(with_filler, name), getattr(without, name), msg=lambda m, name=name: f"{name}: {m}"
        )
    for k, v in with_filler.metric_sums(0.1).items():
        torch.testing.assert_close(v, without.metric_sums(0.1)[k], msg=k)
    with_filler.loss(0.1).backward()
    filler_rows = torch.tensor([r[2] == 2 for r in HAND_ROWS])
    assert torch.isfinite(token_lp.grad).all()
    assert (token_lp.grad[filler_rows] == 0).all()
    assert (token_lp.grad[~filler_rows] != 0).all()


# ------------------------------------------------------------------------------------------ (f) extremes


@pytest.mark.parametrize(
    "chosen,rejected",
    [
        (-1e-9, -1e-9),  # both certain
        (0.0, 0.0),  # exactly certain (a fully confident model)
        (0.0, -1e-3),
        (-1e4, -1e4),  # both hopeless
        (-1e4, -1e-9),  # maximal wrong preference
        (-1e-9, -1e4),  # maximal right preference
        (-80.0, -0.5),
    ],
)
def test_extreme_logps_give_finite_loss_and_grads(chosen, rejected):
    c = torch.tensor([chosen], requires_grad=True)
    r = torch.tensor([rejected], requires_grad=True)
    or_loss, log_odds = odds_ratio(c, r)
    assert torch.isfinite(or_loss).all() and torch.isfinite(log_odds).all()
    assert or_loss.item() >= 0
    or_loss.sum().backward()
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    # also through orpo_parts with bf16-like per-token values
    token_lp = torch.tensor([chosen, rejected], requires_grad=True)
    batch = {
        "seq": torch.tensor([0, 1]),
        "nll": torch.tensor([True, False]),
        "pair": torch.tensor([0, 0]),
        "pair_weight": torch.tensor([1.0]),
    }
    p = orpo_parts(token_lp, batch)
    p.loss(0.1).backward()
    assert torch.isfinite(p.loss(0.1)) and torch.isfinite(token_lp.grad).all()


# ------------------------------------------------------------------------------------------ (g) empty completions


def test_collator_with_empty_completion_documented_behaviour(tokenizer):
    """PaddedCollator does not drop a zero-length completion: the row is scored nowhere, so orpo_parts sees
    count 0 and (via the clamp) logp = 0/1 = 0, i.e. "certain". Finite, but meaningless for a real pair,
    which is why data.py drops such pairs before they can reach a batch (next test)."""
    ex = example_pairs(tokenizer)[:2]
    ex[1] = {**ex[1], "rejected_ids": []}
    batch = PaddedCollator(tokenizer.pad_token_id)(ex)
    assert 3 not in batch["seq"].tolist()  # rejected row of pair 1 (seq 2 + 1) has no scored position
    token_lp = -torch.rand(len(batch["tgt"])) - 0.1
    p = orpo_parts(token_lp, batch)
    assert p.rejected_logps[1].item() == 0.0
    assert torch.isfinite(p.loss(0.1)) and torch.isfinite(p.log_odds).all()


def test_zero_count_filler_row_is_not_nan_and_has_zero_grad():
    # a filler pair whose sequences have no scored positions at all: counts 0 -> 0/clamp(0, 1) = 0
    token_lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    batch = {
        "seq": torch.tensor([0, 2]),
        "nll": torch.tensor([True, False]),
        "pair": torch.tensor([0, 0]),
        "pair_weight": torch.tensor([1.0, 0.0]),
    }
    p = orpo_parts(token_lp, batch)
    assert torch.isfinite(p.chosen_logps).all() and torch.isfinite(p.log_odds).all()
    loss = p.loss(0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(token_lp.grad).all()
    # only pair 0 counts: nll 1/1 + 0.1 * log((e+2)/(e+1))
    assert loss.item() == pytest.approx(1.0 + 0.1 * math.log((E + 2) / (E + 1)), abs=1e-6)


def test_data_pipeline_never_yields_an_empty_completion(tmp_path, tokenizer):
    from orpo_dist.config import DataConfig
    from orpo_dist.data import DataError, build_datasets

    rows = [
        {"prompt": "p" * 200, "chosen": "yes", "rejected": "no"},  # prompt far longer than max_length
        {"prompt": "q" * 9, "chosen": "a" * 50, "rejected": "b"},
        {"prompt": "short", "chosen": "x", "rejected": "y"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(data_path=str(path), max_length=10, max_prompt_length=9, eval_split=0.0)
    train, _, report = build_datasets(cfg, tokenizer, seed=0)
    assert len(train) + sum(report.dropped.values()) == 3
    for c, r in zip(train["chosen_ids"], train["rejected_ids"]):
        assert len(c) >= 1 and len(r) >= 1
    # so in every real batch each sequence has >= 1 scored completion token
    batch = PaddedCollator(tokenizer.pad_token_id)(list(train))
    counts = torch.bincount(batch["seq"][batch["seq"] >= 0], minlength=2 * len(train))
    assert (counts >= 1).all()

    # an empty completion text is refused (or dropped and counted with skip_invalid)
    path.write_text(
        json.dumps({"prompt": "a", "chosen": "", "rejected": "b"}) + "\n" + json.dumps(rows[2]) + "\n"
    )
    with pytest.raises(DataError, match="line 1"):
        build_datasets(DataConfig(data_path=str(path), eval_split=0.0), tokenizer, seed=0)
    train, _, report = build_datasets(
        DataConfig(data_path=str(path), eval_split=0.0, skip_invalid=True), tokenizer, 0
    )
    assert len(train) == 1 and sum(report.dropped.values()) == 1
