"""Hardening, round 2: export never overwrites its inputs, the cache is verified before it is trusted,
odd cache and output locations, one line for environment faults, a report from any metrics.jsonl,
config files that say what they ignore, trackers and the Hub, conversations that end with the user."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import datasets
import pytest

from orpo_dist.config import DataConfig
from orpo_dist.data import DataError, build_datasets

datasets.disable_progress_bars()


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------------ 8. conversations


def _turn(role, text):
    return {"role": role, "content": text}


CONV_OK = {
    "chosen": [_turn("user", "Hi?"), _turn("assistant", "Hello")],
    "rejected": [_turn("user", "Hi?"), _turn("assistant", "Go away")],
}


@pytest.mark.parametrize(
    "field,tail",
    [
        ("chosen", [_turn("user", "thanks")]),
        ("rejected", [_turn("user", "thanks")]),
        ("chosen", [_turn("system", "be brief")]),
        ("rejected", [_turn("tool", "{}")]),
    ],
)
def test_a_conversation_not_ending_with_the_assistant_is_refused_or_skipped(tmp_path, tokenizer, field, tail):
    rows = [CONV_OK] * 4
    bad = {**CONV_OK, field: CONV_OK[field] + tail}
    rows = rows[:2] + [bad] + rows[2:]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match=rf"c\.jsonl line 3, field '{field}': the last message has role"):
        build_datasets(DataConfig(data_path=path, eval_split=0.0), tokenizer, 0)
    _, _, report = build_datasets(DataConfig(data_path=path, eval_split=0.0, skip_invalid=True), tokenizer, 0)
    assert report.dropped == {"last turn not the assistant's": 1}


def test_a_conversation_with_an_explicit_prompt_and_a_user_tail_is_refused(tmp_path, tokenizer):
    rows = [{"prompt": [_turn("user", "Hi?")], "chosen": [_turn("assistant", "Hello")],
             "rejected": [_turn("assistant", "No"), _turn("user", "why?")]}]  # fmt: skip
    with pytest.raises(DataError, match=r"line 1, field 'rejected': the last message has role 'user'"):
        build_datasets(
            DataConfig(data_path=write_jsonl(tmp_path / "c.jsonl", rows), eval_split=0.0), tokenizer, 0
        )


# ------------------------------------------------------------------------------------------ 1. export never overwrites its inputs


@pytest.fixture(scope="module")
def adapter_run(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter whose base is a local copy of the tiny model (the copy may be targeted by --out)."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapter_run")
    base = Path(shutil.copytree(tiny_model_dir, root / "base"))
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    model.save_pretrained(root / "run" / "final")
    return root / "run" / "final", base


def _digest_dir(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _refused(capsys, argv, *, match: str) -> None:
    from orpo_dist import export as ex

    assert ex.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("orpo_dist: ") and re.search(match, err[0]), err


@pytest.mark.parametrize(
    "where,match",
    [
        ("base", r"is the adapter's base model"),
        ("base/sub", r"is inside the adapter's base model"),
        ("ckpt", r"is the checkpoint"),
        ("ckpt/merged", r"is inside the checkpoint"),
        ("link-to-base", r"is the adapter's base model"),
        ("link-to-base/x", r"is inside the adapter's base model"),
    ],
)
def test_export_out_that_is_or_is_inside_an_input_is_refused_before_loading(
    adapter_run, tmp_path, capsys, monkeypatch, where, match
):
    from orpo_dist import export as ex

    ckpt, base = adapter_run
    (tmp_path / "link-to-base").symlink_to(base)
    out = {"base": base, "ckpt": ckpt}.get(where.split("/")[0], tmp_path / where.split("/")[0])
    out = out / where.split("/")[1] if "/" in where else out
    before = _digest_dir(base), _digest_dir(ckpt)
    monkeypatch.setattr(ex, "_load_16bit", lambda *a, **k: pytest.fail("a model was loaded"))
    _refused(capsys, ["--checkpoint", str(ckpt), "--format", "merged_16bit", "--out", str(out)], match=match)
    _refused(capsys, ["--checkpoint", str(ckpt), "--format", "gguf", "--out", str(out)], match=match)
    assert (_digest_dir(base), _digest_dir(ckpt)) == before
    assert not (base / "sub").exists() and not (ckpt / "merged").exists()


def test_export_out_holding_weights_orpo_dist_did_not_write_is_refused(adapter_run, tmp_path, capsys):
    ckpt, _ = adapter_run
    for name in ("model.safetensors", "pytorch_model.bin", "x.gguf", "pytorch_model-00001-of-00002.bin"):
        other = tmp_path / name.replace(".", "_")
        other.mkdir()
        (other / name).write_bytes(b"weights")
        _refused(capsys, ["--checkpoint", str(ckpt), "--format", "merged_16bit", "--out", str(other)],
                 match=rf"already holds model weights orpo_dist did not write \({re.escape(name)}")  # fmt: skip
        assert (other / name).read_bytes() == b"weights"


def test_export_out_under_a_file_is_refused(adapter_run, tmp_path, capsys):
    ckpt, _ = adapter_run
    (tmp_path / "notes.txt").write_text("x")
    for out, match in (
        (tmp_path / "notes.txt", "is a file"),
        (tmp_path / "notes.txt" / "m", "which is a file"),
    ):
        _refused(
            capsys, ["--checkpoint", str(ckpt), "--format", "merged_16bit", "--out", str(out)], match=match
        )


def test_export_rewrites_its_own_earlier_export(adapter_run, tmp_path, capsys):
    """The marker: a directory orpo_dist exported to may be exported to again (not someone else's weights)."""
    from orpo_dist import export as ex
    from orpo_dist.paths import MARKER

    ckpt, _ = adapter_run
    argv = [
        "--checkpoint",
        str(ckpt),
        "--format",
        "merged_16bit",
        "--out",
        str(tmp_path / "m"),
        "--dtype",
        "float16",
    ]
    assert ex.main(argv) == 0 and (tmp_path / "m" / MARKER).is_file()
    assert ex.main(argv) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    "base,match",
    [
        ("/no/such/base", "does not exist on this machine"),
        ("someone/uncached-model-xyz", "not in the Hugging Face cache, and HF_HUB_OFFLINE is set"),
        ("not a valid id!", "does not exist on this machine"),
    ],
)
def test_an_adapter_base_that_cannot_be_found_is_one_line(
    adapter_run, tmp_path, capsys, monkeypatch, base, match
):
    from orpo_dist import export as ex

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(ex, "_load_16bit", lambda *a, **k: pytest.fail("a model was loaded"))
    ckpt, _ = adapter_run
    argv = [
        "--checkpoint",
        str(ckpt),
        "--format",
        "merged_16bit",
        "--out",
        str(tmp_path / "m"),
        "--base-model",
        base,
    ]
    _refused(capsys, argv, match=match)


