"""Typed run configs: schemas per YAML section, loading with hydra-style overrides, validation.

    cfg = load_config("llama2_70b", ["training.learning_rate=1e-4"])
    train(cfg.training, ...)          # each component receives only its own section

See ``schema`` for every key and its meaning, ``checks`` for the cross-field rules, ``loader`` for
name resolution and error locations. Rules that need the model (tensor-parallel degree vs.
attention heads) are the model's: ``modelzoo.models.llama.load_run_config`` loads with them.
"""

from .checks import check_config
from .errors import ConfigError
from .loader import config_to_dict, dump_yaml, load_config, shipped_configs
from .schema import (
    CONFIG_KINDS,
    KNOWN_ARCHS,
    LORA_TARGETS,
    PATCH_NAMES,
    CheckpointConfig,
    DataParallelConfig,
    GenerationConfig,
    GenerationRunConfig,
    ModelConfig,
    PeftConfig,
    RunConfig,
    SambaCompileConfig,
    TrainingConfig,
)

__all__ = [
    "CONFIG_KINDS",
    "KNOWN_ARCHS",
    "PATCH_NAMES",
    "CheckpointConfig",
    "ConfigError",
    "DataParallelConfig",
    "GenerationConfig",
    "GenerationRunConfig",
    "LORA_TARGETS",
    "ModelConfig",
    "PeftConfig",
    "RunConfig",
    "SambaCompileConfig",
    "TrainingConfig",
    "check_config",
    "config_to_dict",
    "dump_yaml",
    "load_config",
    "shipped_configs",
]
