"""GGUF for llama.cpp / Ollama / LM Studio: convert a merged 16-bit model, then quantise.

Needs the optional toolchain (`bash scripts/install_gguf.sh`): llama.cpp's `convert_hf_to_gguf.py`
(shipped only in the llama-cpp-python sdist, so the script keeps a copy in the cache) writes an f16 GGUF,
and `llama_cpp.llama_model_quantize` quantises it. Nothing is downloaded here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from orpo_dist.config import GGUF_QUANTS

CONVERTER_ENV = "ORPO_DIST_LLAMA_CPP_CONVERTER"
INSTALL_HINT = "install the GGUF toolchain with `bash scripts/install_gguf.sh` (PyPI only)"


def _cache_dir() -> Path:
    """Same place scripts/install_gguf.sh writes to."""
    if root := os.environ.get("ORPO_DIST_CACHE"):
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orpo_dist"


def find_converter() -> Path:
    """`$ORPO_DIST_LLAMA_CPP_CONVERTER`, else the copy install_gguf.sh kept for the installed llama_cpp."""
    if env := os.environ.get(CONVERTER_ENV):
        if not Path(env).is_file():
            raise FileNotFoundError(f"{CONVERTER_ENV}={env!r} is not a file")
        return Path(env)
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(f"GGUF export needs llama-cpp-python: {INSTALL_HINT}") from e
    path = _cache_dir() / "llama_cpp" / llama_cpp.__version__ / "convert" / "convert_hf_to_gguf.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"llama.cpp converter not found at {path} (for llama-cpp-python {llama_cpp.__version__}); "
            f"{INSTALL_HINT}, or set {CONVERTER_ENV} to a convert_hf_to_gguf.py"
        )
    return path


def _char_level_sentencepiece(tokenizer_json: dict, out_file: Path) -> None:
    """Describe a character-level WordLevel vocab as a sentencepiece CHAR model, ids unchanged.

    llama.cpp's converter maps tokenizer.json vocabs to its BPE tokenizer, which needs merges and a
    pre-tokenizer it knows by hash -- neither exists for a char vocab such as orpo_dist.builtin's.
    A sentencepiece CHAR model is what such a vocab is; the converter's long-standing Llama
    `tokenizer.model` path reads it, and llama.cpp's SPM tokenizer then splits text exactly per char.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp

    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    specials = {t["content"]: t for t in tokenizer_json.get("added_tokens", [])}
    unk = tokenizer_json["model"].get("unk_token")
    words = [w for w in vocab if w not in specials]
    if (
        any(len(w) != 1 for w in words)
        or "\u2581" in vocab
        or sorted(vocab.values()) != list(range(len(vocab)))
    ):
        raise ValueError("only a character-level WordLevel vocab with ids 0..n-1 can be written as GGUF")
    proto = sp.ModelProto()
    proto.trainer_spec.model_type = sp.TrainerSpec.CHAR
    proto.trainer_spec.vocab_size = len(vocab)
    # Only unk matters to sentencepiece; the converter takes bos/eos/pad from the HF tokenizer files.
    proto.trainer_spec.unk_id = vocab[unk]
    proto.trainer_spec.bos_id = proto.trainer_spec.eos_id = proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    kind = sp.ModelProto.SentencePiece
    for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        piece_type = kind.UNKNOWN if tok == unk else kind.CONTROL if tok in specials else kind.NORMAL
        proto.pieces.add(piece=tok.replace(" ", "\u2581"), score=0.0, type=piece_type)  # SPM escapes spaces
    out_file.write_bytes(proto.SerializeToString())


def _stage_for_converter(merged: Path, stage: Path) -> Path:
    """Return the dir to hand the converter: `merged` itself, or a staged view for a char-level vocab."""
    tok_file = merged / "tokenizer.json"
    if not tok_file.is_file() or (merged / "tokenizer.model").exists():
        return merged
    tok = json.loads(tok_file.read_text())
    if tok.get("model", {}).get("type") != "WordLevel":
        return merged
    stage.mkdir(parents=True, exist_ok=True)
    for f in merged.iterdir():
        if f.name != "tokenizer_config.json":
            (stage / f.name).symlink_to(f.resolve())
    _char_level_sentencepiece(tok, stage / "tokenizer.model")
    cfg_file = merged / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    cfg["add_prefix_space"] = False  # GGUF key tokenizer.ggml.add_space_prefix; SPM defaults to True
    (stage / "tokenizer_config.json").write_text(json.dumps(cfg))
    return stage


def _run_converter(model_dir: Path, out_file: Path) -> None:
    cmd = [sys.executable, str(find_converter()), str(model_dir), "--outfile", str(out_file)]
    proc = subprocess.run([*cmd, "--outtype", "f16"], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        hint = ""
        if "pre-tokenizer was not recognized" in tail:
            hint = (
                "\nllama.cpp does not know this tokenizer's pre-tokenizer. Use a llama-cpp-python version "
                "whose converter lists it (LLAMA_CPP_PYTHON_VERSION=... bash scripts/install_gguf.sh), or "
                f"register its hash with llama.cpp's convert_hf_to_gguf_update.py and point {CONVERTER_ENV} there."
            )
        raise RuntimeError(f"convert_hf_to_gguf.py failed (exit {proc.returncode}):\n{tail}{hint}")


def _quantize(src: Path, dst: Path, quant: str) -> None:
    import llama_cpp

    ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[quant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {quant}) failed with code {rc}")


def to_gguf(merged_dir: str | Path, out_file: str | Path, quant: str = "q4_k_m") -> Path:
    """Convert a merged HF model dir to one GGUF file, quantised to `quant` (q4_k_m | q8_0 | f16)."""
    if quant not in GGUF_QUANTS:
        raise ValueError(f"quant={quant!r}; choose one of {list(GGUF_QUANTS)}")
    merged, out = Path(merged_dir), Path(out_file)
    if not (merged / "config.json").is_file():
        raise FileNotFoundError(f"{merged} is not a merged model (no config.json); run merge_to_16bit first")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="orpo_gguf_", dir=out.parent) as tmp:
        f16 = Path(tmp) / "model-f16.gguf"
        # the staged dir keeps the merged dir's name: the converter derives general.name from it
        _run_converter(_stage_for_converter(merged, Path(tmp) / "stage" / merged.resolve().name), f16)
        if quant == "f16":
            shutil.move(f16, out)
        else:
            _quantize(f16, out, quant)
    return out
