"""Resume refuses what it cannot continue, continues what it can, and never runs code from a checkpoint;
checkpoints are atomic; metrics.jsonl holds each step once.

One uninterrupted reference run (checkpoints at steps 2, 4, 6 of 8) is made per module; each test copies
its output directory and resumes the copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import OFFLINE_ENV, REPO, read_jsonl, signal_after_logging, tiny_run
from safetensors.torch import load_file

import orpo_dist
from orpo_dist.checkpoint import Checkpointer
from orpo_dist.config import ConfigError
from orpo_dist.run_dir import complete_checkpoints

# 18 pairs, 4 held out: 14 over a global batch of 4 (2 x 2) are 4 steps per epoch, the last one ragged;
# 8 steps are 2 epochs; eval every 2 steps
RUN = dict(max_samples=18, max_steps=8, save_steps=2, save_total_limit=None, seed=3, eval_split=0.2,
           eval_steps=2, eval_on_start=True, lr=5e-3)  # fmt: skip


def config(out: Path, model_dir, **overrides) -> dict:
    return tiny_run(out, **{"model": str(model_dir), **RUN, **overrides})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("reference") / "out"
    result = orpo_dist.train(config(out, tiny_model_dir))
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    return out, result


@pytest.fixture
def copy(reference, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    return out


def train_losses(rows) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def file_digests(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------ refused


@pytest.mark.parametrize(
    "overrides,needles",
    [
        ({"max_samples": 16}, ("training data 14 pairs", "-> 13 pairs")),
        ({"max_prompt_length": 20}, ("training data 14 pairs (sha256",)),  # same count, other tokens
        ({"eval_split": 0.3}, ("training data",)),  # another split: other training pairs
        ({"batch_size": 4}, ("global_batch 4 -> 8",)),
        ({"gradient_accumulation": 1}, ("global_batch 4 -> 2",)),
        ({"seed": 4}, ("seed 3 -> 4",)),
        ({"group_by_length": True}, ("group_by_length False -> True",)),
        ({"peft": True}, ("adapter full -> lora",)),
        ({"model": "builtin:tiny"}, ("model ",)),
    ],
    ids=[
        "fewer-pairs",
        "same-count-other-tokens",
        "other-split",
        "batch",
        "accumulation",
        "seed",
        "length-grouping",
        "peft",
        "model",
    ],  # fmt: skip
)
def test_a_resume_that_cannot_continue_is_refused_with_the_numbers(copy, tiny_model_dir, overrides, needles):
    before = file_digests(copy)
    with pytest.raises(ConfigError) as e:
        orpo_dist.train(config(copy, tiny_model_dir, resume="auto", **overrides))
    msg = str(e.value)
    assert msg.startswith(f"cannot resume from {copy / 'checkpoint-6'}:"), msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert "\n" not in msg
    # nothing of the run is touched (the tokenised cache may gain an entry for the other data)
    after = file_digests(copy)
    assert {k: v for k, v in after.items() if k != "config.yaml" and not k.startswith("data_cache/")} == {
        k: v for k, v in before.items() if k != "config.yaml" and not k.startswith("data_cache/")
    }


def test_a_fresh_start_over_an_earlier_runs_checkpoints_is_refused(copy, tiny_model_dir):
    """Rotation would delete the new run's checkpoints (the old ones have higher steps), resume auto would
    pick the old run: a fresh start there is a forgotten --resume."""
    with pytest.raises(ConfigError, match=r"already holds checkpoints of an earlier run .*--resume auto"):
        orpo_dist.train(config(copy, tiny_model_dir))


def test_the_data_position_outside_the_epoch_is_refused_not_an_endless_loop(copy, tiny_model_dir):
    state_file = copy / "checkpoint-6" / "orpo_state.json"
    state = json.loads(state_file.read_text())
    state["progress"]["step_in_epoch"] = 9  # 4 steps per epoch
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="step_in_epoch 9 is past the 4 steps of an epoch"):
        orpo_dist.train(config(copy, tiny_model_dir, resume="auto"))


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: {**s, "progress": {**s["progress"], "global_step": "__import__('os')"}},
        lambda s: {**s, "progress": {**s["progress"], "epoch": -1}},
        lambda s: {k: v for k, v in s.items() if k != "fingerprint"},
        lambda s: "not json {",
    ],
    ids=["text-step", "negative-epoch", "no-fingerprint", "not-json"],
)
def test_a_damaged_state_file_is_refused(copy, tiny_model_dir, edit):
    state_file = copy / "checkpoint-6" / "orpo_state.json"
    edited = edit(json.loads(state_file.read_text()))
    state_file.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(ConfigError, match="orpo_state.json is damaged"):
        orpo_dist.train(config(copy, tiny_model_dir, resume="auto"))


# ------------------------------------------------------------------------------------------ continued


def test_another_split_of_the_same_global_batch_continues_the_same_run(copy, reference, tiny_model_dir):
    """1 process x 4 pairs x 1 micro-batch resumes a 2 x 2 checkpoint: same pairs per step, same losses."""
    result = orpo_dist.train(
        config(copy, tiny_model_dir, resume="latest", batch_size=4, gradient_accumulation=1)
    )
    want, got = train_losses(reference[1].metrics), train_losses(result.metrics)
    assert sorted(got) == [7, 8]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("resume", [True, "true", "latest", "auto"])
def test_resume_true_means_latest_and_odd_names_are_ignored(copy, tiny_model_dir, resume, capsys):
    """`checkpoint-8-copy`, `checkpoint-latest`, a file `checkpoint-9`, a half-written `checkpoint-10` sit next
    to the real ones: resume picks checkpoint-6, the newest complete one, and nothing breaks."""
    shutil.copytree(copy / "checkpoint-6", copy / "checkpoint-8-copy")
    shutil.copytree(copy / "checkpoint-6", copy / "checkpoint-latest")
    (copy / "checkpoint-9").write_text("not a directory")
    shutil.copytree(copy / "checkpoint-6", copy / "checkpoint-10")
    (copy / "checkpoint-10" / "COMPLETE").unlink()
    result = orpo_dist.train(config(copy, tiny_model_dir, resume=resume))
    assert f"resumed from {copy / 'checkpoint-6'} at step 6" in capsys.readouterr().out
    assert result.global_step == 8 and sorted(train_losses(result.metrics)) == [7, 8]


# ------------------------------------------------------------------------------------------ atomic saves


@pytest.mark.slow
def test_a_crash_while_resaving_a_step_never_leaves_a_half_new_checkpoint(copy, tiny_model_dir):
    """Resume from checkpoint-2 with another lr (allowed: the data position means the same) and crash, as kill -9
    would, in the middle of re-saving checkpoint-4: the old checkpoint-4 stays complete and byte-identical."""
    before = file_digests(copy / "checkpoint-4")
    script = f"""
