"""Decoder-only Transformer language model (GPT-style, pre-LayerNorm) with a KV cache.

    module = TransformerLM(vocab_size=96, num_layers=4, num_heads=4, d_model=256, max_len=256)
    logits = module.apply(variables, tokens, train=False)            # (B, T) -> (B, T, V)

    # Autoregressive decoding: the "cache" collection holds each layer's keys and values.
    samples = dlkit.sampling.sample(module, params, prompt, key, max_new_tokens=200)

Attention goes through `jax.nn.dot_product_attention(..., is_causal=True)`, which XLA fuses on
CPU/TPU and which uses cuDNN's fused kernel on GPUs where it applies. Positions are rotary
(applied to queries and keys, nothing learned) or a learned table of `max_len` rows. With
`tie_embeddings` the output layer is the transposed token embedding.

With `decode=True` the module reads and writes the "cache" collection (call with
`mutable=["cache"]`): the new tokens' keys and values are written at the cache's index, the
queries attend to every cached position up to their own, and the index advances by T. A
prompt is therefore one call with T = prompt length (prefill) and each new token a call with
T = 1; `dlkit.sampling` wraps both in one compiled function.

`dtype` is the compute dtype (train.precision): the embedding, every Dense, LayerNorm (whose
statistics are float32) and attention compute in it, params stay float32, the KV cache holds
keys and values in it, and the logits are returned as float32.

Attention weights: applied with `mutable=["intermediates"]` (and decode=False), each block stores
its causal (B, heads, T, T) attention weights as `intermediates/blockI/attn/attention`
(recomputed in float32; see `dlkit.explain.attention_maps`). Without it nothing extra is computed.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlkit.models import vit

_POSITIONS = ("rotary", "learned")
_DTYPES = ("float32", "bfloat16", "float16")
_init = nn.initializers.normal(0.02)


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotates pairs of features by position-dependent angles (RoFormer, Su et al. 2021).

    The feature pairs are (i, i + D/2), rotated by angle `positions * base**(-2i/D)`.

    Args:
      x: (B, T, N, D) queries or keys, D even.
      positions: (T,) int positions of the T rows.
    Returns:
      (B, T, N, D), same dtype as `x`.
    """
    d = x.shape[-1]
    freqs = base ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)  # (D/2,)
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # (T, D/2)
    cos = jnp.cos(angles)[None, :, None, :]  # (1, T, 1, D/2)
    sin = jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # (B, T, N, D/2) each
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; with `decode`, over the cached keys and values too.

    Input (B, T, C) -> output (B, T, C).
    """

    num_heads: int
    max_len: int
    positions: str = "rotary"
    dtype: Any = jnp.float32  # compute dtype (also the KV cache's); params stay float32

    @nn.compact
    def __call__(self, x: jax.Array, offset: jax.Array, *, decode: bool) -> jax.Array:
        b, t, c = x.shape  # (B, T, C)
        n = self.num_heads
        d = c // n
        qkv = nn.DenseGeneral((3, n, d), dtype=self.dtype, kernel_init=_init, name="qkv")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, N, D) each
        if self.positions == "rotary":
            positions = offset + jnp.arange(t)  # (T,)
            q, k = rotary_embedding(q, positions), rotary_embedding(k, positions)
        if decode:
            cached_k = self.variable("cache", "k", jnp.zeros, (b, self.max_len, n, d), k.dtype)
            cached_v = self.variable("cache", "v", jnp.zeros, (b, self.max_len, n, d), v.dtype)
            cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, offset, 0, 0))
            cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, offset, 0, 0))
            # Query i (at position offset + i) sees cached positions 0..offset + i.
            mask = jnp.arange(self.max_len)[None, :] <= (offset + jnp.arange(t))[:, None]
            y = jax.nn.dot_product_attention(
                q,
                cached_k.value,
                cached_v.value,
                mask=mask[None, None],  # (1, 1, T, L)
            )  # (B, T, N, D)
        else:
            if self.is_mutable_collection("intermediates"):  # explain-time only
                causal = jnp.tril(jnp.ones((t, t), bool))  # (Tq, Tk)
                self.sow("intermediates", "attention", vit.attention_weights(q, k, causal))
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # (B, T, N, D)
        return nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype, kernel_init=_init, name="proj")(
            y
        )  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln(x)), then x + mlp(ln(x)). (B, T, C) -> same."""

    num_heads: int
    max_len: int
    mlp_ratio: int = 4
    positions: str = "rotary"
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32  # compute dtype; params stay float32. Set by the parent model.

    @nn.compact
    def __call__(self, x, offset, *, train: bool, decode: bool):
        c = x.shape[-1]
        drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        h = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
        h = CausalSelfAttention(
            self.num_heads, self.max_len, self.positions, self.dtype, name="attn"
        )(h, offset, decode=decode)
        x = x + drop(h)
        h = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
        h = nn.Dense(self.mlp_ratio * c, dtype=self.dtype, kernel_init=_init, name="fc")(h)
        h = nn.Dense(c, dtype=self.dtype, kernel_init=_init, name="fc_out")(nn.gelu(h))
        return x + drop(h)  # (B, T, C)


