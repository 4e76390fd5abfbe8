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

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dlkit import metrics as metrics_lib
from dlkit import nonfinite, optim, precision
from dlkit.data import augment as augment_lib
from dlkit.state import TrainState

Batch = dict[str, jax.Array]
# Augmentation draws from its own stream of the run's key: fold_in(rng, step) stays the dropout
# key, so turning augmentation on leaves dropout masks unchanged.
AUGMENT_STREAM = 0x61756721


def _psum(x: Any, axis_name: str | None) -> Any:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _loss_metrics(loss_fn, outputs, labels, per_example, mask, axis_name):
    metrics = {"loss": metrics_lib.Mean.from_values(per_example, mask)}
    for name, values in loss_fn.metrics(outputs, labels).items():
        metrics[name] = metrics_lib.Mean.from_values(values, mask)
    return _psum(metrics, axis_name)


def gather_batch(data: dict[str, jax.Array], batch: Batch) -> Batch:
    """`batch` of example indices ({"index": int (..., B), "mask"}) as the rows of `data` they
    index: {key: data[key][index], ..., "mask"} (`data.on_device`: the dataset is on the device,
    and the step gathers its own rows). The loader's indices are always in bounds."""
    rows = {k: v.at[batch["index"]].get(mode="promise_in_bounds") for k, v in data.items()}
    return {**rows, "mask": batch["mask"]}


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    loss_fn,
    axis_name: str | None = None,
    loss_spike_factor: float = 0.0,
    grad_accum_steps: int = 1,
    augment: augment_lib.Augment | None = None,
    ema_decay: float = 0.0,
) -> tuple[TrainState, dict[str, metrics_lib.Mean]]:
    """One optimizer step: forward, loss, gradient, (clipping and) update, metrics.

    Args:
      state: the current `TrainState`.
      batch: {"inputs": (B, ...), "labels": (B, ...), "mask": (B,) float32}.
      loss_fn: a `dlkit.losses` loss: `loss_fn(outputs, labels) -> (B,)` (or (B, T), one value
        per token, each weighed by its row's mask) and `.metrics(...)`.
      axis_name: the mapped axis under pmap; None under jit.
      loss_spike_factor: skip updates whose loss exceeds this multiple of the running mean
        loss; 0 = off. Non-finite losses or gradients are always skipped (see `nonfinite`).
      grad_accum_steps: N > 1 splits the batch into N micro-batches of B/N rows, run one after
        another by `lax.scan` inside this step (peak activation memory of B/N rows); the summed
        gradient is that of the whole batch. B/N must split evenly over the devices.
      augment: a `dlkit.data.augment.Augment` applied to the batch (before it is split into
        micro-batches) with a key of its own per step, `fold_in(fold_in(rng, AUGMENT_STREAM),
        step)`, so dropout keys do not change when it is turned on; examples are keyed by
        their global row, so jit and pmap augment identically. None = off.
      ema_decay: d > 0 updates `state.ema_params` (which must exist) after each applied
        update to the bias-corrected exponential average of the weights so far (see
        `ema_decay_at`); a skipped update leaves it unchanged. 0 = off.
    Returns:
      (new_state, metrics): metrics are {"loss", <loss_fn.metrics>, "grad_norm"} as `Mean`s,
      summed over the global batch. A skipped update leaves params, optimizer and model
      state unchanged, and is counted in `new_state.guard`.
    """
    root = jax.random.wrap_key_data(state.rng)
    if augment is not None and augment.enabled:
        aug_key = jax.random.fold_in(jax.random.fold_in(root, AUGMENT_STREAM), state.step)
        row_offset = 0
        if axis_name is not None:
            row_offset = jax.lax.axis_index(axis_name) * batch["mask"].shape[0]
        batch = augment(aug_key, batch, row_offset)
    key = jax.random.fold_in(root, state.step)
    if axis_name is not None:
        # Devices see different rows, so they must draw different dropout masks.
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    # Real rows in the global batch (over devices and micro-batches).
    denominator = jnp.maximum(_psum(jnp.sum(batch["mask"]), axis_name), 1.0)
    loss_scale = precision.loss_scale_of(state.opt_state)  # None unless float16
    if grad_accum_steps == 1:
        grads, model_state, metrics = _grads_and_metrics(
            state, state.model_state, batch, key, denominator, loss_fn, loss_scale
        )
    else:
        grads, model_state, metrics = _accumulate(
            state, batch, key, denominator, loss_fn, grad_accum_steps, loss_scale
        )
    metrics = _psum(metrics, axis_name)
    if axis_name is not None:
        grads = jax.lax.psum(grads, axis_name)
        # Running statistics (e.g. BatchNorm's) are averaged so every replica keeps the same.
        model_state = jax.lax.pmean(model_state, axis_name)
    if loss_scale is not None:
        # float16: the optimizer (precision.with_loss_scaling) skips non-finite steps.
        grads = loss_scale.unscale(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optim.global_norm(grads)
    metrics["grad_norm"] = metrics_lib.Mean.scalar(grad_norm)
    guarded_grad_norm = grad_norm
    if loss_scale is not None:
        metrics["loss_scale"] = metrics_lib.Mean.scalar(opt_state.loss_scale.scale)
        # float16: overflowing gradients are how the optimizer finds its scale (it skips those
        # steps itself), not a NaN-policy event, so the guard below then watches the loss alone.
        guarded_grad_norm = jnp.zeros((), jnp.float32)
    mean_loss = metrics["loss"].total / jnp.maximum(metrics["loss"].count, 1.0)
    ok, guard = nonfinite.check(
        state.guard, state.step, mean_loss, guarded_grad_norm, spike_factor=loss_spike_factor
    )
    params, opt_state, model_state = nonfinite.select(
        ok, (params, opt_state, model_state), (state.params, state.opt_state, state.model_state)
    )
    ema_params = state.ema_params
    if ema_decay > 0:
        if ema_params is None:
            raise ValueError(
                "train_step(ema_decay=...): expected a state with ema_params (create it with "
                f"ema=True), got ema_decay={ema_decay} and state.ema_params=None"
            )
        decay = ema_decay_at(ema_decay, state.step + 1 - guard.skipped)
        moved = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
        # On a skipped step params are the old ones: the average must not move either.
        ema_params = nonfinite.select(ok, moved, ema_params)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        model_state=model_state,
        opt_state=opt_state,
        guard=guard,
        ema_params=ema_params,
    )
    return new_state, metrics