def test_training_time_export_may_not_write_into_the_model(tiny_model_dir, tmp_path):
    import shutil

    from orpo_dist.config import ConfigError, load_config
    from orpo_dist.preflight import check_run

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    for output_dir in (model, model / "runs" / "a"):
        cfg = load_config(None, {"model": str(model), "output_dir": str(output_dir), "export": ["merged_16bit"],
                                 "data_path": "builtin:capitals"})  # fmt: skip
        with pytest.raises(ConfigError, match=r"is inside the model"):
            check_run(cfg, 1, "NO")
    (tmp_path / "run" / "export" / "merged").mkdir(parents=True)
    (tmp_path / "run" / "export" / "merged" / "model.safetensors").write_bytes(b"x")
    cfg = load_config(None, {"model": str(model), "output_dir": str(tmp_path / "run"), "export": ["merged_16bit"],
                             "data_path": "builtin:capitals", "resume": "auto"})  # fmt: skip
    with pytest.raises(ConfigError, match=r"already holds model weights orpo_dist did not write"):
        check_run(cfg, 1, "NO")


# ------------------------------------------------------------------------------------------ 2. a cache entry is verified


@pytest.fixture
def cached(tmp_path, tokenizer):
    """A run's config and its built cache entry (40 pairs, 8 held out)."""
    from test_data_cache import config, load, write_pairs

    write_pairs(tmp_path / "pairs.jsonl", 40)
    cfg = config(tmp_path)
    got, _ = load(cfg, tokenizer)
    return cfg, got.directory, got.train.to_list()


def _reload(cfg, tokenizer):
    from test_data_cache import load

    return load(cfg, tokenizer)


def _swap_train_for_eval_link(entry):
    shutil.rmtree(entry / "train")
    (entry / "train").symlink_to(entry / "eval", target_is_directory=True)


def _link_one_file(entry):
    arrow = next((entry / "train").glob("*.arrow"))
    shutil.copy(arrow, entry / "elsewhere.arrow")
    arrow.unlink()
    arrow.symlink_to(entry / "elsewhere.arrow")


def _rename_swap(entry):
    (entry / "train").rename(entry / "t")
    (entry / "eval").rename(entry / "train")
    (entry / "t").rename(entry / "eval")


def _flip_bytes(entry):
    arrow = max((entry / "train").glob("*.arrow"), key=lambda f: f.stat().st_size)
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrow.write_bytes(bytes(data))


def _report(change):
    def edit(entry):
        info = json.loads((entry / "report.json").read_text())
        (entry / "report.json").write_text(json.dumps(change(info)))

    return edit


@pytest.mark.parametrize(
    "tamper,why",
    [
        (_swap_train_for_eval_link, "is a symlink"),
        (_link_one_file, "is a symlink"),
        (_rename_swap, "differ from what was recorded"),
        (_flip_bytes, "the files of its train/ split differ"),
        (_report(lambda i: [i]), "malformed"),
        (_report(lambda i: {**i, "report": "1801 pairs"}), "malformed"),
        (_report(lambda i: {**i, "report": {**i["report"], "used_train": "1801"}}), "malformed"),
        (_report(lambda i: {**i, "report": {**i["report"], "extra": 1}}), "malformed"),
        (_report(lambda i: {**i, "build_id": 7}), "malformed"),
        (_report(lambda i: {k: v for k, v in i.items() if k != "manifest"}), "malformed"),
        (
            _report(
                lambda i: {
                    **i,
                    "manifest": {
                        "train": {**i["manifest"]["train"], "rows": 1801},
                        "eval": i["manifest"]["eval"],
                    },
                }
            ),
            "row counts",
        ),
        (lambda e: (e / "report.json").write_bytes(b"\xff\xfe{"), "not JSON"),
        (lambda e: (e / "report.json").write_text("[" * 100_000 + "]" * 100_000), "not JSON"),
    ],
)
def test_a_tampered_cache_entry_is_a_miss_rebuilt_with_the_reason(cached, tokenizer, tamper, why):
    cfg, entry, train_rows = cached
    tamper(entry)
    got, lines = _reload(cfg, tokenizer)
    assert got.built and got.directory == entry
    assert lines[0].startswith(
        f"tokenised cache: miss: building (the cache in {entry} is unreadable or stale: "
    )
    assert why in lines[0], lines[0]
    assert got.train.to_list() == train_rows and len(got.eval) == 8
    assert not any(p.is_symlink() for p in entry.rglob("*"))
    again, lines = _reload(cfg, tokenizer)  # the rebuilt entry is a hit
    assert not again.built and lines == [f"tokenised cache: hit {entry}"]


