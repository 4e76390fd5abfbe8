"""Bad input: each case fails before compilation, naming the argument, the expected and the
received, and never harms an existing checkpoint."""

import hashlib
import shutil

import numpy as np
import pytest
from conftest import tiny_digits_config

import dlkit
from dlkit import checkpoint as ckpt_lib
from dlkit.data import validate


def _digits():
    train = dlkit.data.load_dataset("digits", "train")
    return np.array(train.arrays["inputs"]), np.array(train.arrays["labels"])


def _fit_fails(match, *, cfg=None, error=ValueError, **kwargs):
    """Runs fit and checks it raised before anything was traced or compiled."""
    cfg = cfg or tiny_digits_config()
    if "train_source" in kwargs:  # else fit holds out a tenth of it, and counts change
        kwargs.setdefault("eval_source", kwargs["train_source"])
    strategy = dlkit.make_strategy("jit", num_devices=1)
    with pytest.raises(error, match=match):
        dlkit.fit(cfg, strategy=strategy, **kwargs)
    assert dict(strategy.trace_counts) == {}, "the step was compiled before the error"


def _source(x, y):
    return dlkit.data.ArraySource(inputs=x, labels=y)


def test_label_equal_to_num_classes():
    x, y = _digits()
    y[17] = 10
    _fit_fails(
        r"labels \(train split\): expected class ids in \[0, 10\) for a model with 10 "
        r"outputs, got 10 \(index 17\)",
        train_source=_source(x, y),
    )


def test_negative_label():
    x, y = _digits()
    y[3] = -1
    _fit_fails(r"expected class ids in \[0, 10\).*got -1 \(index 3\)", train_source=_source(x, y))


def test_float_labels():
    x, y = _digits()
    _fit_fails(
        r"labels \(train split\): expected integer class ids, got dtype float32",
        train_source=_source(x, y.astype(np.float32)),
    )


def test_labels_shaped_b_by_1():
    x, y = _digits()
    _fit_fails(
        r"labels \(train split\): expected shape \(N,\), got \(1437, 1\)",
        train_source=_source(x, y[:, None]),
    )


def test_channels_first_images():
    cfg = tiny_digits_config(**{"model.name": "cnn", "model.features": "4", "model.dense_size": 8})
    x, y = _digits()
    x_cf = np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))  # (N, 1, 8, 8)
    _fit_fails(
        r"inputs \(train split\): expected channels-last images \(N, H, W, C\), got "
        r"shape \(1437, 1, 8, 8\)",
        cfg=cfg,
        train_source=_source(x_cf, y),
    )


def test_wrong_feature_size_between_splits():
    x, y = _digits()
    eval_x = np.zeros((10, 7, 7, 1), np.float32)
    _fit_fails(
        r"inputs \(eval split\): expected examples of shape \(8, 8, 1\) as in the train "
        r"split, got \(7, 7, 1\)",
        eval_source=_source(eval_x, y[:10]),
    )


def test_wrong_feature_size_against_a_checkpoint(tmp_path):
    dlkit.fit(tiny_digits_config(), tmp_path)
    x = np.zeros((100, 9, 9, 1), np.float32)
    y = np.zeros(100, np.int32)
    _fit_fails(
        r"does not fit this model:\n  params/Dense_0/kernel: this model expects shape "
        r"\(81, 32\), the checkpoint has \(64, 32\)",
        error=ckpt_lib.CheckpointError,
        cfg=tiny_digits_config(),
        workdir=tmp_path,
        train_source=_source(x, y),
        eval_source=_source(x, y),
    )


def test_uint8_images_warn_and_train(capsys):
    x, y = _digits()
    x8 = (x * 255).astype(np.uint8)
    result = dlkit.fit(tiny_digits_config(), train_source=_source(x8, y))
    out = capsys.readouterr().out
    assert "inputs (train split): expected floats scaled to about [0, 1], got uint8" in out
    assert int(result.state.step) == 12


