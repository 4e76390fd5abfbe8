"""Multi-layer perceptron with dropout.

module = MLP(hidden_sizes=(256, 256), num_classes=10, dropout_rate=0.1)
logits = module.apply(variables, x, train=True, rngs={"dropout": key})  # (B, 10)
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _dense_relu(dense: nn.Module, x: jax.Array) -> jax.Array:
    return nn.relu(dense(x))


class MLP(nn.Module):
    """Dense -> ReLU -> Dropout blocks, then a linear head.

    Inputs of any trailing shape are flattened: (B, ...) -> (B, D).
    Output: logits (B, num_classes), float32 whatever `dtype` is.
    """

    hidden_sizes: tuple[int, ...] = (256, 256)  # width of each hidden layer
    num_classes: int = 10  # size of the output layer
    dropout_rate: float = 0.1  # in [0, 1); 0 = no dropout
    dtype: Any = jnp.float32  # compute dtype (float32 | bfloat16 | float16); params stay
    #                           float32. Set by train.precision.
    remat: bool = False  # recompute each block's activations in the backward pass

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        b = x.shape[0]
        x = x.reshape(b, -1).astype(self.dtype)  # (B, D)
        # nn.remat of a function keeps the param paths (Dense_0, ...) of the plain model.
        block = nn.remat(_dense_relu) if self.remat else _dense_relu
        for width in self.hidden_sizes:
            x = block(nn.Dense(width, dtype=self.dtype), x)  # (B, width)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype)(x)  # (B, num_classes)
        return logits.astype(jnp.float32)
