"""The NaN/Inf guard: an update is applied only when the loss and the gradients are finite.

    guard = nonfinite.init_guard()                            # lives in TrainState.guard
    ok, guard = nonfinite.check(guard, step, loss, grad_norm, spike_factor=0.0)
    params = nonfinite.select(ok, new_params, old_params)     # inside the compiled step

On the device every policy behaves the same: a non-finite step leaves params, optimizer state
and model state exactly as they were (so one bad batch can never poison the run, unlike
`optax.apply_if_finite`, which applies the update after `max_consecutive_errors` and leaves
NaN params for good). The guard counts what happened; the loop reads it on logging steps and
before every checkpoint and applies `train.nan_policy`:

- "raise": stop with FloatingPointError naming the first bad step and whether the loss or the
  gradients went non-finite (the state is still the last good one, and is not saved as a
  checkpoint);
- "skip": carry on, log `train/skipped_steps`, and stop once `train.max_consecutive_nonfinite`
  steps in a row were skipped.

`spike_factor > 0` also skips an update whose loss exceeds `spike_factor` times the running
mean of the applied losses (loss-spike skipping).
"""

import flax.struct
import jax
import jax.numpy as jnp

LOSS, GRADS, SPIKE = 1, 2, 4  # bits of Guard.first_kind / last_kind
_EMA_DECAY = 0.99


@flax.struct.dataclass
class Guard:
    """Counters of skipped updates (int32 / float32 scalars)."""

    streak: jax.Array  # consecutive skipped steps, 0 after an applied one
    skipped: jax.Array  # skipped steps in the whole run
    first_step: jax.Array  # step number of the first skipped update, -1 = none yet
    first_kind: jax.Array  # LOSS | GRADS | SPIKE bits of that step
    last_step: jax.Array  # step number of the latest skipped update, -1 = none
    last_kind: jax.Array
    loss_ema: jax.Array  # running mean of applied losses; 0 = none yet


def init_guard() -> Guard:
    i = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    return Guard(i(0), i(0), i(-1), i(0), i(-1), i(0), jnp.zeros((), jnp.float32))


def check(
    guard: Guard,
    step: jax.Array,
    loss: jax.Array,
    grad_norm: jax.Array,
    *,
    spike_factor: float = 0.0,
) -> tuple[jax.Array, Guard]:
    """Decides whether this step's update is applied, and updates the counters.

    Args:
      guard: the current counters.
      step: int32 scalar, the step being taken (before the increment).
      loss: float scalar, the global mean loss of the batch.
      grad_norm: float scalar, the global gradient norm.
      spike_factor: 0 = off; else skip when loss > spike_factor * running mean loss.
    Returns:
      (ok, guard): ok is a bool scalar, True when the update may be applied.
    """
    kind = jnp.where(jnp.isfinite(loss), 0, LOSS) | jnp.where(jnp.isfinite(grad_norm), 0, GRADS)
    if spike_factor > 0:
        spike = (guard.loss_ema > 0) & (loss > spike_factor * guard.loss_ema)
        kind = kind | jnp.where(spike & (kind == 0), SPIKE, 0)
    kind = kind.astype(jnp.int32)
    ok = kind == 0
    first = guard.first_step < 0
    ema = jnp.where(guard.loss_ema > 0, _EMA_DECAY * guard.loss_ema + (1 - _EMA_DECAY) * loss, loss)
    new = Guard(
        streak=jnp.where(ok, 0, guard.streak + 1),
        skipped=guard.skipped + jnp.where(ok, 0, 1),
        first_step=jnp.where(~ok & first, step, guard.first_step),
        first_kind=jnp.where(~ok & first, kind, guard.first_kind),
        last_step=jnp.where(ok, guard.last_step, step),
        last_kind=jnp.where(ok, guard.last_kind, kind),
        loss_ema=jnp.where(ok, ema.astype(jnp.float32), guard.loss_ema),
    )
    return ok, new


def select(ok: jax.Array, new, old):
    """`new` where ok else `old`, leaf by leaf (same structure)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def describe(kind: int) -> str:
    """ "the loss", "the gradients", ... for a kind bit set."""
    parts = []
    if kind & LOSS:
        parts.append("the loss")
    if kind & GRADS:
        parts.append("the gradients")
    text = " and ".join(parts) + " went non-finite (NaN or Inf)" if parts else ""
    if kind & SPIKE:
        text = "the loss spiked above train.loss_spike_factor x its running mean"
    return text


def enforce(guard, *, policy: str, max_consecutive: int) -> None:
    """Applies `train.nan_policy` to fetched (host) counters; raises FloatingPointError."""
    skipped, streak = int(guard.skipped), int(guard.streak)
    if policy == "raise" and skipped > 0:
        raise FloatingPointError(
            f"train.nan_policy=raise: at step {int(guard.first_step) + 1} "
            f"{describe(int(guard.first_kind))}; that update was not applied and no checkpoint "
            "was written after it. Lower the learning rate, set optim.grad_clip_norm, check "
            "the data, or use --set train.nan_policy=skip."
        )
    if policy == "skip" and streak >= max_consecutive:
        raise FloatingPointError(
            f"train.nan_policy=skip: {streak} consecutive updates were skipped, up to step "
            f"{int(guard.last_step) + 1} ({describe(int(guard.last_kind))}); stopping "
            f"(train.max_consecutive_nonfinite={max_consecutive})."
        )
