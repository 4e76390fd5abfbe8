"""Attention maps of the ViT and the Transformer LM, and attention rollout.

    maps = dlkit.explain.attention_maps(state.apply_fn, variables, images)  # [(B, H, N, N)] * L
    rollout = dlkit.explain.attention_rollout(maps)                           # (B, N, N)
    heat = dlkit.explain.rollout_image(maps, image_hw=(32, 32), patch_size=4)  # (B, 32, 32)

`jax.nn.dot_product_attention` (the models' fast path) does not return its weights. The
attention modules recompute softmax(q k^T / sqrt(d) + mask) in float32 and `sow` it into the
"intermediates" collection only when that collection is mutable, which `attention_maps` asks for;
ordinary `apply` calls (training, eval, sampling) compute nothing extra.
"""

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util


def _natural_key(path: tuple[str, ...]) -> tuple:
    # "block10" after "block9": compare the digits in names as numbers.
    return tuple(
        tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(name))) for name in path
    )


def attention_maps(apply_fn: Callable, variables: Any, x) -> list[jax.Array]:
    """Every layer's attention weights for inputs x, in layer order.

    Args:
      apply_fn: the model's `apply` (e.g. `state.apply_fn`); the model must sow
        "attention" intermediates (dlkit's ViT and TransformerLM do).
      variables: {"params": ..., **model_state}.
      x: the model's inputs (images (B, H, W, C) for a ViT, tokens (B, T) for an LM).
    Returns:
      A list with one (B, heads, Tq, Tk) float32 array per attention layer; rows sum to 1.
      (An LM's are causal: zero above the diagonal.)
    Raises:
      ValueError: the model recorded no attention weights.
    """
    _, collections = apply_fn(variables, x, train=False, mutable=["intermediates"])
    flat = traverse_util.flatten_dict(dict(collections.get("intermediates", {})))
    paths = sorted((p for p in flat if p[-1] == "attention"), key=_natural_key)
    if not paths:
        raise ValueError(
            "attention_maps: expected a model that sows 'attention' intermediates (dlkit's ViT "
            f"or TransformerLM), got none from {getattr(apply_fn, '__self__', apply_fn)!r:.80}"
        )
    return [flat[p][0] for p in paths]  # sow stores a tuple of values per call


def attention_rollout(maps: list[jax.Array], *, residual: bool = True) -> jax.Array:
    """Attention rollout (Abnar and Zuidema 2020): attention propagated through the layers.

    Each layer's weights are averaged over heads; with `residual` the skip connection is
    modelled as 0.5 * A + 0.5 * I (rows renormalised); the layers are multiplied from the
    first to the last.

    Args:
      maps: per-layer (B, heads, T, T) weights, first layer first (from `attention_maps`).
      residual: add the identity for the residual stream.
    Returns:
      (B, T, T): row i = how much each input token flows into output token i; rows sum to 1.
    """
    if not maps:
        raise ValueError("maps: expected at least one (B, heads, T, T) array, got none")
    rollout = None
    for a in maps:
        if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"maps: expected (B, heads, T, T) arrays, got shape {a.shape}")
        a = jnp.mean(a, axis=1)  # (B, T, T)
        if residual:
            a = 0.5 * a + 0.5 * jnp.eye(a.shape[-1], dtype=a.dtype)
            a = a / jnp.sum(a, axis=-1, keepdims=True)
        rollout = a if rollout is None else jnp.einsum("bij,bjk->bik", a, rollout)
    return rollout


def rollout_image(
    maps: list[jax.Array],
    image_hw: tuple[int, int],
    patch_size: int,
    *,
    cls_token: bool = True,
    residual: bool = True,
) -> jax.Array:
    """A ViT's attention rollout as a heat map over the image.

    Args:
      maps: the ViT's per-layer (B, heads, N, N) weights (from `attention_maps`).
      image_hw: (H, W) of the input images.
      patch_size: the ViT's patch side, pixels.
      cls_token: the ViT pools a class token (token 0; `pooling="cls"`): use its row of the
        rollout. False (`pooling="mean"`): average the rows of all patch tokens.
    Returns:
      (B, H, W) float32: each pixel gets its patch's share of the attention; each map sums to 1.
    """
    h, w = image_hw
    gh, gw = h // patch_size, w // patch_size
    expected = gh * gw + int(cls_token)
    if maps and maps[0].shape[-1] != expected:
        raise ValueError(
            f"maps: expected {expected} tokens for {h}x{w} images, patch_size={patch_size}, "
            f"cls_token={cls_token}; got {maps[0].shape[-1]}"
        )
    r = attention_rollout(maps, residual=residual)  # (B, N, N)
    row = r[:, 0, 1:] if cls_token else jnp.mean(r, axis=1)  # (B, gh * gw)
    row = row / jnp.sum(row, axis=-1, keepdims=True)
    grid = row.reshape(-1, gh, gw)  # (B, gh, gw)
    image = jnp.repeat(jnp.repeat(grid, patch_size, axis=1), patch_size, axis=2)  # (B, H', W')
    return image / (patch_size * patch_size)
