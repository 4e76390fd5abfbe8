"""dlkit: a JAX functional deep-learning toolkit.

Flax modules and Optax optimizers, compiled with `jax.jit` on a device mesh (or `jax.pmap`)
into one pure train step and one eval step; Orbax checkpoints; the same `fit` from a notebook
cell, a training script and `dlkit train`.

    import dlkit
    cfg = dlkit.load_config("digits_mlp", overrides=["train.steps=500"])
    result = dlkit.fit(cfg, workdir="runs/digits")
    print(result.history.last("eval/accuracy"))
    state, cfg = dlkit.load_checkpoint("runs/digits")     # onto one device, e.g. in a notebook
"""

from dlkit import (
    callbacks,
    checkpoint,
    compute,
    config,
    data,
    debugging,
    diagnosis,
    distributed,
    early_stopping,
    errors,
    explain,
    losses,
    lr_finder,
    metrics,
    models,
    optim,
    parallel,
    precision,
    report,
    sampling,
    state,
    steps,
    summary,
    tensorboard,
)
from dlkit.callbacks import Callback, Run
from dlkit.checkpoint import Checkpointer
from dlkit.config import Config, ConfigError, apply_overrides, list_experiments, load_config
from dlkit.loop import FitResult, build, evaluate, fit, load_checkpoint
from dlkit.metrics import read_history
from dlkit.parallel import make_strategy
from dlkit.state import TrainState, create_train_state
from dlkit.steps import eval_step, train_step

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "Checkpointer",
    "Config",
    "ConfigError",
    "FitResult",
    "TrainState",
    "apply_overrides",
    "build",
    "callbacks",
    "checkpoint",
    "compute",
    "config",
    "create_train_state",
    "data",
    "debugging",
    "diagnosis",
    "distributed",
    "early_stopping",
    "errors",
    "eval_step",
    "evaluate",
    "explain",
    "fit",
    "list_experiments",
    "load_checkpoint",
    "load_config",
    "read_history",
    "losses",
    "lr_finder",
    "make_strategy",
    "metrics",
    "models",
    "optim",
    "parallel",
    "precision",
    "Run",
    "report",
    "sampling",
    "state",
    "steps",
    "summary",
    "tensorboard",
    "train_step",
]
