"""The pure steps: masking, metric sums, one compiled program, donation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dlkit
from dlkit import losses, models, steps


def _state(seed=0):
    module = models.build("mlp", hidden_sizes=(16,), dropout_rate=0.0, num_classes=3)
    return dlkit.create_train_state(module, optax.sgd(0.1), np.zeros((1, 5), np.float32), seed=seed)


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "inputs": rng.normal(size=(n, 5)).astype(np.float32),
        "labels": rng.integers(0, 3, size=n).astype(np.int32),
        "mask": np.ones(n, np.float32),
    }


def test_padding_rows_do_not_change_the_update_or_the_metrics():
    loss_fn = losses.make_loss("softmax_cross_entropy")
    real = _batch(6)
    padded = {k: np.concatenate([v, _batch(2, seed=1)[k]]) for k, v in real.items()}
    padded["mask"][6:] = 0.0
    s1, m1 = steps.train_step(_state(), real, loss_fn=loss_fn)
    s2, m2 = steps.train_step(_state(), padded, loss_fn=loss_fn)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert float(m2["loss"].count) == 6.0
    np.testing.assert_allclose(float(m1["loss"].total), float(m2["loss"].total), rtol=1e-6)


def test_metrics_are_sums_that_match_a_direct_computation():
    loss_fn = losses.make_loss("softmax_cross_entropy")
    state, batch = _state(), _batch(8)
    metrics = steps.eval_step(state, batch, loss_fn=loss_fn)
    logits = state.apply_fn({"params": state.params}, batch["inputs"], train=False)
    expected = optax.losses.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    np.testing.assert_allclose(float(metrics["loss"].total), float(expected.sum()), rtol=1e-6)
    correct = (np.argmax(logits, -1) == batch["labels"]).sum()
    assert float(metrics["accuracy"].total) == correct and float(metrics["accuracy"].count) == 8
    assert dlkit.metrics.compute(jax.device_get(metrics))["accuracy"] == correct / 8


def test_train_step_updates_step_and_lowers_the_loss_on_a_fixed_batch():
    loss_fn = losses.make_loss("softmax_cross_entropy")
    step = jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn), donate_argnums=0)
    state, batch = _state(), _batch(16)
    losses_seen = []
    for _ in range(30):
        state, m = step(state, batch)
        losses_seen.append(float(m["loss"].total / m["loss"].count))
    assert int(state.step) == 30
    # Full-batch gradient descent with a small rate: the loss falls at every step.
    assert all(b < a for a, b in zip(losses_seen, losses_seen[1:], strict=False))
    assert losses_seen[-1] < 0.75 * losses_seen[0]


def test_the_step_is_one_program_and_donates_the_state():
    loss_fn = losses.make_loss("softmax_cross_entropy")
    step = jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn), donate_argnums=0)
    state = _state()
    batch = {k: jnp.asarray(v) for k, v in _batch(4).items()}
    hlo = step.lower(state, batch).compile().as_text()
    # Loss, gradient, the optimizer update and the metrics are all in one compiled module.
    assert hlo.count("HloModule") == 1
    old_leaf = jax.tree.leaves(state.params)[0]
    state, _ = step(state, batch)
    assert old_leaf.is_deleted()  # its buffer was donated to the new state


def test_dropout_key_changes_with_the_step():
    module = models.build("mlp", hidden_sizes=(64,), dropout_rate=0.5, num_classes=3)
    state = dlkit.create_train_state(module, optax.sgd(0.0), np.zeros((1, 5), np.float32))
    loss_fn = losses.make_loss("softmax_cross_entropy")
    batch = _batch(8)
    _, m0 = steps.train_step(state, batch, loss_fn=loss_fn)
    _, m1 = steps.train_step(state.replace(step=state.step + 1), batch, loss_fn=loss_fn)
    _, m0_again = steps.train_step(state, batch, loss_fn=loss_fn)
    assert float(m0["loss"].total) != float(m1["loss"].total)  # lr 0: only dropout differs
    assert float(m0["loss"].total) == float(m0_again["loss"].total)  # and it is deterministic
