"""The command line: `python -m orpo_dist.train`, `accelerate launch -m orpo_dist.train`, `orpo-dist`.

    python -m orpo_dist.train [--config FILE.yaml] [--key value ...]

With no --config, no model and no data the built-in quickstart preset runs (tiny local model, built-in
task, CPU is fine); a command line naming its own model or data (AutoTrain style) starts from the defaults.
Exit codes: 0 done; 2 bad config or data (one-line reason, before any model is loaded);
3 preempted with a checkpoint saved (run again with --resume auto).
"""

from __future__ import annotations

import logging
import os
import sys
from importlib.resources import files

from orpo_dist.config import Config, ConfigError, canonical, load_config, parse_overrides

USAGE = """usage: python -m orpo_dist.train [--config FILE.yaml] [--key value ...]
       accelerate launch [--config_file configs/accelerate/X.yaml] -m orpo_dist.train ...

Keys may be written --key value, --key=value, with dashes or underscores; boolean keys work bare
(--peft). AutoTrain / TRL / Axolotl / Unsloth names are accepted (--project-name, --dpo-beta,
--learning_rate, --load_in_4bit, ...). Without --config, --model or --data-path: the built-in quickstart.
--version prints the versions of orpo_dist and the libraries it trains with.
Exit codes: 0 done; 2 bad config or data; 3 preempted (a checkpoint was saved; rerun with --resume auto).
"""
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
    """(config, whether it is the quickstart preset) from the command line."""
    config_path = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path to a YAML file")
            config_path, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            config_path, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    if config_path is not None and not os.path.exists(config_path):
        raise ConfigError(f"--config {config_path}: no such file")
    # the quickstart preset only when the command brings no run of its own (no model, no data)
    own_run = {canonical(key) for key, _ in parse_overrides(rest)} & {"model", "data_path", "datasets"}
    preset = config_path is None and not own_run
    return load_config(quickstart_preset() if preset else config_path, rest), preset


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(_help())
        return 0
    if "--version" in argv:
        print(_version())
        return 0
    logging.basicConfig(level=logging.INFO, format="[orpo_dist] %(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "accelerate", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernel notice, not actionable
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        cfg, preset = parse(argv)
    except ConfigError as e:
        print(f"orpo_dist: {e}", file=sys.stderr)
        return 2
    from orpo_dist.data import DataError
    from orpo_dist.trainer import exit_code, run

    if preset and os.environ.get("RANK", "0") == "0":
        print(
            f"[orpo_dist] no --config given: running the built-in quickstart ({quickstart_preset()})",
            flush=True,
        )
    try:
        return exit_code(run(cfg))
    except DataError as e:
        print(f"orpo_dist: data error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:  # what only this machine can tell: paged optimizer without CUDA, no Hub token
        print(f"orpo_dist: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