def test_empty_dataset():
    x, y = _digits()
    empty = _source(x[:0], y[:0])
    with pytest.raises(ValueError, match=r"empty|0 examples"):
        dlkit.fit(tiny_digits_config(), train_source=empty)


def test_batch_larger_than_dataset_with_drop():
    x, y = _digits()
    _fit_fails(
        r"train.batch_size: expected at most the 20 training examples with "
        r"data.last_batch=drop .*got 32",
        train_source=_source(x[:20], y[:20]),
    )


def test_nan_in_inputs():
    x, y = _digits()
    x[9, 2, 2, 0] = np.nan
    _fit_fails(
        r"inputs \(train split\): expected finite values, got 1 NaN/Inf values in 1 "
        r"examples, the first at index 9",
        train_source=_source(x, y),
    )


def test_inf_in_eval_inputs():
    x, y = _digits()
    x[4] = np.inf
    _fit_fails(
        r"inputs \(eval split\): expected finite values, got 64 NaN/Inf values in 1 "
        r"examples, the first at index 4",
        eval_source=_source(x, y),
    )


def test_unknown_config_key():
    with pytest.raises(
        dlkit.ConfigError, match=r"(?s)unknown config key 'train.stepz'.*train.steps"
    ):
        tiny_digits_config(**{"train.stepz": 3})


def test_wrong_type_in_an_override():
    with pytest.raises(
        dlkit.ConfigError,
        match=r"optim.learning_rate: expected a float, got "
        r"'fast'",
    ):
        tiny_digits_config(**{"optim.learning_rate": "fast"})


@pytest.mark.parametrize(
    "key,value",
    [("train.batch_size", 0), ("train.batch_size", -8), ("train.steps", 0), ("train.steps", -5)],
)
def test_non_positive_batch_size_or_steps(key, value):
    cfg = tiny_digits_config(**{key: value})
    _fit_fails(rf"{key}: expected a positive int, got {value}", cfg=cfg)


def test_batch_size_not_divisible_by_devices():
    cfg = tiny_digits_config(**{"train.batch_size": 12})
    strategy = dlkit.make_strategy("jit")
    with pytest.raises(
        ValueError,
        match=r"train.batch_size: expected a positive multiple of the "
        r"device count 8 .*got 12",
    ):
        dlkit.fit(cfg, strategy=strategy)
    assert dict(strategy.trace_counts) == {}


def test_missing_dataset_files(tmp_path):
    cfg = tiny_digits_config(**{"data.name": "fashion_mnist", "data.data_dir": str(tmp_path)})
    _fit_fails(r"dataset-fashion-mnist", cfg=cfg, error=FileNotFoundError)


@pytest.mark.parametrize(
    "key,value,match",
    [
        (
            "model.name",
            "transformer9000",
            r"model.name: expected one of \[.*'mlp'.*\], got 'transformer9000'",
        ),
        (
            "optim.name",
            "adamax",
            r"optim.name: expected one of \['sgd', 'momentum', 'adam', "
            r"'adamw'\], got 'adamax'",
        ),
        (
            "optim.warmup_steps",
            50,
            r"optim.warmup_steps: expected an int in \[0, train.steps=12\], "
            r"got 50",
        ),
        (
            "loss.label_smoothing",
            1.5,
            r"loss.label_smoothing: expected a float in \[0, 1\), got 1.5",
        ),
        (
            "train.nan_policy",
            "ignore",
            r"train.nan_policy: expected one of raise \| skip, got "
            r"'ignore'",
        ),
        ("data.eval_split", "validation", r"validation"),
        ("parallel.num_devices", 99, r"parallel.num_devices: expected 0 \(all\) or 1..8, got 99"),
    ],
)
def test_bad_settings(key, value, match):
    if key == "model.name":
        with pytest.raises(dlkit.ConfigError, match=match):
            tiny_digits_config(**{key: value})
        return
    cfg = tiny_digits_config(**{key: value})
    with pytest.raises(ValueError, match=match):
        dlkit.fit(cfg)


def _hashes(path):
    return {
        p.relative_to(path): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in path.rglob("*")
        if p.is_file()
    }


