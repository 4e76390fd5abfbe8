"""A small convolutional network for image classification.

module = CNN(features=(32, 64), dense_size=128, num_classes=10)
logits = module.apply(variables, images, train=False)  # images (B, H, W, C) -> (B, 10)
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlkit.models import conv as conv_lib


@jax.custom_jvp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 and VALID padding: the max of the four strided views.

    Same values as `nn.max_pool(x, (2, 2), strides=(2, 2))`, and the same derivatives as
    JAX's own for a max over each window (tied maxima share the gradient equally).
    - Not `nn.max_pool`: on XLA:CPU its gradient lowers to select-and-scatter, a slow
      scattering loop that dominated a small CNN's training step.
    - Not a reshape to (B, H/2, 2, W/2, 2, C) and a max either: XLA:CPU reduces over those
      split axes, and their derivative, in loops rather than vectorised elementwise code.
    The four strided views and a custom JVP (`_max_pool_jvp`) keep every pass elementwise,
    which XLA fuses and vectorises (figures: docs/performance.md, "Max pooling"). Being a JVP
    rule, it keeps forward-mode autodiff (jvp, jacfwd, Hessian-vector products) as well as
    gradients. Odd trailing rows and columns are dropped, as VALID does.

    Args:
      x: (B, H, W, C).
    Returns:
      (B, H // 2, W // 2, C).
    """
    a, b, c, d = _quadrants(x)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _quadrants(x: jax.Array) -> list[jax.Array]:
    """The four strided views x[:, i::2, j::2] of the even part of x: 4 x (B, H/2, W/2, C)."""
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    return [x[:, i:h:2, j:w:2, :] for i in (0, 1) for j in (0, 1)]


@max_pool_2x2.defjvp
def _max_pool_jvp(primals, tangents):
    """d y = the mean of the tangents at each window's maxima (all of them, when tied)."""
    (x,), (dx,) = primals, tangents
    y = max_pool_2x2(x)
    hits = [view == y for view in _quadrants(x)]
    count = sum(hit.astype(y.dtype) for hit in hits)  # >= 1: y is one of the four
    zero = jnp.zeros((), dx.dtype)
    dy = sum(jnp.where(hit, t, zero) for hit, t in zip(hits, _quadrants(dx), strict=True))
    return y, dy / count


def _conv_block(conv: nn.Module, x: jax.Array) -> jax.Array:
    """Conv -> ReLU -> 2x2 max-pool: (B, H, W, C) -> (B, H/2, W/2, ch)."""
    return max_pool_2x2(nn.relu(conv(x)))


class CNN(nn.Module):
    """Conv(3x3) -> ReLU -> 2x2 max-pool per entry of `features`, then Dense -> Dropout -> head.

    Input: images (B, H, W, C), channels last, float. Output: logits (B, num_classes).
    """

    features: tuple[int, ...] = (32, 64)  # channels of each conv block
    dense_size: int = 128  # width of the hidden dense layer; 0 = none
    num_classes: int = 10  # size of the output layer
    dropout_rate: float = 0.25  # before the head, in [0, 1)
    dtype: Any = jnp.float32  # compute dtype (float32 | bfloat16 | float16); params stay
    #                           float32. Set by train.precision.
    remat: bool = False  # recompute each conv block's activations in the backward pass
    conv_impl: str = "xla"  # xla (lax.conv_general_dilated) | patches (patch extraction +
    #                         one matmul) | matmul_grad (patches, kernel gradient as one
    #                         matmul); the same function each way, which is fastest depends
    #                         on the CPU: dlkit/models/conv.py, docs/performance.md

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"CNN input: expected (B, H, W, C), got shape {x.shape}")
        conv_fn = conv_lib.conv_function(self.conv_impl)
        x = x.astype(self.dtype)
        # nn.remat of a function keeps the param paths (Conv_0, ...) of the plain model.
        block = nn.remat(_conv_block) if self.remat else _conv_block
        for channels in self.features:
            conv = nn.Conv(
                channels,
                kernel_size=(3, 3),
                padding="SAME",
                dtype=self.dtype,
                conv_general_dilated=conv_fn,
            )
            x = block(conv, x)  # (B, H/2, W/2, ch)
        b = x.shape[0]
        x = x.reshape(b, -1)  # (B, H*W*ch)
        if self.dense_size:
            x = nn.relu(nn.Dense(self.dense_size, dtype=self.dtype)(x))  # (B, dense_size)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype)(x)  # (B, num_classes)
        return logits.astype(jnp.float32)