@pytest.mark.parametrize("text", ["[1, 2]", '{"settings": "x"}', "{", "[" * 100_000])
def test_a_damaged_neighbour_entry_does_not_break_the_miss_message(cached, tokenizer, text):
    from test_data_cache import write_pairs

    cfg, entry, _ = cached
    (entry / "key.json").write_text(text)
    write_pairs(tmp := entry.parents[2] / "pairs.jsonl", 30)  # other data: another key, a miss
    got, lines = _reload(cfg, tokenizer)
    assert got.built and got.directory != entry and len(got.train) + len(got.eval) == 30, tmp
    assert lines[0].startswith("tokenised cache: miss: building (")


# ------------------------------------------------------------------------------------------ 3. odd cache and output locations


def _no_partial(root: Path) -> None:
    assert not [
        p for p in root.rglob("*") if p.name.startswith((".tmp-", ".old-")) or p.name.endswith(".partial")
    ]


def test_a_cache_dir_that_is_a_file_is_one_line_before_tokenising(tmp_path, tokenizer, monkeypatch):
    from test_data_cache import config, load, write_pairs

    from orpo_dist.config import ConfigError
    from orpo_dist.data import cache as cache_mod

    write_pairs(tmp_path / "pairs.jsonl", 20)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(cache_mod, "build_datasets", lambda *a: pytest.fail("tokenised before the check"))
    for cache_dir in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(
            ConfigError, match=rf"cache_dir {re.escape(str(cache_dir))}: cannot write .* set cache_dir"
        ):
            load(config(tmp_path, cache_dir=str(cache_dir)), tokenizer)
    assert (tmp_path / "afile").read_text() == "x"


def test_a_read_only_cache_dir_on_a_miss_is_one_line(tmp_path, tokenizer, monkeypatch):
    from test_data_cache import config, load, write_pairs

    from orpo_dist.config import ConfigError

    write_pairs(tmp_path / "pairs.jsonl", 20)
    ro = tmp_path / "ro"
    ro.mkdir()

    mkdtemp = tempfile.mkdtemp

    def read_only(
        suffix=None, prefix=None, dir=None
    ):  # what a read-only mount answers (root ignores chmod: simulated)
        if dir is not None and Path(dir) == ro:
            raise OSError(errno.EROFS, "Read-only file system", str(ro))
        return mkdtemp(suffix, prefix, dir)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(
        ConfigError,
        match=rf"cache_dir {re.escape(str(ro))}: cannot write the tokenised cache there \(Read-only file system",
    ):
        load(config(tmp_path, cache_dir=str(ro)), tokenizer)
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("where", ["train", "eval", "report"])
def test_a_full_disk_during_the_cache_build_leaves_nothing(tmp_path, tokenizer, monkeypatch, where):
    from test_data_cache import config, load, write_pairs

    from orpo_dist.exits import environment_fault

    write_pairs(tmp_path / "pairs.jsonl", 20)
    cfg = config(tmp_path)
    save, write = datasets.Dataset.save_to_disk, Path.write_text

    def full(self, path, **kw):
        save(self, path, **kw)
        if str(path).endswith(where):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def full_text(self, text, *a, **k):
        if self.name == "report.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write(self, text, *a, **k)

    if where == "report":
        monkeypatch.setattr(Path, "write_text", full_text)
    else:
        monkeypatch.setattr(datasets.Dataset, "save_to_disk", full)
    with pytest.raises(OSError) as e:
        load(cfg, tokenizer)
    line, code = environment_fault(e.value)
    assert code == 1 and "No space left on device" in line and str(tmp_path / "out" / "data_cache") in line
    root = tmp_path / "out" / "data_cache"
    assert list(root.iterdir()) == []  # no entry, no temporary build: the space is free again


@pytest.mark.parametrize("value", ["$ORPO_TEST_UNSET/cache", "${ORPO_TEST_UNSET}/c", "~/x/$ORPO_TEST_UNSET"])
def test_an_unset_variable_in_a_path_is_refused_never_a_literal_directory(
    tmp_path, tokenizer, monkeypatch, value
):
    from test_data_cache import config, load, write_pairs

    from orpo_dist.config import ConfigError, load_config

    monkeypatch.delenv("ORPO_TEST_UNSET", raising=False)
    monkeypatch.chdir(tmp_path)
    write_pairs(tmp_path / "pairs.jsonl", 20)
    with pytest.raises(ConfigError, match=r"\$ORPO_TEST_UNSET is not set"):
        load(config(tmp_path, cache_dir=value), tokenizer)
    for key in ("output_dir", "cache_dir", "data_path"):
        with pytest.raises(ConfigError, match=rf"{key}=.*\$ORPO_TEST_UNSET is not set"):
            load_config(None, {key: value})
    assert not list(tmp_path.rglob("*ORPO_TEST_UNSET*")) and not list(tmp_path.rglob("$*"))


