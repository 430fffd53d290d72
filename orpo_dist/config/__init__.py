"""The run's settings: typed sections (`schema`), what users write (`load`), validation (`checks`), other
tools' names (`aliases`)."""

from orpo_dist.config.aliases import ALIASES, SWITCHES
from orpo_dist.config.checks import problems, validate
from orpo_dist.config.load import LEAVES, canonical, load_config, parse_overrides
from orpo_dist.config.schema import (
    CHAT_TEMPLATES,
    EXPORT_FORMATS,
    GGUF_QUANTS,
    LAYOUTS,
    OPTIMIZERS,
    SECTIONS,
    Config,
    ConfigError,
    DataConfig,
    ExportConfig,
    ModelConfig,
    OrpoConfig,
    PeftConfig,
    SetupError,
    TrainConfig,
)

__all__ = [
    "ALIASES",
    "CHAT_TEMPLATES",
    "EXPORT_FORMATS",
    "GGUF_QUANTS",
    "LAYOUTS",
    "LEAVES",
    "OPTIMIZERS",
    "SECTIONS",
    "SWITCHES",
    "Config",
    "ConfigError",
    "DataConfig",
    "ExportConfig",
    "ModelConfig",
    "OrpoConfig",
    "PeftConfig",
    "SetupError",
    "TrainConfig",
    "canonical",
    "load_config",
    "parse_overrides",
    "problems",
    "validate",
]