class TransformerLM(nn.Module):
    """Token embedding, `num_layers` pre-LN blocks, a final LayerNorm and the output layer.

    Input: tokens (B, T) int, T <= max_len. Output: logits (B, T, vocab_size), float32; the
    logits at position t predict token t + 1. Collections: "params"; with `decode=True` also
    "cache" (see the module docstring).

    With positions="learned", tie_embeddings=True and GPT-2's sizes (vocab 50257, 12 layers,
    12 heads, d_model 768, max_len 1024) this is GPT-2 small: 124,439,808 parameters.
    """

    vocab_size: int = 256  # tokens in the vocabulary; 0 = from the data (the engine sets it)
    num_layers: int = 4  # Transformer blocks
    num_heads: int = 4  # attention heads; d_model must be divisible by it
    d_model: int = 256  # width of the residual stream
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    max_len: int = 256  # longest sequence (and KV cache length)
    positions: str = "rotary"  # rotary | learned
    tie_embeddings: bool = True  # output layer = token embedding transposed
    dropout_rate: float = 0.0  # on embeddings and each residual branch, in [0, 1)
    dtype: Any = jnp.float32  # compute dtype (float32 | bfloat16 | float16); params stay
    #                           float32. Set by train.precision.

    def _check(self, tokens: jax.Array) -> None:
        if self.positions not in _POSITIONS:
            raise ValueError(
                f"TransformerLM.positions: expected one of {_POSITIONS}, got {self.positions!r}"
            )
        try:
            dtype_name = jnp.dtype(self.dtype).name
        except TypeError:
            dtype_name = None
        if dtype_name not in _DTYPES:
            raise ValueError(f"TransformerLM.dtype: expected one of {_DTYPES}, got {self.dtype!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"TransformerLM.d_model: expected a multiple of num_heads={self.num_heads}, "
                f"got {self.d_model}"
            )
        if self.positions == "rotary" and (self.d_model // self.num_heads) % 2:
            raise ValueError(
                "TransformerLM: rotary positions need an even head size d_model / num_heads, "
                f"got {self.d_model} / {self.num_heads}"
            )
        if tokens.ndim != 2:
            raise ValueError(f"TransformerLM input: expected tokens (B, T), got {tokens.shape}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(
                f"TransformerLM input: expected at most max_len={self.max_len} tokens, "
                f"got {tokens.shape[1]}"
            )

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool, decode: bool = False) -> jax.Array:
        self._check(tokens)
        b, t = tokens.shape  # (B, T)
        dtype = jnp.dtype(self.dtype)
        offset = jnp.zeros((), jnp.int32)
        if decode:
            index = self.variable("cache", "index", jnp.zeros, (), jnp.int32)
            offset = index.value
            index.value = offset + t
        embed = nn.Embed(
            self.vocab_size, self.d_model, embedding_init=_init, dtype=dtype, name="embed"
        )
        x = embed(tokens.astype(jnp.int32))  # (B, T, C)
        if self.positions == "learned":
            table = self.param("pos_embed", _init, (self.max_len, self.d_model))
            x = x + jax.lax.dynamic_slice_in_dim(table, offset, t)[None].astype(dtype)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)  # (B, T, C)
        for i in range(self.num_layers):
            x = Block(
                self.num_heads,
                self.max_len,
                self.mlp_ratio,
                self.positions,
                self.dropout_rate,
                dtype,
                name=f"block{i + 1}",
            )(x, offset, train=train, decode=decode)
        x = nn.LayerNorm(dtype=dtype, name="ln_f")(x)
        if self.tie_embeddings:
            logits = embed.attend(x)  # (B, T, V), computed in dtype
        else:
            logits = nn.Dense(
                self.vocab_size, use_bias=False, kernel_init=_init, dtype=dtype, name="head"
            )(x)
        return logits.astype(jnp.float32)  # (B, T, V)
