"""Early stopping: end a run once an eval metric stops improving, returning its best state.

    cfg.train.early_stopping_metric = "eval/loss"   # "" = off
    cfg.train.early_stopping_mode = "auto"          # min | max | auto (loss: min, accuracy: max)
    cfg.train.early_stopping_patience = 3           # evaluations without improvement
    cfg.train.early_stopping_min_delta = 0.001      # what counts as an improvement
    result = dlkit.fit(cfg, workdir="runs/x")       # result.state = the best evaluation's state

Rules, per evaluation (a metric row holding the metric):
- the best is the best value seen so far (ties: the earlier step); that step's state is what
  the run returns at the end, whether it stopped early or ran to `train.steps`;
- the evaluation counts as an improvement when it beats the best by more than `min_delta`;
  `patience` evaluations in a row without one stop the run (`FitResult.stopped ==
  "early_stopping"`, a checkpoint of the last step is written as for any stop).

With a workdir the best state comes back from its checkpoint: the callback turns on
`checkpoint.keep_best` (1, ranked by the same metric and mode), so the best step survives
`max_to_keep`, and requires every evaluation to be a checkpoint step (`train.eval_every` a
multiple of `checkpoint.every_steps`). Without a workdir it keeps a device copy of the best
state instead. A resumed run replays the metric rows from before the resume, so patience
carries over.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from dlkit import callbacks
from dlkit import checkpoint as checkpoint_lib
from dlkit import config as config_lib

PREFIXES = ("eval/", "eval_raw/")
REASON = "early_stopping"


class EarlyStopping(callbacks.Callback):
    """Stops `fit` when `metric` has not improved for `patience` evaluations (see module doc).

    Attributes (after a run): best_value, best_step (None until the metric is seen),
    evaluations_without_improvement.
    """

    def __init__(self, metric: str, mode: str = "auto", patience: int = 5, min_delta: float = 0.0):
        check_options(metric, mode, patience, min_delta)
        self.metric = metric
        self.mode = config_lib.metric_mode(metric, mode, "train.early_stopping_mode")
        self.patience = patience
        self.min_delta = min_delta
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.evaluations_without_improvement = 0
        self._best_state = None  # device copy, only without a checkpointer

    def _better(self, value: float, than: float, by: float) -> bool:
        return value < than - by if self.mode == "min" else value > than + by

    def observe(self, step: int, value: float) -> tuple[bool, bool]:
        """Feeds one evaluation. Returns (new_best, should_stop)."""
        value = float(value)
        if not math.isfinite(value):
            new_best, improved = False, False
        elif self.best_value is None:
            new_best, improved = True, True
        else:
            new_best = self._better(value, self.best_value, 0.0)
            improved = self._better(value, self.best_value, self.min_delta)
        if new_best:
            self.best_value, self.best_step = value, step
        self.evaluations_without_improvement = (
            0 if improved else (self.evaluations_without_improvement + 1)
        )
        return new_best, self.evaluations_without_improvement >= self.patience

    def on_train_start(self, run: callbacks.Run) -> None:
        ckpt = run.checkpointer
        if ckpt is not None:
            if ckpt.keep_best and (ckpt.best_metric, ckpt.best_mode) != (self.metric, self.mode):
                raise config_lib.ConfigError(
                    "checkpoint.best_metric / best_mode: expected the early stopping metric "
                    f"and mode ({self.metric!r}, {self.mode!r}), got "
                    f"({ckpt.best_metric!r}, {ckpt.best_mode!r})"
                )
            ckpt.keep_best = max(ckpt.keep_best, 1)
            ckpt.best_metric, ckpt.best_mode = self.metric, self.mode
        names = run.components.abstract_eval_metrics(run.get_state())
        prefixes = PREFIXES if run.get_state().ema_params is not None else PREFIXES[:1]
        known = sorted(p + k for p in prefixes for k in names)
        if self.metric not in known:
            raise config_lib.ConfigError(
                f"train.early_stopping_metric: expected one of this run's metrics {known}, "
                f"got {self.metric!r}"
            )
        for row in run.history:  # rows from before a resume
            if self.metric in row:
                self.observe(row["step"], row[self.metric])

    def on_row(self, run: callbacks.Run, row: dict[str, Any]) -> None:
        if self.metric not in row:
            return
        new_best, stop = self.observe(row["step"], row[self.metric])
        if new_best and run.checkpointer is None:
            self._best_state = jax.tree.map(lambda x: x.copy(), run.get_state())
        if stop:
            run.log(
                f"early stopping: {self.metric} has not improved by more than {self.min_delta} "
                f"for {self.patience} evaluations; best {self.best_value:.4f} at step "
                f"{self.best_step}"
            )
            run.request_stop(REASON)

    def on_train_end(self, run: callbacks.Run, result):
        if self.best_step is None:
            run.log(f"early stopping: {self.metric} was never evaluated; returning the last state")
            return None
        final_step = int(jax.device_get(result.state.step))
        if self.best_step == final_step:
            state = result.state
        elif run.checkpointer is not None:
            directory = run.checkpointer.directory
            with checkpoint_lib.Checkpointer(directory, max_to_keep=None, read_only=True) as ck:
                state, _ = ck.restore(run.components.abstract_state(), self.best_step)
        else:
            state = self._best_state
        run.log(
            f"early stopping: returning the best state, step {self.best_step} "
            f"({self.metric}={self.best_value:.4f}); the run ended at step {final_step}"
        )
        return dataclasses.replace(result, state=state)


def check_options(metric: str, mode: str, patience: int, min_delta: float) -> None:
    """Raises ConfigError for settings early stopping cannot use."""
    if not metric.startswith(PREFIXES):
        raise config_lib.ConfigError(
            "train.early_stopping_metric: expected an eval metric such as 'eval/loss' or "
            f"'eval/accuracy' (prefix {' or '.join(PREFIXES)}), got {metric!r}"
        )
    if mode not in ("min", "max", "auto"):
        raise config_lib.ConfigError(
            f"train.early_stopping_mode: expected min | max | auto, got {mode!r}"
        )
    if patience < 1:
        raise config_lib.ConfigError(
            f"train.early_stopping_patience: expected an int >= 1, got {patience}"
        )
    if not min_delta >= 0:
        raise config_lib.ConfigError(
            f"train.early_stopping_min_delta: expected a float >= 0, got {min_delta}"
        )


def from_config(cfg, workdir) -> EarlyStopping | None:
    """The callback `train.early_stopping_*` asks for (None when the metric is "")."""
    t = cfg.train
    if not t.early_stopping_metric:
        return None
    check_options(
        t.early_stopping_metric,
        t.early_stopping_mode,
        t.early_stopping_patience,
        t.early_stopping_min_delta,
    )
    if t.eval_every <= 0:
        raise config_lib.ConfigError(
            f"train.eval_every: expected > 0 with train.early_stopping_metric set (it watches "
            f"the periodic evaluations), got {t.eval_every}"
        )
    every = cfg.checkpoint.every_steps
    if workdir is not None and (every <= 0 or t.eval_every % every):
        raise config_lib.ConfigError(
            "checkpoint.every_steps: expected a divisor of train.eval_every="
            f"{t.eval_every} with early stopping (every evaluated step must be a checkpoint it "
            f"can return to), got {every}"
        )
    mode = config_lib.metric_mode(
        t.early_stopping_metric, t.early_stopping_mode, "train.early_stopping_mode"
    )
    if cfg.checkpoint.keep_best and (
        cfg.checkpoint.best_metric,
        config_lib.metric_mode(
            cfg.checkpoint.best_metric, cfg.checkpoint.best_mode, "checkpoint.best_mode"
        ),
    ) != (t.early_stopping_metric, mode):
        raise config_lib.ConfigError(
            "checkpoint.best_metric / best_mode: expected the early stopping metric and mode "
            f"({t.early_stopping_metric!r}, {mode!r}) when checkpoint.keep_best "
            f"> 0, got ({cfg.checkpoint.best_metric!r}, {cfg.checkpoint.best_mode!r})"
        )
    return EarlyStopping(
        t.early_stopping_metric,
        mode,
        t.early_stopping_patience,
        t.early_stopping_min_delta,
    )
