"""The sweep's config: `schema` (the dataclasses), `compose` (Hydra composition and the checks across sections)
and `sweep_file` (sweep.yaml and what a resume may change). The grid it spans is `cram_sweep.sweep.grid`."""

from .compose import CONF_DIR, available, compose, compose_config, register, to_sweep_config, validate
from .schema import (
    AnalysisConfig,
    ClusterConfig,
    DatasetConfig,
    GridConfig,
    MethodConfig,
    MethodSettings,
    ModelConfig,
    OptimConfig,
    ParamConfig,
    SweepConfig,
    TrackingConfig,
    WorkerConfig,
)
from .sweep_file import RESULT_KEYS, load_sweep_config, result_config, to_yaml, with_runtime_overrides

__all__ = [
    "CONF_DIR",
    "RESULT_KEYS",
    "AnalysisConfig",
    "ClusterConfig",
    "DatasetConfig",
    "GridConfig",
    "MethodConfig",
    "MethodSettings",
    "ModelConfig",
    "OptimConfig",
    "ParamConfig",
    "SweepConfig",
    "TrackingConfig",
    "WorkerConfig",
    "available",
    "compose",
    "compose_config",
    "load_sweep_config",
    "register",
    "result_config",
    "to_sweep_config",
    "to_yaml",
    "validate",
    "with_runtime_overrides",
]
