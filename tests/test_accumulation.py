"""Gradient accumulation gives the gradient of one big batch (docs/architecture.md, "The loss").

The trainer's rule: count the NLL tokens and pairs of the whole step first (all micro-batches, all
ranks), then each micro-batch's loss is `parts.loss(beta, step_nll_tokens, step_pairs)` and their
gradients add up. A per-micro-batch mean averaged over micro-batches weights the tokens of short
micro-batches more, and gives a different gradient whenever the micro-batches differ in length.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import orpo_forward, tiny_run, tokenized_pair
from safetensors.torch import load_file

import orpo_dist
from orpo_dist.layouts import PaddedCollator
from orpo_dist.loss import batch_counts

BETA = 0.3


def _micro_batches(tokenizer):
    """3 micro-batches of 3 pairs; short, medium and long, so per-micro-batch token counts differ a lot."""
    texts = [
        [("Hi ", "yo", "no"), ("Ok? ", "y", "nope"), ("A: ", "b", "cc")],
        [
            ("Write in capitals: house\n", "HOUSE", "house"),
            ("Spell: cat\n", "c-a-t", "k-a-t"),
            ("Say it twice: ab\n", "abab", "ab"),
        ],
        [
            (
                "Write in small letters: ELEPHANTS AND GIRAFFES\n",
                "elephants and giraffes",
                "ELEPHANTS AND GIRAFFES",
            ),
            (
                "Repeat the whole sentence back to me please: the quick brown fox\n",
                "the quick brown fox",
                "the fox",
            ),
            ("Count to ten: ", "1 2 3 4 5 6 7 8 9 10", "1 2 3"),
        ],
    ]
    i = 0
    micro = []
    for group in texts:
        micro.append([tokenized_pair(tokenizer, *t, i + j) for j, t in enumerate(group)])
        i += len(group)
    return micro


def _grads(model, losses_fn) -> torch.Tensor:
    model.zero_grad()
    losses_fn()
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    return flat


def test_accumulated_gradient_equals_one_big_batch(tiny_model, tokenizer):
    model = tiny_model
    collate = PaddedCollator(tokenizer.pad_token_id)
    micro = [collate(m) for m in _micro_batches(tokenizer)]
    big = collate([ex for m in _micro_batches(tokenizer) for ex in m])
    nll_counts = [batch_counts(b)[0].item() for b in micro]
    assert len(set(nll_counts)) == 3 and max(nll_counts) > 2 * min(nll_counts)  # lengths really differ

    def one_big_batch():
        orpo_forward(model, big, 16).loss(BETA).backward()

    def accumulated():  # the trainer's rule (trainer.py: counts of the whole step, then sum of micro losses)
        nll_tokens, pairs = sum(batch_counts(b) for b in micro).tolist()
        for b in micro:
            orpo_forward(model, b, 16).loss(BETA, nll_tokens, pairs).backward()

    def naive_mean_of_means():  # what a per-micro-batch mean averaged over k micro-batches gives
        for b in micro:
            (orpo_forward(model, b, 16).loss(BETA) / len(micro)).backward()

    want = _grads(model, one_big_batch)
    got = _grads(model, accumulated)
    naive = _grads(model, naive_mean_of_means)
    scale = want.abs().max()
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=1e-6)
    # the naive rule is measurably wrong, so this test can tell the two apart
    assert (naive - want).abs().max() / scale > 1e-2
    assert (got - want).abs().max() < 1e-3 * (naive - want).abs().max()


def test_filler_micro_batch_adds_nothing(tiny_model, tokenizer):
    model = tiny_model
    """The ragged last step pads a rank's empty slot with a weight-0 filler pair (loader.PairShards)."""
    collate = PaddedCollator(tokenizer.pad_token_id)
    groups = _micro_batches(tokenizer)
    micro = [collate(m) for m in groups]
    filler = collate([{**groups[2][0], "weight": 0.0}])

    def run(batches):
        nll_tokens, pairs = sum(batch_counts(b) for b in batches).tolist()
        for b in batches:
            orpo_forward(model, b, 16).loss(BETA, nll_tokens, pairs).backward()

    want = _grads(model, lambda: run(micro))
    got = _grads(model, lambda: run([*micro, filler]))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------------ the real Trainer


def _train(tmp_path, name, tiny_model_dir, **overrides):
    cfg = tiny_run(
        tmp_path / name, model=str(tiny_model_dir), max_samples=18, max_steps=3, lr=1e-2, scheduler="linear",
        beta=BETA, seed=7, **overrides,
    )  # fmt: skip
    return orpo_dist.train(cfg)


def _trace(trace_dir) -> list[list[int]]:
    rows = [json.loads(line) for line in (trace_dir / "rank0.jsonl").read_text().splitlines()]
    return [sorted(r["ids"]) for r in sorted(rows, key=lambda r: r["step"])]


def test_trainer_accumulation_matches_big_batch(tmp_path, tiny_model_dir, monkeypatch):
    runs = {}
    for name, bs, accum in [("a_bs6", 6, 1), ("b_bs2_x3", 2, 3)]:
        trace = tmp_path / f"trace_{name}"
        trace.mkdir()
        monkeypatch.setenv("ORPO_DIST_TRACE_DIR", str(trace))
        result = _train(tmp_path, name, tiny_model_dir, batch_size=bs, gradient_accumulation=accum)
        runs[name] = (result, _trace(trace))
    (a, trace_a), (b, trace_b) = runs["a_bs6"], runs["b_bs2_x3"]

    assert a.global_step == b.global_step == 3
    # the same 6 pairs in each step (PairShards deals one global batch to the micro-batch slots)
    assert trace_a == trace_b and all(len(ids) == 6 for ids in trace_a)
    assert len({i for ids in trace_a for i in ids}) == 18

    loss_a = [r["loss"] for r in a.metrics if "loss" in r]
    loss_b = [r["loss"] for r in b.metrics if "loss" in r]
    assert len(loss_a) == len(loss_b) == 3
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    assert loss_a[0] != pytest.approx(loss_a[-1], abs=1e-3)  # the weights moved: steps 2-3 test the updates
    for key in ("nll_loss", "log_odds_chosen", "rewards/accuracies"):
        assert [r[key] for r in a.metrics] == pytest.approx([r[key] for r in b.metrics], abs=1e-5), key

    wa = load_file(a.final_dir / "model.safetensors")
    wb = load_file(b.final_dir / "model.safetensors")
    w0 = load_file(tiny_model_dir / "model.safetensors")
    assert wa.keys() == wb.keys()
    diff = torch.cat([(wa[k] - wb[k]).flatten() for k in wa])
    update = torch.cat([(wa[k] - w0[k]).flatten() for k in wa])
    assert update.abs().max() > 1e-3  # training changed the weights, so equality is not trivial
    # Adam divides by sqrt(v) + 1e-8: where a gradient entry is itself ~1e-8 (cancellation), float32
    # summation-order noise in it is amplified to up to ~lr * 1e-2 in the update. So a handful of entries
    # may differ by ~1e-4; everything else must agree to 1e-5, and the whole difference must be tiny
    # next to the update (a per-micro-batch-mean bug moves thousands of entries by ~lr).
    assert (diff.abs() > 1e-5).sum().item() <= 1e-3 * diff.numel(), diff.abs().topk(10).values
    assert diff.norm() < 1e-3 * update.norm()
    assert diff.abs().max() < 0.1 * 3 * 1e-2  # far below the up to lr-per-step an Adam update can move
