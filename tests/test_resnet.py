"""Tests for dlkit.models.resnet: published parameter counts, shapes, the option A shortcut, and
BatchNorm statistics over the global batch under both strategies (jit and pmap agree)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits_config

import dlkit
from dlkit import components, models, state
from dlkit.models import resnet

TINY = {"stage_sizes": (1, 1), "width": 8, "num_classes": 10}


def _param_count(module, image_shape):
    # eval_shape: the count needs no FLOPs, so ResNet-18 at 224x224 costs nothing.
    variables = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False)
    )
    return state.param_count(variables["params"]), variables


@pytest.mark.parametrize(
    "preset, image_shape, expected",
    [
        # He et al. 2016, table 6: ResNet-20 0.27M, ResNet-56 0.85M (option A shortcuts).
        (resnet.RESNET20, (32, 32, 3), 269_722),
        (resnet.RESNET56, (32, 32, 3), 853_018),
        # torchvision.models.resnet18() (1000 classes): 11,689,512 parameters, "11.7M".
        (resnet.RESNET18_IMAGENET, (224, 224, 3), 11_689_512),
        # The common CIFAR ResNet-18 (3x3 stem, no max-pool, 10 classes): "11.17M".
        (resnet.RESNET18_CIFAR, (32, 32, 3), 11_173_962),
    ],
)
def test_published_parameter_counts(preset, image_shape, expected):
    count, variables = _param_count(resnet.ResNet(**preset), image_shape)
    assert count == expected
    # Running statistics are state, not parameters: a mean and a variance per BN scale.
    bn_scales = sum(
        x.size for p, x in jax.tree.leaves_with_path(variables["params"]) if "scale" in str(p)
    )
    assert state.param_count(variables["batch_stats"]) == 2 * bn_scales


def test_resnet20_is_the_default_and_option_a_has_no_shortcut_params():
    module = models.build("resnet")
    assert (module.stage_sizes, module.width, module.shortcut) == ((3, 3, 3), 16, "A")
    _, variables = _param_count(module, (32, 32, 3))
    assert not any("proj" in str(p) for p, _ in jax.tree.leaves_with_path(variables["params"]))
    # 3x3 conv layers: 1 stem + 2 per block = 19, plus the head = 20 weight layers.
    kernels = [p for p, x in jax.tree.leaves_with_path(variables["params"]) if x.ndim == 4]
    assert len(kernels) == 19


def test_shortcut_a_subsamples_and_zero_pads_channels():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    y = resnet.shortcut_a(x, 8, 2)
    assert y.shape == (2, 3, 3, 8)
    np.testing.assert_array_equal(np.asarray(y[..., 2:6]), np.asarray(x[:, ::2, ::2, :]))
    assert float(jnp.abs(y[..., :2]).max()) == 0.0 and float(jnp.abs(y[..., 6:]).max()) == 0.0


@pytest.mark.parametrize("stem, out_hw", [("cifar", 8), ("imagenet", 2)])
def test_tiny_resnet_shapes_and_batch_stats_update(stem, out_hw):
    module = resnet.ResNet(**TINY, stem=stem, shortcut="B")
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    variables = jax.jit(lambda x: module.init(jax.random.key(0), x, train=False))(x)
    logits = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32

    @jax.jit
    def train_apply(variables, x):
        # Also captures the last stage's output to check its spatial size.
        return module.apply(
            variables,
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda m, _: m.name == "stage2_block1",
        )

    logits, updates = train_apply(variables, x)
    assert logits.shape == (3, 10)
    old = variables["batch_stats"]["stem_bn"]["mean"]
    assert float(jnp.abs(updates["batch_stats"]["stem_bn"]["mean"] - old).max()) > 1e-4
    # 16 -> 8 (stride 2 in stage 2) with the cifar stem; /4 more with the imagenet stem.
    feats = updates["intermediates"]["stage2_block1"]["__call__"][0]
    assert feats.shape == (3, out_hw, out_hw, 16)


def test_bad_fields_are_rejected_with_names():
    x = jnp.ones((1, 8, 8, 1))
    with pytest.raises(ValueError, match="ResNet.stem"):
        resnet.ResNet(stem="big").init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        resnet.ResNet().init(jax.random.key(0), jnp.ones((1, 8, 8)), train=False)


def test_module_for_strategy_sets_the_bn_axis_only_under_pmap():
    module = resnet.ResNet(**TINY)
    assert (
        components.module_for_strategy(module, dlkit.make_strategy("pmap")).bn_axis_name == "data"
    )
    assert components.module_for_strategy(module, dlkit.make_strategy("jit")).bn_axis_name is None
    mlp = models.build("mlp")
    assert components.module_for_strategy(mlp, dlkit.make_strategy("pmap")) is mlp


def _fit_resnet(strategy):
    cfg = tiny_digits_config()
    dlkit.apply_overrides(cfg, ["model.name=resnet", "model.stage_sizes=1,1", "model.width=8"])
    cfg.parallel.strategy = strategy
    cfg.parallel.num_devices = 8
    cfg.train.steps = 6
    cfg.train.eval_every = 0
    return dlkit.fit(cfg)


@pytest.fixture(scope="module")
def bn_runs():
    return {"jit8": _fit_resnet("jit"), "pmap8": _fit_resnet("pmap")}


TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def _assert_trees_close(a, b, **tol):
    a, b = jax.device_get(a), jax.device_get(b)
    for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **tol)


def test_jit_and_pmap_agree_on_batch_stats_and_params(bn_runs):
    jit, pmap = bn_runs["jit8"].state, bn_runs["pmap8"].state
    assert int(jit.step) == int(pmap.step) == 6
    _assert_trees_close(jit.model_state, pmap.model_state, **TOLERANCE)
    _assert_trees_close(jit.params, pmap.params, **TOLERANCE)
    np.testing.assert_allclose(
        bn_runs["jit8"].history.last("eval/loss"),
        bn_runs["pmap8"].history.last("eval/loss"),
        rtol=1e-4,
    )
    # The statistics moved away from their initial values (mean 0, variance 1).
    var = jax.device_get(jit.model_state["batch_stats"]["stem_bn"]["var"])
    assert np.abs(var - 1.0).max() > 1e-2


def test_pmap_without_cross_device_statistics_would_differ(bn_runs, monkeypatch):
    # The check above has teeth: per-device statistics (B/8 rows each) give other numbers.
    monkeypatch.setattr(components, "module_for_strategy", lambda module, strategy: module)
    local = _fit_resnet("pmap").state
    with pytest.raises(AssertionError):
        _assert_trees_close(bn_runs["jit8"].state.model_state, local.model_state, **TOLERANCE)
    with pytest.raises(AssertionError):
        _assert_trees_close(bn_runs["jit8"].state.params, local.params, **TOLERANCE)
