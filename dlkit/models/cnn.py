"""A small convolutional network for image classification.

module = CNN(features=(32, 64), dense_size=128, num_classes=10)
logits = module.apply(variables, images, train=False)  # images (B, H, W, C) -> (B, 10)
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlkit.models import conv as conv_lib


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 and VALID padding, as a reshape and a max.

    Same values as `nn.max_pool(x, (2, 2), strides=(2, 2))`. Written this way because on
    XLA:CPU the gradient of `nn.max_pool` lowers to select-and-scatter, which took 50 of 86 ms
    of a small CNN's training step on a 2-core machine; the reshape form's gradient is a cheap
    elementwise mask (issue 8's measurements). Odd trailing rows/columns are dropped, as VALID does.

    Args:
      x: (B, H, W, C).
    Returns:
      (B, H // 2, W // 2, C).
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :]
    x = x.reshape(b, h // 2, 2, w // 2, 2, c)  # (B, H/2, 2, W/2, 2, C)
    return jnp.max(x, axis=(2, 4))  # (B, H/2, W/2, C)


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
    #                         matmul: 1.27x the training step of xla on XLA:CPU); the same
    #                         function each way: dlkit/models/conv.py, docs/performance.md

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
