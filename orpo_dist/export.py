"""Export a trained checkpoint: merged 16-bit safetensors, and GGUF for llama.cpp / Ollama / LM Studio.

Single-process by design: the trainer calls this on rank 0 after the last barrier.

    python -m orpo_dist.export --checkpoint outputs/orpo/final --format merged_16bit gguf --out outputs/export

GGUF needs the optional toolchain (`bash scripts/install_gguf.sh`): llama.cpp's `convert_hf_to_gguf.py`
(shipped only in the llama-cpp-python sdist, so the script keeps a copy in the cache) writes an f16 GGUF,
and `llama_cpp.llama_model_quantize` quantises it. Nothing is downloaded here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

FORMATS = ("merged_16bit", "gguf")
GGUF_QUANTS = ("q4_k_m", "q8_0", "f16")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CONVERTER_ENV = "ORPO_DIST_LLAMA_CPP_CONVERTER"
INSTALL_HINT = "install the GGUF toolchain with `bash scripts/install_gguf.sh` (PyPI only)"
# Tokenizer files are copied verbatim: re-saving through AutoTokenizer can change the class and the ids.
TOKENIZER_FILES = tuple(
    "tokenizer.json tokenizer_config.json special_tokens_map.json tokenizer.model vocab.json merges.txt "
    "added_tokens.json chat_template.jinja chat_template.json".split()
)
EXTRA_FILES = ("generation_config.json", "orpo_config.yaml")


# ---------------------------------------------------------------------------------------------------
# merge


def _resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, str]:
    """Return (dir, "adapter" | "full"); also accepts an output_dir (uses `final/`) or `checkpoint-N/`."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    for cand in (path, path / "final", path / "model"):
        if (cand / "adapter_config.json").is_file():
            return cand, "adapter"
        if (cand / "config.json").is_file() and any(cand.glob("model*.safetensors")):
            return cand, "full"
    found = sorted(p.name for p in path.iterdir())[:20] if path.is_dir() else [path.name]
    raise FileNotFoundError(
        f"{str(path)!r} is not a checkpoint: expected a PEFT adapter (adapter_config.json + "
        f"adapter_model.safetensors) or a full model (config.json + model*.safetensors), in it or in its "
        f"final/ or model/ subdirectory; found {found}"
    )


def _trust_remote_code(ckpt: Path) -> bool:
    """Only the run's own config may turn on remote code; absent or unreadable means no."""
    cfg = ckpt / "orpo_config.yaml"
    if not cfg.is_file():
        return False
    import yaml

    try:
        data = yaml.safe_load(cfg.read_text()) or {}
    except yaml.YAMLError:
        return False
    return bool((data.get("model") or {}).get("trust_remote_code", False))


