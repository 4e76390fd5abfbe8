"""Typed run configuration, `--set key=value` overrides, and loading experiments.

A run is described by one `Config`: nested dataclasses, one per concern. Experiments are
Python files `experiments/<name>.py` with a `config()` function returning a `Config`.

    import dlkit
    cfg = dlkit.load_config("digits_mlp", overrides=["train.steps=200", "optim.learning_rate=3e-3"])
    cfg.train.steps            # 200
    dlkit.config.valid_keys(cfg)  # every key that `--set` accepts

Model hyperparameters are the fields of the Flax module itself (`dlkit.models.MLP.hidden_sizes`),
so `model.<field>` keys are checked against the module named by `model.name`: there is one place
that defines a model's options and their defaults.

The package's modules: `sections` (the dataclasses, their `check()` and `Config`), `checks`
(the checks of single values they share, and `metric_mode`), `overrides` (keys, types and
`set_value`), `experiments` (finding and loading experiment files).
"""

from dlkit import errors
from dlkit.config.checks import metric_mode
from dlkit.config.experiments import (
    experiment_dirs,
    find_experiment,
    list_experiments,
    load_config,
)
from dlkit.config.overrides import apply_overrides, set_value, valid_keys
from dlkit.config.sections import (
    MAX_AUTO_SCAN_UNROLL,
    CheckpointConfig,
    Config,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    resolved_scan_unroll,
)

# Defined in dlkit.errors so the model registry can raise it without importing this package.
ConfigError = errors.ConfigError

__all__ = [
    "MAX_AUTO_SCAN_UNROLL",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "apply_overrides",
    "experiment_dirs",
    "find_experiment",
    "list_experiments",
    "load_config",
    "metric_mode",
    "resolved_scan_unroll",
    "set_value",
    "valid_keys",
]
