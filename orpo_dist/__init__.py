"""orpo_dist: ORPO preference alignment from one GPU (QLoRA) to many nodes (DeepSpeed ZeRO, FSDP2).

    import orpo_dist
    result = orpo_dist.train("run.yaml", lr=1e-4)   # or orpo_dist.train({"model": ..., "data_path": ...})
    orpo_dist.generate(result.final_dir, ["Write in capitals: hello\\n"])   # -> ["HELAP"]: its completions

The command lines are `python -m orpo_dist.train` (orpo_dist.cli) and `python -m orpo_dist.generate`
(orpo_dist.generation).
"""

from __future__ import annotations

from orpo_dist.config import Config, ConfigError, load_config, validate

__all__ = ["Config", "ConfigError", "ORPOConfig", "ORPOTrainer", "generate", "load_config", "train"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`from orpo_dist import ORPOConfig, ORPOTrainer`: TRL's names on orpo_dist's loop (orpo_dist.trl_api),
    imported on first use so `import orpo_dist` stays light."""
    if name in ("ORPOConfig", "ORPOTrainer"):
        from orpo_dist import trl_api

        return getattr(trl_api, name)
    raise AttributeError(f"module 'orpo_dist' has no attribute {name!r}")


def train(config: Config | dict | str | None = None, **overrides):
    """Train from a Config, a dict of keys, or a YAML path, plus keyword overrides; returns a TrainResult
    (output_dir, global_step, final_dir, the logged metric rows). The config is validated before
    anything is loaded. `data_path` / `eval_data_path` may be a datasets.Dataset / DatasetDict, a list of
    dicts or a pandas DataFrame, and `model` a PreTrainedModel (written once under <output_dir>/inputs/)."""
    from orpo_dist.inputs import bind, split_objects
    from orpo_dist.trainer import run

    if isinstance(config, Config):
        if overrides:
            raise TypeError("pass overrides with a YAML path or dict, not with a Config object")
        validate(config)
        return run(config)
    if isinstance(config, dict):
        plain, objects = split_objects({**config, **overrides})
        cfg = load_config(None, plain)
    else:
        plain, objects = split_objects(overrides)
        cfg = load_config(config, plain)
    bind(cfg, objects)
    return run(cfg)


def generate(model_dir, prompts, **options) -> list[str]:
    """Completions (greedy by default) of `prompts` -- text, or lists of {role, content} messages -- by the
    model in `model_dir`: a run's output_dir, final/ (full or LoRA), checkpoint-N/, an exported or any
    model directory. Prompts are rendered as the run's training rendered them. Options:
    max_new_tokens, temperature, top_p, num_return_sequences, seed, batch_size, prompt_format, dtype,
    base_model, device (orpo_dist.generation.Options). Raises GenerateError (a ValueError) on a mistake."""
    from orpo_dist.generation import generate as _generate

    return _generate(model_dir, prompts, **options)