def _base_model_path(ckpt: Path, base_model: str | None) -> str:
    base = base_model or json.loads((ckpt / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{ckpt}/adapter_config.json has no base_model_name_or_path; pass base_model=")
    if base.startswith("builtin:"):
        from orpo_dist.synthetic import save_builtin_model

        base = str(save_builtin_model(base, Path(tempfile.mkdtemp(prefix="orpo_builtin_"))))
    elif base.startswith(("/", ".")) and not Path(base).exists():
        raise FileNotFoundError(
            f"the adapter's base model {base!r} does not exist on this machine; pass base_model= (CLI --base-model)"
        )
    return base


def _load_16bit(name: str, dtype: torch.dtype, trust: bool):
    """Load weights unquantised; a base saved pre-quantised (a `-bnb-4bit` hub repo) is dequantised.

    Returns (model, was_dequantised)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, use_safetensors=True, trust_remote_code=trust
    )
    if getattr(model, "hf_quantizer", None) is None:
        return model, False
    return model.dequantize(dtype=dtype), True


def _copy_files(src: Path, dst: Path, names: tuple[str, ...]) -> list[str]:
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def merge_to_16bit(
    checkpoint: str | Path, out_dir: str | Path, dtype: str = "bfloat16", base_model: str | None = None
) -> Path:
    """Write a standalone model (safetensors + tokenizer) that loads without peft or bitsandbytes.

    An adapter is merged into its base reloaded in `dtype` -- never into 4-bit weights, even after a
    QLoRA run: merging into nf4 would re-quantise the LoRA delta away. `float32` is for tests.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {list(DTYPES)}")
    ckpt, kind = _resolve_checkpoint(checkpoint)
    out = Path(out_dir)
    if out.resolve() == ckpt.resolve():
        raise ValueError(f"out_dir {str(out)!r} is the checkpoint itself; choose another directory")
    trust = _trust_remote_code(ckpt)
    if kind == "adapter":
        from peft import PeftModel

        if not (ckpt / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"{ckpt} has adapter_config.json but no adapter_model.safetensors")
        base = _base_model_path(ckpt, base_model)
        model, dequantized = _load_16bit(base, DTYPES[dtype], trust)
        model = PeftModel.from_pretrained(model, ckpt).merge_and_unload()
    else:
        base = None
        model, dequantized = _load_16bit(str(ckpt), DTYPES[dtype], trust)
    model = model.to(DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=True)
    # transformers 5 writes safetensors only (no pickle .bin). After dequantising, the loader's recorded
    # 4-bit deserialise step cannot be reverted, so those weights are saved as they are in memory.
    model.save_pretrained(out, save_original_format=not dequantized)
    if not _copy_files(ckpt, out, TOKENIZER_FILES):
        if base and Path(base).is_dir():
            _copy_files(Path(base), out, TOKENIZER_FILES)
        elif base:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(base, trust_remote_code=trust).save_pretrained(out)
    _copy_files(ckpt, out, EXTRA_FILES)
    return out


# ---------------------------------------------------------------------------------------------------
# GGUF


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
    pre-tokenizer it knows by hash -- neither exists for a char vocab such as orpo_dist.synthetic's.
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


# ---------------------------------------------------------------------------------------------------
# entry points


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    formats: list[str],
    gguf_quant: str = "q4_k_m",
    dtype: str = "bfloat16",
    base_model: str | None = None,
) -> dict[str, Path]:
    """Merge once and derive every requested format from it: {"merged_16bit": dir, "gguf": file}."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats={formats!r}; choose one or more of {list(FORMATS)}")
    if "gguf" in formats:
        find_converter()  # fail before the (long) merge if the toolchain is missing
    out = Path(out_dir)
    merged = merge_to_16bit(checkpoint, out / "merged", dtype=dtype, base_model=base_model)
    result: dict[str, Path] = {}
    if "merged_16bit" in formats:
        result["merged_16bit"] = merged
    if "gguf" in formats:
        result["gguf"] = to_gguf(merged, out / f"model-{gguf_quant}.gguf", gguf_quant)
        if "merged_16bit" not in formats:
            shutil.rmtree(merged)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orpo_dist.export", description="Merge a LoRA/QLoRA checkpoint to 16-bit and/or GGUF."
    )
    parser.add_argument(
        "--checkpoint", required=True, help="<output_dir>/final, checkpoint-N/, or output_dir"
    )
    parser.add_argument("--format", nargs="+", required=True, metavar="FORMAT", help=" and/or ".join(FORMATS))
    parser.add_argument("--quant", default="q4_k_m", choices=GGUF_QUANTS, help="GGUF quantisation")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--base-model", default=None, help="override the adapter's base_model_name_or_path")
    args = parser.parse_args(argv)
    formats = [f for item in args.format for f in item.split(",") if f]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        parser.error(f"unknown --format {', '.join(bad)}; choose from {', '.join(FORMATS)}")
    try:
        result = export(args.checkpoint, args.out, formats, args.quant, args.dtype, args.base_model)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    for fmt, path in result.items():
        print(f"{fmt}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