def test_variables_and_home_in_paths_are_expanded(tmp_path, monkeypatch):
    from orpo_dist.config import load_config

    monkeypatch.setenv("ORPO_TEST_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(None, {"output_dir": "$ORPO_TEST_SCRATCH/run", "cache_dir": "~/cache"})
    assert cfg.train.output_dir == str(tmp_path / "scratch" / "run")
    assert cfg.data.cache_dir == str(tmp_path / "home" / "cache")


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_output_dir_is_refused(value):
    from orpo_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"output_dir is empty"):
        load_config(None, ["--output_dir", value])


def _fake_checkpoint(path: Path, step: int) -> Path:
    from orpo_dist.run_dir import COMPLETE_MARKER

    path.mkdir(parents=True)
    (path / COMPLETE_MARKER).write_text(json.dumps({"epoch": 0, "step_in_epoch": step, "global_step": step}))
    (path / "precious.bin").write_bytes(b"keep me")
    return path


def test_rotation_and_resume_never_follow_a_checkpoint_symlink_out_of_the_run(tmp_path):
    from orpo_dist.checkpoint import Checkpointer
    from orpo_dist.config import ConfigError, load_config
    from orpo_dist.resume import find_resume_point
    from orpo_dist.run_dir import complete_checkpoints

    out = tmp_path / "run"
    elsewhere = _fake_checkpoint(tmp_path / "elsewhere" / "checkpoint-1", 1)
    for step in (2, 4):
        _fake_checkpoint(out / f"checkpoint-{step}", step)
    (out / "checkpoint-1").symlink_to(elsewhere, target_is_directory=True)
    (out / "checkpoint-9").symlink_to(elsewhere, target_is_directory=True)  # newest by name
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    # a real directory whose COMPLETE marker is a link out of the run is not complete either
    _fake_checkpoint(tmp_path / "x", 0)
    (out / "checkpoint-7").mkdir()
    (out / "checkpoint-7" / "COMPLETE").symlink_to(tmp_path / "x" / "COMPLETE")
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]

    rotate = Checkpointer.__new__(Checkpointer)
    rotate.out, rotate.cfg = out, load_config(None, {"output_dir": str(out), "save_total_limit": 1})
    rotate._rotate(keep=out / "checkpoint-4")
    assert not (out / "checkpoint-2").exists() and (out / "checkpoint-4").is_dir()
    assert (elsewhere / "precious.bin").read_bytes() == b"keep me" and (elsewhere / "COMPLETE").is_file()
    assert (tmp_path / "x" / "COMPLETE").is_file()

    cfg = load_config(None, {"output_dir": str(out), "resume": "auto"})
    with pytest.raises(
        ConfigError, match=r"checkpoint-4 has no orpo_state\.json"
    ):  # picked, not checkpoint-9
        find_resume_point(cfg)
    (out / "checkpoint-4").rename(tmp_path / "gone")
    assert find_resume_point(cfg) is None  # only links remain: nothing to resume, starts fresh


@pytest.mark.slow
@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 0 vs 64: file write failed"),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
    ],
)
def test_a_full_disk_during_a_checkpoint_save_removes_the_partial_directory(
    tmp_path, tiny_model_dir, monkeypatch, error
):
    from helpers import tiny_run

    import orpo_dist
    from orpo_dist.checkpoint import Checkpointer, CheckpointError
    from orpo_dist.run_dir import complete_checkpoints

    real = Checkpointer.save_model

    def disk_fills(self, model, path):
        real(self, model, path)
        if self.progress.global_step == 4:
            (path / "filler.bin").write_bytes(b"\0" * (1 << 20))  # what the disk filled with
            raise error

    monkeypatch.setattr(Checkpointer, "save_model", disk_fills)
    out = tmp_path / "out"
    cfg = tiny_run(out, model=str(tiny_model_dir), max_steps=6, save_steps=2, max_samples=16)
    with pytest.raises(
        CheckpointError, match=r"could not write checkpoint-4 .*last complete checkpoint is .*checkpoint-2"
    ):
        orpo_dist.train(cfg)
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    assert not list(out.glob(".checkpoint-*")) and not (out / "final").exists()


# ------------------------------------------------------------------------------------------ 4. one line for environment faults


def _network_errors():
    import urllib.error

    import httpx
    import requests

    return [
        requests.ConnectionError(
            "HTTPSConnectionPool(host='huggingface.co', port=443): Max retries exceeded"
        ),
        httpx.ConnectError("[Errno -3] Temporary failure in name resolution"),
        urllib.error.URLError("[Errno 111] Connection refused"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    ]


@pytest.mark.parametrize(
    "error,code,words",
    [
        (
            OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"),
            2,
            ["Read-only file system: /mnt/ro/out"],
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/out/x.bin"),
            1,
            ["No space left", "/data/out/x.bin", "free space"],
        ),
        (
            NotADirectoryError(errno.ENOTDIR, "Not a directory", "/a/file/out"),
            2,
            ["Not a directory: /a/file/out"],
        ),
        (FileExistsError(errno.EEXIST, "File exists", "/a/out"), 2, ["File exists: /a/out"]),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 2, ["Permission denied: /root/x"]),
        (OSError(errno.EDQUOT, "Disk quota exceeded", "/home/u/x"), 1, ["Disk quota exceeded: /home/u/x"]),
    ],
)
def test_oserrors_become_one_line_naming_the_path(error, code, words):
    from orpo_dist.exits import environment_fault

    line, got = environment_fault(error)
    assert got == code and "\n" not in line and all(w in line for w in words), line


