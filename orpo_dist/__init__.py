"""orpo_dist: ORPO preference alignment from one GPU (QLoRA) to many nodes (DeepSpeed ZeRO, FSDP2).

    import orpo_dist
    result = orpo_dist.train("run.yaml", lr=1e-4)   # or orpo_dist.train({"model": ..., "data_path": ...})

The command line is `python -m orpo_dist.train` (orpo_dist.cli).
"""

from __future__ import annotations

from orpo_dist.config import Config, ConfigError, load_config, validate

__all__ = ["Config", "ConfigError", "load_config", "train"]
__version__ = "0.1.0"


def train(config: Config | dict | str | None = None, **overrides):
    """Train from a Config, a dict of keys, or a YAML path, plus keyword overrides; returns a TrainResult
    (output_dir, global_step, final_dir, the logged metric rows). The config is validated before
    anything is loaded."""
    from orpo_dist.trainer import run

    if isinstance(config, Config):
        if overrides:
            raise TypeError("pass overrides with a YAML path or dict, not with a Config object")
        validate(config)
        return run(config)
    if isinstance(config, dict):
        return run(load_config(None, {**config, **overrides}))
    return run(load_config(config, overrides))
