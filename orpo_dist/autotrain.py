"""AutoTrain's Python API on orpo_dist: a script that did

    from autotrain.params import LLMTrainingParams
    from autotrain.project import AutoTrainProject

runs with `from orpo_dist.autotrain import LLMTrainingParams, AutoTrainProject` instead. The parameters
are AutoTrain's names (the loader's aliases map them), with AutoTrain's defaults where they differ from
ours; `create()` trains here, in this process (AutoTrain's `backend="local"`).
"""

from __future__ import annotations

import os
from typing import Any

from orpo_dist.config import ConfigError

# AutoTrain LLMTrainingParams defaults that differ from orpo_dist's
AUTOTRAIN_DEFAULTS: dict[str, Any] = {
    "project_name": "project-name",
    "data_path": "data",
    "lr": 3e-5,
    "epochs": 1,
    "batch_size": 2,
    "gradient_accumulation": 4,
    "model_max_length": 2048,
    "max_prompt_length": 128,
    "save_total_limit": 1,
    "eval_strategy": "epoch",
    "disable_gradient_checkpointing": False,
}


class LLMTrainingParams:
    """AutoTrain's `LLMTrainingParams(model=..., data_path=..., trainer="orpo", ...)`. A `token` is put in
    this process's HF_TOKEN for the Hub upload, never into the config or a file."""

    def __init__(self, **params: Any):
        token = params.pop("token", None)
        if token:
            os.environ["HF_TOKEN"] = str(token)
        if params.get("peft") and "quantization" not in params:
            params["quantization"] = "int4"  # AutoTrain's default with peft
        self.__dict__["params"] = {**AUTOTRAIN_DEFAULTS, **params}

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["params"][name]
        except KeyError:
            raise AttributeError(name) from None


class AutoTrainProject:
    """`AutoTrainProject(params=..., backend="local", process=True).create()`: trains now, returns the
    TrainResult (AutoTrain returns a job id)."""

    def __init__(self, params: LLMTrainingParams, backend: str = "local", process: bool = True):
        if not str(backend).startswith("local"):
            raise ConfigError(f"backend={backend!r}: orpo_dist trains on this machine; use backend='local'")
        self.params, self.backend, self.process = params, backend, process

    def create(self):
        import orpo_dist

        return orpo_dist.train(dict(self.params.params))
