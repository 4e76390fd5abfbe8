"""The optimizer factory: one function that builds one Optax chain.

    tx, schedule = dlkit.optim.make_optimizer(
        "adamw", learning_rate=1e-3, total_steps=10_000, schedule="warmup_cosine",
        warmup_steps=500, weight_decay=0.05, grad_clip_norm=1.0)
    schedule(0), schedule(500)  # 0.0, 1e-3

The chain is: clip by global norm (optional, `clip_by_global_norm`) -> weight decay on
matrices only (for the non-decoupled optimizers) -> the optimizer's own scaling with the
schedule. Everything is Optax; nothing here reimplements an update rule (the clip is
optax's rule with a faster norm, see `global_norm`).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear")

# Parameters with these names are never decayed, whatever their rank.
_NO_DECAY_NAMES = frozenset({"bias", "scale", "embedding_scale"})

# `global_norm` adds a large leaf's squares in rows of this many, pairwise, before reducing.
_NORM_FOLD_ROWS = 8


def global_norm(tree, *, fold: bool | None = None) -> jax.Array:
    """The L2 norm of all leaves of `tree` together, float32: sqrt(sum of all squares).

    Equal to `optax.tree.norm` up to float rounding: only the order of the sum differs.
    Leaves are cast to float32 first, so bfloat16 gradients are summed in float32.

    Folding: a leaf with a multiple of 8 x 64 elements is squared, viewed as 8 rows, and its
    rows are added pairwise (8 -> 4 -> 2 -> 1, elementwise) before the one reduction of what
    is left. XLA fuses the squares and the row additions into one vectorised pass, while
    XLA:CPU reduces an array to a scalar in a much slower loop (a reduce-window), so the
    reduction left is 8 times smaller (figures: docs/performance.md, "Gradient norm").

    Args:
      tree: a pytree of arrays (e.g. gradients).
      fold: fold as above; None = when this process sees a single device
        (`jax.device_count() == 1`). With several devices a leaf may be split over them
        (FSDP), and folding its flattened rows would make XLA move the data between devices
        (an all-gather and collective permutes in the compiled step, tested), where a plain
        sum of squares reduces each shard in place.
    """
    if fold is None:
        fold = jax.device_count() == 1
    total = jnp.zeros((), jnp.float32)
    for leaf in jax.tree.leaves(tree):
        squares = jnp.square(jnp.asarray(leaf, jnp.float32))
        if fold and squares.size % (_NORM_FOLD_ROWS * 64) == 0:
            rows = squares.reshape(_NORM_FOLD_ROWS, -1)
            while rows.shape[0] > 1:
                rows = rows[0::2] + rows[1::2]
            squares = rows
        total = total + jnp.sum(squares)
    return jnp.sqrt(total)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` with the norm taken by `global_norm`.

    The same rule: when the global norm g exceeds `max_norm`, every leaf is scaled by
    max_norm / g. The norm is the one `steps.train_step` reports as `grad_norm`, computed
    the same way on the same gradients, so XLA computes it once for both (with optax's own
    norm, clipping cost a second pass over the gradients).
    """

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        clip = norm > max_norm
        scaled = jax.tree.map(
            lambda t: jnp.where(clip, (t / norm.astype(t.dtype)) * max_norm, t), updates
        )
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_mask(params) -> object:
    """True for the weights that weight decay applies to: matrices and kernels.

    Biases, normalisation scales (LayerNorm/BatchNorm `scale`) and any other rank-0/1 array are
    excluded, the usual practice: decaying them only shrinks the model's offsets and gains.
    """

    def keep(path, leaf) -> bool:
        name = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
        return leaf.ndim > 1 and name not in _NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(keep, params)