@pytest.mark.parametrize("index", range(4))
def test_network_errors_become_one_line(index):
    from orpo_dist.exits import environment_fault

    line, code = environment_fault(_network_errors()[index])
    assert code == 1 and "\n" not in line and line.startswith("network error"), line


def test_a_bug_keeps_its_traceback_and_debug_shows_every_traceback(monkeypatch, capsys):
    from orpo_dist.exits import guarded

    def bug():
        raise KeyError("a real bug")

    def fault():
        raise OSError(errno.ENOSPC, "No space left on device", "/x")

    with pytest.raises(KeyError):
        guarded(bug)
    assert guarded(fault) == 1 and capsys.readouterr().err.startswith(
        "orpo_dist: No space left on device: /x"
    )
    monkeypatch.setenv("ORPO_DIST_DEBUG", "1")
    with pytest.raises(OSError):
        guarded(fault)


def _one_line(capsys, code, got, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert got == code and len(err) == 1 and err[0].startswith("orpo_dist: "), err
    assert all(w in err[0] for w in words), err[0]


@pytest.mark.parametrize("command", ["train", "export", "report"])
@pytest.mark.parametrize("fault", ["erofs", "enospc", "enotdir", "network"])
def test_every_command_ends_in_one_line_for_environment_faults(command, fault, tmp_path, monkeypatch, capsys):
    import httpx

    from orpo_dist import cli, export, report, trainer

    error = {
        "erofs": OSError(errno.EROFS, "Read-only file system", str(tmp_path / "o")),
        "enospc": OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o")),
        "enotdir": NotADirectoryError(errno.ENOTDIR, "Not a directory", str(tmp_path / "o")),
        "network": httpx.ConnectError("[Errno 101] Network is unreachable"),
    }[fault]
    code, word = (
        (1, "network error") if fault == "network" else (1 if fault == "enospc" else 2, str(tmp_path / "o"))
    )

    def fails(*a, **k):
        raise error

    if command == "train":
        monkeypatch.setattr(trainer, "run", fails)
        got = cli.main(["--output_dir", str(tmp_path / "run")])
    elif command == "export":
        monkeypatch.setattr(export, "export", fails)
        got = export.main(
            ["--checkpoint", str(tmp_path), "--format", "merged_16bit", "--out", str(tmp_path / "o")]
        )
    else:
        (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
        monkeypatch.setattr(report, "write_report", fails)
        got = report.main([str(tmp_path)])
    _one_line(capsys, code, got, word)


@pytest.mark.slow
def test_a_resume_onto_weights_whose_shapes_changed_is_refused_naming_the_model(tmp_path, tiny_model_dir):
    import shutil

    from helpers import tiny_run
    from transformers import AutoConfig, AutoModelForCausalLM

    import orpo_dist
    from orpo_dist.config import ConfigError

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    run = tiny_run(tmp_path / "out", model=str(model), max_steps=2, save_steps=1, max_samples=8)
    orpo_dist.train(run)
    config = AutoConfig.from_pretrained(model)
    config.intermediate_size *= 2  # the same path now holds another model
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    with pytest.raises(
        ConfigError, match=rf"resume: the model {re.escape(str(model))} has other weight shapes"
    ):
        orpo_dist.train({**run, "max_steps": 4, "resume": "auto"})


# ------------------------------------------------------------------------------------------ 5. the report reads any metrics.jsonl


def test_the_report_skips_and_counts_what_it_cannot_read(tmp_path, capsys):
    from orpo_dist import report

    lines = [b'{"step": 1, "loss": 0.9, "rewards/accuracies": 0.5}', b"NaN", b"42", b"[1,2]", b"null", b'"text"',
             b'{"loss": 0.8}', b'{"step": "3", "loss": 0.7}', b'{"step": true, "loss": 0.7}', b'{"step": 2.5}',
             b'{"step": 2, "loss": "low", "grad_norm": [1], "learning_rate": 1e-3}', b"\xff\xfe\x00garbage",
             b'{"step": 3, "eval_loss": 0.6}', b'{"step": 4, "loss": 0.5, "train_runtime": -1}',
             b'{"step": 5, "loss": Infinity, "train_runtime": 1e300}', b'{"step": 6, "lo', b"[" * 100_000]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines))
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    assert report.main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "## Not read" in md and "config.yaml (ParserError" in md
    for note in ("1 lines that are not UTF-8", "5 lines that are not JSON objects", "4 rows without an integer step",
                 "2 values that are not numbers", "2 lines that are not JSON (or cut short)"):  # fmt: skip
        assert f"metrics.jsonl: skipped {note}" in md, md
    assert "1e+300 s" in md
    rows = report.read_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[1] == {"step": 2, "learning_rate": 1e-3}


