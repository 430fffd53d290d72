"""The command line: `python -m orpo_dist.train`, `accelerate launch -m orpo_dist.train`, `orpo-dist`.

    python -m orpo_dist.train [--config FILE.yaml] [--key value ...]

With no --config the built-in quickstart preset runs (tiny local model, built-in task, CPU is fine).
Exit codes: 0 done; 2 bad config or data (one-line reason, before any model is loaded);
3 preempted with a checkpoint saved (run again with --resume auto).
"""

from __future__ import annotations

import logging
import os
import sys
from importlib.resources import files

from orpo_dist.config import LEAVES, Config, ConfigError, load_config

USAGE = """usage: python -m orpo_dist.train [--config FILE.yaml] [--key value ...]
       accelerate launch [--config_file configs/accelerate/X.yaml] -m orpo_dist.train ...

Keys may be written --key value, --key=value, with dashes or underscores; boolean keys work bare
(--peft). AutoTrain / TRL / Axolotl / Unsloth names are accepted (--project-name, --dpo-beta,
--learning_rate, --load_in_4bit, ...). See README.md for the table.
Without --config: the built-in quickstart preset.
"""


def quickstart_preset() -> str:
    return str(files("orpo_dist") / "presets" / "quickstart.yaml")


def _help() -> str:
    keys = "\n".join(f"  --{name:<26} [{section}]" for name, (section, _) in LEAVES.items())
    return USAGE + "\nkeys:\n" + keys


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
    return load_config(config_path or quickstart_preset(), rest), config_path is None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(_help())
        return 0
    logging.basicConfig(level=logging.INFO, format="[orpo_dist] %(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "accelerate"):
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
    except ConfigError as e:  # what only the launch and the model can tell (sequence parallelism)
        print(f"orpo_dist: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
