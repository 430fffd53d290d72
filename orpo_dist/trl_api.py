"""TRL's ORPO API on orpo_dist's loop: `from orpo_dist import ORPOConfig, ORPOTrainer` in place of
`from trl.experimental.orpo import ORPOConfig, ORPOTrainer`, the rest of the script unchanged.

`ORPOConfig` takes TRL's / transformers' field names (with TRL's defaults where they differ from ours)
and becomes an orpo_dist `Config` through the same loader as a YAML file; `ORPOTrainer` writes the objects
it is given (model, datasets, tokenizer) under `<output_dir>/inputs/` (orpo_dist.inputs), maps
`peft_config` onto the LoRA keys, and runs orpo_dist's own `Trainer`. Nothing of TRL's trainer is used.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from orpo_dist.config import Config, ConfigError, load_config

# TRL ORPOConfig / transformers TrainingArguments defaults that differ from orpo_dist's
TRL_DEFAULTS: dict[str, Any] = {
    "output_dir": "trainer_output",
    "learning_rate": 1e-6,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 8,
    "max_length": 1024,
    "beta": 0.1,
    "warmup_steps": 0,
    "logging_steps": 10,
    "eval_strategy": "no",
    "eval_on_start": False,
    "save_total_limit": None,
    "gradient_checkpointing": True,
    "disable_dropout": True,
    "report_to": "none",
    "eval_split": 0,  # TRL evaluates on eval_dataset only
}
LORA_FIELDS = {  # peft LoraConfig attribute -> our key
    "r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "target_modules": "target_modules",
    "use_rslora": "use_rslora",
    "use_dora": "use_dora",
    "modules_to_save": "modules_to_save",
}


class ORPOConfig:
    """TRL's `ORPOConfig(output_dir=..., learning_rate=..., beta=..., ...)`: every field kept as given and
    readable as an attribute; `to_config()` is the orpo_dist Config it means."""

    def __init__(self, output_dir: str | None = None, **fields: Any):
        given = {k: v for k, v in fields.items()}
        if output_dir is not None:
            given["output_dir"] = output_dir
        self.__dict__["fields"] = {**TRL_DEFAULTS, **given}

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__["fields"][name] = value

    def to_config(self, extra: dict[str, Any] | None = None) -> Config:
        return load_config(None, {**self.fields, **(extra or {})})


def lora_keys(peft_config: Any) -> dict[str, Any]:
    """A peft LoraConfig as our keys (peft: true, lora_r, ...); other adapter types are refused."""
    if peft_config is None:
        return {}
    if type(peft_config).__name__ != "LoraConfig":
        raise ConfigError(
            f"peft_config: a {type(peft_config).__name__}; orpo_dist trains LoRA adapters (LoraConfig)"
        )
    keys = {"use_peft": True}
    for attr, key in LORA_FIELDS.items():
        value = getattr(peft_config, attr, None)
        if value is None:
            continue
        if isinstance(value, (set, frozenset, list, tuple)):
            value = ",".join(sorted(map(str, value)))
        keys[key] = value
    return keys


class ORPOTrainer:
    """`ORPOTrainer(model, args, train_dataset=..., eval_dataset=..., processing_class=..., peft_config=...)`,
    then `.train()`, `.evaluate()`, `.save_model()`, on orpo_dist's Trainer."""

    def __init__(
        self,
        model: Any = None,
        args: ORPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: Any = None,
        **unsupported: Any,
    ):
        from orpo_dist.inputs import bind, is_object

        if data_collator is not None or callbacks or unsupported:
            names = (
                ["data_collator"] * (data_collator is not None)
                + ["callbacks"] * bool(callbacks)
                + list(unsupported)
            )
            raise ConfigError(
                f"ORPOTrainer: {', '.join(names)} not supported (orpo_dist collates and logs itself)"
            )
        if model is None or train_dataset is None:
            raise ConfigError("ORPOTrainer needs model= and train_dataset=")
        self.args = args or ORPOConfig()
        keys: dict[str, Any] = lora_keys(peft_config)
        objects: dict[str, Any] = {}
        for key, value in (("model", model), ("data_path", train_dataset), ("eval_data_path", eval_dataset)):
            if value is None:
                continue
            if is_object(value):
                objects[key] = value
            else:
                keys[key] = str(value)
        if isinstance(model, str) and processing_class is not None:
            tokenizer_source = getattr(processing_class, "name_or_path", None)
            if tokenizer_source and tokenizer_source != model:
                objects["model"] = _from_pretrained(model)  # the model saved with the tokenizer passed
        self.cfg = self.args.to_config(keys)
        bind(self.cfg, objects, processing_class)
        self._trainer = None
        self.state = None

    def _built(self):
        if self._trainer is None:
            from orpo_dist.preemption import Preemption
            from orpo_dist.trainer import Trainer

            self._preemption = Preemption(None)
            self._trainer = Trainer(self.cfg, self._preemption.__enter__())
        return self._trainer

    def train(self, resume_from_checkpoint: str | bool | None = None):
        """Train; returns transformers' TrainOutput(global_step, training_loss, metrics)."""
        from transformers.trainer_utils import TrainOutput

        if resume_from_checkpoint:
            self.cfg.train.resume = (
                "latest" if resume_from_checkpoint is True else str(resume_from_checkpoint)
            )
        trainer = self._built()
        try:
            result = trainer.train()
        finally:
            self._preemption.__exit__(None, None, None)
        self.result = result
        rows = [r for r in result.metrics if "loss" in r]
        metrics = {k: v for k, v in (rows[-1] if rows else {}).items() if isinstance(v, (int, float))}
        loss = sum(r["loss"] for r in rows) / len(rows) if rows else float("nan")
        # what scripts read of TRL's trainer.state: the step and the logged rows
        self.state = SimpleNamespace(global_step=result.global_step, log_history=list(result.metrics))
        return TrainOutput(result.global_step, loss, metrics)

    def evaluate(self, eval_dataset: Any = None) -> dict[str, float]:
        """Held-out metrics (`eval_loss`, `eval_rewards/accuracies`, ...) of the current model."""
        if eval_dataset is not None:
            raise ConfigError("evaluate(eval_dataset=...): pass eval_dataset to ORPOTrainer(...) instead")
        return self._built().evaluate()

    def push_to_hub(self, **_card: Any) -> str:
        """Upload the final model to `hub_model_id` (TRL's model-card arguments are not used)."""
        from orpo_dist.hub import push

        if not self.cfg.export.hub_model_id:
            raise ConfigError("push_to_hub() needs hub_model_id=<owner>/<name> in ORPOConfig")
        if getattr(self, "result", None) is None or self.result.final_dir is None:
            raise ConfigError("push_to_hub(): train() first (it uploads the final model)")
        return push(self.cfg, self.result.final_dir, {})

    def save_model(self, output_dir: str | None = None) -> None:
        """The model (or its adapter) and tokenizer into output_dir (args.output_dir by default)."""
        trainer = self._built()
        trainer.checkpoints.save_model(trainer.model, Path(output_dir or self.cfg.train.output_dir))


def _from_pretrained(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)
