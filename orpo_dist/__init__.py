"""orpo_dist: ORPO preference alignment from one GPU (QLoRA) to many nodes (DeepSpeed ZeRO, FSDP2)."""

from orpo_dist.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "train"]
__version__ = "0.1.0"


def train(config: Config | dict | str | None = None, **overrides):
    """Python API: `orpo_dist.train("run.yaml", lr=1e-4)` or `orpo_dist.train({"model": ...})`.

    Returns a TrainResult (output_dir, global_step, final_dir, metrics rows).
    """
    from orpo_dist.trainer import run

    if isinstance(config, Config):
        cfg = config
        if overrides:
            raise TypeError("pass overrides with a YAML path or dict, not with a Config object")
        cfg.validate()
    elif isinstance(config, dict):
        cfg = load_config(None, {**config, **overrides})
    else:
        cfg = load_config(config, overrides)
    return run(cfg)
