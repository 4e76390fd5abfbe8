"""Mixed precision: one policy setting, float32 params, a lower-precision compute dtype.

    policy = dlkit.precision.get_policy("bfloat16")   # train.precision = float32|bfloat16|float16
    module = dlkit.precision.apply_to_module(policy, module)  # sets the module's `dtype` field
    policy.loss_scaling                                 # True for float16 only

Params (and the optimizer state) always stay float32: the optimizer adds small updates to
large weights, which bfloat16's 8-bit mantissa would round away. The module computes in
`policy.compute_dtype`: every zoo model has a `dtype` field that its layers use for their
computation (`nn.Dense(dtype=...)` casts the float32 params to it at use), and returns float32
logits so the loss and its softmax stay in full precision.

float16 has a narrow exponent range, so small gradients underflow to zero. It therefore uses
dynamic loss scaling (as in NVIDIA's apex and DeepMind's jmp): the loss is multiplied by a
scale S before differentiation, the gradients are divided by S, and a step whose gradients
are not finite is skipped and halves S; after `period` finite steps in a row S doubles.
`with_loss_scaling(tx)` is that as an Optax transformation (like `optax.apply_if_finite`):
its state `LossScaleState` holds the inner optimizer's state and the `DynamicLossScale`, so
the TrainState's structure changes only for float16 runs. bfloat16 has float32's exponent
range and needs no scaling.
"""

import dataclasses
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

PRECISIONS = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Policy:
    """A mixed-precision policy.

    Attributes:
      name: float32 | bfloat16 | float16.
      compute_dtype: the dtype the model computes in.
      param_dtype: always float32.
      loss_scaling: whether the step uses dynamic loss scaling (float16).
    """

    name: str
    compute_dtype: jnp.dtype
    param_dtype: jnp.dtype = jnp.float32
    loss_scaling: bool = False


def get_policy(name: str) -> Policy:
    """The policy called `name`; ValueError naming `train.precision` otherwise."""
    if name not in PRECISIONS:
        raise ValueError(f"train.precision: expected one of {list(PRECISIONS)}, got {name!r}")
    return Policy(name, jnp.dtype(name), loss_scaling=name == "float16")


def apply_to_module(policy: Policy, module):
    """`module` computing in `policy.compute_dtype` (a clone with its `dtype` field set).

    Raises:
      ValueError: the module has no `dtype` field and the policy is not float32.
    """
    fields = {f.name for f in dataclasses.fields(module)}
    if "dtype" not in fields:
        if policy.name == "float32":
            return module
        raise ValueError(
            f"train.precision={policy.name}: expected a module with a `dtype` field (the compute "
            f"dtype), got {type(module).__name__} without one"
        )
    return module.clone(dtype=policy.compute_dtype)


@flax.struct.dataclass
class DynamicLossScale:
    """Dynamic loss scale state (float16 training).

    Attributes:
      scale: float32 scalar, the current loss scale S.
      good_steps: int32 scalar, finite steps since S last changed.
      period: steps of finite gradients before S doubles (static).
      factor: S is multiplied / divided by this (static).
    """

    scale: jax.Array
    good_steps: jax.Array
    period: int = flax.struct.field(pytree_node=False, default=2000)
    factor: float = flax.struct.field(pytree_node=False, default=2.0)

    @classmethod
    def create(cls, initial_scale: float = 2.0**15, period: int = 2000) -> "DynamicLossScale":
        return cls(
            scale=jnp.asarray(initial_scale, jnp.float32),
            good_steps=jnp.zeros((), jnp.int32),
            period=period,
        )

    def scale_loss(self, loss: jax.Array) -> jax.Array:
        return loss * self.scale.astype(loss.dtype)

    def unscale(self, grads):
        inv = 1.0 / self.scale
        return jax.tree.map(lambda g: (g * inv).astype(g.dtype), grads)

    def adjust(self, grads_finite: jax.Array) -> "DynamicLossScale":
        """The next state: halve S on a non-finite step, double it after `period` good ones."""
        grow = grads_finite & (self.good_steps + 1 >= self.period)
        scale = jnp.where(
            grads_finite,
            jnp.where(grow, self.scale * self.factor, self.scale),
            jnp.maximum(self.scale / self.factor, 1.0),
        )
        good_steps = jnp.where(grads_finite & ~grow, self.good_steps + 1, 0)
        return self.replace(scale=scale, good_steps=good_steps.astype(jnp.int32))


def all_finite(tree) -> jax.Array:
    """bool scalar: every element of every leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


class LossScaleState(NamedTuple):
    """Optimizer state of `with_loss_scaling`: the inner state and the loss scale."""

    inner_state: Any
    loss_scale: DynamicLossScale


def with_loss_scaling(
    tx: optax.GradientTransformation, initial_scale: float = 2.0**15, period: int = 2000
) -> optax.GradientTransformation:
    """Wraps `tx` for dynamic loss scaling (the float16 policy).

    `update` expects gradients already divided by the scale (`train_step` does it, since it
    also scaled the loss). A step whose gradients are not all finite returns zero updates,
    keeps the inner state and halves the scale; otherwise the scale grows as
    `DynamicLossScale.adjust` says.
    """

    def init(params):
        return LossScaleState(tx.init(params), DynamicLossScale.create(initial_scale, period))

    def update(grads, state, params=None):
        finite = all_finite(grads)
        updates, inner = tx.update(grads, state.inner_state, params)
        updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        inner = jax.tree.map(lambda new, old: jnp.where(finite, new, old), inner, state.inner_state)
        return updates, LossScaleState(inner, state.loss_scale.adjust(finite))

    return optax.GradientTransformation(init, update)


def loss_scale_of(opt_state) -> DynamicLossScale | None:
    """The loss scale in a `with_loss_scaling` optimizer state; None for any other state."""
    return opt_state.loss_scale if isinstance(opt_state, LossScaleState) else None
