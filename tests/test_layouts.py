"""Batch layouts (packed, shared prefix) against the padded layout, and their attention masks.

Every switch must give the padded layout's numbers: per-pair log-probs, the loss parts and every
parameter gradient, within float32 tolerance, for both NLL scopes and for pairs of very different
lengths. The isolation tests change one sequence and check another does not move, with a control
that breaks isolation on purpose so the test is shown to catch it.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import orpo_forward, tiny_run
from torch import nn

from orpo_dist.config import load_config
from orpo_dist.layouts import (
    PackedCollator,
    PaddedCollator,
    SharedPrefixCollator,
    make_collator,
    shared_prefix_attention_mask,
)
from orpo_dist.loss import batch_counts
from orpo_dist.metrics import WALL_CLOCK_KEYS

LAYOUTS = ["packed", "shared_prefix"]
SCOPES = ["prompt_completion", "completion"]
BETA = 0.25
# (prompt, chosen, rejected) lengths: 1-token prompt / completions, and 20x length differences
LENGTHS = [(3, 5, 9), (12, 1, 2), (1, 20, 4), (25, 2, 30), (2, 1, 1)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (on a shared 2-core box the default is far slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pairs(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    tokens = lambda n: [rng.randrange(1, vocab) for _ in range(n)]  # noqa: E731  (0 is the pad id)
    return [
        {"id": i, "prompt_ids": tokens(p), "chosen_ids": tokens(c), "rejected_ids": tokens(r)}
        for i, (p, c, r) in enumerate(lengths)
    ]


@pytest.fixture(scope="module")
def random_ids_model_dir(tmp_path_factory):
    """A 2-layer Llama (GQA, RoPE) saved and loaded as an ordinary checkpoint; token ids are random."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    path = tmp_path_factory.mktemp("packing_model")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, random_ids_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        random_ids_model_dir, dtype=torch.float32, attn_implementation=request.param
    )
    torch.manual_seed(0)
    with torch.no_grad():  # a less uniform init, so positions and sequences really differ
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def _run(model, batch, chunk_size=7):
    """Loss parts and every parameter gradient of one forward/backward."""
    model.zero_grad()
    parts = orpo_forward(model, batch, chunk_size)
    parts.loss(BETA).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return parts, grads


