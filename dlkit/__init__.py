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
    components,
    compute,
    config,
    data,
    debugging,
    default_callbacks,
    diagnosis,
    distributed,
    early_stopping,
    errors,
    evaluation,
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
    step_wrappers,
    steps,
    summary,
    tensorboard,
)
from dlkit.callbacks import Callback, Run
from dlkit.checkpoint import Checkpointer
from dlkit.components import Components, build
from dlkit.config import Config, ConfigError, apply_overrides, list_experiments, load_config
from dlkit.evaluation import evaluate, load_checkpoint
from dlkit.loop import FitResult, fit
from dlkit.metrics import read_history
from dlkit.parallel import make_strategy
from dlkit.sampling import sample_text as sample
from dlkit.state import TrainState, create_train_state
from dlkit.step_wrappers import make_train_step
from dlkit.steps import eval_step, train_step

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "Checkpointer",
    "Components",
    "Config",
    "ConfigError",
    "FitResult",
    "TrainState",
    "apply_overrides",
    "build",
    "callbacks",
    "checkpoint",
    "components",
    "compute",
    "config",
    "create_train_state",
    "data",
    "debugging",
    "default_callbacks",
    "diagnosis",
    "distributed",
    "early_stopping",
    "errors",
    "eval_step",
    "evaluate",
    "evaluation",
    "explain",
    "fit",
    "list_experiments",
    "load_checkpoint",
    "load_config",
    "read_history",
    "sample",
    "losses",
    "lr_finder",
    "make_strategy",
    "make_train_step",
    "metrics",
    "models",
    "optim",
    "parallel",
    "precision",
    "Run",
    "report",
    "sampling",
    "state",
    "step_wrappers",
    "steps",
    "summary",
    "tensorboard",
    "train_step",
]
