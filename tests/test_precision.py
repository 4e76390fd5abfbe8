"""Mixed precision (train.precision), gradient accumulation and rematerialisation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits_config

import dlkit
from dlkit import precision

CURVE = {
    "train.steps": 60,
    "train.log_every": 10,
    "train.eval_every": 0,
    "model.hidden_sizes": "64",
    "optim.learning_rate": 3e-3,
    "parallel.num_devices": 1,
}


@pytest.fixture(scope="module")
def curves():
    return {
        name: dlkit.fit(tiny_digits_config(**CURVE, **{"train.precision": name}))
        for name in ("float32", "bfloat16", "float16")
    }


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_loss_curve_stays_close_to_float32(curves, name):
    _, ref = curves["float32"].history.series("train/loss")
    _, got = curves[name].history.series("train/loss")
    assert len(got) == len(ref) == 6
    assert ref[-1] < 0.7 * ref[0]  # the curve actually falls
    np.testing.assert_allclose(got, ref, rtol=0.05, atol=0.02)
    # Params and optimizer state stay float32 whatever the compute dtype.
    for leaf in jax.tree.leaves((curves[name].state.params, curves[name].state.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32)


def test_float16_keeps_a_dynamic_loss_scale(curves):
    assert precision.loss_scale_of(curves["float32"].state.opt_state) is None
    assert precision.loss_scale_of(curves["bfloat16"].state.opt_state) is None
    scale = precision.loss_scale_of(curves["float16"].state.opt_state)
    assert float(scale.scale) == 2.0**15  # no overflow in 60 steps: unchanged
    assert int(scale.good_steps) == 60
    assert curves["float16"].history.last("train/loss_scale") == 2.0**15


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_zoo_models_compute_in_the_policy_dtype(model, name):
    module = precision.apply_to_module(precision.get_policy(name), dlkit.models.build(model))
    x = jnp.ones((2, 8, 8, 1))
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))
    jaxpr = str(jax.make_jaxpr(lambda v: module.apply(v, x, train=False))(variables))
    op = "conv_general_dilated" if model == "cnn" else "dot_general"
    lines = [line for line in jaxpr.splitlines() if op in line]
    short = {"bfloat16": "bf16", "float16": "f16"}[name]  # jaxpr's dtype names
    assert lines and all(f":{short}[" in line.split("=")[0] for line in lines)
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
    out = jax.eval_shape(lambda v: module.apply(v, x, train=False), variables)
    assert out.dtype == jnp.float32


def test_every_registered_model_has_a_dtype_field():
    for name, cls in dlkit.models.REGISTRY.items():
        assert "dtype" in {f.name for f in dataclasses.fields(cls)}, name


def test_float16_overflow_skips_the_step_and_halves_the_scale():
    cfg = tiny_digits_config(**{"train.precision": "float16", "parallel.num_devices": 1})
    c = dlkit.build(cfg)
    state = c.init_state()
    huge = precision.DynamicLossScale.create(initial_scale=2.0**60)
    state = state.replace(opt_state=state.opt_state._replace(loss_scale=huge))
    batch = {k: jnp.asarray(v) for k, v in c.example_batch().items()}
    step = dlkit.make_train_step(c.loss_fn, loss_scaling=True)
    new, metrics = jax.jit(step)(state, batch)
    assert float(new.opt_state.loss_scale.scale) == 2.0**59
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params), strict=True):
        np.testing.assert_array_equal(a, b)  # skipped
    assert int(new.step) == 1
    for a, b in zip(
        jax.tree.leaves(state.opt_state.inner_state),
        jax.tree.leaves(new.opt_state.inner_state),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)  # the optimizer's moments are untouched too


def test_loss_scale_doubles_after_period_finite_steps():
    s = precision.DynamicLossScale.create(initial_scale=8.0, period=3)
    for _ in range(2):
        s = s.adjust(jnp.asarray(True))
    assert float(s.scale) == 8.0
    s = s.adjust(jnp.asarray(True))
    assert (float(s.scale), int(s.good_steps)) == (16.0, 0)
    s = s.adjust(jnp.asarray(False))
    assert (float(s.scale), int(s.good_steps)) == (8.0, 0)


def test_unknown_precision_is_rejected_before_compiling():
    with pytest.raises(ValueError, match=r"train.precision: expected one of .* got 'float8'"):
        dlkit.build(tiny_digits_config(**{"train.precision": "float8"}))


# --------------------------------------------------------------------------------------------
# Gradient accumulation.


@pytest.mark.parametrize("strategy", ["jit", "pmap"])
def test_grad_accumulation_equals_one_large_batch(strategy):
    base = {"parallel.strategy": strategy, "train.steps": 6, "train.eval_every": 0}
    one = dlkit.fit(tiny_digits_config(**base))
    four = dlkit.fit(tiny_digits_config(**base, **{"train.grad_accum_steps": 4}))
    for a, b in zip(
        jax.tree.leaves(jax.device_get(one.state.params)),
        jax.tree.leaves(jax.device_get(four.state.params)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    for key in ("train/loss", "train/accuracy", "train/grad_norm"):
        np.testing.assert_allclose(one.history.series(key)[1], four.history.series(key)[1], 1e-5)
    assert four.trace_counts == {"train": 1, "eval": 1}  # one compiled program
    assert four.compute_report["grad_accum_steps"] == 4
    # The FLOPs of the accumulating step count every micro-batch (XLA counts a loop once).
    assert four.compute_report["flops_per_step"] == one.compute_report["flops_per_step"]


def test_grad_accumulation_must_leave_micro_batches_divisible_by_devices():
    cfg = tiny_digits_config(**{"train.grad_accum_steps": 8})  # 32 rows / 8 = 4 < 8 devices
    with pytest.raises(dlkit.ConfigError, match=r"train.grad_accum_steps: expected a divisor"):
        dlkit.build(cfg)


# --------------------------------------------------------------------------------------------
# Rematerialisation.


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_remat_recomputes_blocks_with_the_same_params_and_gradients(model):
    x = jnp.linspace(0, 1, 2 * 8 * 8).reshape(2, 8, 8, 1)
    small = {"mlp": {"hidden_sizes": (16, 16)}, "cnn": {"features": (4, 8), "dense_size": 8}}
    plain, remat = (
        dlkit.models.build(model, remat=r, dropout_rate=0.0, **small[model]) for r in (False, True)
    )
    # Same param paths (checkpoints stay compatible), so one init serves both.
    shapes = [
        jax.eval_shape(lambda m=m: m.init(jax.random.key(0), x, train=False))
        for m in (plain, remat)
    ]
    assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
    variables = jax.jit(lambda key: plain.init(key, x, train=False))(jax.random.key(0))
    grads, jaxprs = [], []
    for module in (plain, remat):

        def loss(v, module=module):
            return jnp.sum(module.apply(v, x, train=True) ** 2)

        grads.append(jax.jit(jax.grad(loss))(variables))
        jaxprs.append(str(jax.make_jaxpr(jax.grad(loss))(variables)))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert "checkpoint" not in jaxprs[0] and "remat" not in jaxprs[0]
    assert "checkpoint" in jaxprs[1] or "remat" in jaxprs[1]


def test_remat_is_a_setting():
    cfg = tiny_digits_config(**{"model.remat": "true", "train.steps": 4})
    assert dlkit.build(cfg).module.remat is True
    assert dlkit.fit(cfg).history.last("train/loss") > 0