import os, sys
import orpo_dist
from orpo_dist.checkpoint import Checkpointer
real = Checkpointer.save_model
def crash(self, model, path):
    real(self, model, path)
    if self.progress.global_step == 4 and path.name == "model":
        os._exit(9)  # no cleanup, no exception handlers: what SIGKILL leaves
Checkpointer.save_model = crash
cfg = {config(copy, tiny_model_dir, resume=str(copy / "checkpoint-2"), lr=1e-2)!r}
orpo_dist.train(cfg)
"""
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert (copy / ".checkpoint-4.partial" / "state").is_dir()  # the new save was under way ...
    assert not (copy / ".checkpoint-4.partial" / "COMPLETE").exists()
    assert file_digests(copy / "checkpoint-4") == before  # ... and the old checkpoint-4 is untouched
    assert [p.name for p in complete_checkpoints(copy)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    # the next resume ignores the partial save; saving step 4 again replaces checkpoint-4 whole
    orpo_dist.train(config(copy, tiny_model_dir, resume=str(copy / "checkpoint-2"), lr=1e-2))
    assert not (copy / ".checkpoint-4.partial").exists()
    assert file_digests(copy / "checkpoint-4") != before and (copy / "checkpoint-4" / "COMPLETE").is_file()


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoints(tmp_path, tiny_model_dir, monkeypatch):
    from orpo_dist.checkpoint import CheckpointError

    real = Checkpointer.save_model

    def disk_full(self, model, path):
        if self.progress.global_step == 4:
            raise OSError(28, "No space left on device")
        real(self, model, path)

    monkeypatch.setattr(Checkpointer, "save_model", disk_full)
    out = tmp_path / "out"
    with pytest.raises(
        CheckpointError, match=r"No space left on device.*last complete checkpoint is .*checkpoint-2"
    ):
        orpo_dist.train(config(out, tiny_model_dir))
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / ".checkpoint-4.partial").exists() and not (out / "final").exists()


@pytest.mark.parametrize("limit", [1, 2])
def test_save_total_limit_keeps_the_newest(tmp_path, tiny_model_dir, limit):
    out = tmp_path / "out"
    orpo_dist.train(config(out, tiny_model_dir, save_total_limit=limit))
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"][
        -limit:
    ]
    assert (out / "final").is_dir()


@pytest.mark.parametrize("limit", [0, -1, -5])
def test_save_total_limit_below_one_is_a_config_error(tmp_path, limit):
    with pytest.raises(ConfigError, match=f"save_total_limit={limit} must be >= 1"):
        orpo_dist.train(tiny_run(tmp_path, save_total_limit=limit))
    assert not tmp_path.joinpath("checkpoint-4").exists()


# ------------------------------------------------------------------------------------------ metrics once


def test_after_a_resume_metrics_jsonl_holds_each_step_once(copy, reference, tiny_model_dir):
    """Resume from an older checkpoint (the rows after it are retrained) with a line torn by a kill at the end."""
    with (copy / "metrics.jsonl").open("a") as f:
        f.write('{"loss": 1.2, "st')
    orpo_dist.train(config(copy, tiny_model_dir, resume=str(copy / "checkpoint-4")))
    rows = read_jsonl(copy / "metrics.jsonl")
    train = [r["step"] for r in rows if "loss" in r]
    evals = [r["step"] for r in rows if "eval_loss" in r]
    assert train == list(range(1, 9)) and evals == [0, 2, 4, 6, 8]
    assert len(rows) == len(train) + len(evals)
    want = train_losses(read_jsonl(reference[0] / "metrics.jsonl"))
    assert train_losses(rows) == pytest.approx(want, rel=1e-5)


def test_preempted_at_the_last_step_resumes_without_logging_it_twice(tmp_path, tiny_model_dir, monkeypatch):
    signal_after_logging(monkeypatch, step=8)
    out = tmp_path / "out"
    first = orpo_dist.train(config(out, tiny_model_dir))
    monkeypatch.undo()
    assert first.preempted and (out / "checkpoint-8" / "COMPLETE").exists() and not (out / "final").exists()
    again = orpo_dist.train(config(out, tiny_model_dir, resume="auto"))
    assert again.global_step == 8 and again.final_dir.is_dir() and again.metrics == []
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4, 6, 8]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))


def test_a_fresh_start_moves_an_earlier_metrics_file_aside(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    orpo_dist.train(config(out, tiny_model_dir, save_steps=None, max_steps=2))
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert read_jsonl(out / "metrics.previous.jsonl") == [{"step": 1, "loss": 9.0}]


# ------------------------------------------------------------------------------------------ no code from a checkpoint


class Payload:
    """Unpickling this runs a shell command that writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _torch_zip(path: Path, marker: Path) -> None:
    torch.save({"state": Payload(marker)}, path)


