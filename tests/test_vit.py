"""Tests for dlkit.models.vit: ViT-B/16's published parameter count, shapes, both poolings,
and that the model sees patch positions (and only them, through pos_embed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlkit import models, state
from dlkit.models import vit

TINY = {"patch_size": 4, "num_layers": 2, "num_heads": 2, "d_model": 16, "num_classes": 10}


def test_vit_b16_parameter_count():
    # ViT-B/16 (Dosovitskiy et al. 2021; timm vit_base_patch16_224): 86,567,656 parameters.
    module = vit.ViT(
        patch_size=16, num_layers=12, num_heads=12, d_model=768, num_classes=1000, pooling="cls"
    )
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )
    assert state.param_count(shapes["params"]) == 86_567_656


@pytest.mark.parametrize("pooling, expected", [("cls", 7_130), ("mean", 7_098)])
def test_tiny_shapes_and_pinned_counts(pooling, expected):
    module = models.build("vit", **TINY, pooling=pooling)
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    variables = jax.jit(lambda x: module.init(jax.random.key(0), x, train=False))(x)
    logits = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    c, n = 16, 4  # 8x8 images in 4x4 patches: 4 tokens (+ the class token)
    per_block = 4 * c + (3 * c * c + 3 * c) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c)
    count = (16 * c + c) + 2 * per_block + 2 * c + (c * 10 + 10)
    count += (n + 1) * c + c if pooling == "cls" else n * c
    assert state.param_count(variables["params"]) == count == expected


def test_mean_pooling_without_positions_is_blind_to_patch_order():
    module = vit.ViT(**TINY, pooling="mean")
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
    variables = module.init(jax.random.key(0), x, train=False)
    # Swap the top-left and bottom-right 4x4 patches.
    swapped = x.at[:, :4, :4].set(x[:, 4:, 4:]).at[:, 4:, 4:].set(x[:, :4, :4])
    apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
    assert float(jnp.abs(apply(variables, x) - apply(variables, swapped)).max()) > 1e-4
    params = dict(variables["params"], pos_embed=jnp.zeros_like(variables["params"]["pos_embed"]))
    np.testing.assert_allclose(
        apply({"params": params}, x), apply({"params": params}, swapped), rtol=1e-5, atol=1e-5
    )


def test_bad_inputs_are_rejected_with_names():
    module = vit.ViT(**TINY)
    with pytest.raises(ValueError, match="patch_size=4"):
        module.init(jax.random.key(0), jnp.zeros((1, 10, 8, 1)), train=False)
    with pytest.raises(ValueError, match="ViT.pooling"):
        vit.ViT(pooling="max").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