def test_workdir_of_another_experiment_is_refused_and_untouched(tmp_path):
    dlkit.fit(tiny_digits_config(), tmp_path)
    before = _hashes(tmp_path)
    other = tiny_digits_config(**{"name": "other_experiment"})
    _fit_fails(
        r"workdir .* holds checkpoints of experiment 'digits_mlp' that this run "
        r"\('other_experiment'\) cannot resume .*checkpoint.archive_mismatched=true",
        cfg=other,
        workdir=tmp_path,
    )
    assert _hashes(tmp_path) == before


def test_changed_model_in_a_workdir_is_refused(tmp_path):
    dlkit.fit(tiny_digits_config(), tmp_path)
    before = _hashes(tmp_path)
    bigger = tiny_digits_config(**{"model.hidden_sizes": "64"})
    _fit_fails(r"model.hidden_sizes: \[32\] -> \[64\]", cfg=bigger, workdir=tmp_path)
    assert _hashes(tmp_path) == before


def test_archive_mismatched_moves_old_checkpoints_aside(tmp_path):
    dlkit.fit(tiny_digits_config(), tmp_path)
    before = _hashes(tmp_path / "checkpoints")
    other = tiny_digits_config(**{"name": "other", "checkpoint.archive_mismatched": "true"})
    result = dlkit.fit(other, tmp_path)
    assert int(result.state.step) == 12
    archived = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoints.archived-")]
    assert len(archived) == 1 and _hashes(archived[0]) == before


def test_failing_run_never_deletes_a_good_checkpoint(tmp_path):
    """A resumed run that dies (bad data here) leaves every existing checkpoint valid."""
    dlkit.fit(tiny_digits_config(), tmp_path)
    before = _hashes(tmp_path / "checkpoints")
    x, y = _digits()
    y[0] = 42
    cfg = tiny_digits_config(**{"train.steps": 24})
    with pytest.raises(validate.DataError):
        dlkit.fit(cfg, tmp_path, train_source=_source(x, y))
    assert _hashes(tmp_path / "checkpoints") == before
    for step in (6, 12):
        assert ckpt_lib.verify_step(tmp_path / "checkpoints" / str(step)) == []
    shutil.rmtree(tmp_path)


def test_one_dimensional_inputs_are_an_error_naming_the_expected_shape():
    x, y = _digits()
    _fit_fails(
        r"inputs \(train split\): expected a batch axis and a feature axis, shape \(N, F\) .*"
        r"got shape \(\d+,\)",
        train_source=_source(x[:, 2, 3, 0].copy(), y),
    )


def test_unscaled_float_images_warn_like_uint8_ones():
    x, y = _digits()
    warnings = validate.check_split(
        _source((x * 255).astype(np.float64), y), "train", num_outputs=10, classification=True
    )
    assert len(warnings) == 1
    assert warnings[0].startswith(
        "inputs (train split): expected floats scaled to about [0, 1], got float64 images "
        "with values in [0, 255]"
    )
    assert validate.check_split(_source(x, y), "train", num_outputs=10, classification=True) == []


def test_token_ids_of_a_language_model_are_not_warned_about():
    tokens = np.random.default_rng(0).integers(0, 50, size=(16, 9)).astype(np.int32)
    lm = _source(tokens[:, :-1], tokens[:, 1:])
    assert validate.check_split(lm, "train", num_outputs=None, classification=False) == []
    # Integer images still are.
    x, y = _digits()
    warned = validate.check_split(
        _source((x * 255).astype(np.uint8), y), "train", num_outputs=10, classification=True
    )
    assert len(warned) == 1 and "got uint8" in warned[0]


def test_a_config_or_number_where_a_workdir_goes_is_an_error_naming_workdir():
    with pytest.raises(TypeError, match=r"workdir: expected a local path .* got Config; the run"):
        dlkit.evaluate(tiny_digits_config())
    _fit_fails(r"workdir: expected a local path .* got int$", error=TypeError, workdir=3)
