"""Completion log-probs (logps.py): the chunked kernel against full log-softmax, the model forward against
a brute-force full-logits computation, and the logit transforms some architectures apply after lm_head.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import example_pairs, orpo_forward
from torch import nn

from orpo_dist import logps as logps_mod
from orpo_dist.layouts import PaddedCollator
from orpo_dist.logps import LinearTokenLogps, token_logps

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
    monkeypatch.setattr(logps_mod, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
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
    sizes, real = [], logps_mod.LinearTokenLogps._logits

    def recording(*args):
        out = real(*args)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(logps_mod.LinearTokenLogps, "_logits", staticmethod(recording))
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
    examples = example_pairs(tokenizer)
    batch = PaddedCollator(tokenizer.pad_token_id, scope)(examples)
    want = brute_force(tiny_model, examples, beta, scope, tokenizer.pad_token_id)
    with torch.no_grad():
        p = orpo_forward(tiny_model, batch, chunk_size)
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
    examples = example_pairs(tokenizer)
    batch = PaddedCollator(tokenizer.pad_token_id)(examples)
    params = [p for p in tiny_model.parameters()]
    head = tiny_model.lm_head if kind == "linear" else MaxOutput(tiny_model.lm_head)

    tiny_model.zero_grad()
    orpo_forward(tiny_model, batch, 4, head).loss(beta).backward()
    ours = [p.grad.clone() for p in params]
    tiny_model.zero_grad()
    brute_force(tiny_model, examples, beta, "prompt_completion", tokenizer.pad_token_id)["loss"].backward()
    ref = [p.grad.clone() for p in params]
    tiny_model.zero_grad()
    for (name, _), g, r in zip(tiny_model.named_parameters(), ours, ref):
        torch.testing.assert_close(
            g, r.float(), rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


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
    examples = example_pairs(tokenizer)
    batch = PaddedCollator(tokenizer.pad_token_id)(examples)
    want = brute_force(model, examples, 0.25, "prompt_completion", tokenizer.pad_token_id)
    with torch.no_grad():
        ours = orpo_forward(model, batch, 7, output_head(model))
        bare = orpo_forward(model, batch, 7, model.lm_head)
    assert ours.loss(0.25).item() == pytest.approx(want["loss"].item(), abs=1e-5)
    assert abs(bare.loss(0.25).item() - want["loss"].item()) > 1e-3  # the head alone would be wrong


# ------------------------------------------------------------------------------------------ fused log-probs


def _lp_grads(hidden, head, targets, upstream, chunk_size, fused):
    hidden = hidden.detach().clone().requires_grad_(True)
    head.zero_grad()
    lp = token_logps(hidden, head, targets, chunk_size, fused=fused)
    (lp * upstream).sum().backward()
    out = [lp.detach(), hidden.grad, head.weight.grad.clone()]
    return out + ([head.bias.grad.clone()] if head.bias is not None else [])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 6, 37, 1000])
def test_fused_logps_equal_checkpointed_path(bias, chunk_size):
    torch.manual_seed(0)
    n, h, v = 37, 16, 301
    hidden, head, targets = torch.randn(n, h), nn.Linear(h, v, bias=bias), torch.randint(0, v, (n,))
    upstream = torch.randn(n)  # any downstream use: each row's gradient differs
    got = _lp_grads(hidden, head, targets, upstream, chunk_size, fused=True)
    want = _lp_grads(hidden, head, targets, upstream, chunk_size, fused=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_fused_logps_under_bf16_autocast_backward_outside():
    """Forward under autocast (the trainer's mixed precision), backward outside it: bf16 matmuls."""
    torch.manual_seed(0)
    hidden, head, targets = torch.randn(20, 16), nn.Linear(16, 64, bias=False), torch.randint(0, 64, (20,))
    upstream = torch.randn(20)
    results = []
    for fused in (True, False):
        x = hidden.clone().requires_grad_(True)
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = token_logps(x, head, targets, 8, fused=fused)
        (lp * upstream).sum().backward()
        results.append((lp.detach(), x.grad, head.weight.grad.clone()))
    assert results[0][0].dtype == torch.float32 and results[0][2].dtype == torch.float32
    for g, w in zip(*results):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_fused_logps_used_only_for_a_plain_linear_head(monkeypatch):
    calls = []
    monkeypatch.setattr(LinearTokenLogps, "apply", lambda *a: calls.append(1) or torch.zeros(a[0].shape[0]))
    hidden, targets = torch.randn(4, 8), torch.randint(0, 5, (4,))
    token_logps(hidden, nn.Linear(8, 5), targets, 2)
    assert calls == [1]
    sharded = nn.Linear(8, 5)
    sharded.weight.ds_id = 3  # what a DeepSpeed ZeRO-3 partitioned parameter carries
    hooked = nn.Linear(8, 5)
    hooked.register_forward_pre_hook(lambda m, a: None)  # e.g. FSDP2 / accelerate hooks gather weights
    for head in (sharded, hooked, nn.Sequential(nn.Linear(8, 5))):
        token_logps(hidden, head, targets, 2)
    token_logps(hidden, nn.Linear(8, 5), targets, 2, fused=False)
    assert calls == [1]


def test_fused_logps_keep_no_vocab_wide_tensor_for_backward():
    n, h, v, chunk = 64, 8, 1000, 8
    hidden = torch.randn(n, h, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        lp = token_logps(hidden, nn.Linear(h, v, bias=False), torch.randint(0, v, (n,)), chunk)
    lp.sum().backward()
    assert logps_mod._plain_linear(nn.Linear(h, v))
    assert sum(saved) <= n * h + v * h + 2 * n  # hidden, weight, targets, lse: no [rows, vocab] logits