@pytest.mark.parametrize(
    "text,note",
    [
        ("- a\n- b\n", "config.yaml (a list, not a mapping of sections)"),
        ("just words\n", "config.yaml (a str, not a mapping of sections)"),
        ("model: tiny\ntrain: {lr: 1}\n", "config.yaml entries that are not sections (model)"),
        ("a: &a [*a]\n", "config.yaml (ConfigError"),
        ("\tmodel: x\n", "config.yaml (ScannerError"),
    ],
)
def test_a_config_yaml_the_report_cannot_read_is_named_in_the_report(tmp_path, text, note):
    from orpo_dist import report

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.9}\n')
    (tmp_path / "config.yaml").write_text(text)
    assert report.main([str(tmp_path)]) == 0
    assert note in (tmp_path / "report.md").read_text()


def test_a_report_from_non_utf8_config_and_empty_metrics(tmp_path):
    from orpo_dist import report

    (tmp_path / "metrics.jsonl").write_bytes(b"\x80\x81\n\n")
    (tmp_path / "config.yaml").write_bytes(b"model: \xff\n")
    assert report.main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "config.yaml (UnicodeDecodeError" in md and "skipped 1 lines that are not UTF-8" in md


# ------------------------------------------------------------------------------------------ 6. config files say what they ignore


@pytest.mark.parametrize(
    "text,places",
    [
        ("lr: 1.0e-4\nlr: 2.0e-4\n", "key 'lr' is given twice in one mapping (lines 1 and 2)"),
        (
            "train:\n  lr: 1.0e-4\n  epochs: 1\n  lr: 2.0e-4\n",
            "key 'lr' is given twice in one mapping (lines 2 and 4)",
        ),
        ("lr: 1.0e-4\ntrain:\n  lr: 2.0e-4\n", "lr is given 2 times (`lr` and `train.lr`)"),
        (
            "learning_rate: 1.0e-4\ntrain:\n  lr: 2.0e-4\n",
            "lr is given 2 times (`learning_rate` and `train.lr`)",
        ),
        ("beta: 0.1\norpo:\n  beta: 0.2\n", "beta is given 2 times (`beta` and `orpo.beta`)"),
        ("model: a\nmodel:\n  model: b\n", "key 'model' is given twice"),
        (
            "lora:\n  lora_r: 4\npeft:\n  lora_r: 8\n",
            "lora_r is given 2 times (`lora.lora_r` and `peft.lora_r`)",
        ),
    ],
)
def test_a_setting_given_twice_is_refused_naming_both_places(tmp_path, text, places):
    from orpo_dist.config import ConfigError, load_config

    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "run.yaml")
    assert places in str(e.value) and "run.yaml" in str(e.value), str(e.value)


def test_yaml_merge_keys_and_flags_over_the_file_are_not_repeats(tmp_path):
    from orpo_dist.config import load_config

    (tmp_path / "run.yaml").write_text("train:\n  <<: {lr: 1.0e-4, epochs: 2}\n  lr: 3.0e-4\n")
    cfg = load_config(tmp_path / "run.yaml")  # YAML's merge key: the explicit key wins, by the spec
    assert (cfg.train.lr, cfg.train.epochs) == (3e-4, 2)
    assert load_config(tmp_path / "run.yaml", ["--lr", "5e-4"]).train.lr == 5e-4  # a flag overrides the file


def _bomb(levels: int, width: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + f"\nlr: *a{levels - 1}\n"


@pytest.mark.parametrize("levels", [6, 8, 9, 12])
def test_a_yaml_alias_bomb_is_refused_within_a_second(tmp_path, levels):
    import time

    from orpo_dist.cli import main

    (tmp_path / "bomb.yaml").write_text(_bomb(levels))
    start = time.perf_counter()
    from orpo_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"aliases \(\*name\) expand to more than 100,000 values"):
        load_config(tmp_path / "bomb.yaml")
    assert main(["--config", str(tmp_path / "bomb.yaml")]) == 2
    assert time.perf_counter() - start < 1.0


def test_a_recursive_alias_and_a_mapping_bomb_are_refused(tmp_path):
    from orpo_dist.config import ConfigError, load_config

    (tmp_path / "r.yaml").write_text("a: &a [*a]\n")
    with pytest.raises(ConfigError, match="recursive alias"):
        load_config(tmp_path / "r.yaml")
    levels = ["m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8}"]
    levels += [f"m{i}: &m{i} {{" + ", ".join(f"k{j}: *m{i - 1}" for j in range(8)) + "}" for i in range(1, 9)]
    (tmp_path / "m.yaml").write_text("\n".join(levels) + "\n")
    with pytest.raises(ConfigError, match="expand to more than"):
        load_config(tmp_path / "m.yaml")


@pytest.mark.parametrize(
    "env,match",
    [
        (
            {"WANDB_PROJECT": "team/project"},
            r"WANDB_PROJECT='team/project' is not a valid wandb project name: it contains '/'",
        ),
        ({"WANDB_PROJECT": "what?#"}, r"contains '#' '\?'"),
        ({"WANDB_PROJECT": "p" * 129}, r"is over 128 characters"),
        (
            {"WANDB_ENTITY": "my team"},
            r"WANDB_ENTITY='my team' is not a valid wandb entity name: it contains ' '",
        ),
        ({"WANDB_ENTITY": "a:b"}, r"WANDB_ENTITY='a:b'"),
    ],
)
def test_an_invalid_wandb_project_or_entity_stops_before_the_model_loads(tmp_path, monkeypatch, env, match):
    from helpers import tiny_run

    import orpo_dist
    from orpo_dist import trainer

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(trainer, "make_accelerator", lambda cfg: pytest.fail("got past the checks"))
    with pytest.raises(orpo_dist.ConfigError, match=match):
        orpo_dist.train(tiny_run(tmp_path / "out", log="wandb"))
    assert not (tmp_path / "out").exists()


