"""Configuration: the dataclasses and their defaults (schema.py), loading from YAML and overrides (loading.py)."""

from agentlm_jax.config.loading import (from_dict, load_config, merge, parse_overrides, read_yaml, to_dict,
                                        to_yaml)
from agentlm_jax.config.schema import (ATTENTION_IMPLS, DEFAULT_RULES, DISTRIBUTED_MODES, DTYPES, EXPORT_DTYPES,
                                       LOSS_IMPLS, MESH_AXES, OVERLONG_POLICIES, REMAT_POLICIES, RUNTIME_FIELDS,
                                       CheckpointConfig, DataConfig, EvalConfig, ExportConfig, LoggingConfig,
                                       LoraConfig, LossConfig, MeshConfig, ModelConfig, OptimizerConfig, Rules,
                                       SamplingConfig, TrainConfig)
from agentlm_jax.errors import ConfigError

__all__ = [
    "ATTENTION_IMPLS", "DEFAULT_RULES", "DISTRIBUTED_MODES", "DTYPES", "EXPORT_DTYPES", "LOSS_IMPLS", "MESH_AXES",
    "OVERLONG_POLICIES", "REMAT_POLICIES", "RUNTIME_FIELDS", "CheckpointConfig", "ConfigError", "DataConfig",
    "EvalConfig", "ExportConfig", "LoggingConfig", "LoraConfig", "LossConfig", "MeshConfig", "ModelConfig",
    "OptimizerConfig", "Rules", "SamplingConfig", "TrainConfig", "from_dict", "load_config", "merge", "parse_overrides", "read_yaml", "to_dict",
    "to_yaml",
]
