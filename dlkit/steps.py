"""The pure training and evaluation steps, written once for every strategy.

    step = jax.jit(functools.partial(train_step, loss_fn=loss), donate_argnums=0)
    state, metrics = step(state, batch)

A batch is a dict: "inputs" (B, ...), "labels" (B, ...), "mask" (B,) float32 with 1.0 for real
examples and 0.0 for padding. Under `jax.jit` the arrays are global (B is the global batch)
and XLA inserts the cross-device reductions; under `jax.pmap` each device sees its B/n rows and
`axis_name` names the mapped axis for the explicit collectives. Both compute the same numbers:
the loss is (sum over the global batch of mask * loss) / (global sum of mask), and each device's
gradient of its share of that sum is `psum`-ed, which is exactly the global gradient.

`train_step` is the core: forward, loss, gradient, update, metrics. Everything else a run may
turn on is a wrapper around it (`dlkit.step_wrappers`): the non-finite guard, EMA weights,
augmentation, K steps per call; and around its gradient function (`GradFn`): micro-batched
accumulation (`microbatched`) and float16 loss scaling. `step_wrappers.make_train_step` is the
one place the run's options meet.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dlkit import metrics as metrics_lib
from dlkit import optim
from dlkit.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, metrics_lib.Mean]
# grad_fn(state, model_state, batch, key, denominator) -> (grads, new_model_state, metrics):
# this device's gradient of sum(mask * loss) / denominator with respect to `state.params`, the
# model state after the forward pass, and the batch's metric sums (not yet reduced over a pmap
# axis). `denominator` is the global count of real rows.
GradFn = Callable[..., tuple[Any, Any, Metrics]]


def _psum(x: Any, axis_name: str | None) -> Any:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _loss_metrics(loss_fn, outputs, labels, per_example, mask) -> Metrics:
    metrics = {"loss": metrics_lib.Mean.from_values(per_example, mask)}
    for name, values in loss_fn.metrics(outputs, labels).items():
        metrics[name] = metrics_lib.Mean.from_values(values, mask)
    return metrics


def gradients(loss_fn, loss_scale: jax.Array | None = None) -> GradFn:
    """The plain `GradFn` of `loss_fn`: one forward and backward pass over the whole batch.

    Args:
      loss_fn: a `dlkit.losses` loss: `loss_fn(outputs, labels) -> (B,)` (or (B, T), one
        value per token, each weighed by its row's mask) and `.metrics(outputs, labels)`.
      loss_scale: a float32 scalar S that multiplies the objective before differentiation
        (float16 loss scaling; the caller divides the gradients by S); None = 1.
    """

    def grad_fn(state: TrainState, model_state, batch: Batch, key, denominator):
        inputs, labels, mask = batch["inputs"], batch["labels"], batch["mask"]
        mutable = list(model_state)

        def objective(params):
            variables = {"params": params, **model_state}
            if mutable:
                outputs, new_model_state = state.apply_fn(
                    variables, inputs, train=True, rngs={"dropout": key}, mutable=mutable
                )
            else:
                outputs = state.apply_fn(variables, inputs, train=True, rngs={"dropout": key})
                new_model_state = model_state
            per_example = loss_fn(outputs, labels)  # (B,), or (B, T) for a per-token loss
            if "mix_labels" in batch:  # mixup/cutmix: the loss of the blended target
                w = batch["mix_weight"]  # (B,)
                per_example = w * per_example + (1.0 - w) * loss_fn(outputs, batch["mix_labels"])
            # The row mask weighs every element of its row, as in the metrics: a (B, T) loss is
            # a mean over the global batch's real tokens, a (B,) loss a mean over its real rows.
            # `denominator` counts global rows; the elements per row are static.
            elements_per_row = math.prod(per_example.shape[1:])
            weighted = metrics_lib.Mean.from_values(per_example, mask)
            loss = weighted.total / (denominator * elements_per_row)
            if loss_scale is not None:
                loss = loss * loss_scale.astype(loss.dtype)
            return loss, (outputs, per_example, new_model_state)

        grad_of = jax.value_and_grad(objective, has_aux=True)
        (_, (outputs, per_example, new_model_state)), grads = grad_of(state.params)
        metrics = _loss_metrics(loss_fn, outputs, labels, per_example, mask)
        return grads, new_model_state, metrics

    return grad_fn


def microbatched(grad_fn: GradFn, n: int) -> GradFn:
    """`grad_fn` summed over `n` micro-batches of B/n rows, one after another in a `lax.scan`.

    Peak activation memory is that of B/n rows; the summed gradient is the whole batch's (the
    denominator stays the global count of real rows). Micro-batch i takes rows i, i + n,
    i + 2n, ...: each device's contiguous block of the batch stays on that device in every
    micro-batch, so splitting moves no data. Each micro-batch draws its dropout masks from
    `fold_in(key, i)`; running statistics (BatchNorm) thread through the micro-batches.

    Raises:
      ValueError: at trace time, when n does not divide the per-step batch.
    """

    def accumulated(state: TrainState, model_state, batch: Batch, key, denominator):
        b = batch["mask"].shape[0]
        if b % n:
            raise ValueError(
                f"train.grad_accum_steps: expected a divisor of the per-step batch {b}, got {n}"
            )

        def split(x):
            return x.reshape((b // n, n) + x.shape[1:]).swapaxes(0, 1)  # (N, B/N, ...)

        micro = jax.tree.map(split, batch)

        def body(carry, xs):
            grads_sum, model_state, metrics_sum = carry
            i, micro_batch = xs
            micro_key = jax.random.fold_in(key, i)
            grads, model_state, metrics = grad_fn(
                state, model_state, micro_batch, micro_key, denominator
            )
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, model_state, metrics_lib.merge(metrics_sum, metrics)), None

        first = jax.tree.map(lambda x: x[0], micro)
        grads_shape, _, metrics_shape = jax.eval_shape(
            lambda: grad_fn(state, model_state, first, key, denominator)
        )
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (grads_shape, metrics_shape))
        init = (zeros[0], model_state, zeros[1])
        (grads, model_state, metrics), _ = jax.lax.scan(body, init, (jnp.arange(n), micro))
        return grads, model_state, metrics

    return accumulated


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    loss_fn,
    axis_name: str | None = None,
    grad_fn: GradFn | None = None,
) -> tuple[TrainState, Metrics]:
    """One optimizer step: forward, loss, gradient, update, metrics.

    Args:
      state: the current `TrainState`.
      batch: {"inputs": (B, ...), "labels": (B, ...), "mask": (B,) float32}.
      loss_fn: a `dlkit.losses` loss (see `gradients`).
      axis_name: the mapped axis under pmap; None under jit.
      grad_fn: how the gradient is computed (a `GradFn`, e.g. `microbatched(...)`);
        None = `gradients(loss_fn)`.
    Returns:
      (new_state, metrics): metrics are {"loss", <loss_fn.metrics>, "grad_norm"} as `Mean`s,
      summed over the global batch (and any "loss_scale" the gradient function reports).
      The update is always applied: skipping non-finite ones is `step_wrappers.
      with_nonfinite_guard`.
    """
    grad_fn = gradients(loss_fn) if grad_fn is None else grad_fn
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if axis_name is not None:
        # Devices see different rows, so they must draw different dropout masks.
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    # Real rows in the global batch (over devices and micro-batches).
    denominator = jnp.maximum(_psum(jnp.sum(batch["mask"]), axis_name), 1.0)
    grads, model_state, metrics = grad_fn(state, state.model_state, batch, key, denominator)
    if axis_name is not None:
        metrics = jax.lax.psum(metrics, axis_name)
        grads = jax.lax.psum(grads, axis_name)
        # Running statistics (e.g. BatchNorm's) are averaged so every replica keeps the same.
        model_state = jax.lax.pmean(model_state, axis_name)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = metrics_lib.Mean.scalar(optim.global_norm(grads))
    new_state = state.replace(
        step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state
    )
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, loss_fn, axis_name: str | None = None) -> Metrics:
    """Metrics of the model in inference mode (no dropout, running statistics) on `batch`.

    Args and batch as in `train_step`. Returns {"loss", <loss_fn.metrics>} as `Mean`s.
    """
    variables = {"params": state.params, **state.model_state}
    outputs = state.apply_fn(variables, batch["inputs"], train=False)
    per_example = loss_fn(outputs, batch["labels"])
    metrics = _loss_metrics(loss_fn, outputs, batch["labels"], per_example, batch["mask"])
    return _psum(metrics, axis_name)
