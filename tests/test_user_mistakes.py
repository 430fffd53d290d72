"""Every user mistake ends in one line on stderr and exit 2, before the model loads; the quickstart preset
applies only to the quickstart; a stop signal during start-up exits 3 like a preemption.

Most cases call the command line in-process (`cli.main`) with model loading replaced by a tripwire, so a
check that ran too late fails the test; a few run the real `python -m orpo_dist.train` to prove the
process itself prints one line, no traceback, and exits 2.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import OFFLINE_ENV, REPO, TINY_YAML, assert_one_error_line

import orpo_dist.modeling
import orpo_dist.trainer
from orpo_dist import cli
from orpo_dist.config import Config, load_config

GOOD = {"prompt": "p", "chosen": "yes", "rejected": "no"}


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model (weights) fails the test: every mistake must be reported before it."""

    def tripwire(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(orpo_dist.trainer, "load_model", tripwire)


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.startswith("orpo_dist:")]


def assert_one_line(rc: int, lines: list[str], *needles: str) -> None:
    assert rc == 2, (rc, lines)
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def tiny(tmp_path: Path, *extra) -> list:
    return ["--config", TINY_YAML, "--output_dir", tmp_path / "out", "--max_steps", 2, *extra]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ item 1: the preset


def test_the_preset_applies_only_to_the_bare_command_or_config_quickstart(tmp_path):
    preset = load_config(cli.quickstart_preset())
    defaults = Config()
    for argv in ([], ["--config", "quickstart"], ["--config=quickstart"]):
        cfg, is_preset = cli.parse(argv)
        assert is_preset and cfg == preset, argv
    cfg, is_preset = cli.parse(["--config", "quickstart", "--lr", "1e-3"])  # the preset plus a flag
    assert is_preset and cfg.train.lr == 1e-3 and cfg.orpo.beta == preset.orpo.beta
    # any other command line starts from the documented defaults, not the preset's lr 3e-3 / beta 0.5 / 64 tokens
    for argv in (
        ["--model", "org/llama-8b", "--data-path", "mine.jsonl"],
        ["--output_dir", str(tmp_path)],
        ["--peft"],
    ):
        cfg, is_preset = cli.parse(argv)
        assert not is_preset, argv
        assert (cfg.train.lr, cfg.orpo.beta, cfg.data.max_length, cfg.train.batch_size) == (
            defaults.train.lr, defaults.orpo.beta, defaults.data.max_length, defaults.train.batch_size,
        ), argv  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text("model: org/m\n")
    cfg, is_preset = cli.parse(["--config", str(path)])
    assert (
        not is_preset
        and cfg.train.lr == defaults.train.lr
        and cfg.data.max_length == defaults.data.max_length
    )


