"""Typed run configs: schemas per YAML section, loading with hydra-style overrides, validation.

    cfg = load_config("llama2_70b", ["training.learning_rate=1e-4"])
    train(cfg.training, ...)          # each component receives only its own section

See ``schema`` for every key and its meaning, ``checks`` for the cross-field rules (tensor-parallel
degree vs. attention heads), ``loader`` for name resolution and error locations.
"""

from .checks import check_run_config, check_tensor_parallel, model_heads, valid_n_chips
from .errors import ConfigError
from .loader import config_to_dict, dump_yaml, load_config, shipped_configs
from .schema import (
    CONFIG_KINDS,
    KNOWN_ARCHS,
    CheckpointConfig,
    DataParallelConfig,
    GenerationConfig,
    GenerationRunConfig,
    ModelConfig,
    RunConfig,
    SambaCompileConfig,
    TrainingConfig,
)

__all__ = [
    "CONFIG_KINDS",
    "KNOWN_ARCHS",
    "CheckpointConfig",
    "ConfigError",
    "DataParallelConfig",
    "GenerationConfig",
    "GenerationRunConfig",
    "ModelConfig",
    "RunConfig",
    "SambaCompileConfig",
    "TrainingConfig",
    "check_run_config",
    "check_tensor_parallel",
    "config_to_dict",
    "dump_yaml",
    "load_config",
    "model_heads",
    "shipped_configs",
    "valid_n_chips",
]