def _raw_pickle(protocol: int):
    def write(path: Path, marker: Path) -> None:
        path.write_bytes(pickle.dumps(Payload(marker), protocol=protocol))

    return write


PLANTED = {  # file the resume reads (or could be made to read) -> where it lives under checkpoint-6/state
    "optimizer": "optimizer.bin",
    "rng": "random_states_0.pkl",
    "custom-state": "custom_checkpoint_0.pkl",
    "scheduler": "scheduler.bin",
    "model-bin-instead-of-safetensors": "pytorch_model.bin",
    "deepspeed-optimizer": "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "deepspeed-model": "pytorch_model/mp_rank_00_model_states.pt",
    "stray": "extra.pt",
}


@pytest.mark.parametrize(
    "writer", [_torch_zip, _raw_pickle(0), _raw_pickle(4)], ids=["torch-zip", "pickle-0", "pickle-4"]
)
@pytest.mark.parametrize("where", list(PLANTED))
def test_a_planted_pickle_is_never_executed_and_the_resume_refuses(
    copy, tiny_model_dir, tmp_path, where, writer
):
    marker = tmp_path / "PWNED"
    state = copy / "checkpoint-6" / "state"
    target = state / PLANTED[where]
    target.parent.mkdir(parents=True, exist_ok=True)
    if where == "model-bin-instead-of-safetensors":
        (state / "model.safetensors").unlink()
    writer(target, marker)
    with pytest.raises(ConfigError) as e:
        orpo_dist.train(config(copy, tiny_model_dir, resume="auto"))
    assert not marker.exists(), "code from the checkpoint ran"
    assert PLANTED[where].split("/")[-1] in str(e.value) and "refusing" in str(e.value)


