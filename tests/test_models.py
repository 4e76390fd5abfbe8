"""Tests for dlkit.models: shapes and sizes, the 2x2 max-pool, dropout and the registry."""

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlkit
from dlkit import models, state


def _init(module, x):
    return module.init(jax.random.key(0), x, train=False)


def test_mlp_default_shape_and_param_count():
    module = models.build("mlp")
    x = jnp.ones((3, 8, 8, 1))
    variables = _init(module, x)
    out = module.apply(variables, x, train=False)
    assert out.shape == (3, 10)
    assert out.dtype == jnp.float32
    expected = (64 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    assert state.param_count(variables["params"]) == expected
    assert expected == 85_002


def test_mlp_custom_sizes():
    module = models.build("mlp", hidden_sizes=(5,), num_classes=3)
    x = jnp.ones((2, 4, 2))
    variables = _init(module, x)
    assert module.apply(variables, x, train=False).shape == (2, 3)
    assert state.param_count(variables["params"]) == (8 * 5 + 5) + (5 * 3 + 3)


def test_cnn_default_shape_and_param_count():
    module = models.build("cnn")
    x = jnp.ones((2, 28, 28, 1))
    variables = _init(module, x)
    out = module.apply(variables, x, train=False)
    assert out.shape == (2, 10)
    conv1 = 3 * 3 * 1 * 32 + 32
    conv2 = 3 * 3 * 32 * 64 + 64
    dense = (7 * 7 * 64) * 128 + 128  # 28 -> 14 -> 7 after two 2x2 pools
    head = 128 * 10 + 10
    expected = conv1 + conv2 + dense + head
    assert state.param_count(variables["params"]) == expected
    assert expected == 421_642


def test_cnn_without_dense_layer_on_odd_images():
    module = models.build("cnn", features=(4,), dense_size=0, num_classes=3)
    x = jnp.ones((2, 9, 7, 2))
    variables = _init(module, x)
    assert module.apply(variables, x, train=False).shape == (2, 3)
    # one conv, pooled 9x7 -> 4x3, then the head directly.
    assert state.param_count(variables["params"]) == (3 * 3 * 2 * 4 + 4) + (4 * 3 * 4 * 3 + 3)


def test_cnn_rejects_non_image_input():
    module = models.build("cnn", features=(4,), dense_size=8)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        module.init(jax.random.key(0), jnp.ones((2, 28, 28)), train=False)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 3), (1, 5, 4, 2), (3, 3, 3, 1)])
def test_max_pool_2x2_matches_flax(shape):
    x = jax.random.normal(jax.random.key(1), shape)
    got = models.cnn.max_pool_2x2(x)
    want = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    assert got.shape == want.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 3)])
def test_max_pool_2x2_gradient_matches_flax(shape):
    k1, k2 = jax.random.split(jax.random.key(2))
    x = jax.random.normal(k1, shape)  # no ties
    w = jax.random.normal(k2, (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))

    def f(pool):
        return lambda x: jnp.sum(w * pool(x))

    got = jax.grad(f(models.cnn.max_pool_2x2))(x)
    want = jax.grad(f(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    # exactly one nonzero per pooled window, none in the dropped odd row/column.
    assert int(jnp.sum(got != 0)) == w.size


def test_mlp_dropout_depends_on_key_in_training():
    module = models.build("mlp", hidden_sizes=(32,), num_classes=4, dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(3), (4, 8))
    variables = _init(module, x)

    def run(key, train):
        return np.asarray(module.apply(variables, x, train=train, rngs={"dropout": key}))

    a = run(jax.random.key(10), True)
    b = run(jax.random.key(11), True)
    assert np.max(np.abs(a - b)) > 1e-3
    np.testing.assert_array_equal(a, run(jax.random.key(10), True))  # same key, same mask
    eval_out = np.asarray(module.apply(variables, x, train=False))
    assert np.max(np.abs(a - eval_out)) > 1e-3


def test_mlp_eval_is_deterministic_and_ignores_rngs():
    module = models.build("mlp", hidden_sizes=(32,), num_classes=4, dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(3), (4, 8))
    variables = _init(module, x)
    plain = np.asarray(module.apply(variables, x, train=False))
    for seed in (10, 11):
        out = module.apply(variables, x, train=False, rngs={"dropout": jax.random.key(seed)})
        np.testing.assert_array_equal(np.asarray(out), plain)


def test_mlp_training_needs_a_dropout_key():
    module = models.build("mlp", hidden_sizes=(32,), num_classes=4, dropout_rate=0.5)
    x = jnp.ones((2, 8))
    variables = _init(module, x)
    with pytest.raises(flax.errors.InvalidRngError):
        module.apply(variables, x, train=True)


def test_cnn_dropout_depends_on_key_in_training():
    module = models.build("cnn", features=(4,), dense_size=16, num_classes=3, dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(4), (2, 6, 6, 1))
    variables = _init(module, x)
    a = module.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = module.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4
    e1 = module.apply(variables, x, train=False, rngs={"dropout": jax.random.key(1)})
    e2 = module.apply(variables, x, train=False)
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))


