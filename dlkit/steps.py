"""The pure training and evaluation steps, written once for every strategy.

    train = jax.jit(functools.partial(train_step, loss_fn=loss), donate_argnums=0)
    state, metrics = train(state, batch)

A batch is a dict: "inputs" (B, ...), "labels" (B, ...), "mask" (B,) float32 with 1.0 for real
examples and 0.0 for padding. Under `jax.jit` the arrays are global (B is the global batch)
and XLA inserts the cross-device reductions; under `jax.pmap` each device sees its B/n rows and
`axis_name` names the mapped axis for the explicit collectives. Both compute the same numbers:
the loss is (sum over the global batch of mask * loss) / (global sum of mask), and each device's
gradient of its share of that sum is `psum`-ed, which is exactly the global gradient.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dlkit import metrics as metrics_lib
from dlkit.state import TrainState

Batch = dict[str, jax.Array]


def _psum(x: Any, axis_name: str | None) -> Any:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _loss_metrics(loss_fn, outputs, labels, per_example, mask, axis_name):
    metrics = {"loss": metrics_lib.Mean.from_values(per_example, mask)}
    for name, values in loss_fn.metrics(outputs, labels).items():
        metrics[name] = metrics_lib.Mean.from_values(values, mask)
    return _psum(metrics, axis_name)


def train_step(
    state: TrainState, batch: Batch, *, loss_fn, axis_name: str | None = None
) -> tuple[TrainState, dict[str, metrics_lib.Mean]]:
    """One optimizer step: forward, loss, gradient, (clipping and) update, metrics.

    Args:
      state: the current `TrainState`.
      batch: {"inputs": (B, ...), "labels": (B, ...), "mask": (B,) float32}.
      loss_fn: a `dlkit.losses` loss: `loss_fn(outputs, labels) -> (B,)` (or (B, T), one value
        per token, each weighed by its row's mask) and `.metrics(...)`.
      axis_name: the mapped axis under pmap; None under jit.
    Returns:
      (new_state, metrics): metrics are {"loss", <loss_fn.metrics>, "grad_norm"} as `Mean`s,
      summed over the global batch.
    """
    inputs, labels, mask = batch["inputs"], batch["labels"], batch["mask"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if axis_name is not None:
        # Devices see different rows, so they must draw different dropout masks.
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    mutable = list(state.model_state)

    def compute_loss(params):
        variables = {"params": params, **state.model_state}
        if mutable:
            outputs, model_state = state.apply_fn(
                variables, inputs, train=True, rngs={"dropout": key}, mutable=mutable
            )
        else:
            outputs = state.apply_fn(variables, inputs, train=True, rngs={"dropout": key})
            model_state = state.model_state
        per_example = loss_fn(outputs, labels)  # (B,), or (B, T) for a per-token loss
        # The mask weighs every element of its row, as in the metrics: a (B, T) loss is a mean
        # over the global batch's real tokens, a (B,) loss a mean over its real examples.
        weighted = metrics_lib.Mean.from_values(per_example, mask)
        denominator = jnp.maximum(_psum(weighted.count, axis_name), 1.0)
        return weighted.total / denominator, (outputs, per_example, model_state)

    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
    (_, (outputs, per_example, model_state)), grads = grad_fn(state.params)
    if axis_name is not None:
        grads = jax.lax.psum(grads, axis_name)
        # Running statistics (e.g. BatchNorm's) are averaged so every replica keeps the same.
        model_state = jax.lax.pmean(model_state, axis_name)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = _loss_metrics(loss_fn, outputs, labels, per_example, mask, axis_name)
    metrics["grad_norm"] = metrics_lib.Mean.scalar(optax.tree.norm(grads))
    new_state = state.replace(
        step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state
    )
    return new_state, metrics


def eval_step(
    state: TrainState, batch: Batch, *, loss_fn, axis_name: str | None = None
) -> dict[str, metrics_lib.Mean]:
    """Metrics of the model in inference mode (no dropout, running statistics) on `batch`.

    Args and batch as in `train_step`. Returns {"loss", <loss_fn.metrics>} as `Mean`s.
    """
    variables = {"params": state.params, **state.model_state}
    outputs = state.apply_fn(variables, batch["inputs"], train=False)
    per_example = loss_fn(outputs, batch["labels"])
    return _loss_metrics(loss_fn, outputs, batch["labels"], per_example, batch["mask"], axis_name)
