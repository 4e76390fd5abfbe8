"""data.train_examples and data.validation_examples: which examples train and which validate."""

import numpy as np
import pytest
from conftest import tiny_digits_config

import dlkit


def test_validation_is_the_last_train_examples_and_never_trained_on():
    full = dlkit.data.load_dataset("digits", "train")
    cfg = tiny_digits_config(
        **{
            "data.validation_examples": 100,
            "data.eval_split": "validation",
            "data.train_examples": 50,
        }
    )
    c = dlkit.build(cfg)
    assert len(c.train_source) == 50 and len(c.eval_source) == 100
    train = dlkit.data.get_batch(c.train_source, np.arange(50))
    val = dlkit.data.get_batch(c.eval_source, np.arange(100))
    np.testing.assert_array_equal(train["inputs"], full.arrays["inputs"][:50])
    np.testing.assert_array_equal(val["inputs"], full.arrays["inputs"][-100:])
    np.testing.assert_array_equal(val["labels"], full.arrays["labels"][-100:])
    # Without train_examples the held-out rows are cut from training.
    c = dlkit.build(tiny_digits_config(**{"data.validation_examples": 100}))
    assert len(c.train_source) == len(full) - 100
    assert len(c.eval_source) == 360  # eval_split=test is unchanged


def test_bad_subset_settings_are_rejected():
    with pytest.raises(dlkit.ConfigError, match=r"validation.*validation_examples > 0"):
        dlkit.build(tiny_digits_config(**{"data.eval_split": "validation"}))
    with pytest.raises(ValueError, match=r"data.train_examples: expected 1..1437.*got 5000"):
        dlkit.build(tiny_digits_config(**{"data.train_examples": 5000}))