def test_build_unknown_model_lists_known_names():
    with pytest.raises(dlkit.ConfigError) as info:
        models.build("nope")
    message = str(info.value)
    assert "nope" in message
    assert "mlp" in message and "cnn" in message


def test_registry_and_register():
    assert models.get_model_class("mlp") is models.MLP
    assert models.get_model_class("cnn") is models.CNN

    class Tiny(nn.Module):
        width: int = 2

        @nn.compact
        def __call__(self, x, *, train):
            return nn.Dense(self.width)(x.reshape(x.shape[0], -1))

    models.register("tiny_test_model", Tiny)
    try:
        module = models.build("tiny_test_model", width=3)
        assert isinstance(module, Tiny) and module.width == 3
        cfg = dlkit.apply_overrides(dlkit.Config(), ["model.name=tiny_test_model", "model.width=5"])
        assert cfg.model.options == {"width": 5}
    finally:
        del models.REGISTRY["tiny_test_model"]


@pytest.mark.parametrize("impl", ["patches", "matmul_grad"])
def test_cnn_conv_impl_matches_xla_conv(impl):
    """conv_impl="patches" / "matmul_grad" is the same function as "xla": params, outputs,
    parameter gradients and input gradients, with 1 and 3 input channels."""
    import optax

    for channels in (1, 3):
        images = jax.random.normal(jax.random.key(1), (4, 28, 28, channels))
        labels = jnp.arange(4) % 10
        xla = models.build("cnn", features=(8, 16), dense_size=32, dropout_rate=0.0)
        other = xla.clone(conv_impl=impl)
        variables = xla.init(jax.random.key(0), images, train=False)
        assert jax.tree.structure(variables) == jax.tree.structure(
            other.init(jax.random.key(0), images, train=False)
        )

        def loss(params, x, module, labels=labels):
            logits = module.apply({"params": params}, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        out_x = xla.apply(variables, images, train=False)
        out_o = other.apply(variables, images, train=False)
        np.testing.assert_allclose(out_o, out_x, rtol=1e-4, atol=1e-5)
        g_x = jax.grad(loss, (0, 1))(variables["params"], images, xla)
        g_o = jax.grad(loss, (0, 1))(variables["params"], images, other)
        for a, b in zip(jax.tree.leaves(g_x), jax.tree.leaves(g_o), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)
        assert float(jnp.abs(jax.tree.leaves(g_x)[0]).max()) > 0  # gradients are not all zero


@pytest.mark.parametrize("impl", ["patches", "matmul_grad"])
def test_cnn_conv_impl_is_really_used(impl):
    """nn.Conv passes padding="SAME" as a string: the variant must handle it rather than fall
    back to the plain convolution (which made "patches" measure the same as "xla" once)."""
    module = models.build("cnn", features=(8,), dense_size=0, dropout_rate=0.0, conv_impl=impl)
    images = jnp.ones((2, 8, 8, 1))
    variables = module.init(jax.random.key(0), images, train=False)
    jaxpr = str(jax.make_jaxpr(lambda v: module.apply(v, images, train=False))(variables))
    if impl == "patches":
        assert "conv_general_dilated" not in jaxpr
    else:
        assert "custom_vjp_call" in jaxpr


def test_matmul_grad_conv_with_asymmetric_padding_and_kernel():
    from dlkit.models import conv

    lhs = jax.random.normal(jax.random.key(0), (2, 9, 7, 3))
    rhs = jax.random.normal(jax.random.key(1), (3, 2, 3, 5))
    dims = ("NHWC", "HWIO", "NHWC")
    for padding in (((2, 0), (0, 1)), "VALID", "SAME"):

        def f(a, b, fn, padding=padding):
            return jnp.sum(jnp.sin(fn(a, b, (1, 1), padding, dimension_numbers=dims)))

        want = jax.value_and_grad(f, (0, 1))(lhs, rhs, jax.lax.conv_general_dilated)
        got = jax.value_and_grad(f, (0, 1))(lhs, rhs, conv.matmul_grad_conv)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    # Strided convolutions are not handled: they go to the plain function, same values.
    strided = conv.matmul_grad_conv(lhs, rhs, (2, 2), "SAME", dimension_numbers=dims)
    np.testing.assert_array_equal(
        strided, jax.lax.conv_general_dilated(lhs, rhs, (2, 2), "SAME", dimension_numbers=dims)
    )


def test_cnn_rejects_an_unknown_conv_impl():
    module = models.build("cnn", conv_impl="fft")
    expected = r"model.conv_impl: expected one of xla \| patches \| matmul_grad, got 'fft'"
    with pytest.raises(ValueError, match=expected):
        module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)


