"""Vision Transformer (Dosovitskiy et al. 2021): patch embedding, a pre-LayerNorm encoder,
class-token or mean pooling, a linear head.

    module = ViT(patch_size=4, num_layers=6, num_heads=4, d_model=128, pooling="cls")
    logits = module.apply(variables, images, train=False)  # (B, H, W, C) -> (B, num_classes)

With the ViT-B/16 sizes (patch 16, 12 layers, 12 heads, d_model 768, 1000 classes, 224x224
images) it has 86,567,656 parameters, the published ViT-B/16 count.

`dtype` is the compute dtype (train.precision): every layer computes in it (LayerNorm takes its
statistics in float32; attention gets bf16/f16 queries, keys and values), params stay float32,
and the logits are returned as float32.

Attention weights: applied with `mutable=["intermediates"]`, each block also stores its
(B, heads, N, N) attention weights as `intermediates/blockI/attention` (recomputed in float32;
`dlkit.explain.attention_maps` collects them). Without it nothing extra is computed.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_POOLINGS = ("cls", "mean")
_init = nn.initializers.normal(0.02)


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(D) + mask), in float32: the weights `jax.nn.dot_product_attention`
    uses but does not return.

    Args:
      q: (B, Tq, H, D) queries; k: (B, Tk, H, D) keys.
      mask: optional bool, broadcastable to (B, H, Tq, Tk); False = not attended.
    Returns:
      (B, H, Tq, Tk) float32; each row sums to 1.
    """
    d = q.shape[-1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    scores = scores / jnp.sqrt(jnp.float32(d))  # (B, H, Tq, Tk)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x)). (B, N, C) -> (B, N, C)."""

    num_heads: int
    mlp_ratio: int = 4
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32  # compute dtype; params stay float32. Set by the parent ViT.

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        b, n, c = x.shape  # (B, N, C)
        h = self.num_heads
        drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
        qkv = nn.DenseGeneral((3, h, c // h), kernel_init=_init, dtype=self.dtype, name="qkv")(
            y
        )  # (B, N, 3, H, D)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, D) each
        if self.is_mutable_collection("intermediates"):  # explain-time only; see dlkit.explain
            self.sow("intermediates", "attention", attention_weights(q, k))
        y = jax.nn.dot_product_attention(q, k, v)  # (B, N, H, D)
        y = nn.DenseGeneral(c, axis=(-2, -1), kernel_init=_init, dtype=self.dtype, name="proj")(
            y
        )  # (B, N, C)
        x = x + drop(y)
        y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
        y = nn.Dense(self.mlp_ratio * c, kernel_init=_init, dtype=self.dtype, name="fc")(y)
        y = nn.Dense(c, kernel_init=_init, dtype=self.dtype, name="fc_out")(nn.gelu(y))
        return x + drop(y)  # (B, N, C)


class ViT(nn.Module):
    """Patches -> linear embedding (+ class token) + learned positions -> encoder -> pool -> head.

    Input: images (B, H, W, C), channels last, H and W multiples of patch_size.
    Output: logits (B, num_classes), float32.
    """

    patch_size: int = 4  # side of the square patches, in pixels
    num_layers: int = 6  # encoder blocks
    num_heads: int = 4  # attention heads; d_model must be divisible by it
    d_model: int = 128  # width of the token embeddings
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    pooling: str = "cls"  # cls: a learned class token's output | mean: mean of patch outputs
    num_classes: int = 10  # size of the output layer
    dropout_rate: float = 0.0  # on embeddings and each residual branch, in [0, 1)
    dtype: Any = jnp.float32  # compute dtype (float32 | bfloat16 | float16); params stay
    #                           float32. Set by train.precision.

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"ViT input: expected (B, H, W, C), got shape {x.shape}")
        b, height, width, _ = x.shape  # (B, H, W, C)
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"ViT input: expected H and W to be multiples of patch_size={p}, "
                f"got {height}x{width}"
            )
        if self.pooling not in _POOLINGS:
            raise ValueError(f"ViT.pooling: expected one of {_POOLINGS}, got {self.pooling!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"ViT.d_model: expected a multiple of num_heads={self.num_heads}, "
                f"got {self.d_model}"
            )
        x = nn.Conv(
            self.d_model,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            name="patch_embed",
        )(x.astype(self.dtype))  # (B, H/p, W/p, C)
        x = x.reshape(b, -1, self.d_model)  # (B, N, C), N = HW / p^2
        if self.pooling == "cls":
            cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.d_model))
            cls = cls.astype(self.dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.d_model)), x], axis=1)
        positions = self.param("pos_embed", _init, (1, x.shape[1], self.d_model))
        x = x + positions.astype(self.dtype)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)  # (B, N', C)
        for i in range(self.num_layers):
            x = EncoderBlock(
                self.num_heads,
                self.mlp_ratio,
                self.dropout_rate,
                dtype=self.dtype,
                name=f"block{i + 1}",
            )(x, train=train)
        x = nn.LayerNorm(dtype=self.dtype, name="ln_f")(x)
        x = x[:, 0] if self.pooling == "cls" else jnp.mean(x, axis=1)  # (B, C)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)  # (B, num_classes)
        return logits.astype(jnp.float32)