def make_schedule(
    learning_rate: float,
    *,
    total_steps: int,
    schedule: str = "constant",
    warmup_steps: int = 0,
    end_learning_rate_factor: float = 0.0,
) -> optax.Schedule:
    """The learning rate as a function of the step.

    Args:
      learning_rate: the peak rate, reached after `warmup_steps`.
      total_steps: the run's length; the decays end there.
      schedule: constant | warmup_cosine | warmup_linear.
      warmup_steps: linear ramp from 0 to the peak.
      end_learning_rate_factor: the decays' final rate as a fraction of the peak.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: expected one of {list(SCHEDULES)}, got {schedule!r}")
    if learning_rate <= 0:
        raise ValueError(f"optim.learning_rate: expected a positive float, got {learning_rate}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"optim.warmup_steps: expected an int in [0, train.steps={total_steps}], "
            f"got {warmup_steps}"
        )
    end_value = learning_rate * end_learning_rate_factor
    if schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), end_value
        )
    if schedule == "constant":
        decay = optax.constant_schedule(learning_rate)
    else:  # warmup_linear
        decay = optax.linear_schedule(learning_rate, end_value, max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(
    name: str,
    learning_rate: float | optax.Schedule,
    *,
    total_steps: int,
    schedule: str = "constant",
    warmup_steps: int = 0,
    end_learning_rate_factor: float = 0.0,
    momentum: float = 0.9,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip_norm: float = 0.0,
) -> tuple[optax.GradientTransformation, Callable]:
    """Builds the optimizer chain and returns it with its learning-rate schedule.

    Args:
      name: sgd | momentum | adam | adamw.
      learning_rate, total_steps, schedule, warmup_steps, end_learning_rate_factor: see
        `make_schedule`. A callable `learning_rate(step) -> rate` is used as the schedule
        as it is, and the schedule arguments are ignored (e.g. `dlkit.lr_finder`'s sweep).
      momentum: for "momentum" (heavy-ball SGD).
      b1, b2, eps: for adam/adamw.
      weight_decay: adamw decays decoupled from the gradient (Loshchilov & Hutter); the others
        add `weight_decay * w` to the gradient. Either way only `decay_mask` weights.
      grad_clip_norm: clip the gradient to this global norm first; 0 = off.
    Returns:
      (tx, schedule): the `optax.GradientTransformation` and `schedule(step) -> rate`.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name: expected one of {list(OPTIMIZERS)}, got {name!r}")
    if weight_decay < 0:
        raise ValueError(f"optim.weight_decay: expected a float >= 0, got {weight_decay}")
    if grad_clip_norm < 0:
        raise ValueError(f"optim.grad_clip_norm: expected a float >= 0, got {grad_clip_norm}")
    if callable(learning_rate):
        lr = learning_rate
    else:
        lr = make_schedule(
            learning_rate,
            total_steps=total_steps,
            schedule=schedule,
            warmup_steps=warmup_steps,
            end_learning_rate_factor=end_learning_rate_factor,
        )
    parts = []
    if grad_clip_norm > 0:
        parts.append(clip_by_global_norm(grad_clip_norm))
    if name == "adamw":
        parts.append(
            optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
        )
    else:
        if weight_decay > 0:
            parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
        if name == "sgd":
            parts.append(optax.sgd(lr))
        elif name == "momentum":
            parts.append(optax.sgd(lr, momentum=momentum))
        else:
            parts.append(optax.adam(lr, b1=b1, b2=b2, eps=eps))
    return optax.chain(*parts), lr


def from_config(section, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """`make_optimizer` with the fields of a config's `optim` section as its arguments.

    Read by attribute, so any object with the fields of `dlkit.config.OptimConfig` works (this
    module does not import the config).

    Args:
      section: the `optim` section (`cfg.optim`).
      total_steps: the run's length (`cfg.train.steps`); the decays end there.
    Returns:
      (tx, schedule), as `make_optimizer` returns them.
    """
    return make_optimizer(
        section.name,
        section.learning_rate,
        total_steps=total_steps,
        schedule=section.schedule,
        warmup_steps=section.warmup_steps,
        end_learning_rate_factor=section.end_learning_rate_factor,
        momentum=section.momentum,
        b1=section.b1,
        b2=section.b2,
        eps=section.eps,
        weight_decay=section.weight_decay,
        grad_clip_norm=section.grad_clip_norm,
    )
