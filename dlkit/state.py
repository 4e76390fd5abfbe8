"""`TrainState`: the whole device-side state of a run as one pytree.

    state = dlkit.state.create_train_state(module, tx, example_inputs, seed=0,
                                           shardings=strategy.state_shardings)
    state.step, state.params, state.model_state, state.opt_state, state.rng

Creation is shapes first: `jax.eval_shape` gives the abstract state at no cost, the target
sharding of every leaf is chosen from it, and a jitted init writes each array directly where it
lives (no host copy, no full replica on device 0 that is then scattered). The same abstract
state is the restore target for checkpoints, so restoring onto another device layout only
changes the shardings.
"""

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlkit import nonfinite


@flax.struct.dataclass
class TrainState:
    """One pytree with everything a training step reads and writes.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: the module's "params" collection.
      model_state: the module's other collections (e.g. {"batch_stats": ...}); {} if none.
      opt_state: the Optax state of `tx`.
      rng: uint32 (2,) raw threefry key data; the step folds in `step` for its dropout key.
        Stored as raw data (not a typed key) so checkpoints hold plain arrays.
      guard: `nonfinite.Guard` counters of updates skipped for NaN/Inf (or loss spikes).
      apply_fn: the module's `apply` (static: part of the tree's structure, not a leaf).
      tx: the Optax transformation (static).
      ema_params: an exponential moving average of `params` (same structure), or None when
        the run keeps none (`train.ema_decay` = 0). A field of its own rather than part of
        `opt_state`: evaluation and `dlkit.load_checkpoint` read it by name, and None adds no
        leaves, so a state without EMA has exactly the structure it had before it existed
        (older checkpoints still load).
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array
    guard: nonfinite.Guard
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    ema_params: Any = None


def _init_fn(module, tx, example_inputs, ema: bool = False) -> Callable[[jax.Array], TrainState]:
    def init(key: jax.Array) -> TrainState:
        params_key, dropout_key, step_key = jax.random.split(key, 3)
        variables = dict(
            module.init({"params": params_key, "dropout": dropout_key}, example_inputs, train=False)
        )
        params = variables.pop("params")
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=variables,
            opt_state=tx.init(params),
            rng=jax.random.key_data(step_key),
            guard=nonfinite.init_guard(),
            apply_fn=module.apply,
            tx=tx,
            # The average starts at the initial weights (a copy, not an alias: buffers are
            # donated separately).
            ema_params=jax.tree.map(jnp.copy, params) if ema else None,
        )

    return init


def _example(example_inputs) -> np.ndarray:
    """A batch-of-one stand-in for init: only its shape and dtype matter."""
    x = np.asarray(example_inputs)
    return np.zeros((1,) + x.shape[1:], x.dtype)


def abstract_train_state(
    module, tx, example_inputs, seed: int = 0, *, ema: bool = False
) -> TrainState:
    """The state's shapes and dtypes (`jax.ShapeDtypeStruct` leaves), computed without FLOPs."""
    init = _init_fn(module, tx, _example(example_inputs), ema)
    return jax.eval_shape(init, jax.random.key(seed))


def create_train_state(
    module,
    tx: optax.GradientTransformation,
    example_inputs,
    *,
    seed: int = 0,
    shardings: Callable[[TrainState], Any] | None = None,
    ema: bool = False,
) -> TrainState:
    """Initialises a `TrainState` directly with its target sharding.

    Args:
      module: a Flax Linen module called as `module(x, train=bool)`.
      tx: the Optax transformation.
      example_inputs: an array (or ShapeDtypeStruct) of shape (B, ...) whose per-example shape
        and dtype are the model's input; B is ignored.
      seed: the run's seed; params, dropout and the step keys all derive from it.
      shardings: maps the abstract state to a pytree of `jax.sharding.Sharding` (e.g.
        `strategy.state_shardings`); None = default placement.
      ema: also keep `ema_params`, starting equal to the initial params.
    Returns:
      The state, every leaf already on its devices.
    """
    init = _init_fn(module, tx, _example(example_inputs), ema)
    key = jax.random.key(seed)
    if shardings is None:
        return jax.jit(init)(key)
    out_shardings = shardings(jax.eval_shape(init, key))
    return jax.jit(init, out_shardings=out_shardings)(key)


def param_count(params) -> int:
    """Number of scalars in a params tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
