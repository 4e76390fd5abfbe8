"""What a run adds to the core `steps.train_step`, each as a small wrapper with its own test.

    step = make_train_step(loss_fn, grad_accum_steps=4, ema_decay=0.999)  # the run's step
    state, metrics = step(state, batch)

    k_step = k_steps(accumulating(step), unroll=10)    # K stacked batches per compiled call
    state, acc = k_step(state, acc, stacked_batches)   # leaves (K, B, ...)

A step is `step(state, batch) -> (state, metrics)`; a wrapper takes a step and returns one, in
the style of optax's `apply_if_finite` and Levanter's `microbatched`: the non-finite guard
(`with_nonfinite_guard`), the EMA of the weights (`with_ema`), augmentation
(`with_augmentation`). Gradient accumulation and float16 loss scaling change how the gradient
is computed, so they wrap the step's gradient function (`steps.microbatched`,
`loss_scaled`). `accumulating` adds the step's metrics to a running sum (the loop logs their
mean), and `k_steps` runs K steps in one `lax.scan`. `make_train_step` composes them from the
run's options; nothing else in dlkit reads those options.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dlkit import metrics as metrics_lib
from dlkit import nonfinite, precision, steps
from dlkit.data import augment as augment_lib
from dlkit.state import TrainState

Step = Callable[[TrainState, steps.Batch], tuple[TrainState, steps.Metrics]]
# Augmentation draws from its own stream of the run's key: fold_in(rng, step) stays the dropout
# key, so turning augmentation on leaves dropout masks unchanged.
AUGMENT_STREAM = 0x61756721


def loss_scaled(loss_fn, grad_accum_steps: int = 1) -> steps.GradFn:
    """The `GradFn` of float16 dynamic loss scaling (`precision.with_loss_scaling`).

    The objective is multiplied by the scale S held in the optimizer state before
    differentiation, so small gradients do not underflow in float16, and the gradients are
    divided by S again before the optimizer sees them. S is a power of two, so the division is
    exact. The metrics gain "loss_scale". Overflowing gradients are the optimizer's business:
    it skips those updates and halves S.
    """

    def grad_fn(state: TrainState, model_state, batch, key, denominator):
        scale = precision.loss_scale_of(state.opt_state)
        if scale is None:
            raise ValueError(
                "train.precision=float16: expected an optimizer wrapped in "
                "precision.with_loss_scaling (its state holds the loss scale), got "
                f"{type(state.opt_state).__name__}"
            )
        inner = steps.gradients(loss_fn, loss_scale=scale.scale)
        if grad_accum_steps > 1:
            inner = steps.microbatched(inner, grad_accum_steps)
        grads, model_state, metrics = inner(state, model_state, batch, key, denominator)
        metrics["loss_scale"] = metrics_lib.Mean.scalar(scale.scale)
        return scale.unscale(grads), model_state, metrics

    return grad_fn


def with_nonfinite_guard(step: Step, spike_factor: float = 0.0, watch_grads: bool = True) -> Step:
    """`step` whose update is dropped when the loss or the gradient norm is not finite.

    A dropped update leaves params, optimizer state and model state exactly as they were (the
    step counter still advances), and `state.guard` counts it (see `dlkit.nonfinite`).

    Args:
      step: the step to guard; its metrics must hold "loss" and "grad_norm".
      spike_factor: > 0 also drops an update whose loss exceeds this multiple of the running
        mean of the applied losses; 0 = off.
      watch_grads: False watches the loss alone (float16 loss scaling: overflowing gradients
        are how the optimizer finds its scale, and it skips those updates itself).
    """

    def guarded(state: TrainState, batch):
        new, metrics = step(state, batch)
        mean_loss = metrics["loss"].total / jnp.maximum(metrics["loss"].count, 1.0)
        grad_norm = metrics["grad_norm"].total if watch_grads else jnp.zeros((), jnp.float32)
        ok, guard = nonfinite.check(
            state.guard, state.step, mean_loss, grad_norm, spike_factor=spike_factor
        )
        params, opt_state, model_state = nonfinite.select(
            ok,
            (new.params, new.opt_state, new.model_state),
            (state.params, state.opt_state, state.model_state),
        )
        new = new.replace(params=params, opt_state=opt_state, model_state=model_state, guard=guard)
        return new, metrics

    return guarded


def ema_decay_at(decay: float, t: jax.Array) -> jax.Array:
    """The decay of the bias-corrected EMA at its t-th update (t >= 1), float32 scalar.

    With d_t = d (1 - d^(t-1)) / (1 - d^t), the recurrence ema_t = d_t ema_(t-1) + (1 - d_t) p_t
    gives ema_t = sum_k (1 - d) d^(t-k) p_k / (1 - d^t) over the updated weights p_1..p_t:
    the zero-initialised, debiased average of `optax.ema(debias=True)`, with no trace of the
    initial weights (d_1 = 0, so ema_1 = p_1).
    """
    t = jnp.asarray(t, jnp.float32)
    return decay * (1.0 - decay ** (t - 1.0)) / (1.0 - decay**t)


def with_ema(step: Step, decay: float) -> Step:
    """`step` that also moves `state.ema_params` towards the new params after each applied
    update, as the bias-corrected average of `ema_decay_at`; an update the guard dropped
    (`state.guard.skipped` grew) leaves the average unchanged.

    Raises:
      ValueError: at trace time, when the state keeps no `ema_params` (create it with
        ema=True).
    """

    def averaged(state: TrainState, batch):
        if state.ema_params is None:
            raise ValueError(
                "train_step(ema_decay=...): expected a state with ema_params (create it with "
                f"ema=True), got ema_decay={decay} and state.ema_params=None"
            )
        new, metrics = step(state, batch)
        applied = new.guard.skipped == state.guard.skipped
        d = ema_decay_at(decay, new.step - new.guard.skipped)
        moved = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, new.params)
        ema_params = nonfinite.select(applied, moved, state.ema_params)
        return new.replace(ema_params=ema_params), metrics

    return averaged


def with_augmentation(
    step: Step, augment: augment_lib.Augment, axis_name: str | None = None
) -> Step:
    """`step` on the batch as `augment` transforms it, with a key of its own per step:
    `fold_in(fold_in(rng, AUGMENT_STREAM), step)`, so dropout keys do not change when it is
    turned on. Examples are keyed by their global row, so jit and pmap augment identically."""

    def augmented(state: TrainState, batch):
        root = jax.random.wrap_key_data(state.rng)
        key = jax.random.fold_in(jax.random.fold_in(root, AUGMENT_STREAM), state.step)
        row_offset = 0
        if axis_name is not None:
            row_offset = jax.lax.axis_index(axis_name) * batch["mask"].shape[0]
        return step(state, augment(key, batch, row_offset))

    return augmented


def accumulating(step: Step) -> Callable[..., tuple[TrainState, Any]]:
    """`(state, acc, batch) -> (state, acc)`: `step` with its metrics added to `acc`, the
    running metric sums the loop reads on logging steps (`metrics.merge`)."""

    def train_and_accumulate(state: TrainState, acc, batch):
        state, metrics = step(state, batch)
        return state, metrics_lib.merge(acc, metrics)

    return train_and_accumulate


def k_steps(step_and_sum: Callable, unroll: int = 1) -> Callable:
    """`(state, acc, batches) -> (state, acc)`: an `accumulating` step run over K stacked
    batches (leaves (K, B, ...)) one after another in a `lax.scan`, `unroll` steps per
    iteration of the compiled loop (a divisor of K). Each of the K steps is exactly the
    single step on its batch."""

    def scanned(state: TrainState, acc, batches):
        def body(carry, batch):
            return step_and_sum(*carry, batch), None

        (state, acc), _ = jax.lax.scan(body, (state, acc), batches, unroll=unroll)
        return state, acc

    return scanned


def make_train_step(
    loss_fn,
    *,
    axis_name: str | None = None,
    grad_accum_steps: int = 1,
    loss_scaling: bool = False,
    loss_spike_factor: float = 0.0,
    ema_decay: float = 0.0,
    augment: augment_lib.Augment | None = None,
) -> Step:
    """The run's train step: the core `steps.train_step` with the wrappers its options ask for.

    Args:
      loss_fn: a `dlkit.losses` loss.
      axis_name: the mapped axis under pmap; None under jit.
      grad_accum_steps: N > 1 sums the gradient over N micro-batches (`steps.microbatched`).
      loss_scaling: float16 dynamic loss scaling (`loss_scaled`); the state's optimizer must
        be `precision.with_loss_scaling(...)`.
      loss_spike_factor: see `with_nonfinite_guard` (the guard is always on).
      ema_decay: d > 0 keeps the EMA of the weights (`with_ema`); 0 = off.
      augment: a `dlkit.data.augment.Augment`, or None (`with_augmentation`).
    Returns:
      `step(state, batch) -> (state, metrics)`, pure and unjitted.
    """
    if loss_scaling:
        grad_fn = loss_scaled(loss_fn, grad_accum_steps)
    elif grad_accum_steps > 1:
        grad_fn = steps.microbatched(steps.gradients(loss_fn), grad_accum_steps)
    else:
        grad_fn = steps.gradients(loss_fn)
    step = functools.partial(
        steps.train_step, loss_fn=loss_fn, axis_name=axis_name, grad_fn=grad_fn
    )
    step = with_nonfinite_guard(step, loss_spike_factor, watch_grads=not loss_scaling)
    if ema_decay > 0:
        step = with_ema(step, ema_decay)
    if augment is not None and augment.enabled:
        step = with_augmentation(step, augment, axis_name)
    return step