def test_a_wandb_project_setting_is_checked_too(tmp_path, monkeypatch):
    from orpo_dist.config import ConfigError, load_config
    from orpo_dist.trackers import check_tracker

    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    with pytest.raises(ConfigError, match=r"wandb_project='a%b'"):
        check_tracker(load_config(None, {"log": "wandb", "wandb_project": "a%b"}))
    check_tracker(load_config(None, {"log": "wandb", "wandb_project": "my project-1"}))  # wandb accepts it


# ------------------------------------------------------------------------------------------ 7. trackers and the Hub


@pytest.mark.parametrize("kind", ["wandb", "tensorboard"])
@pytest.mark.parametrize("how", ["find_spec", "sys.modules"])
def test_a_tracker_whose_package_is_missing_names_the_extra_before_the_model_loads(
    tmp_path, monkeypatch, capsys, kind, how
):
    import importlib.util
    import sys

    from orpo_dist import cli, trainer

    if how == "find_spec":
        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: (
                None if name.split(".")[0] in ("wandb", "tensorboard", "tensorboardX") else real(name, *a)
            ),
        )
    else:
        for name in ("wandb", "tensorboard", "tensorboardX"):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(trainer, "make_accelerator", lambda cfg: pytest.fail("got past the checks"))
    got = cli.main(["--output_dir", str(tmp_path / "out"), "--log", kind])
    _one_line(capsys, 2, got, f"log: {kind} needs the {kind} package", f"pip install 'orpo-dist[{kind}]'")


def _http_error(status: int):
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} Client Error", response=httpx.Response(status, request=request))


@pytest.mark.parametrize(
    "status,match",
    [(401, r"token was refused \(401\)"), (403, r"cannot create or open the repo me/orpo-tiny \(403\)")],
)
def test_push_to_hub_opens_the_repo_before_training(tmp_path, monkeypatch, status, match):
    from helpers import tiny_run
    from huggingface_hub import HfApi

    import orpo_dist
    from orpo_dist import trainer

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_123")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(self, repo_id, **kw):
        raise _http_error(status)

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(orpo_dist.ConfigError, match=match):
        orpo_dist.train(tiny_run(tmp_path / "out", push_to_hub=True, hub_model_id="me/orpo-tiny"))


def test_push_to_hub_with_the_network_down_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    import httpx
    from huggingface_hub import HfApi

    from orpo_dist import cli, trainer

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_123")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def down(self, repo_id, **kw):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(HfApi, "create_repo", down)
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    got = cli.main(["--output_dir", str(tmp_path / "out"), "--push-to-hub", "--hub_model_id", "me/orpo-tiny"])
    _one_line(capsys, 1, got, "network error (ConnectError")


@pytest.mark.slow
def test_an_upload_that_fails_after_training_keeps_everything_and_says_how_to_retry(tmp_path, monkeypatch):
    import httpx
    from helpers import tiny_run
    from huggingface_hub import HfApi

    import orpo_dist
    from orpo_dist import hub
    from orpo_dist.export import ExportError

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_123")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append("create") or f"https://huggingface.co/{repo_id}")  # fmt: skip

    def upload_fails(self, **kw):
        raise httpx.ReadTimeout("The read operation timed out")

    monkeypatch.setattr(HfApi, "upload_folder", upload_fails)
    out = tmp_path / "out"
    run = tiny_run(out, peft=True, max_steps=1, save_steps=None, push_to_hub=True, hub_model_id="me/orpo-tiny",
                   export=["merged_16bit"])  # fmt: skip
    with pytest.raises(ExportError) as e:
        orpo_dist.train(run)
    message = str(e.value)
    assert "\n" not in message and "upload to the Hub (me/orpo-tiny) failed (ReadTimeout" in message
    assert f"retry only the upload: python -m orpo_dist.hub {out}" in message
    assert (out / "final" / "adapter_model.safetensors").is_file() and (
        out / "export" / "merged" / "config.json"
    ).is_file()
    assert (out / "report.md").is_file()
    assert calls == ["create"]  # opened before training
    uploaded = []
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: uploaded.append(kw["folder_path"]))
    assert hub.main([str(out)]) == 0 and uploaded == [str(out / "export" / "merged")]


def test_the_upload_retry_refuses_what_is_not_a_finished_run(tmp_path, capsys):
    from orpo_dist import hub

    _one_line(capsys, 2, hub.main([str(tmp_path)]), "is not a finished run")


# ------------------------------------------------------------------------------------------ 2 ranks: none left waiting


