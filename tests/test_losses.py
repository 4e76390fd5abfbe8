"""Tests for dlkit.losses: cross-entropy (with label smoothing), squared error, the factory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dlkit import losses

B, K = 6, 5


def _logits_labels(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    logits = 3.0 * jax.random.normal(k1, (B, K))
    labels = jax.random.randint(k2, (B,), 0, K)
    return logits, labels


def _log_softmax(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_cross_entropy_matches_optax_and_hand_computation():
    logits, labels = _logits_labels()
    loss = losses.make_loss("softmax_cross_entropy")
    got = loss(logits, labels)
    assert got.shape == (B,)
    want_optax = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want_optax), rtol=1e-6)
    want_hand = -_log_softmax(logits)[np.arange(B), np.asarray(labels)]
    np.testing.assert_allclose(np.asarray(got), want_hand, rtol=1e-5)


def test_cross_entropy_on_bfloat16_logits_is_float32():
    logits, labels = _logits_labels()
    got = losses.SoftmaxCrossEntropy()(logits.astype(jnp.bfloat16), labels)
    assert got.dtype == jnp.float32


def test_cross_entropy_with_label_smoothing():
    logits, labels = _logits_labels(seed=1)
    alpha = 0.1
    loss = losses.make_loss("softmax_cross_entropy", label_smoothing=alpha)
    got = np.asarray(loss(logits, labels))
    onehot = np.eye(K)[np.asarray(labels)]
    targets = (1 - alpha) * onehot + alpha / K
    want = -(targets * _log_softmax(logits)).sum(axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # smoothing changes the value: it is not silently ignored.
    hard = np.asarray(losses.SoftmaxCrossEntropy()(logits, labels))
    assert np.max(np.abs(got - hard)) > 1e-3


def test_accuracy_metric():
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 5.0, 1.0], [0.0, 1.0, 3.0], [4.0, 0.0, 0.0]])
    labels = jnp.array([0, 1, 0, 2])
    metrics = losses.SoftmaxCrossEntropy().metrics(logits, labels)
    assert set(metrics) == {"accuracy"}
    np.testing.assert_array_equal(np.asarray(metrics["accuracy"]), [1.0, 1.0, 0.0, 0.0])
    assert metrics["accuracy"].dtype == jnp.float32


def test_accuracy_metric_on_random_logits():
    logits, labels = _logits_labels(seed=2)
    metrics = losses.SoftmaxCrossEntropy(label_smoothing=0.2).metrics(logits, labels)
    acc = np.asarray(metrics["accuracy"])
    want = (np.argmax(np.asarray(logits), axis=-1) == np.asarray(labels)).astype(np.float32)
    np.testing.assert_array_equal(acc, want)


def test_squared_error_is_mean_over_output_dims():
    k1, k2 = jax.random.split(jax.random.key(3))
    p = jax.random.normal(k1, (B, 3, 2))
    t = jax.random.normal(k2, (B, 3, 2))
    got = losses.make_loss("squared_error")(p, t)
    assert got.shape == (B,)
    want = ((np.asarray(p) - np.asarray(t)) ** 2).reshape(B, -1).mean(axis=-1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    assert losses.SquaredError().metrics(p, t) == {}


def test_squared_error_vector_targets_match_column_predictions():
    p = jnp.array([[1.0], [2.0], [-1.0]])
    t = jnp.array([0.0, 2.0, 1.0])
    got = losses.SquaredError()(p, t)
    np.testing.assert_allclose(np.asarray(got), [1.0, 0.0, 4.0], rtol=1e-6)


def test_squared_error_integer_targets():
    p = jnp.array([[0.5, 1.5]])
    t = jnp.array([[1, 1]], dtype=jnp.int32)
    np.testing.assert_allclose(np.asarray(losses.SquaredError()(p, t)), [0.25], rtol=1e-6)


def test_make_loss_types():
    assert isinstance(losses.make_loss("squared_error"), losses.SquaredError)
    loss = losses.make_loss("softmax_cross_entropy", label_smoothing=0.3)
    assert isinstance(loss, losses.SoftmaxCrossEntropy)
    assert loss.label_smoothing == 0.3


def test_make_loss_rejects_unknown_name():
    with pytest.raises(ValueError, match="loss.name") as info:
        losses.make_loss("hinge")
    assert "hinge" in str(info.value)
    assert "softmax_cross_entropy" in str(info.value)
    assert "squared_error" in str(info.value)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_make_loss_rejects_bad_label_smoothing(value):
    with pytest.raises(ValueError, match="loss.label_smoothing"):
        losses.make_loss("softmax_cross_entropy", label_smoothing=value)


def test_make_loss_accepts_label_smoothing_range_ends():
    assert losses.make_loss("softmax_cross_entropy", label_smoothing=0.0).label_smoothing == 0.0
    assert losses.make_loss("softmax_cross_entropy", label_smoothing=0.99).label_smoothing == 0.99


def test_from_config_reads_name_and_label_smoothing():
    from dlkit import config

    loss = losses.from_config(config.LossConfig(label_smoothing=0.1))
    assert loss == losses.SoftmaxCrossEntropy(label_smoothing=0.1)
    assert losses.from_config(config.LossConfig(name="squared_error")) == losses.SquaredError()
    with pytest.raises(ValueError, match="loss.name"):
        losses.from_config(config.LossConfig(name="hinge"))