def _assert_same(got, want):
    (pg, gg), (pw, gw) = got, want
    for name in ("chosen_logps", "rejected_logps", "log_odds", "nll_sum", "nll_tokens", "or_sum", "pairs"):
        torch.testing.assert_close(getattr(pg, name), getattr(pw, name), rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(pg.loss(BETA), pw.loss(BETA), rtol=1e-6, atol=1e-6)
    for name in gw:
        torch.testing.assert_close(gg[name], gw[name], rtol=1e-5, atol=1e-5, msg=f"grad {name}")


# ------------------------------------------------------------------------------------------ equal to padded


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_equals_padded(model, layout, scope):
    pairs = _pairs(model.config.vocab_size)
    want = _run(model, PaddedCollator(0, scope)(pairs))
    got = _run(model, make_collator(layout, 0, scope)(pairs))
    _assert_same(got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_filler_pair_and_single_pair(model, layout):
    """A weight-0 filler pair (loader.PairShards) and a batch of one pair behave as in padded."""
    pairs = _pairs(model.config.vocab_size)
    for batch_pairs in ([{**pairs[0], "weight": 0.0}, pairs[3]], [pairs[2]]):
        _assert_same(_run(model, make_collator(layout, 0, "prompt_completion")(batch_pairs)),
                     _run(model, PaddedCollator(0)(batch_pairs)))  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_counts_equal_padded(layout):
    """The trainer normalises by these before the forward: they must not depend on the layout."""
    pairs = _pairs(100)
    for scope in SCOPES:
        padded, other = PaddedCollator(0, scope)(pairs), make_collator(layout, 0, scope)(pairs)
        assert batch_counts(other).tolist() == batch_counts(padded).tolist()
        assert other["num_tokens"].item() == padded["num_tokens"].item()
        assert sorted(other["tgt"].tolist()) == sorted(padded["tgt"].tolist())
        assert (other["seq"] >= 0).sum() == (padded["seq"] >= 0).sum()


# ------------------------------------------------------------------------------------------ layout shape


def test_packed_has_no_pad_tokens_and_positions_restart():
    pairs = _pairs(100)
    batch = PackedCollator(pad_token_id=0)(pairs)
    ids, positions = batch["input_ids"][0], batch["position_ids"][0]
    lengths = [len(p["prompt_ids"]) + len(p[k]) for k in ("chosen_ids", "rejected_ids") for p in pairs]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert (ids != 0).all() and "attention_mask" not in batch
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    assert positions[starts].tolist() == [0] * len(lengths)  # restart at every sequence
    expected = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(positions, expected)
    # every scored position predicts the next token of its own sequence
    assert torch.equal(batch["tgt"], ids[batch["pos"] + 1])


def test_shared_prefix_runs_each_prompt_once():
    pairs = _pairs(100)
    batch = SharedPrefixCollator(pad_token_id=0)(pairs)
    p, c, r = (torch.tensor([len(x[k]) for x in pairs]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    assert batch["input_ids"].shape == (1, (p + c + r).sum().item())
    assert (batch["input_ids"] != 0).all()
    o = 0
    for k, ex in enumerate(pairs):
        pk, ck, rk = len(ex["prompt_ids"]), len(ex["chosen_ids"]), len(ex["rejected_ids"])
        seg = slice(o, o + pk + ck + rk)
        assert batch["input_ids"][0, seg].tolist() == ex["prompt_ids"] + ex["chosen_ids"] + ex["rejected_ids"]
        # rejected continues from the end of the prompt, as if it followed the prompt directly
        assert batch["position_ids"][0, seg].tolist() == [*range(pk + ck), *range(pk, pk + rk)]
        assert (batch["segment_ids"][0, seg] == k).all()
        # the first rejected token is predicted from the last prompt position
        first_rejected = (batch["seq"] == len(pairs) + k).nonzero()[0, 0]
        assert (
            batch["pos"][first_rejected] == o + pk - 1
            and batch["tgt"][first_rejected] == ex["rejected_ids"][0]
        )
        o += pk + ck + rk


def test_make_collator_and_config_know_every_layout():
    for layout, cls in [
        ("padded", PaddedCollator),
        ("packed", PackedCollator),
        ("shared_prefix", SharedPrefixCollator),
    ]:
        assert isinstance(make_collator(layout, 0, "completion"), cls)
        assert load_config(overrides={"layout": layout}).orpo.layout == layout
    with pytest.raises(ValueError, match="shared_prefix"):
        make_collator("nope", 0, "completion")


def test_training_run_is_the_same_in_every_layout(tmp_path):
    """The real trainer (`orpo_dist.train`) with each layout: the same metrics, step after step."""
    import orpo_dist

    rows = {}
    for layout in ["padded", *LAYOUTS]:
        run = tiny_run(tmp_path / layout, max_samples=96, eval_split=0.2, eval_on_start=True, batch_size=8,
                       gradient_accumulation=1, max_steps=6, logging_steps=2, save_steps=None, seed=0, layout=layout)  # fmt: skip
        result = orpo_dist.train(run)
        rows[layout] = [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in result.metrics]
    assert len(rows["padded"]) >= 4
    for layout in LAYOUTS:
        for got, want in zip(rows[layout], rows["padded"], strict=True):
            assert got.keys() == want.keys()
            for k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), (layout, got["step"], k)


# ------------------------------------------------------------------------------------------ isolation


def _logps(model, batch):
    with torch.no_grad():
        p = orpo_forward(model, batch, 64)
    return p.chosen_logps, p.rejected_logps


@pytest.mark.parametrize("layout", LAYOUTS)
def test_other_sequences_cannot_change_a_sequence(model, layout):
    """Rewriting pairs 1.. leaves pair 0's log-probs bit-for-bit alone; in shared_prefix, rewriting chosen
    leaves rejected alone too. The control (one position run, no isolation) shows the check can fail."""
    collate = make_collator(layout, 0, "prompt_completion")
    vocab = model.config.vocab_size
    pairs, others = _pairs(vocab), _pairs(vocab, seed=1)
    changed = [pairs[0]] + [{**o, "id": p["id"]} for p, o in zip(pairs[1:], others[1:])]
    chosen, rejected = _logps(model, collate(pairs))
    chosen2, rejected2 = _logps(model, collate(changed))
    torch.testing.assert_close(chosen2[0], chosen[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rejected2[0], rejected[0], rtol=1e-6, atol=1e-6)
    assert (chosen2[1:] - chosen[1:]).abs().min() > 1e-4  # the other pairs did change

    # rejected must not see chosen: change pair 0's chosen only
    new_chosen = [{**pairs[0], "chosen_ids": others[0]["chosen_ids"]}] + pairs[1:]
    chosen3, rejected3 = _logps(model, collate(new_chosen))
    assert (chosen3[0] - chosen[0]).abs() > 1e-4
    torch.testing.assert_close(rejected3[0], rejected[0], rtol=1e-6, atol=1e-6)

    # control: the same row with isolation removed (plain causal attention over the whole row)
    broken = collate(pairs) | {"position_ids": torch.arange(collate(pairs)["input_ids"].shape[1])[None]}
    broken.pop("segment_ids", None)
    broken2 = collate(new_chosen) | {"position_ids": broken["position_ids"]}
    broken2.pop("segment_ids", None)
    assert (_logps(model, broken2)[1][0] - _logps(model, broken)[1][0]).abs() > 1e-4  # contamination shows


def test_shared_prefix_mask_by_backend():
    batch = SharedPrefixCollator(0)(_pairs(50, lengths=[(2, 2, 3), (1, 1, 1)]))

    class Fake(nn.Module):
        def __init__(self, impl):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
            self.config = type("C", (), {"_attn_implementation": impl})()

    sdpa = shared_prefix_attention_mask(Fake("sdpa"), batch)
    assert sdpa.dtype == torch.bool and sdpa.shape == (1, 1, 10, 10)
    # pair 0 = tokens 0..6: prompt 0-1, chosen 2-3, rejected 4-6
    assert sdpa[0, 0, 4].tolist() == [True, True, False, False, True] + [False] * 5  # rejected: prompt + self
    assert sdpa[0, 0, 3].tolist() == [True, True, True, True] + [False] * 6  # chosen: prompt + itself
    assert not sdpa[0, 0, 7:, :7].any() and not sdpa[0, 0, :7, 7:].any()  # pairs never see each other
    eager = shared_prefix_attention_mask(Fake("eager"), batch)
    assert eager.dtype == torch.bfloat16 and torch.equal(eager == 0, sdpa)
    with pytest.raises(ValueError, match="flex_attention"):
        shared_prefix_attention_mask(Fake("flash_attention_2"), batch)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_flex_attention_masks_forward_on_cpu(random_ids_model_dir, layout):
    """The FlexAttention path the GPU uses (BlockMask from segment/branch ids, or transformers' own from
    position_ids), forward only: torch has no FlexAttention backward on CPU. Compiles (~5-10 s)."""
    from transformers import AutoModelForCausalLM

    got = {}
    for name, impl in [("padded", "sdpa"), (layout, "flex_attention")]:
        m = AutoModelForCausalLM.from_pretrained(
            random_ids_model_dir, dtype=torch.float32, attn_implementation=impl
        )
        got[name] = _logps(m.eval(), make_collator(name, 0, "prompt_completion")(_pairs(m.config.vocab_size)))
    for g, w in zip(got[layout], got["padded"]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ GPU only


def _run_on_gpu(model_dir, layout: str, attn_implementation: str, dtype):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    m = m.cuda().eval()
    batch = make_collator(layout, 0, "prompt_completion")(_pairs(m.config.vocab_size))
    return _run(m, {k: v.cuda() for k, v in batch.items()})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention block masks need a CUDA GPU")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_flex_attention_layouts_equal_padded_on_gpu(random_ids_model_dir, layout):

    (pg, gg), (pw, gw) = [
        _run_on_gpu(random_ids_model_dir, name, impl, torch.float32)
        for name, impl in [(layout, "flex_attention"), ("padded", "sdpa")]
    ]
    torch.testing.assert_close(pg.chosen_logps, pw.chosen_logps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pg.rejected_logps, pw.rejected_logps, rtol=1e-4, atol=1e-4)
    for name in gw:
        torch.testing.assert_close(gg[name], gw[name], rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash_attention_2 needs a CUDA GPU")
def test_packed_flash_attention_2_equals_padded_on_gpu(random_ids_model_dir):
    pytest.importorskip("flash_attn", reason="flash-attn is not installed")

    results = {
        name: _run_on_gpu(random_ids_model_dir, name, impl, torch.bfloat16)[0]
        for name, impl in [("padded", "sdpa"), ("packed", "flash_attention_2")]
    }
    torch.testing.assert_close(
        results["packed"].chosen_logps, results["padded"].chosen_logps, rtol=2e-2, atol=2e-2
    )