@pytest.mark.slow
def test_a_flag_only_run_saves_the_defaults_not_the_preset(tmp_path):
    """`python -m orpo_dist.train --output_dir X ...`: the real process, the resolved config on disk."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "orpo_dist.train", "--output_dir", str(out), "--max_steps", "1",
         "--max_samples", "16", "--batch_size", "4", "--eval_split", "0", "--save_steps", "none"],
        cwd=REPO, env={**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["lr"] == Config().train.lr and saved["orpo"]["beta"] == Config().orpo.beta
    assert saved["data"]["max_length"] == Config().data.max_length
    assert "built-in quickstart" not in proc.stdout


# ------------------------------------------------------------------------------------------ config files


@pytest.mark.parametrize(
    "content,needles",
    [
        ("lr: 1e-4\nbeta: [0.1\n", ("run.yaml line 3", "YAML syntax error")),
        ("lr: 1e-4\n  beta: 0.1\n", ("run.yaml line 2", "YAML syntax error")),
        ("- lr\n- beta\n", ("expected a mapping",)),
        (b"lr: 1e-4 # caf\xe9\n", ("not UTF-8",)),
    ],
    ids=["unclosed-list", "bad-indent", "a-list", "latin-1"],
)
def test_a_broken_config_file_is_one_line_naming_the_file(tmp_path, capsys, content, needles):
    path = tmp_path / "run.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc, lines = run_cli(["--config", path], capsys)
    assert_one_line(rc, lines, *needles)


def test_config_pointing_at_a_directory_or_nothing(tmp_path, capsys):
    assert_one_line(*run_cli(["--config", tmp_path], capsys), "is a directory")
    assert_one_line(*run_cli(["--config", tmp_path / "missing.yaml"], capsys), "no such file")
    assert_one_line(*run_cli(["--config"], capsys), "--config needs a path")


def test_a_bad_yaml_file_through_the_real_process_is_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: [1e-4\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orpo_dist.train", "--config", str(path)], cwd=REPO,
                          env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr)
    assert time.perf_counter() - start < 30


# ------------------------------------------------------------------------------------------ data files


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "make,needles",
    [
        (lambda d: _csv(d / "p.csv", ""), ("p.csv", "empty")),
        (lambda d: _csv(d / "p.csv", "prompt,chosen,rejected\n"), ("p.csv", "only a header")),
        (lambda d: _csv(d / "p.jsonl", ""), ("p.jsonl", "no rows")),
        (lambda d: _csv(d / "p.json", "[]"), ("p.json", "no rows")),
        (
            lambda d: _bytes(
                d / "p.jsonl",
                json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n',
            ),
            ("p.jsonl line 2", "not UTF-8", "0xe9"),
        ),  # fmt: skip
        (
            lambda d: _bytes(d / "p.csv", b"prompt,chosen,rejected\np,a,b\ncaf\xe9,a,b\n"),
            ("p.csv line 3", "not UTF-8"),
        ),
        (lambda d: _bytes(d / "p.jsonl", json.dumps(GOOD).encode("utf-16-le")), ("p.jsonl", "UTF-16")),
        (lambda d: _csv(d / "p.csv", 'prompt,chosen,rejected\np,"a,b\n'), ("p.csv", "malformed CSV")),
    ],
    ids=[
        "empty-csv",
        "header-only-csv",
        "empty-jsonl",
        "empty-json-list",
        "latin-1-jsonl",
        "latin-1-csv",
        "utf16-without-bom",
        "unclosed-quote-csv",
    ],  # fmt: skip
)
def test_unreadable_data_is_one_line_before_the_model_loads(tmp_path, capsys, no_model_load, make, needles):
    path = make(tmp_path)
    rc, lines = run_cli(tiny(tmp_path, "--data_path", path, "--max_samples", "none"), capsys)
    assert_one_line(rc, lines, "data error", *needles)


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "gzip"])
def test_decodable_bytes_are_decoded(tmp_path, encoding):
    """A UTF-8 BOM, UTF-16 with its BOM, gzip bytes in a .jsonl: read, not refused."""
    from orpo_dist.builtin import build_tokenizer
    from orpo_dist.config import DataConfig
    from orpo_dist.data import build_datasets

    text = "".join(json.dumps({**GOOD, "prompt": f"p{i}"}) + "\n" for i in range(3))
    data = gzip.compress(text.encode()) if encoding == "gzip" else text.encode(encoding)
    path = _bytes(tmp_path / "p.jsonl", data)
    train, _, report = build_datasets(DataConfig(data_path=str(path), eval_split=0), build_tokenizer(), 0)
    assert (report.read, len(train)) == (3, 3)


# ------------------------------------------------------------------------------------------ the run's paths


def test_output_dir_that_is_a_file_under_a_file_or_read_only(tmp_path, capsys, no_model_load):
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, lines = run_cli(["--config", TINY_YAML, "--output_dir", afile], capsys)
    assert_one_line(rc, lines, f"output_dir={afile} is a file")
    rc, lines = run_cli(["--config", TINY_YAML, "--output_dir", afile / "sub" / "run"], capsys)
    assert_one_line(rc, lines, "which is a file")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        rc, lines = run_cli(["--config", TINY_YAML, "--output_dir", locked / "run"], capsys)
        assert_one_line(rc, lines, "read-only")
        rc, lines = run_cli(["--config", TINY_YAML, "--output_dir", locked], capsys)
        assert_one_line(rc, lines, str(locked))
    finally:
        locked.chmod(0o755)


def test_resume_that_names_nothing(tmp_path, capsys, no_model_load):
    rc, lines = run_cli(tiny(tmp_path, "--resume", tmp_path / "nope" / "checkpoint-4"), capsys)
    assert_one_line(rc, lines, "no such checkpoint directory")
    rc, lines = run_cli(tiny(tmp_path, "--resume", "latest"), capsys)
    assert_one_line(rc, lines, "resume: latest", "no complete checkpoint")
    rc, lines = run_cli(tiny(tmp_path, "--resume", "true"), capsys)  # true means latest, not a path "true"
    assert_one_line(rc, lines, "resume: latest")
    half = tmp_path / "out" / "checkpoint-2"  # a save that never finished: no COMPLETE
    (half / "state").mkdir(parents=True)
    rc, lines = run_cli(tiny(tmp_path, "--resume", half), capsys)
    assert_one_line(rc, lines, "not a complete checkpoint")


# ------------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize(
    "flags,needles",
    [
        (
            ["--model", "/nonexistent/models/llama"],
            ("model=/nonexistent/models/llama", "no such local directory"),
        ),
        (["--model", "./models/mine"], ("no such local directory",)),
        (["--model", "some-org/not-downloaded-7b"], ("not in the Hugging Face cache", "offline")),
        (["--attn_implementation", "nonsense"], ("attn_implementation=nonsense",)),
        (["--attn_implementation", "flash_attention_2"], ("attn_implementation=flash_attention_2",)),
        (["--peft", "--target_modules", "q_proj,v_projj"], ("'v_projj' matches no module", "v_proj")),
        (["--peft", "--target_modules", "self_attn"], ("'self_attn' is a LlamaAttention",)),
        (["--backend", "unsloth", "--peft"], ("backend: unsloth cannot run here",)),
        (["--fused_kernels", "liger"], ("fused_kernels: liger cannot run here",)),
        (["--dtype", "float16"], ("dtype=float16", "NaN")),
    ],
    ids=[
        "missing-absolute-path",
        "missing-relative-path",
        "hub-id-offline",
        "unknown-attn",
        "attn-not-installed",
        "target-typo",
        "target-not-a-layer",
        "unsloth",
        "liger",
        "float16-full-finetune",
    ],  # fmt: skip
)
def test_model_mistakes_are_one_line_before_the_weights_load(
    tmp_path, capsys, no_model_load, monkeypatch, flags, needles
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    rc, lines = run_cli(tiny(tmp_path, *flags), capsys)
    assert_one_line(rc, lines, *needles)


def test_a_directory_that_is_not_a_model(tmp_path, capsys, no_model_load):
    (tmp_path / "empty_model").mkdir()
    rc, lines = run_cli(tiny(tmp_path, "--model", tmp_path / "empty_model"), capsys)
    assert_one_line(rc, lines, "has no config.json")


def test_gguf_without_its_toolchain_is_refused_at_start(tmp_path, capsys, no_model_load, monkeypatch):
    import orpo_dist.gguf as gguf

    def missing():
        raise ImportError(f"GGUF export needs llama-cpp-python: {gguf.INSTALL_HINT}")

    monkeypatch.setattr(gguf, "find_converter", missing)
    rc, lines = run_cli(tiny(tmp_path, "--export", "merged_16bit,gguf"), capsys)
    assert_one_line(rc, lines, "export: [gguf]", "install_gguf.sh")
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.slow
def test_the_real_process_reports_a_model_mistake_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "orpo_dist.train", *map(str, tiny(tmp_path, "--model", "/nonexistent/model"))],
        cwd=REPO, env={**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert assert_one_error_line(proc.stderr) == "orpo_dist: model=/nonexistent/model: no such local directory"


def test_a_bad_launch_is_one_line(tmp_path, capsys, monkeypatch, no_model_load):
    """WORLD_SIZE says 2 but plain python started one process: a launch mistake, exit 2."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, lines = run_cli(tiny(tmp_path), capsys)
    assert_one_line(rc, lines, "WORLD_SIZE=2 processes but the process group has 1")


