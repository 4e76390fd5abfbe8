"""Tests for dlkit.optim: schedules, the optimizer chain, the weight-decay mask and clipping."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from dlkit import optim


def _lr(schedule, step):
    return float(schedule(jnp.asarray(step)))


# --------------------------------------------------------------------------------------------
# Schedules.


def test_constant_schedule_with_warmup():
    s = optim.make_schedule(0.2, total_steps=100, schedule="constant", warmup_steps=10)
    assert _lr(s, 0) == 0.0
    np.testing.assert_allclose(_lr(s, 5), 0.1, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, 1), 0.02, rtol=1e-6)
    for step in (10, 11, 50, 100, 1000):
        np.testing.assert_allclose(_lr(s, step), 0.2, rtol=1e-6)


def test_constant_schedule_without_warmup():
    s = optim.make_schedule(0.2, total_steps=100)
    for step in (0, 1, 100):
        np.testing.assert_allclose(_lr(s, step), 0.2, rtol=1e-6)


def test_warmup_cosine_schedule():
    peak, total, warmup, factor = 1e-2, 100, 20, 0.1
    s = optim.make_schedule(
        peak,
        total_steps=total,
        schedule="warmup_cosine",
        warmup_steps=warmup,
        end_learning_rate_factor=factor,
    )
    assert _lr(s, 0) == 0.0
    np.testing.assert_allclose(_lr(s, 10), peak / 2, rtol=1e-5)
    np.testing.assert_allclose(_lr(s, warmup), peak, rtol=1e-5)
    np.testing.assert_allclose(_lr(s, total), factor * peak, rtol=1e-5)
    # halfway through the decay the cosine is at the mean of peak and end.
    np.testing.assert_allclose(_lr(s, 60), (peak + factor * peak) / 2, rtol=1e-5)
    values = [_lr(s, t) for t in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_warmup_linear_schedule():
    peak, total, warmup, factor = 0.5, 110, 10, 0.2
    s = optim.make_schedule(
        peak,
        total_steps=total,
        schedule="warmup_linear",
        warmup_steps=warmup,
        end_learning_rate_factor=factor,
    )
    end = factor * peak
    assert _lr(s, 0) == 0.0
    np.testing.assert_allclose(_lr(s, 5), peak / 2, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, warmup), peak, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, 60), (peak + end) / 2, rtol=1e-6)  # midpoint of decay
    np.testing.assert_allclose(_lr(s, 35), peak + (end - peak) * 0.25, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, total), end, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, total + 50), end, rtol=1e-6)


def test_warmup_linear_without_warmup_decays_to_zero():
    s = optim.make_schedule(1.0, total_steps=50, schedule="warmup_linear")
    np.testing.assert_allclose(_lr(s, 0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, 25), 0.5, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, 50), 0.0, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(learning_rate=0.1, schedule="cosine"), "optim.schedule"),
        (dict(learning_rate=-0.1), "optim.learning_rate"),
        (dict(learning_rate=0.0), "optim.learning_rate"),
        (dict(learning_rate=0.1, warmup_steps=11), "optim.warmup_steps"),
        (dict(learning_rate=0.1, warmup_steps=-1), "optim.warmup_steps"),
    ],
)
def test_make_schedule_rejects_bad_arguments(kwargs, key):
    with pytest.raises(ValueError, match=key):
        optim.make_schedule(total_steps=10, **kwargs)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(name="lamb"), "optim.name"),
        (dict(name="adam", weight_decay=-1.0), "optim.weight_decay"),
        (dict(name="adam", grad_clip_norm=-1.0), "optim.grad_clip_norm"),
        (dict(name="adam", schedule="cosine"), "optim.schedule"),
    ],
)
def test_make_optimizer_rejects_bad_arguments(kwargs, key):
    with pytest.raises(ValueError, match=key):
        optim.make_optimizer(learning_rate=0.1, total_steps=10, **kwargs)


# --------------------------------------------------------------------------------------------
# The optimizer chain.


def _params():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "Dense_0": {"kernel": jax.random.normal(k1, (3, 4)), "bias": jax.random.normal(k2, (4,))},
        "Dense_1": {"kernel": jax.random.normal(k3, (4, 2)), "bias": jnp.zeros((2,))},
    }


def _grads(params, seed):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _run(tx, params, steps):
    state = tx.init(params)
    updates_seen = []
    for i in range(steps):
        updates, state = tx.update(_grads(params, seed=i + 1), state, params)
        params = optax.apply_updates(params, updates)
        updates_seen.append(updates)
    return params, updates_seen


def _assert_trees_close(a, b, **kw):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


@pytest.mark.parametrize(
    "name, kwargs, reference",
    [
        ("sgd", {}, optax.sgd(0.1)),
        ("momentum", dict(momentum=0.5), optax.sgd(0.1, momentum=0.5)),
        ("adam", dict(b1=0.8, b2=0.99, eps=1e-6), optax.adam(0.1, b1=0.8, b2=0.99, eps=1e-6)),
        (
            "adamw",
            dict(b1=0.8, b2=0.99, eps=1e-6),
            optax.adamw(0.1, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.0),
        ),
    ],
)
def test_optimizer_matches_plain_optax(name, kwargs, reference):
    tx, _ = optim.make_optimizer(name, 0.1, total_steps=100, **kwargs)
    params = _params()
    # the first update, then two more so that momentum and the moments matter.
    got_params, got_updates = _run(tx, params, steps=3)
    want_params, want_updates = _run(reference, params, steps=3)
    _assert_trees_close(got_updates[0], want_updates[0], rtol=1e-6, atol=1e-7)
    _assert_trees_close(got_params, want_params, rtol=1e-6, atol=1e-7)


def test_momentum_differs_from_sgd():
    # guards the comparison above: the two references really are different after 3 steps.
    params = _params()
    sgd_params, _ = _run(optim.make_optimizer("sgd", 0.1, total_steps=10)[0], params, 3)
    mom_params, _ = _run(optim.make_optimizer("momentum", 0.1, total_steps=10)[0], params, 3)
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), sgd_params, mom_params)
    assert max(jax.tree.leaves(diff)) > 1e-3


def test_optimizer_uses_the_schedule():
    tx, schedule = optim.make_optimizer(
        "sgd", 0.4, total_steps=20, schedule="constant", warmup_steps=4
    )
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    for step in range(6):
        updates, state = tx.update(grads, state, params)
        expected = -0.4 * min(step, 4) / 4
        np.testing.assert_allclose(_lr(schedule, step), 0.4 * min(step, 4) / 4, rtol=1e-6)
        for u in jax.tree.leaves(updates):
            np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Weight decay.


def _mixed_params():
    return {
        "Dense_0": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)},
        "LayerNorm_0": {"scale": jnp.full((4,), 2.0), "bias": jnp.full((4,), 2.0)},
        "Conv_0": {"kernel": jnp.full((3, 3, 1, 8), 2.0)},
    }


def test_decay_mask_selects_kernels_only():
    mask = optim.decay_mask(_mixed_params())
    assert mask == {
        "Dense_0": {"kernel": True, "bias": False},
        "LayerNorm_0": {"scale": False, "bias": False},
        "Conv_0": {"kernel": True},
    }


def test_decay_mask_excludes_named_matrices():
    # a 2-D array named like a scale/bias is still not decayed.
    mask = optim.decay_mask({"a": {"scale": jnp.ones((2, 3)), "w": jnp.ones((2, 3))}})
    assert mask == {"a": {"scale": False, "w": True}}


@pytest.mark.parametrize("name", ["adamw", "sgd", "momentum", "adam"])
def test_weight_decay_shrinks_kernels_only(name):
    lr, wd = 0.1, 0.5
    tx, _ = optim.make_optimizer(name, lr, total_steps=10, weight_decay=wd)
    params = _mixed_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    mask = optim.decay_mask(params)
    for p, n, decayed in zip(
        jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(mask), strict=True
    ):
        if decayed:
            if name in ("adamw", "sgd", "momentum"):
                # adamw: decoupled, w - lr*wd*w; sgd/momentum: the gradient wd*w, first step.
                np.testing.assert_allclose(np.asarray(n), np.asarray(p) * (1 - lr * wd), rtol=1e-6)
            else:
                # adam: the decay term is normalised, so the first step moves each weight by lr.
                np.testing.assert_allclose(np.asarray(n), np.asarray(p) - lr, rtol=1e-5)
        else:
            np.testing.assert_array_equal(np.asarray(n), np.asarray(p))


def test_no_weight_decay_by_default():
    tx, _ = optim.make_optimizer("sgd", 0.1, total_steps=10)
    params = _mixed_params()
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for u in jax.tree.leaves(updates):
        np.testing.assert_array_equal(np.asarray(u), 0.0)


# --------------------------------------------------------------------------------------------
# Clipping.


def _norm10_grads():
    # global norm sqrt(36 + 64) = 10.
    return {"a": jnp.array([6.0, 0.0]), "b": {"c": jnp.array([[0.0, 8.0]])}}


def test_clipping_scales_to_the_global_norm():
    grads = _norm10_grads()
    params = jax.tree.map(jnp.zeros_like, grads)
    tx, _ = optim.make_optimizer("sgd", 1.0, total_steps=10, grad_clip_norm=1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(updates)), 1.0, rtol=1e-5)
    # the direction is kept: every component is scaled by the same 1/10.
    np.testing.assert_allclose(np.asarray(updates["a"]), [-0.6, 0.0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(updates["b"]["c"]), [[0.0, -0.8]], rtol=1e-5)


def test_no_clipping_by_default():
    grads = _norm10_grads()
    params = jax.tree.map(jnp.zeros_like, grads)
    tx, _ = optim.make_optimizer("sgd", 1.0, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(updates)), 10.0, rtol=1e-5)


def test_clipping_leaves_small_gradients_alone():
    grads = jax.tree.map(lambda g: g / 100, _norm10_grads())  # norm 0.1
    params = jax.tree.map(jnp.zeros_like, grads)
    tx, _ = optim.make_optimizer("sgd", 1.0, total_steps=10, grad_clip_norm=1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(updates)), 0.1, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# The global norm (the step's grad_norm and the clip's norm).


def _large_tree(scale: float = 1.0):
    # Leaves that are folded (multiples of 8 x 64 elements), and some that are not.
    rng = np.random.default_rng(0)
    return {
        "kernel": jnp.asarray(rng.normal(size=(64, 256)) * scale, jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(256,)) * scale, jnp.float32),
        "odd": jnp.asarray(rng.normal(size=(7, 3)) * scale, jnp.float32),
        "half": jnp.asarray(rng.normal(size=(8, 128)) * scale, jnp.bfloat16),
    }


@pytest.mark.parametrize("fold", [True, False, None])
def test_global_norm_equals_the_exact_norm(fold):
    tree = _large_tree()
    exact = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    got = optim.global_norm(tree, fold=fold)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), exact, rtol=1e-6)
    jitted = jax.jit(functools.partial(optim.global_norm, fold=fold))
    np.testing.assert_allclose(float(jitted(tree)), exact, rtol=1e-6)
    assert float(optim.global_norm({}, fold=fold)) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_global_norm_is_not_finite_when_one_gradient_is_not(bad):
    tree = _large_tree()
    tree["kernel"] = tree["kernel"].at[37, 201].set(bad)  # inside a folded leaf
    assert not np.isfinite(float(optim.global_norm(tree, fold=True)))


def test_global_norm_moves_no_data_between_devices():
    # The suite's 8 CPU devices: leaves split as FSDP splits them. The default (no fold with
    # several devices) reduces each shard in place; folding would gather the leaves.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    specs = {"kernel": P(None, "data"), "bias": P(), "odd": P(), "half": P("data")}
    tree = {
        k: jax.device_put(v, jax.sharding.NamedSharding(mesh, specs[k]))
        for k, v in _large_tree().items()
    }

    def moves(**kw) -> int:
        text = jax.jit(functools.partial(optim.global_norm, **kw)).lower(tree).compile().as_text()
        return sum(
            text.count(f" {op}(") for op in ("all-gather", "collective-permute", "all-to-all")
        )

    assert jax.device_count() == 8
    assert moves() == 0
    assert moves(fold=True) > 0  # what the default avoids


@pytest.mark.parametrize("scale", [1e-3, 10.0])  # norms about 0.13 and 1300: unclipped, clipped
def test_clip_matches_optax_on_large_leaves(scale):
    grads = {k: v.astype(jnp.float32) for k, v in _large_tree(scale).items()}
    ours = optim.clip_by_global_norm(1.0)
    ref = optax.clip_by_global_norm(1.0)
    got, _ = ours.update(grads, ours.init(grads))
    want, _ = ref.update(grads, ref.init(grads))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


def test_clipping_reuses_the_step_norm():
    # train_step reports global_norm(grads) and the clip takes the same norm of the same
    # gradients: XLA computes it once, so clipping adds no reduction to the compiled step.
    grads = {k: v.astype(jnp.float32) for k, v in _large_tree().items()}
    tx, _ = optim.make_optimizer("sgd", 0.1, total_steps=10, grad_clip_norm=1.0)
    state = tx.init(grads)

    def reductions(fn) -> int:
        text = jax.jit(fn).lower(grads).compile().as_text()
        return text.count(" reduce(") + text.count(" reduce-window(")

    alone = reductions(lambda g: (optim.global_norm(g), jax.tree.map(lambda t: -0.1 * t, g)))
    clipped = reductions(lambda g: (optim.global_norm(g), tx.update(g, state, g)[0]))
    assert alone > 0
    assert clipped == alone


def test_from_config_passes_every_field_of_the_section():
    from dlkit import config

    section = config.OptimConfig(
        name="momentum",
        learning_rate=0.5,
        schedule="warmup_linear",
        warmup_steps=4,
        end_learning_rate_factor=0.1,
        momentum=0.8,
        weight_decay=0.01,
        grad_clip_norm=1.0,
    )
    tx, schedule = optim.from_config(section, total_steps=20)
    _, expected_schedule = optim.make_optimizer(
        "momentum",
        0.5,
        total_steps=20,
        schedule="warmup_linear",
        warmup_steps=4,
        end_learning_rate_factor=0.1,
    )
    for step in (0, 2, 4, 12, 20):
        assert _lr(schedule, step) == _lr(expected_schedule, step)
    np.testing.assert_allclose(_lr(schedule, 20), 0.05, rtol=1e-6)
    params = {"w": jnp.ones((2, 2))}
    grads = {"w": jnp.full((2, 2), 10.0)}  # global norm 20: clipped to 1
    expected_tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.add_decayed_weights(0.01),
        optax.sgd(expected_schedule, momentum=0.8),
    )
    got_state, want_state = tx.init(params), expected_tx.init(params)
    for _ in range(6):  # past the warm-up, with momentum carried over
        got, got_state = tx.update(grads, got_state, params)
        want, want_state = expected_tx.update(grads, want_state, params)
        np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
    assert float(jnp.abs(got["w"]).max()) > 0
    with pytest.raises(ValueError, match="optim.name"):
        optim.from_config(config.OptimConfig(name="adamax"), total_steps=20)
