"""fast_dev_run (one step, one eval batch, a checkpoint saved and restored) and overfit_batches
(a small MLP memorises the first N batches)."""

import json

import numpy as np
import pytest

import dlkit
from dlkit import cli
from dlkit.data import datasets, sources
from tests.conftest import tiny_digits_config


def _eval_with_nan_after_first_batch():
    """Digits test split whose examples after the first 32 are NaN: an eval of more than one
    batch of 32 has a NaN loss."""
    test = datasets.load_dataset("digits", "test")
    x = np.array(test.arrays["inputs"])
    x[32:] = np.nan
    return sources.ArraySource(inputs=x, labels=test.arrays["labels"])


def test_fast_dev_run_does_one_step_one_eval_batch_and_a_checkpoint(tmp_path, capsys):
    cfg = tiny_digits_config(
        **{"train.fast_dev_run": "true", "data.validate": "warn", "optim.warmup_steps": 5}
    )
    result = dlkit.fit(cfg, tmp_path / "run", eval_source=_eval_with_nan_after_first_batch())
    assert int(result.state.step) == 1
    rows = list(result.history)
    assert [r["step"] for r in rows] == [1]
    assert np.isfinite(rows[0]["eval/loss"])  # only the first (finite) eval batch ran
    assert 0.0 <= rows[0]["eval/accuracy"] <= 1.0
    assert rows[0]["train/learning_rate"] > 0  # warm-up dropped: the one step trains
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1"]
    out = capsys.readouterr().out
    assert "fast_dev_run: ok" in out and "checkpoint of step 1 saved and restored equal" in out


def test_fast_dev_run_refuses_a_workdir_with_checkpoints(tmp_path):
    (tmp_path / "checkpoints" / "500").mkdir(parents=True)
    cfg = tiny_digits_config(**{"train.fast_dev_run": "true"})
    with pytest.raises(dlkit.ConfigError, match=r"train.fast_dev_run: expected a workdir without"):
        dlkit.fit(cfg, tmp_path)


def test_cli_fast_dev_run_uses_a_temporary_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a default runs/<name> would appear here
    sets = ["model.hidden_sizes=[16]", "train.batch_size=32"]
    argv = ["train", "digits_mlp", "--fast-dev-run", "--no-progress"]
    assert cli.main(argv + [a for s in sets for a in ("--set", s)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["workdir"] is None and last["step"] == 1 and "eval/accuracy" in last
    assert not (tmp_path / "runs").exists()


def test_overfit_batches_memorises_the_batches(tmp_path):
    cfg = tiny_digits_config(
        **{
            "train.overfit_batches": 2,
            "train.steps": 60,
            "train.log_every": 20,
            "train.eval_every": 0,
            "optim.learning_rate": 1e-2,
            "optim.warmup_steps": 0,
            "model.hidden_sizes": "[64]",
            "data.random_crop_padding": 2,  # turned off: it would make new batches each epoch
        }
    )
    c = dlkit.build(cfg)
    assert len(c.train_source) == len(c.eval_source) == 64  # 2 batches of 32
    assert np.array_equal(
        c.train_source.arrays["labels"],
        datasets.load_dataset("digits", "train").arrays["labels"][:64],
    )
    result = dlkit.fit(cfg, tmp_path)
    last = result.history[-1]
    assert last["train/accuracy"] >= 0.99  # mean over steps 41-60
    assert last["eval/accuracy"] >= 0.99  # the same 64 examples, without dropout
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["data"]["shuffle"] is False
    assert saved["data"]["random_crop_padding"] == 0


def test_overfit_batches_larger_than_the_data_is_rejected():
    cfg = tiny_digits_config(**{"train.overfit_batches": 100})
    with pytest.raises(dlkit.ConfigError, match=r"train.overfit_batches: expected at most 44"):
        dlkit.fit(cfg)
