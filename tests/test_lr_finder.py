"""The learning-rate range test: an exponential sweep in one compiled step, a sensible
suggestion on digits, divergence stops the sweep, and the JSON and PNG are written."""

import json
import multiprocessing

import numpy as np
import pytest

import dlkit
from dlkit import lr_finder
from tests.conftest import tiny_digits_config


def test_sweep_suggests_a_sensible_rate_and_writes_files(tmp_path):
    strategy = dlkit.make_strategy("jit")
    k = 40
    result = lr_finder.lr_find(
        tiny_digits_config(), tmp_path, min_lr=1e-5, max_lr=1e-1, num_steps=k, strategy=strategy
    )
    assert strategy.trace_counts["train"] == 1  # the rate changes inside one compiled step
    assert not result.diverged
    assert 1e-4 <= result.suggested_lr <= 1e-1  # Adam on the MLP
    assert result.method == "min_loss/10"
    assert result.suggested_lr == pytest.approx(result.min_loss_lr / 10)
    assert result.loss_at_suggestion < result.losses[0]
    saved = json.loads((tmp_path / "lr_find.json").read_text())
    assert len(saved["lrs"]) == len(saved["losses"]) == len(saved["smoothed"]) == k
    lrs = np.array(saved["lrs"])
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1e-1, rel=1e-4)
    assert np.allclose(lrs[1:] / lrs[:-1], (1e4) ** (1 / (k - 1)), rtol=1e-4)  # exponential
    png = tmp_path / "lr_find.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_diverging_sweep_stops_early():
    result = lr_finder.lr_find(tiny_digits_config(), min_lr=1e-4, max_lr=100.0, num_steps=40)
    assert result.diverged
    assert len(result.lrs) < 40
    last = result.smoothed[-1]
    assert not np.isfinite(last) or last > 4 * min(result.smoothed[:-1])
    assert result.suggested_lr < result.lrs[-1]


def test_suggest_lr_rules():
    lrs = np.logspace(-5, 0, 11)
    smoothed = np.array([2.3, 2.3, 2.29, 2.2, 1.6, 0.9, 0.6, 0.5, 0.45, 0.9, 5.0])
    suggested, at_min, steepest = lr_finder.suggest_lr(lrs, smoothed)
    assert at_min == lrs[8] and suggested == pytest.approx(lrs[8] / 10)
    assert steepest == lrs[4]  # 2.2 -> 1.6 -> 0.9: the fastest fall per decade
    assert lr_finder.suggest_lr(lrs, smoothed, "steepest")[0] == lrs[4]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match=r"max_lr: expected a float > min_lr=0.1, got 0.01"):
        lr_finder.lr_find(tiny_digits_config(), min_lr=0.1, max_lr=0.01)
    with pytest.raises(ValueError, match=r"num_steps: expected an int >= 5, got 2"):
        lr_finder.lr_find(tiny_digits_config(), num_steps=2)


def test_the_sweep_closes_its_grain_loader_and_stops_the_workers(monkeypatch):
    from dlkit.data import grain_pipeline

    closed = []
    original = grain_pipeline.GrainLoader.close

    def spy(self):
        closed.append(self.workers)
        original(self)

    monkeypatch.setattr(grain_pipeline.GrainLoader, "close", spy)
    cfg = tiny_digits_config(**{"data.pipeline": "grain", "data.grain_workers": 1})
    result = lr_finder.lr_find(cfg, min_lr=1e-5, max_lr=1e-1, num_steps=5)
    assert len(result.lrs) == 5
    assert closed == [1]
    # No Grain worker process outlives the sweep.
    assert multiprocessing.active_children() == []
