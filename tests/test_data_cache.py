"""The tokenised cache (hit, miss, what invalidates it, atomic builds), chunked parallel tokenisation, and
the prefetching loader (exact order, resume position, workers that survive a preemption signal).

The 2-rank checks (one rank tokenises, the others memory-map; a resumed job reads the cache; one build per
node with a node-local cache_dir) are in test_multiprocess.py and test_multinode.py, on launches they share.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time

import datasets
import psutil
import pytest
import torch

from orpo_dist.config import Config, DataConfig, TrainConfig
from orpo_dist.data import DataError, build_datasets, parallel
from orpo_dist.data import cache as cache_mod
from orpo_dist.data.cache import cache_root, tokenised_datasets
from orpo_dist.layouts import PaddedCollator
from orpo_dist.loader import PairLoader, PairShards, pair_lengths

datasets.disable_progress_bars()


class SoloAccelerator:
    """What tokenised_datasets asks of an accelerator, for one process (the 2-rank runs use the real one)."""

    num_processes, process_index, is_main_process, is_local_main_process = 1, 0, True, True
    wait_for_everyone = staticmethod(lambda: None)


def write_pairs(path, n: int, start: int = 0) -> str:
    rows = [{"prompt": f"Question {i}?\n", "chosen": f"answer {i}", "rejected": f"no {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[start:]))
    return str(path)


def config(tmp_path, **data) -> Config:
    data = {"data_path": str(tmp_path / "pairs.jsonl"), "eval_split": 0.2, **data}
    return Config(data=DataConfig(**data), train=TrainConfig(output_dir=str(tmp_path / "out"), seed=3))


def load(cfg: Config, tokenizer):
    lines: list[str] = []
    got = tokenised_datasets(cfg, tokenizer, SoloAccelerator(), lines.append)
    return got, lines


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "pairs.jsonl", 40)


def test_miss_builds_then_hit_memory_maps_the_same_data(tmp_path, pairs, tokenizer):
    cfg = config(tmp_path)
    first, lines = load(cfg, tokenizer)
    assert first.built and lines[0] == f"tokenised cache: miss: building (no cache in {cache_root(cfg)} yet)"
    assert lines[1].startswith(f"tokenised cache: built {first.directory} in ")
    assert first.directory.parent == tmp_path / "out" / "data_cache"  # default: inside output_dir
    second, lines = load(cfg, tokenizer)
    assert not second.built and lines == [f"tokenised cache: hit {first.directory}"]
    # what build_datasets gives, read back memory-mapped from the cache's Arrow files
    train, evaluation, report = build_datasets(cfg.data, tokenizer, 3)
    assert second.train.to_list() == train.to_list() and second.eval.to_list() == evaluation.to_list()
    assert second.report == report  # stored with the cache: printed on a hit as on a miss
    for ds in (second.train, second.eval):
        files = [f["filename"] for f in ds.cache_files]
        assert files and all(f.startswith(str(first.directory)) for f in files)
    assert not [p for p in first.directory.parent.iterdir() if p.name.startswith(".")]  # no leftovers


def _change(name: str, tmp_path, cfg: Config, tokenizer, monkeypatch):
    """Change one input of the fingerprint; returns (config, tokenizer, words the miss reason must contain)."""
    d = cfg.data
    if name == "source file":
        time.sleep(0.01)
        write_pairs(tmp_path / "pairs.jsonl", 41)
        return cfg, tokenizer, ["data source"]
    if name == "tokenizer files":
        tokenizer = tokenizer.__class__.from_pretrained(_saved(tokenizer, tmp_path))
        tokenizer.add_tokens(["<|tool|>"])
        return cfg, tokenizer, ["tokenizer files"]
    if name == "chat template":
        tokenizer = tokenizer.__class__.from_pretrained(_saved(tokenizer, tmp_path))
        tokenizer.chat_template = tokenizer.chat_template.replace("<|", "<<|")
        return cfg, tokenizer, ["chat template"]
    if name == "data-format version":
        monkeypatch.setattr(cache_mod, "DATA_FORMAT_VERSION", cache_mod.DATA_FORMAT_VERSION + 1)
        return cfg, tokenizer, ["data-format version"]
    if name == "seed":
        return (
            dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=4)),
            tokenizer,
            ["seed 3 -> 4"],
        )
    if name == "eval_data_path":
        value = write_pairs(tmp_path / "eval.jsonl", 5)
    elif name == "prompt_column":
        rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
        (tmp_path / "q.jsonl").write_text(
            "".join(json.dumps({"q": r.pop("prompt"), **r}) + "\n" for r in rows)
        )
        d = dataclasses.replace(d, data_path=str(tmp_path / "q.jsonl"))
        value = "q"
    else:
        value = {"max_length": 30, "max_prompt_length": 8, "max_completion_length": 4, "eval_split": 0.5,
                 "max_samples": 20, "skip_invalid": True, "train_split": "other"}[name]  # fmt: skip
    return dataclasses.replace(cfg, data=dataclasses.replace(d, **{name: value})), tokenizer, [name]


def _saved(tokenizer, tmp_path) -> str:
    tokenizer.save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


@pytest.mark.parametrize(
    "name",
    [
        "source file", "tokenizer files", "chat template", "data-format version", "seed", "eval_data_path",
        "prompt_column", "max_length", "max_prompt_length", "max_completion_length", "eval_split",
        "max_samples", "skip_invalid", "train_split",
    ],
)  # fmt: skip
def test_every_fingerprint_input_invalidates(name, tmp_path, pairs, tokenizer, monkeypatch):
    cfg = config(tmp_path)
    base, _ = load(cfg, tokenizer)
    changed_cfg, changed_tok, words = _change(name, tmp_path, cfg, tokenizer, monkeypatch)
    got, lines = load(changed_cfg, changed_tok)
    assert got.built and got.directory != base.directory, lines
    assert lines[0].startswith("tokenised cache: miss: building (changed since the last cache: ")
    assert all(w in lines[0] for w in words), lines[0]
    monkeypatch.undo()
    if name != "source file":  # the old build is still there for the old inputs
        again, lines = load(cfg, tokenizer)
        assert not again.built and again.directory == base.directory, lines


def test_how_it_is_built_is_not_in_the_key(tmp_path, pairs, tokenizer):
    cfg = config(tmp_path)
    base, _ = load(cfg, tokenizer)
    got, lines = load(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_proc=2)), tokenizer)
    assert not got.built and got.directory == base.directory, lines


def test_overwrite_cache_rebuilds(tmp_path, pairs, tokenizer):
    cfg = config(tmp_path)
    base, _ = load(cfg, tokenizer)
    got, lines = load(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, overwrite_cache=True)), tokenizer
    )
    assert got.built and got.directory == base.directory
    assert lines[0] == "tokenised cache: miss: building (overwrite_cache: true)"
    assert got.train.to_list() == base.train.to_list()


def test_a_crash_mid_build_leaves_no_cache(tmp_path, pairs, tokenizer, monkeypatch):
    cfg = config(tmp_path)
    save = datasets.Dataset.save_to_disk

    def save_then_crash(self, path, **kw):
        save(self, path, **kw)
        if path.endswith("eval"):
            raise KeyboardInterrupt("killed while writing the cache")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        load(cfg, tokenizer)
    monkeypatch.undo()
    assert list(cache_root(cfg).iterdir()) == []  # no entry and no temporary directory left
    got, lines = load(cfg, tokenizer)
    assert got.built and "no cache in" in lines[0]


def test_an_unreadable_cache_is_rebuilt(tmp_path, pairs, tokenizer):
    cfg = config(tmp_path)
    base, _ = load(cfg, tokenizer)
    for f in (base.directory / "train").glob("*.arrow"):
        f.unlink()
    got, lines = load(cfg, tokenizer)
    assert got.built and got.directory == base.directory
    assert lines[0].startswith(
        f"tokenised cache: miss: building (the cache in {base.directory} is unreadable or stale"
    )
    assert got.train.to_list() == build_datasets(cfg.data, tokenizer, 3)[0].to_list()


def test_a_data_error_leaves_no_cache(tmp_path, tokenizer):
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "b"}\n')
    cfg = config(tmp_path, eval_split=0)
    with pytest.raises(DataError, match="line 1"):
        load(cfg, tokenizer)
    assert list(cache_root(cfg).iterdir()) == []


def test_cache_dir_expands_environment_variables(tmp_path, pairs, tokenizer, monkeypatch):
    monkeypatch.setenv("NODE_SCRATCH", str(tmp_path / "scratch"))
    got, _ = load(config(tmp_path, cache_dir="$NODE_SCRATCH/cache"), tokenizer)
    assert got.directory.parent == tmp_path / "scratch" / "cache"


# ------------------------------------------------------------------------------------------ parallel chunks


@pytest.mark.parametrize("source", ["builtin", "conversational-jsonl"])
def test_chunks_on_workers_give_the_same_result(source, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(parallel, "CHUNK_PAIRS", 7)
    if source == "builtin":
        cfg = DataConfig(data_path="builtin:case_rule", eval_split=0.1, max_samples=100, max_length=12,
                         max_prompt_length=10)  # fmt: skip
    else:
        turn = [{"role": "user", "content": "Hi?"}]
        rows = [{"chosen": turn + [{"role": "assistant", "content": f"yes {i}"}],
                 "rejected": turn + [{"role": "assistant", "content": f"no {i}"}]} for i in range(60)]  # fmt: skip
        (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = DataConfig(data_path=str(tmp_path / "c.jsonl"), eval_split=0.2)
    one = build_datasets(dataclasses.replace(cfg, num_proc=1), tokenizer, 0)
    two = build_datasets(dataclasses.replace(cfg, num_proc=2), tokenizer, 0)
    assert one[0].to_list() == two[0].to_list() and one[1].to_list() == two[1].to_list()
    assert one[2] == two[2] and one[2].read == len(one[0]) + len(one[1]) + sum(one[2].dropped.values())
    assert one[2].truncated > 0 or source != "builtin"


def test_workers_report_the_first_bad_row_in_file_order(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(parallel, "CHUNK_PAIRS", 5)
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(40)]
    rows[33]["chosen"] = 7  # a later chunk: a worker may well reach it first
    rows[12]["rejected"] = rows[12]["chosen"]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(data_path=str(path), eval_split=0, num_proc=2)
    with pytest.raises(DataError) as got:
        build_datasets(cfg, tokenizer, 0)
    with pytest.raises(DataError) as one_process:
        build_datasets(dataclasses.replace(cfg, num_proc=1), tokenizer, 0)
    assert str(got.value) == str(one_process.value)
    assert str(got.value).startswith(f"{path} line 13, field 'rejected': identical to chosen")
    _, _, report = build_datasets(dataclasses.replace(cfg, skip_invalid=True), tokenizer, 0)
    assert report.dropped == {"chosen identical to rejected": 1, "non-text value": 1}


def test_num_proc_auto(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert parallel.resolve_num_proc("auto", 5000) == 1
    assert parallel.resolve_num_proc("auto", 5001) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert parallel.resolve_num_proc("auto", 100_000) == 2
    assert parallel.resolve_num_proc(3, 10) == 3


# ------------------------------------------------------------------------------------------ prefetching loader


def _loader(tokenizer, workers: int) -> PairLoader:
    train, _, _ = build_datasets(
        DataConfig(data_path="builtin:case_rule", eval_split=0, max_samples=45), tokenizer, 0
    )
    shards = PairShards(pair_lengths(train), 2, 2, world=2, rank=1, seed=5, group_by_length=True)
    return PairLoader(train, PaddedCollator(tokenizer.pad_token_id), shards, torch.device("cpu"), workers)


def _steps(loader: PairLoader, epoch: int, step: int, n: int, during=None) -> list[list[dict]]:
    steps = loader.steps(epoch, step)
    out = []
    for i in range(n):
        out.append(next(steps))
        if during and i == 1:
            during()
    steps.close()
    return out


def test_workers_keep_the_exact_order_and_resume_position(tokenizer):
    """Collated in worker processes, ahead of the step: the same batches, in the same order, from any position."""
    steps_per_epoch = _loader(
        tokenizer, 0
    ).shards.steps_per_epoch  # 45 pairs / 8 per step: 6, the last ragged
    for epoch, step in [(0, 0), (1, 4)]:
        want = _steps(_loader(tokenizer, 0), epoch, step, 2 * steps_per_epoch)
        got = _steps(_loader(tokenizer, 2), epoch, step, 2 * steps_per_epoch)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert len(g) == len(w) == 2  # accumulation micro-batches per step
            for gb, wb in zip(g, w):
                assert gb.keys() == wb.keys() and all(torch.equal(gb[k], wb[k]) for k in wb)


def test_workers_survive_a_preemption_signal(tokenizer):
    """SLURM's SIGUSR1 and scancel's SIGTERM reach every process: the workers leave them to the main process."""
    loader = _loader(tokenizer, 2)
    me = psutil.Process()

    def signal_the_workers():
        workers = me.children()
        assert len(workers) == 2
        for w in workers:
            os.kill(w.pid, signal.SIGUSR1)
            os.kill(w.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert all(w.is_running() for w in workers)

    got = _steps(loader, 0, 0, 8, during=signal_the_workers)
    want = _steps(_loader(tokenizer, 0), 0, 0, 8)
    assert all(torch.equal(g[0]["input_ids"], w[0]["input_ids"]) for g, w in zip(got, want))
    deadline = time.monotonic() + 10
    while me.children() and time.monotonic() < deadline:  # closing the stream stops its workers
        time.sleep(0.1)
    assert not me.children()


def test_pair_lengths_is_the_length_column(tokenizer):
    train, _, _ = build_datasets(
        DataConfig(data_path="builtin:case_rule", eval_split=0.5, max_samples=30), tokenizer, 0
    )
    want = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in train.to_list()]
    assert pair_lengths(train).tolist() == want


def _die_in_the_third_chunk(span):
    if span.start == 10:
        os._exit(9)  # as the OOM killer would
    return _run_chunk(span)


_run_chunk = parallel._run_chunk


def test_a_worker_that_dies_stops_the_run_with_the_fix(tmp_path, pairs, tokenizer, monkeypatch):
    monkeypatch.setattr(parallel, "CHUNK_PAIRS", 5)
    monkeypatch.setattr(parallel, "_run_chunk", _die_in_the_third_chunk)
    with pytest.raises(
        DataError, match=r"a tokenising worker process died \(out of memory\?\) with num_proc=2"
    ):
        build_datasets(DataConfig(data_path=pairs, num_proc=2), tokenizer, 0)


# ------------------------------------------------------------------------------------------ the keys


def test_the_scale_keys_and_their_errors(monkeypatch):
    from orpo_dist.config import ConfigError, load_config

    monkeypatch.setenv(
        "TMPDIR", "/node/tmp"
    )  # expanded when the config is read, on each node (unset: refused)

    cfg = load_config(None, ["--num_proc", "auto", "--dataloader_num_workers", "3", "--peak_tflops", "400",
                             "--cache_dir", "$TMPDIR/c", "--overwrite_cache"])  # fmt: skip
    assert (cfg.data.num_proc, cfg.train.dataloader_num_workers, cfg.train.peak_tflops) == ("auto", 3, 400.0)
    assert (cfg.data.cache_dir, cfg.data.overwrite_cache) == ("/node/tmp/c", True)
    assert (Config().data.num_proc, Config().train.dataloader_num_workers) == ("auto", "auto")  # the defaults
    for flags, message in [
        (["--num_proc", "many"], "num_proc='many' is not an integer and is not one of ['auto']"),
        (["--num_proc", "0"], "num_proc=0 must be >= 1 or auto"),
        (["--dataloader_num_workers", "-1"], "dataloader_num_workers=-1 must be >= 0 or auto"),
        (["--peak_tflops", "0"], "peak_tflops=0.0 must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, flags)


def test_a_hub_dataset_is_read_once_for_the_key_and_the_build(tokenizer, monkeypatch):
    """The cache key needs a hub dataset's fingerprint and the build needs its rows: one load serves both."""
    from orpo_dist.builtin import case_rule_pairs
    from orpo_dist.data import sources

    loads = []

    def load_dataset(path, split, **kw):
        loads.append((path, split))
        return datasets.Dataset.from_list(case_rule_pairs(40, seed=3))

    monkeypatch.setattr(sources.datasets, "load_dataset", load_dataset)
    sources.hub_dataset.cache_clear()
    cfg = Config(data=DataConfig(data_path="someone/preference-pairs", eval_split=0.1))
    key = cache_mod.key_inputs(cfg.data, tokenizer, 0)
    train, held_out, _ = build_datasets(cfg.data, tokenizer, seed=0)
    assert key["source"]["hub"] == "someone/preference-pairs" and key["source"]["fingerprint"]
    assert len(train) + len(held_out) == 40
    assert loads == [("someone/preference-pairs", "train")]
    sources.hub_dataset.cache_clear()
