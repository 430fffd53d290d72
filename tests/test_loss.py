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
import torch.nn.functional as F
from torch import nn

from orpo_dist import loss as loss_mod
from orpo_dist.collate import PaddedCollator
from orpo_dist.loss import LN_HALF, forward_parts, log1mexp, odds_ratio, orpo_parts, token_logps

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


# ------------------------------------------------------------------------------------------ (d) token_logps


class MaxOutput(nn.Module):
    """Wraps lm_head and records the largest output it ever produced (forward and recompute).

    Not a plain nn.Linear, so token_logps takes its generic path (module call under checkpointing),
    the one PEFT-wrapped and ZeRO-3 / FSDP-sharded heads take.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.max_numel, self.calls = inner, 0, 0

    def forward(self, x):
        out = self.inner(x)
        self.max_numel, self.calls = max(self.max_numel, out.numel()), self.calls + 1
        return out


def _linear(head: nn.Module) -> nn.Linear:
    return head.inner if isinstance(head, MaxOutput) else head


def _logps_and_grads(hidden, head, targets, chunk_size=None):
    hidden = hidden.detach().clone().requires_grad_(True)
    head.zero_grad()
    if chunk_size is None:  # the reference: full [N, vocab] log_softmax, then gather
        lp = torch.log_softmax(head(hidden).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    else:
        lp = token_logps(hidden, head, targets, chunk_size)
    weights = torch.linspace(-1, 2, len(targets))  # an arbitrary downstream use, so each grad row differs
    (lp * weights).sum().backward()
    lin = _linear(head)
    grads = [lp.detach(), hidden.grad, lin.weight.grad.clone()]
    return grads + ([lin.bias.grad.clone()] if lin.bias is not None else [])


# "linear": a plain nn.Linear head (the fused path); "module": any other head (the checkpointed path)
HEAD_KINDS = ["linear", "module"]


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize(
    "chunk_size,bias", [(1, False), (3, True), (16, False), (40, False), (41, True), (1000, False)]
)
def test_token_logps_chunked_equals_full_log_softmax(chunk_size, bias, kind):
    torch.manual_seed(0)
    n, h, v = 41, 16, 97
    linear = nn.Linear(h, v, bias=bias)
    head = linear if kind == "linear" else MaxOutput(linear)
    hidden, targets = torch.randn(n, h) * 3, torch.randint(0, v, (n,))
    want = _logps_and_grads(hidden, linear, targets)
    got = _logps_and_grads(hidden, head, targets, chunk_size)
    for name, g, w in zip(("logps", "grad hidden", "grad lm_head.weight", "grad lm_head.bias"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert got[0].dtype == torch.float32


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_token_logps_bf16_head_gives_float32_logps(kind):
    torch.manual_seed(0)
    linear = nn.Linear(8, 33, bias=False).bfloat16()
    head = linear if kind == "linear" else MaxOutput(linear)
    hidden = torch.randn(10, 8).bfloat16().requires_grad_(True)
    targets = torch.randint(0, 33, (10,))
    lp = token_logps(hidden, head, targets, chunk_size=4)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all() and (lp <= 0).all()
    want = torch.log_softmax(linear(hidden.detach()).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(lp.detach(), want, rtol=0, atol=1e-6)  # same bf16 logits, float32 softmax
    lp.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and torch.isfinite(hidden.grad.float()).all()
    assert linear.weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_token_logps_empty_input(kind):
    linear = nn.Linear(8, 5)
    out = token_logps(
        torch.zeros(0, 8),
        linear if kind == "linear" else MaxOutput(linear),
        torch.zeros(0, dtype=torch.long),
        4,
    )
    assert out.shape == (0,) and out.dtype == torch.float32


def _saved_numel(fn, *existing: torch.Tensor):
    """Elements autograd keeps alive for backward while `fn` runs: unique storages, not counting
    the `existing` tensors (inputs and weights, which live anyway)."""
    saved: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in existing}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())


N, H, V, CHUNK = 64, 8, 1000, 8


def test_token_logps_module_head_never_materialises_full_logits(monkeypatch):
    torch.manual_seed(0)
    hidden = torch.randn(N, H, requires_grad=True)
    head = MaxOutput(nn.Linear(H, V, bias=False))
    targets = torch.randint(0, V, (N,))

    out, kept = _saved_numel(lambda: token_logps(hidden, head, targets, CHUNK), hidden, head.inner.weight)
    out.sum().backward()
    # every lm_head call (N/CHUNK in forward, as many recomputed in backward) made at most CHUNK x vocab logits
    assert head.max_numel <= CHUNK * V
    assert head.calls == 2 * (N // CHUNK)
    # and checkpointing means no chunk's logits are kept for backward: far less than one [N, vocab]
    assert kept < N * V / 10, kept

    # control: without checkpointing the chunks' logits stay alive for backward, N * vocab in total
    monkeypatch.setattr(loss_mod, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
    _, kept_unchecked = _saved_numel(
        lambda: token_logps(hidden, head, targets, CHUNK), hidden, head.inner.weight
    )
    assert kept_unchecked >= N * V


def test_token_logps_linear_head_never_materialises_full_logits(monkeypatch):
    """The fused path (plain nn.Linear head) makes chunk-sized logits only, in forward and backward."""
    torch.manual_seed(0)
    hidden = torch.randn(N, H, requires_grad=True)
    head = nn.Linear(H, V, bias=False)
    targets = torch.randint(0, V, (N,))
    sizes, real = [], loss_mod.LinearTokenLogps._logits

    def recording(*args):
        out = real(*args)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(loss_mod.LinearTokenLogps, "_logits", staticmethod(recording))
    out, kept = _saved_numel(lambda: token_logps(hidden, head, targets, CHUNK), hidden, head.weight)
    assert type(out.grad_fn).__name__ == "LinearTokenLogpsBackward", (
        "a plain nn.Linear head takes the fused path"
    )
    out.sum().backward()
    assert (
        len(sizes) == 2 * (N // CHUNK) and max(sizes) <= CHUNK * V
    )  # each chunk once forward, once backward
    assert kept < N * V / 10, kept  # targets and one log-sum-exp per row
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(head.weight.grad).all()


# ------------------------------------------------------------------------------------------ (e) forward_parts


def _examples(tokenizer):
    """Three pairs of different prompt / completion lengths, tokenised as data.py does (BOS prompt, EOS answers)."""
    rows = [
        ("Write in capitals: cat\n", "CAT", "cat"),
        ("Write in small letters: HORSES\n", "horses", "HORSES"),
        ("Say yes: ", "yes, of course", "no"),
    ]
    eos = tokenizer.eos_token_id
    return [
        {
            "id": i,
            "prompt_ids": tokenizer(p)["input_ids"],
            "chosen_ids": tokenizer(c, add_special_tokens=False)["input_ids"] + [eos],
            "rejected_ids": tokenizer(r, add_special_tokens=False)["input_ids"] + [eos],
        }
        for i, (p, c, r) in enumerate(rows)
    ]


def brute_force(model, examples, beta: float, scope: str, pad_id: int):
    """Independent reference: full logits, log_softmax in float64, masked per-row means, plain formulas."""
    rows = [ex["prompt_ids"] + ex["chosen_ids"] for ex in examples] + [
        ex["prompt_ids"] + ex["rejected_ids"] for ex in examples
    ]
    prompt_lens = [len(ex["prompt_ids"]) for ex in examples] * 2
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
    lp = (
        torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    )  # lp[r, t] scores token t+1
    b = len(examples)
    seq_logps, nll_terms = [], []
    for r, row in enumerate(rows):
        completion = lp[r, prompt_lens[r] - 1 : len(row) - 1]
        seq_logps.append(completion.mean())
        if r < b:
            nll_terms.append(-(completion if scope == "completion" else lp[r, : len(row) - 1]))
    chosen, rejected = torch.stack(seq_logps[:b]), torch.stack(seq_logps[b:])
    log_odds = (chosen - rejected) - (torch.log(1 - torch.exp(chosen)) - torch.log(1 - torch.exp(rejected)))
    nll = torch.cat(nll_terms)
    or_loss = -F.logsigmoid(log_odds)
    return {
        "loss": nll.mean() + beta * or_loss.mean(),
        "nll_sum": nll.sum(),
        "nll_tokens": torch.tensor(float(len(nll)), dtype=torch.float64),
        "or_sum": or_loss.sum(),
        "chosen_logps": chosen,
        "rejected_logps": rejected,
        "log_odds": log_odds,
    }


@pytest.mark.parametrize("scope", ["prompt_completion", "completion"])
@pytest.mark.parametrize("chunk_size", [5, 1024])
def test_forward_parts_equals_brute_force_full_logits(tiny_model, tokenizer, scope, chunk_size):
    beta = 0.25
    examples = _examples(tokenizer)
    batch = PaddedCollator(tokenizer.pad_token_id, scope)(examples)
    want = brute_force(tiny_model, examples, beta, scope, tokenizer.pad_token_id)
    with torch.no_grad():
        p = forward_parts(tiny_model, tiny_model.lm_head, batch, chunk_size)
    assert p.pairs.item() == 3
    assert p.loss(beta).item() == pytest.approx(want["loss"].item(), abs=1e-5)
    for name in ("nll_sum", "nll_tokens", "or_sum", "chosen_logps", "rejected_logps", "log_odds"):
        torch.testing.assert_close(
            getattr(p, name).double(),
            want[name],
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m, name=name: f"{name}: {m}",
        )


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_forward_parts_gradients_equal_brute_force(tiny_model, tokenizer, kind):
    beta = 0.25
    examples = _examples(tokenizer)
    batch = PaddedCollator(tokenizer.pad_token_id)(examples)
    params = [p for p in tiny_model.parameters()]
    head = tiny_model.lm_head if kind == "linear" else MaxOutput(tiny_model.lm_head)

    tiny_model.zero_grad()
    forward_parts(tiny_model, head, batch, 4).loss(beta).backward()
    ours = [p.grad.clone() for p in params]
    tiny_model.zero_grad()
    brute_force(tiny_model, examples, beta, "prompt_completion", tokenizer.pad_token_id)["loss"].backward()
    ref = [p.grad.clone() for p in params]
    tiny_model.zero_grad()
    for (name, _), g, r in zip(tiny_model.named_parameters(), ours, ref):
        torch.testing.assert_close(
            g, r.float(), rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


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
    ex = _examples(tokenizer)[:2]
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


# ------------------------------------------------------------------ logit transforms after lm_head


def _arch_model(kind: str, vocab: int):
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
    )

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    if kind == "gemma2":  # softcap 3 so it really bends the logits of a random model
        return Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0))
    if kind == "cohere":
        return CohereForCausalLM(CohereConfig(**common, logit_scale=0.25))
    return GraniteForCausalLM(GraniteConfig(**common, logits_scaling=4.0))


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_forward_parts_applies_the_models_logit_transform(tokenizer, kind):
    """Soft-capping / logit scaling after lm_head must be in our log-probs, or the loss is wrong."""
    from orpo_dist.modeling import output_head

    torch.manual_seed(0)
    model = _arch_model(kind, len(tokenizer)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    examples = _examples(tokenizer)
    batch = PaddedCollator(tokenizer.pad_token_id)(examples)
    want = brute_force(model, examples, 0.25, "prompt_completion", tokenizer.pad_token_id)
    with torch.no_grad():
        ours = forward_parts(model, output_head(model), batch, 7)
        bare = forward_parts(model, model.lm_head, batch, 7)
    assert ours.loss(0.25).item() == pytest.approx(want["loss"].item(), abs=1e-5)
    assert abs(bare.loss(0.25).item() - want["loss"].item()) > 1e-3  # the head alone would be wrong
