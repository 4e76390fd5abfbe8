"""Augmentation (dlkit.data.augment): exact transforms, keys, mixed losses, and the step
(compiled once; jit and pmap augment identically, also with gradient accumulation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits_config

import dlkit
from dlkit import losses, steps
from dlkit.data import augment

B, H, W, C = 8, 6, 5, 2


def _images(shape=(B, H, W, C), dtype=jnp.float32):
    return jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape).astype(dtype) + 1


@pytest.mark.parametrize("shape", [(B, H, W, C), (B, H, W)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.uint8])
def test_crop_and_flip_keep_shape_and_dtype(shape, dtype):
    x = _images(shape, dtype)
    key = jax.random.key(0)
    for y in (augment.random_crop(key, x, 2), augment.horizontal_flip(key, x)):
        assert y.shape == x.shape and y.dtype == x.dtype


def test_crop_is_a_window_of_the_padded_image():
    x = np.asarray(_images())
    p = 2
    y = np.asarray(augment.random_crop(jax.random.key(3), jnp.asarray(x), p))
    padded = np.pad(x, [(0, 0), (p, p), (p, p), (0, 0)])
    offsets = []
    for i in range(B):
        found = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if np.array_equal(y[i], padded[i, dy : dy + H, dx : dx + W])
        ]
        assert found, f"example {i} is not a window of its padded image"
        offsets.append(found[0])
    assert len(set(offsets)) > 1  # offsets are per example, not one per batch


def test_same_key_same_crop_other_key_other_crop():
    x = _images()
    a = augment.random_crop(jax.random.key(1), x, 2)
    b = augment.random_crop(jax.random.key(1), x, 2)
    c = augment.random_crop(jax.random.key(2), x, 2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_row_offset_gives_the_global_rows_keys():
    # What pmap relies on: rows 4..7 of a batch augment as they do in the whole batch.
    x = _images()
    key = jax.random.key(5)
    whole = augment.random_crop(key, x, 2)
    part = augment.random_crop(key, x[4:], 2, row_offset=4)
    np.testing.assert_array_equal(whole[4:], part)


def test_flip_is_an_exact_left_right_reversal():
    x = np.asarray(_images())
    y = np.asarray(augment.horizontal_flip(jax.random.key(0), jnp.asarray(x)))
    flipped = [np.array_equal(y[i], x[i, :, ::-1]) for i in range(B)]
    kept = [np.array_equal(y[i], x[i]) for i in range(B)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # exactly one of the two
    assert 0 < sum(flipped) < B


def test_mixup_blends_images_and_labels_with_one_weight():
    x, labels = _images(), jnp.arange(B, dtype=jnp.int32)
    y, mix_labels, weight = augment.mixup(jax.random.key(0), x, labels, alpha=0.4)
    lam = float(weight[0])
    assert 0.0 < lam < 1.0 and np.all(np.asarray(weight) == lam)
    partner = np.asarray(x)[[1, 0, 3, 2, 5, 4, 7, 6]]
    np.testing.assert_allclose(y, lam * np.asarray(x) + (1 - lam) * partner, rtol=1e-6)
    np.testing.assert_array_equal(mix_labels, [1, 0, 3, 2, 5, 4, 7, 6])


def test_cutmix_weight_is_the_share_of_own_pixels():
    x, labels = _images(), jnp.arange(B, dtype=jnp.int32)
    y, mix_labels, weight = augment.cutmix(jax.random.key(4), x, labels, alpha=1.0)
    y, x = np.asarray(y), np.asarray(x)
    own = np.all(y == x, axis=-1)  # (B, H, W): pixels that stayed
    np.testing.assert_allclose(own.mean(axis=(1, 2)), np.asarray(weight), rtol=1e-6)
    np.testing.assert_array_equal(y[0][~own[0]], x[1][~own[0]])  # the box comes from the partner


def test_mixed_loss_is_the_convex_combination_and_accuracy_uses_own_labels():
    # The step's loss with mixing: lam * CE(labels) + (1 - lam) * CE(mix_labels).
    cfg = tiny_digits_config(**{"data.mixup_alpha": 0.5})
    cfg.parallel.num_devices = 1
    c = dlkit.build(cfg)
    state = c.init_state()
    batch = dlkit.data.get_batch(c.train_source, np.arange(8))
    batch["mask"] = np.ones((8,), np.float32)
    key = jax.random.key(0)
    mixed = c.augment(key, batch)
    grad_fn = steps.gradients(c.loss_fn)
    _, _, metrics = grad_fn(state, state.model_state, mixed, key, 8.0)
    logits = state.apply_fn({"params": state.params}, mixed["inputs"], train=True)
    ce = losses.SoftmaxCrossEntropy()
    w = mixed["mix_weight"]
    want = w * ce(logits, mixed["labels"]) + (1 - w) * ce(logits, mixed["mix_labels"])
    np.testing.assert_allclose(metrics["loss"].total, want.sum(), rtol=1e-5)
    acc = (jnp.argmax(logits, -1) == jnp.asarray(batch["labels"])).sum()
    np.testing.assert_allclose(metrics["accuracy"].total, acc)


def test_label_smoothing_keeps_accuracy_on_hard_labels():
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 5.0, 1.0]])
    labels = jnp.array([0, 2])
    smooth = losses.make_loss("softmax_cross_entropy", label_smoothing=0.3)
    np.testing.assert_array_equal(smooth.metrics(logits, labels)["accuracy"], [1.0, 0.0])


def test_bad_augmentation_settings_are_rejected_before_compiling():
    with pytest.raises(dlkit.ConfigError, match=r"data.random_crop_padding.*>= 0.*got -1"):
        dlkit.build(tiny_digits_config(**{"data.random_crop_padding": -1}))
    with pytest.raises(dlkit.ConfigError, match=r"mixup_alpha.*even.*got 3"):
        dlkit.build(tiny_digits_config(**{"data.mixup_alpha": 0.2, "train.batch_size": 24}))
    with pytest.raises(dlkit.ConfigError, match=r"loss.name=softmax_cross_entropy"):
        cfg = tiny_digits_config(**{"data.mixup_alpha": 0.2, "loss.name": "squared_error"})
        dlkit.build(cfg)


_AUG = {
    "data.random_crop_padding": 1,
    "data.mixup_alpha": 0.4,
    "data.cutmix_alpha": 0.4,
    "train.steps": 8,
    "train.eval_every": 8,
}


def _fit(strategy, n, **extra):
    cfg = tiny_digits_config(**{**_AUG, **extra})
    cfg.parallel.strategy, cfg.parallel.num_devices = strategy, n
    return dlkit.fit(cfg)


@pytest.fixture(scope="module")
def runs():
    return {
        "jit1": _fit("jit", 1),
        # pmap with 2 micro-batches: augmentation happens before the split, so equal too.
        "pmap8_accum": _fit("pmap", 8, **{"train.grad_accum_steps": 2}),
        "plain": dlkit.fit(tiny_digits_config(**{"train.steps": 8, "train.eval_every": 8})),
    }


def test_jit_and_pmap_augment_identically(runs):
    ref, got = runs["jit1"], runs["pmap8_accum"]
    leaves = zip(jax.tree.leaves(ref.state.params), jax.tree.leaves(got.state.params), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(
        ref.history.series("train/loss")[1], got.history.series("train/loss")[1], rtol=1e-4
    )
    assert got.trace_counts == {"train": 1, "eval": 1}  # the step compiled once


def test_augmentation_changes_training(runs):
    # Guards the comparison above: the augmentation is really applied in fit's step.
    a = runs["jit1"].history.series("train/loss")[1]
    b = runs["plain"].history.series("train/loss")[1]
    assert abs(a[0] - b[0]) > 1e-3