def ema_decay_at(decay: float, t: jax.Array) -> jax.Array:
    """The decay of the bias-corrected EMA at its t-th update (t >= 1), float32 scalar.

    With d_t = d (1 - d^(t-1)) / (1 - d^t), the recurrence ema_t = d_t ema_(t-1) + (1 - d_t) p_t
    gives ema_t = sum_k (1 - d) d^(t-k) p_k / (1 - d^t) over the updated weights p_1..p_t:
    the zero-initialised, debiased average of `optax.ema(debias=True)`, with no trace of the
    initial weights (d_1 = 0, so ema_1 = p_1).
    """
    t = jnp.asarray(t, jnp.float32)
    return decay * (1.0 - decay ** (t - 1.0)) / (1.0 - decay**t)


def _grads_and_metrics(
    state: TrainState, model_state, batch: Batch, key, denominator, loss_fn, loss_scale=None
):
    """This device's gradient of sum(mask * loss) / denominator, the new model state, and the
    metric sums of `batch` (not yet reduced over a pmap axis)."""
    inputs, labels, mask = batch["inputs"], batch["labels"], batch["mask"]
    mutable = list(model_state)

    def compute_loss(params):
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
        # The row mask weighs every element of its row, as in the metrics: a (B, T) loss is a
        # mean over the global batch's real tokens, a (B,) loss a mean over its real rows.
        # `denominator` counts global rows; the elements per row are static.
        elements_per_row = math.prod(per_example.shape[1:])
        weighted = metrics_lib.Mean.from_values(per_example, mask)
        loss = weighted.total / (denominator * elements_per_row)
        if loss_scale is not None:
            loss = loss_scale.scale_loss(loss)
        return loss, (outputs, per_example, new_model_state)

    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
    (_, (outputs, per_example, new_model_state)), grads = grad_fn(state.params)
    metrics = _loss_metrics(loss_fn, outputs, labels, per_example, mask, None)
    return grads, new_model_state, metrics


def _accumulate(state: TrainState, batch: Batch, key, denominator, loss_fn, n: int, loss_scale):
    """`_grads_and_metrics` summed over `n` micro-batches with `lax.scan` (one program)."""
    b = batch["mask"].shape[0]
    if b % n:
        raise ValueError(
            f"train.grad_accum_steps: expected a divisor of the per-step batch {b}, got {n}"
        )

    def split(x):
        # Micro-batch i takes rows i, i + n, i + 2n, ...: each device's contiguous block of
        # the batch stays on that device in every micro-batch (no data movement).
        return x.reshape((b // n, n) + x.shape[1:]).swapaxes(0, 1)  # (N, B/N, ...)

    micro = jax.tree.map(split, batch)

    def body(carry, xs):
        grads_sum, model_state, metrics_sum = carry
        i, micro_batch = xs
        grads, model_state, metrics = _grads_and_metrics(
            state,
            model_state,
            micro_batch,
            jax.random.fold_in(key, i),
            denominator,
            loss_fn,
            loss_scale,
        )
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, model_state, metrics_lib.merge(metrics_sum, metrics)), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(
        lambda: _grads_and_metrics(
            state, state.model_state, first, key, denominator, loss_fn, loss_scale
        )
    )
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (shapes[0], shapes[2]))
    init = (zeros[0], state.model_state, zeros[1])
    (grads, model_state, metrics), _ = jax.lax.scan(body, init, (jnp.arange(n), micro))
    return grads, model_state, metrics


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
