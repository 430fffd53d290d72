"""Export a trained checkpoint: merged 16-bit safetensors, and GGUF for llama.cpp / Ollama / LM Studio.

Single-process by design: the trainer calls this on rank 0 after the last barrier.

    python -m orpo_dist.export --checkpoint outputs/orpo/final --format merged_16bit gguf --out outputs/model

writes the merged model AT `--out` (`from_pretrained("outputs/model")`, as Unsloth's
`save_pretrained_merged`) and the GGUF beside it (`outputs/model/model-q4_k_m.gguf`). At the end of
training the trainer writes `<output_dir>/export/merged/` and `<output_dir>/export/model-<quant>.gguf`.
GGUF (gguf.py) is derived from the merged model and needs the optional toolchain
(`bash scripts/install_gguf.sh`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from orpo_dist.config import EXPORT_FORMATS as FORMATS
from orpo_dist.config import GGUF_QUANTS, ConfigError
from orpo_dist.exits import fail, guarded
from orpo_dist.gguf import find_converter, to_gguf
from orpo_dist.paths import check_model_out, mark_written

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Tokenizer files are copied verbatim: re-saving through AutoTokenizer can change the class and the ids.
TOKENIZER_FILES = tuple(
    "tokenizer.json tokenizer_config.json special_tokens_map.json tokenizer.model vocab.json merges.txt "
    "added_tokens.json chat_template.jinja chat_template.json".split()
)
EXTRA_FILES = ("generation_config.json", "orpo_config.yaml", "prompt_format.json")


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


def _adapter_base(ckpt: Path, base_model: str | None) -> str:
    """The adapter's base as named (`--base-model`, else adapter_config.json), checked before any loading:
    a local directory, a built-in model, or a hub id that can be fetched (or is cached when offline)."""
    if base_model:
        base = base_model
    else:
        try:
            base = json.loads((ckpt / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (ValueError, AttributeError):
            raise ConfigError(
                f"{ckpt}/adapter_config.json is not a JSON object; is this a PEFT adapter?"
            ) from None
    if not base or not isinstance(base, str):
        raise ConfigError(f"{ckpt}/adapter_config.json has no base_model_name_or_path; pass --base-model")
    if base.startswith("builtin:") or Path(base).expanduser().is_dir():
        return base
    fix = "pass --base-model with a local directory (or base_model=)"
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = isinstance(try_to_load_from_cache(base, "config.json"), str)
    except HFValidationError:  # neither a directory here nor a hub id
        raise ConfigError(
            f"the adapter's base model {base!r} does not exist on this machine; {fix}"
        ) from None
    if not cached and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ConfigError(
            f"the adapter's base model {base!r} is not a directory here and not in the Hugging Face cache, "
            f"and HF_HUB_OFFLINE is set; {fix}, or unset HF_HUB_OFFLINE"
        )
    return base


def _base_model_path(ckpt: Path, base_model: str | None) -> str:
    base = _adapter_base(ckpt, base_model)
    if base.startswith("builtin:"):
        from orpo_dist.builtin import save_builtin_model

        base = str(save_builtin_model(base, Path(tempfile.mkdtemp(prefix="orpo_builtin_"))))
    return str(Path(base).expanduser()) if Path(base).expanduser().is_dir() else base


def check_destinations(
    checkpoint: str | Path, outs: list[str | Path], base_model: str | None = None, key: str = "--out"
) -> tuple[Path, str]:
    """Before any model loads: the checkpoint and its base are usable, and no destination in `outs` is one
    of them, inside one, under a file, or a directory of someone else's weights (paths.check_model_out).
    Returns (checkpoint dir, kind)."""
    ckpt, kind = _resolve_checkpoint(checkpoint)
    inputs = {"the checkpoint": ckpt}
    if kind == "adapter":
        base = _adapter_base(ckpt, base_model)
        if Path(base).expanduser().is_dir():
            inputs["the adapter's base model"] = base
    for out in outs:
        check_model_out(out, inputs, key)
        if (
            Path(out).expanduser().resolve() == Path(checkpoint).expanduser().resolve()
        ):  # a run's dir, checkpoint-N/
            raise ConfigError(
                f"{key} {out} is the directory given as the checkpoint; choose another directory"
            )
    return ckpt, kind


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
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    base_model: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Write a standalone model (safetensors + tokenizer) that loads without peft or bitsandbytes.

    An adapter is merged into its base reloaded in `dtype` -- never into 4-bit weights, even after a
    QLoRA run: merging into nf4 would re-quantise the LoRA delta away. `float32` is for tests.
    `trust_remote_code` comes from the caller only (the command line), never from the checkpoint's files.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {list(DTYPES)}")
    ckpt, kind = check_destinations(checkpoint, [out_dir], base_model, key="out_dir")
    out = Path(out_dir)
    trust = trust_remote_code
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
    mark_written(out, "merged 16-bit model")
    if not _copy_files(ckpt, out, TOKENIZER_FILES):
        if base and Path(base).is_dir():
            _copy_files(Path(base), out, TOKENIZER_FILES)
        elif base:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(base, trust_remote_code=trust).save_pretrained(out)
    _copy_files(ckpt, out, EXTRA_FILES)
    return out


# ---------------------------------------------------------------------------------------------------
# entry points


class ExportError(RuntimeError):
    """An export step failed after training; what was written before it (final/, the merged model) is kept."""


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    formats: list[str],
    gguf_quant: str = "q4_k_m",
    dtype: str = "bfloat16",
    base_model: str | None = None,
    merged_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Path]:
    """Merge once and derive every requested format from it: {"merged_16bit": dir, "gguf": file}.

    The merged model is written to `merged_dir` (default: `out_dir` itself), the GGUF to
    `out_dir/model-<quant>.gguf`; with gguf alone the merged model is a temporary directory. A failing
    GGUF step never loses the merged model: it is kept (as `out_dir/merged` when it was temporary) and
    ExportError says where."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats={formats!r}; choose one or more of {list(FORMATS)}")
    # nothing is loaded or written before every destination is known to overwrite no input
    check_destinations(checkpoint, [out_dir, *([merged_dir] if merged_dir else [])], base_model)
    if "gguf" in formats:
        find_converter()  # fail before the (long) merge if the toolchain is missing
    out = Path(out_dir)
    keep = "merged_16bit" in formats
    if not keep:
        out.mkdir(parents=True, exist_ok=True)
        merged_dir = tempfile.mkdtemp(prefix=".merged-", dir=out)
    try:
        merged = merge_to_16bit(checkpoint, merged_dir or out, dtype, base_model, trust_remote_code)
        result: dict[str, Path] = {"merged_16bit": merged} if keep else {}
        if "gguf" in formats:
            try:
                result["gguf"] = to_gguf(merged, out / f"model-{gguf_quant}.gguf", gguf_quant)
                mark_written(out, "GGUF model")
            except Exception as e:
                if not keep:  # the temporary merge outlives the failed step under a plain name
                    shutil.rmtree(out / "merged", ignore_errors=True)
                    merged = Path(merged).rename(out / "merged")
                raise ExportError(
                    f"GGUF export failed ({type(e).__name__}: {e}); the merged 16-bit model is kept in {merged} "
                    f"(retry: python -m orpo_dist.export --checkpoint {merged} --format gguf --out {out})"
                ) from e
    finally:
        if not keep:  # gone already when a failed GGUF step moved it to out/merged
            shutil.rmtree(merged_dir, ignore_errors=True)
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
    parser.add_argument(
        "--out",
        required=True,
        help="directory the model is written to (from_pretrained(OUT)); GGUF beside it",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--base-model", default=None, help="override the adapter's base_model_name_or_path")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run code shipped with the (base) model; off unless given here (a checkpoint's files never turn it on)",
    )
    args = parser.parse_args(argv)
    formats = [f for item in args.format for f in item.split(",") if f]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        parser.error(f"unknown --format {', '.join(bad)}; choose from {', '.join(FORMATS)}")
    return guarded(lambda: _export_command(args, formats))


def _export_command(args: argparse.Namespace, formats: list[str]) -> int:
    try:
        result = export(args.checkpoint, args.out, formats, gguf_quant=args.quant, dtype=args.dtype,
                        base_model=args.base_model, trust_remote_code=args.trust_remote_code)  # fmt: skip
    except (
        FileNotFoundError,
        ValueError,
        ImportError,
        ExportError,
    ) as e:  # no checkpoint, a bad argument, no toolchain, a failed step
        if isinstance(e, ConfigError):
            raise
        return fail(f"export failed: {e}", 1)
    for fmt, path in result.items():
        print(f"{fmt}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
