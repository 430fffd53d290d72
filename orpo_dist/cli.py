"""The command line: `python -m orpo_dist.train`, `accelerate launch -m orpo_dist.train`, `orpo-dist`
(and `orpo-dist generate ...`, which is `python -m orpo_dist.generate ...`).

    python -m orpo_dist.train [--config FILE.yaml] [--key value ...]

With no arguments at all (or `--config quickstart`) the built-in quickstart preset runs (tiny local
model, built-in task, CPU is fine); any other run starts from the documented defaults.
Exit codes: 0 done; 1 stopped by a failure during training (a non-finite loss, a hung or lost rank,
a full disk, a failed export: one-line reason, the last checkpoint kept); 2 bad config or data (one-line
reason, before any model is loaded); 3 preempted with a checkpoint saved (run again with --resume auto).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from importlib.resources import files

from orpo_dist.config import Config, load_config, parse_overrides
from orpo_dist.config.load import CONFIG
from orpo_dist.console import one_line, setup_logging
from orpo_dist.exits import debugging, fail, guarded
from orpo_dist.preemption import record_early

USAGE = """usage: python -m orpo_dist.train [--config FILE.yaml] [--key value ...]
       accelerate launch [--config_file configs/accelerate/X.yaml] -m orpo_dist.train ...
       orpo-dist generate MODEL --prompt TEXT   (python -m orpo_dist.generate --help: see what a model writes)

Keys may be written --key value, --key=value, with dashes or underscores; boolean keys work bare
(--peft). AutoTrain / TRL / Axolotl / Unsloth names are accepted (--project-name, --dpo-beta,
--learning_rate, --load_in_4bit, ...). The full table: docs/options.md.
With no arguments at all, or --config quickstart: the built-in quickstart preset. Otherwise the
documented defaults, then the --config file, then the flags.
--version prints the versions of orpo_dist and the libraries it trains with.
"""
QUICKSTART = "quickstart"  # `--config quickstart`: the preset by name
VERSIONED = (
    "torch",
    "transformers",
    "trl",
    "accelerate",
    "peft",
    "deepspeed",
    "bitsandbytes",
    "datasets",
    "wandb",
)


def quickstart_preset() -> str:
    return str(files("orpo_dist") / "presets" / "quickstart.yaml")


def _help() -> str:
    from orpo_dist.config.keys import help_text

    return USAGE + "\nkeys, by section (a section's keys may also be written under it in YAML):" + help_text()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import orpo_dist

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libs = ", ".join(f"{name} {installed(name)}" for name in VERSIONED)
    return f"orpo_dist {orpo_dist.__version__} (python {sys.version.split()[0]}; {libs})"


def parse(argv: list[str]) -> tuple[Config, bool]:
    """(config, whether it is the quickstart preset) from the command line.

    The preset applies only with no arguments at all, or with `--config quickstart`; every other run
    starts from the documented defaults (a `--model` / `--data-path` run never inherits the preset's
    lr, beta or max_length).
    """
    items = parse_overrides(argv)
    config_path = next((value for key, value in reversed(items) if key == CONFIG), None)
    rest = [(key, value) for key, value in items if key != CONFIG]
    preset = not argv or config_path == QUICKSTART
    return load_config(quickstart_preset() if preset else config_path, rest), preset


def _lost_peer(e: BaseException) -> bool:
    """A collective failed because another rank hung (ddp_timeout passed) or died."""
    import torch.distributed as dist

    text = str(e).lower()
    return isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError)
        and any(
            k in text for k in ("gloo", "nccl", "connection closed by peer", "timed out", "connection reset")
        )
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generate"]:  # `orpo-dist generate MODEL ...`: python -m orpo_dist.generate
        from orpo_dist.generation import main as generate

        return generate(argv[1:])
    signalled, previous = record_early()
    try:
        return _main(argv, signalled)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str], signalled: Callable[[], bool]) -> int:
    if "-h" in argv or "--help" in argv:
        print(_help())
        return 0
    if "--version" in argv:
        print(_version())
        return 0
    setup_logging()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return guarded(lambda: _train(argv, signalled))


def _train(argv: list[str], signalled: Callable[[], bool]) -> int:
    cfg, preset = parse(argv)
    if not sys.stderr.isatty():  # progress bars in a log are noise, and would bury a one-line error
        import datasets

        datasets.disable_progress_bars()
    from orpo_dist.checkpoint import CheckpointError
    from orpo_dist.export import ExportError
    from orpo_dist.health import NonFiniteError
    from orpo_dist.trainer import exit_code, run

    if preset and os.environ.get("RANK", "0") == "0":
        print(f"[orpo_dist] running the built-in quickstart ({quickstart_preset()})", flush=True)
    try:
        if cfg.train.dry_run:
            from orpo_dist.dry_run import dry_run

            dry_run(cfg, say=lambda line: print(f"[orpo_dist] {line}", flush=True))
            return 0
        return exit_code(run(cfg, signalled))
    except (NonFiniteError, CheckpointError, ExportError) as e:
        if debugging():
            raise
        return fail(str(e), 1)
    except Exception as e:
        if not _lost_peer(e) or debugging():
            raise
        return fail(
            f"a rank stopped answering (hung or lost; collectives wait ddp_timeout={cfg.train.ddp_timeout}s): "
            f"{type(e).__name__}: {one_line(str(e))[:300]}. Resume with --resume auto from the last checkpoint",
            1,
        )


if __name__ == "__main__":
    sys.exit(main())
