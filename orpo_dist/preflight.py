"""Start-up checks that need the machine, the launch or the model's config, run before any weights load.

Each user mistake becomes one `ConfigError` (one line on stderr, exit 2) instead of a traceback
minutes later: an output_dir that cannot be written, a resume that cannot continue (resume.py),
float16 master weights, a GGUF export without its toolchain, a model that is neither a local
directory nor reachable on the hub, an attention implementation or LoRA target the model does not
have, a backend or kernel that cannot run here. The model checks build the model on the `meta`
device: module names and attention checks without reading or allocating a single weight.
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import torch

from orpo_dist.config import Config, ConfigError
from orpo_dist.paths import check_model_out
from orpo_dist.resume import ResumePoint, check_settings, find_resume_point, run_fingerprint
from orpo_dist.run_dir import STATE_DIR

LOCAL_PREFIXES = ("/", "./", "../", "~")


def check_run(cfg: Config, world_size: int, strategy: str) -> ResumePoint | None:
    """The checks that need no model: output_dir, resume, float16 weights, GGUF toolchain."""
    check_cpu_launch(world_size)
    check_output_dir(Path(cfg.train.output_dir))
    point = find_resume_point(cfg)
    if point is not None:
        from orpo_dist.safe_load import UnsafeCheckpoint, audit_checkpoint

        check_settings(point, run_fingerprint(cfg, world_size, strategy))
        try:
            audit_checkpoint(point.path / STATE_DIR)
        except UnsafeCheckpoint as e:
            raise ConfigError(str(e)) from None
    if cfg.model.dtype == "float16" and not cfg.peft.use_peft and strategy != "DEEPSPEED":
        raise ConfigError(
            "dtype=float16 for a full fine-tune trains float16 weights and AdamW state: the update underflows to "
            "NaN (on CPU from step 2). Use dtype: auto / float32 (with mixed_precision: fp16 on a GPU), "
            "bfloat16, or peft: true"
        )
    if cfg.export.formats:  # the export at the end may not write over the model it starts from
        model = Path(cfg.model.model).expanduser()
        out = Path(cfg.train.output_dir) / "export"
        inputs = {"the model": model} if model.is_dir() else {}
        for where in (out, out / "merged"):
            check_model_out(where, inputs, key=f"export (output_dir={cfg.train.output_dir}):")
    if "gguf" in cfg.export.formats:
        from orpo_dist.gguf import find_converter

        try:
            find_converter()
        except (ImportError, FileNotFoundError) as e:
            raise ConfigError(f"export: [gguf] cannot run after training: {e}") from None
    return point


def check_cpu_launch(world_size: int) -> None:
    """`accelerate launch --cpu --num_processes N` (N > 1) starts ONE process (accelerate's simple launcher) that
    would train alone and exit 0: seen from the launcher's command line, our parent process."""
    if world_size != 1 or os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true":
        return
    asked = launcher_processes(os.getppid())
    if asked > 1:
        raise ConfigError(
            f"accelerate launch --cpu --num_processes {asked} starts one process, not {asked} (accelerate runs --cpu "
            f"as a single process). On CPU launch DDP with: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            f"--num_processes {asked} -m orpo_dist.train ..."
        )


def launcher_processes(pid: int) -> int:
    """`--num_processes` of an `accelerate launch` command line (/proc/<pid>/cmdline), else 1."""
    try:
        args = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return 1
    if not any(Path(a).name in ("accelerate", "accelerate-launch", "accelerate.commands.launch") for a in args[:3]):
        return 1
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key in ("--num_processes", "--num-processes"):
            value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            return int(value) if value.isdigit() else 1
    return 1


def check_special_tokens(cfg: Config, tokenizer) -> None:
    """Axolotl `special_tokens`: each must already be a token of the tokenizer (nothing to add, nothing to train)."""
    vocab = tokenizer.get_vocab()
    missing = [f"{name}={token!r}" for name, token in (cfg.model.special_tokens or {}).items() if token not in vocab]
    if missing:
        raise ConfigError(
            f"special_tokens: {', '.join(missing)} not tokens of {cfg.model.model}'s tokenizer: adding them would grow "
            "the embeddings, which orpo_dist does not train; use tokens the tokenizer has (or add them to it first)"
        )


def check_output_dir(out: Path) -> None:
    """output_dir exists (created here) and is writable: not a file, not under a file, not read-only."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == out else f"is under {existing}, which is a file"
        raise ConfigError(f"output_dir={out} {where}; choose a directory")
    if not existing.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        # what only root gets this far with: the directory is marked read-only, and that is respected
        where = "is read-only" if existing == out else f"is inside {existing}, which is read-only"
        mode = stat.filemode(existing.stat().st_mode)
        raise ConfigError(f"output_dir={out} {where} ({mode}); choose a writable directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"output_dir={out} cannot be written ({e.strerror or e}); choose a writable directory"
        ) from None


def _is_local(name: str) -> bool:
    return name.startswith(LOCAL_PREFIXES) or Path(name).expanduser().exists()


def model_config(cfg: Config, path: str):
    """The model's transformers config, or a ConfigError saying why it cannot be found (no weights read)."""
    from transformers import AutoConfig

    name = cfg.model.model
    p = Path(path).expanduser()
    if _is_local(path):
        if not p.exists():
            raise ConfigError(f"model={name}: no such local directory")
        if not (p / "config.json").is_file():
            raise ConfigError(
                f"model={name}: {p} has no config.json; point model at a transformers model directory"
            )
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if offline and not _is_local(path):
            raise ConfigError(
                f"model={name}: not a local directory and not in the Hugging Face cache, and the hub is offline "
                f"(HF_HUB_OFFLINE=1): download it first (hf download {name}) or pass a local directory"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model={name}: cannot load its config ({first})") from None


def check_model(cfg: Config, path: str, num_processes: int, sharded: bool) -> None:
    """Backend, kernels, quantization, attention implementation and LoRA targets, on the meta device."""
    from orpo_dist.modeling import choose_backend, fused_kernel_blockers

    config = model_config(cfg, path)
    backend, _ = choose_backend(cfg, num_processes, config.model_type)
    fused_kernel_blockers(cfg.model.fused_kernels)
    if cfg.peft.quantization == "int8" and sharded:
        raise ConfigError(
            "quantization=int8 cannot be sharded by ZeRO-3/FSDP; use int4 (QLoRA) or ZeRO-2/DDP"
        )
    if backend != "hf":
        return
    model = _meta_model(cfg, path)
    if model is not None and cfg.peft.use_peft and cfg.peft.target_modules != "all-linear":
        check_target_modules(model, cfg.peft.target_modules)


def _meta_model(cfg: Config, path: str):
    """The model built on the meta device with the asked attention implementation (None if it cannot be
    built this way for a reason other than the attention implementation: the real load will say)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def build(attn):
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        kwargs = {"attn_implementation": attn} if attn else {}
        with torch.device("meta"), _without_zero3_init():
            return AutoModelForCausalLM.from_config(
                config, trust_remote_code=cfg.model.trust_remote_code, **kwargs
            )

    attn = cfg.model.attn_implementation
    try:
        return build(attn)
    except Exception as e:  # noqa: BLE001 - decided below by retrying without the attention setting
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not attn:
            return None
    try:
        build(None)
    except Exception:  # noqa: BLE001 - the model itself does not build on meta: leave it to the real load
        return None
    raise ConfigError(f"attn_implementation={attn} cannot be used with {cfg.model.model}: {first}")


@contextmanager
def _without_zero3_init():
    """Under ZeRO-3 transformers builds a model inside deepspeed.zero.Init, which partitions it with
    collectives: a meta-device model built on one rank (rank 0 goes first) would wait for the others
    forever. Off for this model only."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


LORA_LAYERS = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention")


def check_target_modules(model, target_modules: str) -> None:
    """Every comma-separated name must be (the last part of) a layer LoRA can adapt, as PEFT matches them."""
    import difflib

    modules = dict(model.named_modules())
    leaves = sorted({name.rsplit(".", 1)[-1] for name in modules if name})
    problems = []
    for target in [t.strip() for t in target_modules.split(",") if t.strip()]:
        matched = [m for n, m in modules.items() if n == target or n.endswith("." + target)]
        if not matched:
            close = difflib.get_close_matches(target, leaves, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"'{target}' matches no module{hint}")
        elif not any(type(m).__name__ in LORA_LAYERS for m in matched):
            problems.append(f"'{target}' is a {type(matched[0]).__name__}, not a layer LoRA can adapt")
    if problems:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if type(m).__name__ == "Linear"})
        raise ConfigError(
            f"target_modules={target_modules}: {'; '.join(problems)}. Linear layers of this model: "
            f"{', '.join(linear)} (or all-linear)"
        )
