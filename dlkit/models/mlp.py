"""Multi-layer perceptron with dropout.

module = MLP(hidden_sizes=(256, 256), num_classes=10, dropout_rate=0.1)
logits = module.apply(variables, x, train=True, rngs={"dropout": key})  # (B, 10)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """Dense -> ReLU -> Dropout blocks, then a linear head.

    Inputs of any trailing shape are flattened: (B, ...) -> (B, D).
    Output: logits (B, num_classes), float32.
    """

    hidden_sizes: tuple[int, ...] = (256, 256)  # width of each hidden layer
    num_classes: int = 10  # size of the output layer
    dropout_rate: float = 0.1  # in [0, 1); 0 = no dropout

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        b = x.shape[0]
        x = x.reshape(b, -1).astype(jnp.float32)  # (B, D)
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width)(x))  # (B, width)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)  # (B, num_classes)
