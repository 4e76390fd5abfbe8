"""Early stopping: patience / min_delta / mode on hand-fed rows, and a real run that stops and
returns its best checkpoint's state."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_digits_config

import dlkit
from dlkit import early_stopping


class FakeRun:
    """The part of `dlkit.Run` that `on_row` uses."""

    checkpointer = None

    def __init__(self):
        self.stop_reason, self.lines, self.state = None, [], {"w": np.zeros(2)}

    def request_stop(self, reason):
        self.stop_reason = self.stop_reason or reason

    def log(self, text):
        self.lines.append(text)

    def get_state(self):
        return self.state


def _feed(cb, values, metric="eval/loss"):
    """Feeds one eval row per value (steps 10, 20, ...); returns the step it asked to stop at."""
    run = FakeRun()
    for i, v in enumerate(values):
        cb.on_row(run, {"step": 10 * (i + 1), "train/loss": 9.0})  # train rows are ignored
        cb.on_row(run, {"step": 10 * (i + 1), metric: v})
        if run.stop_reason:
            assert run.stop_reason == "early_stopping"
            return 10 * (i + 1)
    return None


def test_patience_counts_evaluations_without_improvement():
    cb = early_stopping.EarlyStopping("eval/loss", "min", patience=2)
    assert _feed(cb, [1.0, 0.8, 0.9, 0.85, 0.7]) == 40
    assert (cb.best_step, cb.best_value) == (20, 0.8)


def test_an_improvement_resets_the_patience():
    cb = early_stopping.EarlyStopping("eval/loss", "min", patience=2)
    assert _feed(cb, [1.0, 1.1, 0.9, 1.0, 0.95, 0.99]) == 50
    assert cb.best_step == 30


def test_min_delta_small_gains_do_not_count_but_the_best_is_still_the_lowest():
    cb = early_stopping.EarlyStopping("eval/loss", "min", patience=2, min_delta=0.05)
    assert _feed(cb, [1.0, 0.98, 0.97]) == 30
    assert (cb.best_step, cb.best_value) == (30, 0.97)  # best by value, as keep_best ranks


def test_mode_max_and_ties_keep_the_earlier_step():
    cb = early_stopping.EarlyStopping("eval/accuracy", "max", patience=3)
    assert _feed(cb, [0.5, 0.7, 0.7, 0.6, 0.69], "eval/accuracy") == 50
    assert cb.best_step == 20


def test_nan_never_counts_as_best():
    cb = early_stopping.EarlyStopping("eval/loss", "min", patience=5)
    assert _feed(cb, [float("nan"), 2.0, float("nan")]) is None
    assert (cb.best_step, cb.evaluations_without_improvement) == (20, 1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.early_stopping_metric": "train/loss"}, r"early_stopping_metric.*eval metric"),
        ({"train.early_stopping_mode": "up"}, r"early_stopping_mode.*min \| max.*'up'"),
        ({"train.early_stopping_patience": 0}, r"early_stopping_patience.*>= 1.*got 0"),
        ({"checkpoint.every_steps": 4}, r"checkpoint.every_steps.*divisor.*eval_every=6.*got 4"),
        ({"checkpoint.keep_best": 1, "checkpoint.best_mode": "max"}, r"best_metric / best_mode"),
    ],
)
def test_bad_settings_are_rejected_before_compiling(tmp_path, overrides, message):
    cfg = tiny_digits_config(**{"train.early_stopping_metric": "eval/loss", **overrides})
    with pytest.raises(dlkit.ConfigError, match=message):
        dlkit.fit(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_metric_is_rejected_before_the_first_step(tmp_path):
    cfg = tiny_digits_config(**{"train.early_stopping_metric": "eval/accuracyy"})
    with pytest.raises(dlkit.ConfigError, match=r"'eval/accuracy', 'eval/loss'.*accuracyy"):
        dlkit.fit(cfg, tmp_path / "run")


def test_fit_stops_early_and_returns_the_best_checkpoint(tmp_path):
    # A high learning rate on 64 examples: eval loss bottoms out, then rises.
    cfg = tiny_digits_config(
        **{
            "train.steps": 80,
            "train.eval_every": 4,
            "train.log_every": 4,
            "checkpoint.every_steps": 4,
            "checkpoint.max_to_keep": 1,
            "optim.learning_rate": 0.05,
            "data.train_examples": 64,
            "train.early_stopping_metric": "eval/loss",
            "train.early_stopping_patience": 2,
        }
    )
    result = dlkit.fit(cfg, tmp_path / "run")
    assert result.stopped == "early_stopping"
    steps, losses = result.history.series("eval/loss")
    best = steps[int(np.argmin(losses))]
    assert steps[-1] == best + 2 * 4 < 80  # stopped after 2 evaluations without improvement
    assert int(result.state.step) == best
    # The best step was kept on disk beyond max_to_keep=1, and the state is its restore.
    ckpt = dlkit.Checkpointer(tmp_path / "run" / "checkpoints", read_only=True)
    assert ckpt.all_steps() == [best, steps[-1]]
    ckpt.close()
    saved, _ = dlkit.load_checkpoint(tmp_path / "run", best)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(result.state), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    diagnosis = (tmp_path / "run" / "diagnosis.json").read_text()
    assert f'"step": {best}' in diagnosis
    # Evaluating the workdir: the newest step by default, the returned one with step="best".
    assert dlkit.evaluate(tmp_path / "run")["step"] == steps[-1]
    scored = dlkit.evaluate(tmp_path / "run", step="best")
    assert scored["step"] == best
    assert scored["loss"] == pytest.approx(losses[int(np.argmin(losses))], rel=1e-5)
    eval_cli = subprocess.run(
        [sys.executable, "-m", "dlkit.cli", "eval", str(tmp_path / "run"), "--step", "best"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(eval_cli.stdout.strip().splitlines()[-1])["step"] == best


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("eval/loss", "min"), ("eval_raw/top2_error", "min"), ("eval/accuracy", "max")],
)
def test_auto_mode_reads_the_metric_name(metric, mode):
    assert early_stopping.EarlyStopping(metric).mode == mode


def test_auto_mode_refuses_a_name_it_cannot_read():
    with pytest.raises(dlkit.ConfigError, match=r"train.early_stopping_mode: expected min or max"):
        early_stopping.EarlyStopping("eval/top2")


def test_accuracy_with_the_default_mode_returns_the_most_accurate_step(tmp_path):
    """With early_stopping_mode and best_mode left at their default, an accuracy is higher-is-
    better: the run returns, keeps and diagnoses its most accurate step, not its least."""
    cfg = tiny_digits_config(
        **{
            "train.steps": 24,
            "checkpoint.max_to_keep": 1,
            "train.early_stopping_metric": "eval/accuracy",
            "train.early_stopping_patience": 10,
        }
    )
    result = dlkit.fit(cfg, tmp_path / "run")
    steps, accuracies = result.history.series("eval/accuracy")
    best = steps[int(np.argmax(accuracies))]
    assert min(accuracies) < max(accuracies)
    assert int(result.state.step) == best
    ckpt = dlkit.Checkpointer(tmp_path / "run" / "checkpoints", read_only=True)
    assert ckpt.all_steps() == sorted({best, 24})
    ckpt.close()
    assert f'"step": {best}' in (tmp_path / "run" / "diagnosis.json").read_text()


def test_keep_best_on_accuracy_with_the_default_mode_keeps_the_most_accurate_step(tmp_path):
    cfg = tiny_digits_config(
        **{
            "train.steps": 24,
            "checkpoint.max_to_keep": 1,
            "checkpoint.keep_best": 1,
            "checkpoint.best_metric": "eval/accuracy",
        }
    )
    result = dlkit.fit(cfg, tmp_path / "run")
    steps, accuracies = result.history.series("eval/accuracy")
    ckpt = dlkit.Checkpointer(tmp_path / "run" / "checkpoints", read_only=True)
    assert ckpt.all_steps() == sorted({steps[int(np.argmax(accuracies))], 24})
    ckpt.close()
    cfg.checkpoint.best_metric = "eval/top2"
    with pytest.raises(dlkit.ConfigError, match=r"checkpoint.best_mode: expected min or max"):
        dlkit.fit(cfg, tmp_path / "other")


def test_step_best_needs_a_run_that_ranked_its_checkpoints(tmp_path):
    dlkit.fit(tiny_digits_config(), tmp_path)
    with pytest.raises(ValueError, match=r"step: expected a step number for a run that ranked"):
        dlkit.evaluate(tmp_path, step="best")
    with pytest.raises(
        ValueError, match=r"step: expected a step number, 'best' or None, got 'last'"
    ):
        dlkit.evaluate(tmp_path, step="last")
