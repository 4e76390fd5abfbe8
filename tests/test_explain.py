"""dlkit.explain: attribution methods, attention maps, plots and `dlkit explain`.

The real-data tests share one small CNN trained on Fashion-MNIST (300 steps, ~84% test
accuracy), built once per module.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits_config, ynn_fusions

import dlkit
from dlkit import explain
from dlkit.data import datasets, sources
from dlkit.models import vit as vit_lib


def _fashion_config(seed: int = 0) -> dlkit.Config:
    cfg = dlkit.Config(name="explain_test")
    cfg.data.name = "fashion_mnist"
    cfg.model.name = "cnn"
    cfg.model.options = {"features": (8, 16), "dense_size": 32, "dropout_rate": 0.0}
    cfg.optim.name = "adamw"
    cfg.optim.learning_rate = 3e-3
    cfg.optim.warmup_steps = 20
    cfg.train.steps = 300
    cfg.train.batch_size = 64
    cfg.train.log_every = 100
    cfg.train.eval_every = 0
    cfg.train.progress = False
    cfg.train.seed = seed
    cfg.parallel.num_devices = 1
    return cfg


@pytest.fixture(scope="module")
def fashion():
    """(Explainer of a trained CNN, 64 test images (64, 28, 28, 1), their eval accuracy)."""
    test = datasets.load_dataset("fashion_mnist", "test").arrays
    held_out = sources.ArraySource(inputs=test["inputs"][:500], labels=test["labels"][:500])
    result = dlkit.fit(_fashion_config(), eval_source=held_out)
    x = np.array(test["inputs"][500:564])
    return explain.Explainer.from_state(result.state), x, result.history.last("eval/accuracy")


@pytest.fixture(scope="module")
def fashion_ig(fashion):
    """Integrated Gradients of the predicted classes at the default steps, and Completeness."""
    ex, x, _ = fashion
    return ex.integrated_gradients(x, return_completeness=True)


def test_trained_model_is_real(fashion):
    _, _, accuracy = fashion
    assert accuracy > 0.75  # the properties below are about a model that learned something


def test_integrated_gradients_completeness_at_default_steps(fashion, fashion_ig):
    ex, x, _ = fashion
    ig, comp = fashion_ig
    assert ig.shape == x.shape and ig.dtype == jnp.float32
    np.testing.assert_allclose(comp.attribution_sum, ig.reshape(len(x), -1).sum(1), rtol=1e-5)
    f = ex.logits(x)[np.arange(len(x)), ex.predict(x)]
    f0 = ex.logits(np.zeros_like(x))[np.arange(len(x)), ex.predict(x)]
    np.testing.assert_allclose(comp.output_delta, f - f0, rtol=1e-4, atol=1e-4)
    # A relative gap means something where f(x) - f(0) is not tiny: most images, not all
    # (one of the 64 had |f(x) - f(0)| = 0.047 after a change of float rounding). There the
    # gap must be <= 1%; elsewhere the absolute gap must be as small.
    big = np.abs(np.asarray(comp.output_delta)) > 0.5
    assert big.sum() >= 56
    assert float(jnp.max(comp.relative_gap[big])) <= 0.01
    gap = np.abs(np.asarray(comp.attribution_sum) - np.asarray(comp.output_delta))
    assert float(gap[~big].max(initial=0.0)) <= 0.01
    # The check can fail: with few steps the midpoint rule misses the ReLU kinks.
    _, coarse = ex.integrated_gradients(x, steps=4, return_completeness=True)
    assert float(jnp.max(coarse.relative_gap[big])) > 0.01


def test_integrated_gradients_rank_the_pixels_the_model_uses(fashion, fashion_ig):
    """Deletion: blacking out the 50 pixels with the largest IG attribution drops the target
    logit several times more than blacking out 50 random pixels of the object. (With a black
    baseline the background gets exactly 0, so "mass on the object" would prove nothing; this
    compares object pixels with object pixels, and fails for a ranking no better than chance.)"""
    ex, x, _ = fashion
    k = 50
    target = np.asarray(ex.predict(x))
    rows = np.arange(len(x))
    f = np.asarray(ex.logits(x))[rows, target]
    ig = np.asarray(fashion_ig[0]).reshape(len(x), -1)  # for the predicted classes
    rng = np.random.default_rng(0)
    by_ig, at_random = x.copy().reshape(len(x), -1), x.copy().reshape(len(x), -1)
    for i in rows:
        by_ig[i, np.argsort(-ig[i])[:k]] = 0.0
        on_object = np.flatnonzero(x[i].reshape(-1) > 0.1)
        at_random[i, rng.choice(on_object, min(k, len(on_object)), replace=False)] = 0.0
    drop_ig = f - np.asarray(ex.logits(by_ig.reshape(x.shape)))[rows, target]
    drop_random = f - np.asarray(ex.logits(at_random.reshape(x.shape)))[rows, target]
    assert drop_ig.mean() > 3 * max(drop_random.mean(), 0.1)
    assert np.mean(drop_ig > drop_random) >= 0.9


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def linear():
    module = _Linear()
    x = jax.random.uniform(jax.random.key(0), (4, 4, 4, 1))
    variables = module.init(jax.random.key(1), x, train=False)
    w = np.asarray(variables["params"]["Dense_0"]["kernel"])  # (16, 3)
    return explain.Explainer(module.apply, variables), np.asarray(x), w


def test_exact_on_a_linear_model(linear):
    ex, x, w = linear
    target = np.array([0, 1, 2, 1])
    grad = w[:, target].T.reshape(x.shape)  # (B, 4, 4, 1)
    np.testing.assert_allclose(ex.saliency(x, target, absolute=False), grad, rtol=1e-6)
    np.testing.assert_allclose(ex.saliency(x, target), np.abs(grad), rtol=1e-6)
    np.testing.assert_allclose(ex.gradient_x_input(x, target), x * grad, rtol=1e-6)
    baseline = np.full(x.shape[1:], 0.5, np.float32)
    ig, comp = ex.integrated_gradients(
        x, target, baseline=baseline, steps=3, return_completeness=True
    )
    np.testing.assert_allclose(ig, (x - baseline) * grad, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(comp.relative_gap)) < 1e-4
    # target=None explains the predicted class.
    np.testing.assert_allclose(
        ex.saliency(x, absolute=False), ex.saliency(x, ex.predict(x), absolute=False)
    )


def test_occlusion_is_the_mean_logit_drop_of_the_covering_patches(linear):
    ex, x, w = linear
    contrib = x[..., 0] * w[:, 1].reshape(4, 4)  # (B, 4, 4): each pixel's share of logit 1
    occ = np.asarray(ex.occlusion(x, 1, patch=2, stride=2))
    blocks = contrib.reshape(4, 2, 2, 2, 2).sum(axis=(2, 4))  # (B, 2, 2): each patch's drop
    np.testing.assert_allclose(occ, np.kron(blocks, np.ones((1, 2, 2))), rtol=1e-5, atol=1e-6)
    # Overlapping patches (stride 1): the corner pixel is covered by one patch only.
    occ1 = np.asarray(ex.occlusion(x, 1, patch=2, stride=1))
    np.testing.assert_allclose(occ1[:, 0, 0], contrib[:, :2, :2].sum(axis=(1, 2)), rtol=1e-5)


def test_smoothgrad(fashion):
    ex, x, _ = fashion
    x = x[:8]
    key = jax.random.key(0)
    np.testing.assert_allclose(
        ex.smoothgrad(x, key=key, num_samples=3, sigma=0.0), ex.saliency(x), rtol=1e-4, atol=1e-7
    )
    sg = ex.smoothgrad(x, key=key, num_samples=40)  # 40 > max_batch // 8: several chunks
    assert sg.shape == x.shape and bool(jnp.all(sg >= 0))
    np.testing.assert_array_equal(sg, ex.smoothgrad(x, key=key, num_samples=40))
    assert not np.allclose(sg, ex.smoothgrad(x, key=jax.random.key(1), num_samples=40))
    assert not np.allclose(sg, ex.saliency(x))


def test_compiled_once_per_shape(linear):
    ex = explain.Explainer(linear[0].apply_fn, linear[0].variables)
    x = linear[1]
    for _ in range(3):
        ex.saliency(x)
        ex.integrated_gradients(x, steps=8)
    assert ex.trace_counts["gradients"] == 1
    assert ex.trace_counts["integrated_gradients"] == 1
    ex.saliency(x[:2])
    assert ex.trace_counts["gradients"] == 2


def test_chunking_does_not_change_the_result(linear):
    ex, x, _ = linear
    small = explain.Explainer(ex.apply_fn, ex.variables, max_batch=4)  # one point per chunk
    np.testing.assert_allclose(
        small.integrated_gradients(x, steps=5), ex.integrated_gradients(x, steps=5), rtol=1e-6
    )
    np.testing.assert_allclose(small.occlusion(x, stride=1), ex.occlusion(x, stride=1), rtol=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda ex, x: ex.saliency(x, 3), r"target: expected classes in \[0, 3\), got 3"),
        (lambda ex, x: ex.saliency(x, np.zeros(2, int)), r"target: expected .* \(4,\)"),
        (lambda ex, x: ex.saliency(x.astype(np.int32)), "x: expected float inputs"),
        (lambda ex, x: ex.saliency(x[0, 0, 0]), r"x: expected a batch"),
        (lambda ex, x: ex.integrated_gradients(x, steps=0), "steps: expected an int >= 1"),
        (lambda ex, x: ex.integrated_gradients(x, baseline=x[:2]), "baseline: expected"),
        (lambda ex, x: ex.smoothgrad(x, key=jax.random.key(0), sigma=-1.0), "sigma: expected"),
        (lambda ex, x: ex.occlusion(x, patch=5), r"patch: expected at most the image size"),
        (lambda ex, x: ex.occlusion(x, stride=(1, 0)), "stride: expected an int >= 1"),
        (lambda ex, x: ex.occlusion(x.reshape(4, 16)), r"x: expected images"),
    ],
)
def test_bad_arguments_are_named(linear, call, message):
    ex = explain.Explainer(linear[0].apply_fn, linear[0].variables)
    with pytest.raises(ValueError, match=message):
        call(ex, linear[1])
    assert set(ex.trace_counts) <= {"logits"}  # raised before any attribution was compiled


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """(workdir, FitResult) of a tiny digits MLP run with checkpoints."""
    workdir = tmp_path_factory.mktemp("explain") / "run"
    return workdir, dlkit.fit(tiny_digits_config(**{"parallel.num_devices": 1}), workdir)


def test_from_workdir_matches_from_state(digits_run):
    workdir, result = digits_run
    x = datasets.load_dataset("digits", "test").arrays["inputs"][:4]
    from_state = explain.Explainer.from_state(result.state)
    from_disk = explain.Explainer.from_workdir(workdir)
    np.testing.assert_allclose(from_disk.saliency(x), from_state.saliency(x), rtol=1e-6)


# ---- attention ------------------------------------------------------------------------------


@jax.jit
def _attention_both_ways(q, k, v):
    causal = jnp.tril(jnp.ones((q.shape[1], q.shape[1]), bool))
    return (
        jnp.einsum("bhqk,bkhd->bqhd", vit_lib.attention_weights(q, k), v),
        jax.nn.dot_product_attention(q, k, v),
        jnp.einsum("bhqk,bkhd->bqhd", vit_lib.attention_weights(q, k, causal), v),
        jax.nn.dot_product_attention(q, k, v, is_causal=True),
    )


def test_attention_weights_are_the_ones_attention_uses():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 2, 4))  # (B, T, H, D) each
    mixed, fused, mixed_causal, fused_causal = _attention_both_ways(q, k, v)
    np.testing.assert_allclose(mixed, fused, atol=1e-5)
    np.testing.assert_allclose(mixed_causal, fused_causal, atol=1e-5)
    assert not np.allclose(mixed, mixed_causal)


def test_vit_attention_maps_and_rollout():
    module = dlkit.models.ViT(patch_size=4, num_layers=3, num_heads=2, d_model=16, num_classes=3)
    x = jax.random.normal(jax.random.key(0), (2, 8, 12, 1))
    variables = jax.jit(module.init, static_argnames="train")(jax.random.key(1), x, train=False)
    ex = explain.Explainer(module.apply, variables)
    maps = ex.attention_maps(x)
    assert [m.shape for m in maps] == [(2, 2, 7, 7)] * 3  # 1 class token + 2 x 3 patches
    for m in maps:
        np.testing.assert_allclose(m.sum(-1), 1.0, rtol=1e-5)
    # The fast path is untouched: same logits, and plain apply records nothing.
    apply = jax.jit(module.apply, static_argnames=("train", "mutable"))
    logits, collections = apply(variables, x, train=False, mutable=("intermediates",))
    np.testing.assert_array_equal(logits, apply(variables, x, train=False))
    assert list(collections) == ["intermediates"]
    rollout = explain.attention_rollout(maps)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, rtol=1e-5)
    heat = explain.rollout_image(maps, (8, 12), patch_size=4)
    assert heat.shape == (2, 8, 12)
    np.testing.assert_allclose(heat.sum((1, 2)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(heat[:, :4, :4], heat[:, :1, :1] * np.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="maps: expected 6 tokens .* got 7"):
        explain.rollout_image(maps, (8, 12), patch_size=4, cls_token=False)


def test_lm_attention_maps_are_causal():
    module = dlkit.models.TransformerLM(
        vocab_size=11, num_layers=2, num_heads=2, d_model=16, max_len=8
    )
    tokens = jnp.arange(12).reshape(2, 6) % 11
    variables = jax.jit(module.init, static_argnames="train")(
        jax.random.key(0), tokens, train=False
    )
    maps = explain.Explainer(module.apply, variables).attention_maps(tokens)
    assert [m.shape for m in maps] == [(2, 2, 6, 6)] * 2
    for m in maps:
        np.testing.assert_allclose(m.sum(-1), 1.0, rtol=1e-5)
        assert float(jnp.max(jnp.triu(m, 1))) == 0.0
        assert float(jnp.min(jnp.diagonal(m, axis1=-2, axis2=-1))) > 0.0


def test_attention_maps_need_a_model_with_attention(linear):
    ex, x, _ = linear
    with pytest.raises(ValueError, match="sows 'attention' intermediates"):
        ex.attention_maps(x)


# ---- plots and the CLI ----------------------------------------------------------------------


def test_plot_attributions_grid(fashion, tmp_path):
    from matplotlib.figure import Figure

    ex, x, _ = fashion
    x = x[:5]
    fig = explain.plot_attributions(
        x,
        {"saliency": ex.saliency(x), "IG": ex.integrated_gradients(x, steps=8)},
        labels=[0, 1, 2, 3, 4],
        predictions=ex.predict(x),
    )
    assert isinstance(fig, Figure) and len(fig.axes) == 3 * 5
    ig_image = fig.axes[2 * 5].images[0]  # row 2 = IG: signed, diverging and centred at 0
    assert ig_image.get_cmap().name == "RdBu_r" and ig_image.norm.vmin == -ig_image.norm.vmax
    assert fig.axes[5].images[0].norm.vmin == 0.0  # saliency: non-negative, from 0
    path = tmp_path / "grid.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"attributions\['bad'\]: expected \(5, 28, 28"):
        explain.plot_attributions(x, {"bad": np.zeros((5, 14, 14))})


def test_cli_explain_writes_the_grid(digits_run, tmp_path, capsys):
    import json

    from dlkit import cli

    workdir, _ = digits_run
    out = tmp_path / "explain.png"
    argv = ["explain", str(workdir), "--method", "ig", "--method", "saliency"]
    assert cli.main([*argv, "--num", "3", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num"] == 3 and result["methods"] == ["ig", "saliency"]
    assert result["completeness_max_relative_gap"] < 0.05
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["explain", str(workdir), "--method", "lime"]) == 2


def _explainer_conv_fusions(spec: str | None = None):
    """YNNPACK convolution fusions in the compiled gradient of a CNN's Explainer."""
    from dlkit import models

    m = models.build("cnn", features=(32, 64), dense_size=16, dropout_rate=0.0)
    x = np.zeros((8, 28, 28, 1), np.float32)
    variables = m.init(jax.random.key(0), x, train=False)
    kwargs = {} if spec is None else {"xla_cpu_ynn_fusions": spec}
    ex = explain.Explainer(m.apply, variables, **kwargs)
    text = ex._jitted["gradients"].lower(variables, x, np.zeros(8, np.int32)).compile()
    return [f for f in ynn_fusions(text.as_text()) if "conv_general_dilated" in f]


def test_explainer_compiles_without_ynnpack_convolutions_by_default():
    """As in training (`train.xla_cpu_ynn_fusions`); a bad name names the setting."""
    assert not _explainer_conv_fusions()
    assert not _explainer_conv_fusions("none")
    with pytest.raises(ValueError, match=r"train\.xla_cpu_ynn_fusions: expected .* got 'conv'"):
        _explainer_conv_fusions("conv")


def test_explainer_xla_setting_keeps_xla_s_ynnpack_convolutions():
    """The default differs from XLA's own choice exactly where XLA picks YNNPACK."""
    if jax.devices()[0].platform != "cpu":
        pytest.skip("XLA:CPU only")
    if not _explainer_conv_fusions("xla"):
        pytest.skip("XLA does not hand these convolutions to YNNPACK on this CPU/jaxlib")
    assert not _explainer_conv_fusions()