def _two_ranks(tmp_path, model_dir, fault: str, *flags: str, **env: str) -> tuple[int, str, Path]:

    from helpers import ACCEL, REPO, TINY_YAML, accelerate_cmd, launch_env, run_process

    out = tmp_path / "out"
    cmd = [*accelerate_cmd(2, config=ACCEL / "multi_gpu.yaml"), str(REPO / "tests" / "fault_inject.py"), "--config", str(TINY_YAML), "--model", str(model_dir),
           "--output_dir", str(out), *flags]  # fmt: skip
    launch = launch_env(ACCELERATE_USE_CPU="true", ORPO_TEST_FAULT=fault, **env)
    if "HF_TOKEN" in env:
        launch.pop("HF_HUB_OFFLINE")
    rc, log = run_process(cmd, launch, cwd=tmp_path, timeout=300)  # a rank left waiting: a timeout, a failure
    return rc, log, out


def _rank_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("orpo_dist: ")]


@pytest.mark.slow
@pytest.mark.parametrize("rank", ["0", "1"])
def test_two_ranks_a_full_disk_during_a_checkpoint_on_one_rank_stops_both(tmp_path, tiny_model_dir, rank):
    rc, log, out = _two_ranks(tmp_path, tiny_model_dir, f"checkpoint_full:{rank}")
    lines = _rank_lines(log)
    assert rc != 0 and len(lines) == 2, log[-4000:]
    assert all(
        "could not write checkpoint-4" in line and "free space, then --resume auto" in line for line in lines
    )
    assert not list(out.glob(".checkpoint-*")) and not list(out.glob("checkpoint-*"))


@pytest.mark.slow
def test_two_ranks_a_full_disk_during_the_cache_build_stops_both(tmp_path, tiny_model_dir):
    rc, log, out = _two_ranks(tmp_path, tiny_model_dir, "cache_full:0")
    lines = _rank_lines(log)
    assert rc != 0 and len(lines) == 2, log[-4000:]
    assert any("No space left on device" in line and str(out / "data_cache") in line for line in lines)
    assert any("another rank reported a problem" in line for line in lines)
    assert list((out / "data_cache").iterdir()) == []


@pytest.mark.slow
def test_two_ranks_a_refused_hub_token_stops_both_before_training(tmp_path, tiny_model_dir):
    rc, log, out = _two_ranks(tmp_path, tiny_model_dir, "hub_refused", "--push-to-hub", "--hub_model_id",
                              "me/orpo-tiny", HF_TOKEN="hf_not_a_real_token_123")  # fmt: skip
    lines = _rank_lines(log)
    assert rc != 0 and len(lines) == 2, log[-4000:]
    assert any("token was refused (401)" in line for line in lines)
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_two_ranks_a_failed_upload_after_training_keeps_everything(tmp_path, tiny_model_dir):
    rc, log, out = _two_ranks(tmp_path, tiny_model_dir, "upload_fails", "--push-to-hub", "--hub_model_id",
                              "me/orpo-tiny", "--max_steps", "2", HF_TOKEN="hf_not_a_real_token_123")  # fmt: skip
    lines = _rank_lines(log)
    assert rc == 1 and len(lines) == 1, log[-4000:]  # rank 0 uploads; rank 1 finished normally
    assert "upload to the Hub (me/orpo-tiny) failed (ConnectError" in lines[0]
    assert f"retry only the upload: python -m orpo_dist.hub {out}" in lines[0]
    assert (out / "final").is_dir() and (out / "report.md").is_file()


@pytest.mark.slow
def test_two_ranks_a_tampered_cache_is_rebuilt_and_both_ranks_train(tmp_path, tiny_model_dir):
    rc, log, out = _two_ranks(tmp_path, tiny_model_dir, "none", "--max_steps", "1")
    assert rc == 0, log[-4000:]
    (entry,) = (out / "data_cache").iterdir()
    info = json.loads((entry / "report.json").read_text())
    (entry / "report.json").write_text(json.dumps({**info, "report": {**info["report"], "used_train": "34"}}))
    rc, log, _ = _two_ranks(tmp_path, tiny_model_dir, "none", "--max_steps", "2", "--resume", "auto")
    assert rc == 0 and "unreadable or stale: its report.json is malformed" in log, log[-4000:]
    assert "Traceback" not in log


def test_export_out_that_is_the_run_or_checkpoint_directory_given_is_refused(adapter_run, capsys):
    ckpt, _ = adapter_run
    run = ckpt.parent  # --checkpoint OUTPUT_DIR resolves to OUTPUT_DIR/final
    _refused(capsys, ["--checkpoint", str(run), "--format", "merged_16bit", "--out", str(run)],
             match="is the directory given as the checkpoint")  # fmt: skip
    assert not (run / "model.safetensors").exists()


@pytest.mark.parametrize(
    "value,env,want",
    [
        ("${ORPO_TEST_A}/run", {"ORPO_TEST_A": "/scratch"}, "/scratch/run"),
        ("${ORPO_TEST_UNSET:-/tmp/default}/run", {}, "/tmp/default/run"),
        ("${ORPO_TEST_EMPTY:-/tmp/d}", {"ORPO_TEST_EMPTY": ""}, "/tmp/d"),
        ("runs/$ORPO_TEST_A", {"ORPO_TEST_A": "x"}, "runs/x"),
    ],
)
def test_path_settings_expand_as_a_shell_would(monkeypatch, value, env, want):
    from orpo_dist.config import load_config

    monkeypatch.delenv("ORPO_TEST_UNSET", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert load_config(None, {"output_dir": value}).train.output_dir == want
