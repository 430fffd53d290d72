"""Export the way Unsloth users expect: the model at `--out`, GGUF beside it; adapters that record their base
as an absolute path (so they load from any directory); `push_to_hub` checked before training and uploaded
at the end (the upload itself is monkeypatched: no Hub here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_one_error_line, launch_env, pairs_jsonl, tiny_run

import orpo_dist
from orpo_dist import export as ex
from orpo_dist.builtin import save_builtin_model


def test_export_layout_model_at_out_and_gguf_beside_it(tmp_path, monkeypatch):
    """merged_16bit + gguf: the model at OUT, OUT/model-<quant>.gguf beside it; gguf alone: only the file."""
    model = save_builtin_model("builtin:tiny", tmp_path / "full")
    monkeypatch.setattr(ex, "find_converter", lambda: Path("convert_hf_to_gguf.py"))
    converted = []

    def fake_to_gguf(merged, path, quant):  # the real conversion is tests/test_export.py's GGUF test
        converted.append(sorted(p.name for p in Path(merged).iterdir()))
        Path(path).write_bytes(b"GGUF")
        return Path(path)

    monkeypatch.setattr(ex, "to_gguf", fake_to_gguf)
    both = ex.export(model, tmp_path / "both", ["merged_16bit", "gguf"], gguf_quant="q8_0", dtype="float32")
    assert both == {"merged_16bit": tmp_path / "both", "gguf": tmp_path / "both" / "model-q8_0.gguf"}
    assert (tmp_path / "both" / "config.json").is_file() and "model.safetensors" in converted[0]
    only = ex.export(model, tmp_path / "only", ["gguf"], dtype="float32")
    assert only == {"gguf": tmp_path / "only" / "model-q4_k_m.gguf"}
    assert sorted(p.name for p in (tmp_path / "only").iterdir()) == [
        ".orpo_dist_export",  # the mark of a directory orpo_dist exported to (it may export there again)
        "model-q4_k_m.gguf",
    ]  # no merged copy left behind


def test_adapter_records_an_absolute_base_and_loads_from_anywhere(tmp_path, monkeypatch):
    """Trained from one directory with relative paths, loaded and exported from another."""
    from peft import AutoPeftModelForCausalLM, PeftModel

    here, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    save_builtin_model("builtin:tiny", here / "tiny")
    pairs_jsonl(here / "pairs.jsonl", 24)
    monkeypatch.chdir(here)
    orpo_dist.train(
        tiny_run("out", model="tiny", data_path="pairs.jsonl", peft=True, max_steps=2, save_steps=1)
    )
    final = here / "out" / "final"
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((here / "tiny").resolve())
    ckpt_config = here / "out" / "checkpoint-1" / "model" / "adapter_config.json"
    assert json.loads(ckpt_config.read_text())["base_model_name_or_path"] == base

    monkeypatch.chdir(elsewhere)  # where "tiny" means nothing
    assert isinstance(AutoPeftModelForCausalLM.from_pretrained(final), PeftModel)
    assert ex.main(["--checkpoint", str(final), "--format", "merged_16bit", "--out", "merged"]) == 0
    assert (elsewhere / "merged" / "model.safetensors").is_file()


def test_builtin_base_is_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = orpo_dist.train(tiny_run("rel_out", peft=True, max_steps=1, save_steps=None))
    base = json.loads((result.final_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(tmp_path / "rel_out" / "base_model")


# ------------------------------------------------------------------------------------------ push_to_hub


def _no_token_env(tmp_path: Path) -> dict[str, str]:
    env = launch_env(HF_HOME=str(tmp_path / "hf_home"), HOME=str(tmp_path / "home"))
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_TOKEN_PATH"):
        env.pop(key, None)
    return env


@pytest.mark.slow
def test_push_to_hub_without_a_token_stops_before_training(tmp_path):
    out = tmp_path / "never"
    cmd = [sys.executable, "-m", "orpo_dist.train", "--push-to-hub", "--hub_model_id", "me/orpo-tiny",
           "--output_dir", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=_no_token_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert_one_error_line(proc.stderr, "push_to_hub: true needs a Hugging Face token: set HF_TOKEN")
    assert not out.exists()
    proc = subprocess.run(cmd[:4] + ["--output_dir", str(out)], env=_no_token_env(tmp_path), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "push_to_hub: true needs hub_model_id" in proc.stderr


@pytest.mark.parametrize("formats,uploaded", [([], "final"), (["merged_16bit"], "export/merged")])
def test_push_to_hub_uploads_the_result_and_writes_no_token(formats, uploaded, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_123")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id)) or f"https://huggingface.co/{repo_id}")  # fmt: skip
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw["folder_path"])))  # fmt: skip
    result = orpo_dist.train(tiny_run(tmp_path, peft=True, max_steps=1, save_steps=None, push_to_hub=True,
                                      hub_model_id="me/orpo-tiny", export=formats))  # fmt: skip
    assert calls == [("create", "me/orpo-tiny"), ("upload", "me/orpo-tiny", str(tmp_path / uploaded))]
    assert result.final_dir.is_dir()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"hf_not_a_real_token_123" not in path.read_bytes(), path