# ------------------------------------------------------------------------------------------ signals at start-up


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
@pytest.mark.parametrize("delay", [0.6, 4.0], ids=["while-importing", "while-loading"])
def test_a_stop_signal_during_start_up_exits_3(tmp_path, sig, delay):
    """Before the loop starts (imports, data, model): exit 3 like a preemption, not death by signal (138)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "orpo_dist.train", *map(str, tiny(tmp_path, "--max_steps", "50"))]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(delay)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 3, (proc.returncode, stderr[-2000:])
    assert "preempted" in stdout and "Traceback" not in stderr
    metrics = out / "metrics.jsonl"
    steps = (
        [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
    )
    assert max(steps, default=0) < 50, "the run did not stop"
    assert not (out / "final").exists()


def test_the_cli_gives_the_callers_signal_handlers_back(tmp_path, capsys):
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    run_cli(["--config", tmp_path], capsys)
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_failing_gguf_step_keeps_the_trained_and_the_merged_model(tmp_path, capsys, monkeypatch):
    """After training: the conversion fails (exit 1, one line), final/ and export/merged/ stay."""
    import orpo_dist.export as ex
    import orpo_dist.gguf as gguf

    monkeypatch.setattr(gguf, "find_converter", lambda: tmp_path / "convert_hf_to_gguf.py")
    monkeypatch.setattr(ex, "find_converter", lambda: tmp_path / "convert_hf_to_gguf.py")

    def broken(merged, out_file, quant):
        raise RuntimeError("convert_hf_to_gguf.py failed (exit 1): unknown architecture")

    monkeypatch.setattr(ex, "to_gguf", broken)
    rc = cli.main([str(a) for a in tiny(tmp_path, "--export", "gguf", "--save_steps", "none")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("orpo_dist:")]
    out = tmp_path / "out"
    assert rc == 1 and len(lines) == 1, lines
    assert "GGUF export failed" in lines[0] and f"kept in {out / 'export' / 'merged'}" in lines[0]
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "export" / "merged" / "config.json").is_file() and list(
        (out / "export" / "merged").glob("*.safetensors")
    )


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "soon"])
def test_ddp_timeout_is_a_positive_number_of_seconds(value, capsys):
    rc, lines = run_cli(["--ddp_timeout", value], capsys)
    assert_one_line(rc, lines, "ddp_timeout=")
    assert load_config(None, {"ddp_timeout": 60}).train.ddp_timeout == 60
    assert Config().train.ddp_timeout == 1800  # transformers' default, the NCCL / gloo world's 30 minutes
