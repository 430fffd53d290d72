"""Rank-aware pieces without processes: `PairShards` (who trains on which pair) and the launch check.

The multi-process behaviour these guarantee (no hang, no pair lost or seen twice, N ranks x b == 1 rank
x N*b) is checked end to end in test_multiprocess.py; here every world size and accumulation is cheap.
"""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from orpo_dist.distributed import check_world_size
from orpo_dist.loader import PairShards


def shards(n: int, batch: int, accum: int, world: int, seed: int = 0, lengths=None, **kw) -> list[PairShards]:
    lengths = lengths if lengths is not None else [10] * n
    return [PairShards(lengths, batch, accum, world, rank, seed, **kw) for rank in range(world)]


def steps_by_rank(rank_shards: list[PairShards], epoch: int) -> list[list[list[list[tuple[int, float]]]]]:
    """[rank][step] -> that rank's micro-batches of the step (lists of (pair, weight))."""
    out = []
    for s in rank_shards:
        steps = [[] for _ in range(s.steps_per_epoch)]
        for step, micro in s.micro_batches(epoch):
            steps[step].append(micro)
        out.append(steps)
    return out


def real_pairs(micro_batches) -> list[int]:
    return [i for micro in micro_batches for i, w in micro if w > 0]


CASES = [
    (world, accum, batch, n)
    for world, accum in itertools.product(range(1, 5), range(1, 4))
    for batch, extra in ((1, 1), (3, 5))
    # n not divisible by the global batch: the last step is ragged, and often leaves whole slots empty
    for n in [3 * batch * accum * world + extra]
    if n % (batch * accum * world)
]


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize(("world", "accum", "batch", "n"), CASES)
def test_every_pair_once_and_ranks_in_step(world, accum, batch, n, group_by_length):
    lengths = [random.Random(i).randint(5, 60) for i in range(n)]
    rank_shards = shards(n, batch, accum, world, seed=3, lengths=lengths, group_by_length=group_by_length)
    steps = rank_shards[0].steps_per_epoch
    assert steps == -(-n // (batch * accum * world))
    for epoch in range(2):
        per_rank = steps_by_rank(rank_shards, epoch)
        seen = []
        for rank, rank_steps in enumerate(per_rank):
            assert len(rank_steps) == steps
            for step, micro_batches in enumerate(rank_steps):
                # the same number of forward/backward calls on every rank, or DDP / ZeRO collectives hang
                assert len(micro_batches) == accum, (rank, step)
                for micro in micro_batches:
                    assert 1 <= len(micro) <= batch
                    weights = {w for _, w in micro}
                    if 0.0 in weights:  # a filler: one zero-weight pair standing in for an empty slot
                        assert step == steps - 1, (
                            f"filler on rank {rank} step {step} (not the ragged last step)"
                        )
                        assert len(micro) == 1
                    else:
                        assert weights == {1.0}
            seen += real_pairs(mb for rank_step in rank_steps for mb in rank_step)
        # a pair (chosen + rejected) is one index: each trained exactly once per epoch, on one rank
        assert sorted(seen) == list(range(n))
        ranks_sets = [set(real_pairs(mb for st in rank_steps for mb in st)) for rank_steps in per_rank]
        for a, b in itertools.combinations(ranks_sets, 2):
            assert not a & b


def test_ragged_last_step_gives_idle_slots_fillers():
    # 4 ranks x 2 micro-batches x 1 pair = 8 slots; 9 pairs leave a last step with one real pair
    rank_shards = shards(9, batch=1, accum=2, world=4)
    last = [steps_by_rank(rank_shards, 0)[r][-1] for r in range(4)]
    weights = [w for rank_micro in last for micro in rank_micro for _, w in micro]
    assert weights.count(1.0) == 1 and weights.count(0.0) == 7


def test_deterministic_per_seed_and_epoch():
    a, b = shards(50, 2, 2, 2, seed=5)[1], shards(50, 2, 2, 2, seed=5)[1]
    assert list(a.micro_batches(0)) == list(b.micro_batches(0))
    assert a.order(0) == b.order(0)
    assert a.order(0) != a.order(1), "each epoch must reshuffle"
    assert a.order(0) != shards(50, 2, 2, 2, seed=6)[1].order(0)
    assert shards(50, 2, 2, 2, shuffle=False)[0].order(0) == list(range(50))


def test_resume_mid_epoch_continues_the_same_micro_batches():
    s = shards(50, 2, 3, 2, seed=1, group_by_length=True, lengths=list(range(50)))[1]
    full = list(s.micro_batches(1))
    assert list(s.micro_batches(1, start_step=2)) == [m for m in full if m[0] >= 2]


def _step_sets(world: int, batch: int, accum: int, n: int, **kw) -> list[set[int]]:
    per_rank = steps_by_rank(shards(n, batch, accum, world, seed=11, **kw), 0)
    return [
        set().union(*(real_pairs(per_rank[r][step]) for r in range(world)))
        for step in range(len(per_rank[0]))
    ]


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize(
    ("split", "single"), [((2, 2, 1), (1, 4, 1)), ((2, 1, 3), (1, 2, 3)), ((4, 1, 1), (1, 1, 4))]
)
def test_global_batch_does_not_depend_on_the_split(split, single, group_by_length):
    """(world, batch, accum) splits of one global batch train the same pairs at every step."""
    n = 45
    lengths = [random.Random(i).randint(5, 60) for i in range(n)]
    kw = dict(lengths=lengths, group_by_length=group_by_length)
    assert _step_sets(*split, n, **kw) == _step_sets(*single, n, **kw)


def _rank_token_ratio(rank_shards: list[PairShards], lengths: list[int]) -> float:
    """Mean over full steps of max/min per-rank token count (1.0 = perfectly balanced)."""
    per_rank = steps_by_rank(rank_shards, 0)
    ratios = []
    for step in range(len(per_rank[0]) - 1):  # the ragged last step has fillers
        tokens = [sum(lengths[i] for i in real_pairs(per_rank[r][step])) for r in range(len(per_rank))]
        ratios.append(max(tokens) / min(tokens))
    return sum(ratios) / len(ratios)


def test_group_by_length_balances_rank_token_counts():
    rng = random.Random(0)
    # skewed: most pairs short, a long tail (the straggler case)
    lengths = [rng.choice([rng.randint(8, 24)] * 4 + [rng.randint(200, 900)]) for _ in range(2000)]
    kw = dict(batch=4, accum=2, world=4, seed=0, lengths=lengths)
    plain = _rank_token_ratio(shards(len(lengths), group_by_length=False, **kw), lengths)
    grouped = _rank_token_ratio(shards(len(lengths), group_by_length=True, **kw), lengths)
    assert grouped < plain, (grouped, plain)
    assert grouped < 1.2, grouped


def _fake_accelerator(num_processes: int, kind: DistributedType = DistributedType.MULTI_CPU):
    return SimpleNamespace(num_processes=num_processes, distributed_type=kind)


def test_check_world_size_names_the_mismatch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=4 processes but the process group has 1"):
        check_world_size(_fake_accelerator(1, DistributedType.NO))
    check_world_size(_fake_accelerator(4))
    monkeypatch.delenv("WORLD_SIZE")
    check_world_size(_fake_accelerator(1, DistributedType.NO))  # plain `python -m orpo_dist.train`


def test_check_world_size_rejects_unsynchronised_ranks(monkeypatch):
    # `--multi_gpu` / torchrun on CPU without ACCELERATE_USE_CPU: 2 ranks, each a single-process job
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="never be synchronised"):
        check_world_size(_fake_accelerator(2, DistributedType.NO))


@pytest.mark.parametrize("env", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_check_world_size_rejects_a_silently_dropped_strategy(monkeypatch, env):
    # ACCELERATE_USE_CPU=true with a DeepSpeed / FSDP config: accelerate quietly runs plain DDP
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(env, "true")
    with pytest.raises(RuntimeError, match=f"{env}=true.*running MULTI_CPU"):
        check_world_size(_fake_accelerator(2))
    wanted = DistributedType.DEEPSPEED if env == "ACCELERATE_USE_DEEPSPEED" else DistributedType.FSDP
    check_world_size(_fake_accelerator(2, wanted))
