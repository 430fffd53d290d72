"""orpo_dist: ORPO preference alignment from one GPU (QLoRA) to many nodes (DeepSpeed ZeRO, FSDP2)."""

from orpo_dist.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "train"]
__version__ = "0.1.0"


def train(config: Config | dict | str | None = None, **overrides):
    """Python API: `orpo_dist.train("run.yaml", lr=1e-4)` or `orpo_dist.train({"model": ...})`.

    Returns a TrainResult (output_dir, global_step, final_dir, metrics rows).
    """
    from orpo_dist.train import train as _train  # importing the CLI module rebinds this name to it;
    # that module is callable with the same signature (see the end of train.py)

    return _train(config, **overrides)