def test_a_planted_dcp_checkpoint_is_never_executed(tmp_path):
    """FSDP's sharded state (torch.distributed.checkpoint): `.metadata` and non-tensor items are pickles."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from orpo_dist.safe_load import UnsafeCheckpoint, audit_checkpoint

    marker = tmp_path / "PWNED"
    good = tmp_path / "good"
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    optimizer.step()
    dcp.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_id=good, no_dist=True
    )
    audit_checkpoint(good)  # what FSDP writes passes

    bad_metadata = tmp_path / "bad_metadata"
    shutil.copytree(good, bad_metadata)
    (bad_metadata / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeCheckpoint, match=r"\.metadata: its pickle imports posix\.system"):
        audit_checkpoint(bad_metadata)

    bad_item = tmp_path / "bad_item"  # a non-tensor item (loaded with weights_only=False by DCP) replaced
    shutil.copytree(good, bad_item)
    metadata = pickle.loads((good / ".metadata").read_bytes())  # our own file, written just above
    info = metadata.storage_data[MetadataIndex("optimizer.param_groups.0.lr")]
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    blob = buffer.getvalue()
    with (bad_item / info.relative_path).open("ab") as f:  # appended; the item now points at it
        info.offset, info.length = f.tell(), len(blob)
        f.write(blob)
    (bad_item / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpoint, match=r"item optimizer\.param_groups\.0\.lr.*posix\.system"):
        audit_checkpoint(bad_item)
    assert not marker.exists()


def test_deepspeed_reads_its_checkpoint_files_weights_only(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from orpo_dist.safe_load import weights_only_deepspeed

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    weights_only_deepspeed(engine)
    legit = tmp_path / "optim_states.pt"
    torch.save(
        {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.weights, "x": torch.ones(2)}, legit
    )
    loaded = engine.checkpoint_engine.load(str(legit), map_location="cpu")
    assert loaded["zero_stage"] == ZeroStageEnum.weights and torch.equal(loaded["x"], torch.ones(2))
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"x": Payload(marker)}, evil)
    with pytest.raises(pickle.UnpicklingError):
        engine.checkpoint_engine.load(str(evil), map_location="cpu")
    assert not marker.exists()


def test_export_takes_trust_remote_code_only_from_its_command_line(tmp_path, tiny_model_dir, monkeypatch):
    """A checkpoint's own orpo_config.yaml asking for remote code is ignored; --trust-remote-code is not."""
    import orpo_dist.export as ex

    ckpt = tmp_path / "final"
    shutil.copytree(tiny_model_dir, ckpt)
    (ckpt / "orpo_config.yaml").write_text(yaml.safe_dump({"model": {"trust_remote_code": True}}))
    seen = []
    real = ex._load_16bit

    def spy(name, dtype, trust):
        seen.append(trust)
        return real(name, dtype, trust)

    monkeypatch.setattr(ex, "_load_16bit", spy)
    assert ex.main(["--checkpoint", str(ckpt), "--format", "merged_16bit", "--out", str(tmp_path / "a")]) == 0
    assert ex.main(["--checkpoint", str(ckpt), "--format", "merged_16bit", "--out", str(tmp_path / "b"),
                    "--trust-remote-code"]) == 0  # fmt: skip
    assert seen == [False, True]
    merged = load_file(tmp_path / "a" / "model.safetensors")
    assert merged and all(torch.isfinite(t).all() for t in merged.values())