def test_max_pool_2x2_derivatives_share_ties_like_jax():
    """The custom JVP gives exactly JAX's derivatives of a max over each window, ties
    included (each of k tied maxima gets 1/k), in reverse and in forward mode."""
    x = jax.nn.relu(jax.random.normal(jax.random.key(4), (3, 9, 8, 5)))  # ReLU zeros tie
    x = x.at[0, 0:2, 0:2, 0].set(0.7)  # four equal maxima
    x = x.at[1, 0, 0, 0].set(0.9).at[1, 0, 1, 0].set(0.9).at[1, 1, 0, 0].set(0.9)  # three
    w = jax.random.normal(jax.random.key(5), (3, 4, 4, 5))

    def reference(x):
        b, h, w_, c = x.shape
        x = x[:, : h - h % 2, : w_ - w_ % 2, :].reshape(b, h // 2, 2, w_ // 2, 2, c)
        return jnp.max(x, axis=(2, 4))

    got = jax.grad(lambda x: jnp.sum(w * models.cnn.max_pool_2x2(x)))(x)
    want = jax.grad(lambda x: jnp.sum(w * reference(x)))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=0)
    np.testing.assert_allclose(got[0, 0:2, 0:2, 0], w[0, 0, 0, 0] / 4, rtol=1e-6)
    np.testing.assert_allclose(got[1, 0, 0:2, 0], w[1, 0, 0, 0] / 3, rtol=1e-6)
    assert float(jnp.sum(got[:, 8, :, :] != 0)) == 0  # the dropped odd row
    tangent = jax.random.normal(jax.random.key(6), x.shape)
    _, jvp_got = jax.jvp(models.cnn.max_pool_2x2, (x,), (tangent,))
    _, jvp_want = jax.jvp(reference, (x,), (tangent,))
    np.testing.assert_allclose(np.asarray(jvp_got), np.asarray(jvp_want), rtol=1e-6, atol=1e-7)


def test_from_config_builds_the_named_module_with_its_options():
    cfg = dlkit.load_config("digits_mlp", overrides=["model.hidden_sizes=16,8"])
    module = models.from_config(cfg.model)
    assert module == models.MLP(hidden_sizes=(16, 8), dropout_rate=0.2, num_classes=10)
    cfg = dlkit.apply_overrides(dlkit.Config(), ["model.name=cnn", "model.features=4,8"])
    assert models.from_config(cfg.model) == models.CNN(features=(4, 8))
