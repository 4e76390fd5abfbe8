"""K training steps per dispatch: `train.steps_per_dispatch`.

On a small model the host's work per step (Python, dispatch, the batch's host-to-device copy)
costs as much as the step itself. With `train.steps_per_dispatch = K` the compiled program
runs K optimizer steps one after another with `jax.lax.scan` over K stacked batches, adding
each step's metrics to the accumulator, and the loop advances K steps per call:

    cfg = dlkit.load_config("digits_mlp", overrides=["train.steps_per_dispatch=50"])
    dlkit.fit(cfg)            # same batches, same updates, 1/50 of the dispatches

Each of the K steps is exactly `steps.train_step` on the batch the loader gives for its
position, so a run matches K=1 step for step (to float rounding: XLA may fuse the scan body
differently from the single step; tests/test_dispatch.py checks it). Cadences count
optimizer steps as before, so they must be multiples of K; the checks here say so before
anything is compiled.
"""

from collections.abc import Iterator

import jax
import numpy as np

from dlkit import config as config_lib
from dlkit import metrics as metrics_lib
from dlkit import steps
from dlkit.data.loader import Loader, stack_batches


def check_config(cfg: config_lib.Config, start_step: int = 0) -> int:
    """Validates `train.steps_per_dispatch` against the run's cadences; returns K.

    Args:
      cfg: the run's config.
      start_step: the step the run starts from (a resumed run's checkpoint step).
    Raises:
      ConfigError: K < 1, or train.steps / log_every / eval_every / checkpoint.every_steps /
        the resume step not a multiple of K (the loop only stops between dispatches).
    """
    k = cfg.train.steps_per_dispatch
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise config_lib.ConfigError(f"train.steps_per_dispatch: expected an int >= 1, got {k!r}")
    scan_unroll(cfg)
    if k == 1:
        return k
    cadences = {
        "train.steps": cfg.train.steps,
        "train.log_every": cfg.train.log_every,
        "train.eval_every": cfg.train.eval_every,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
    }
    for key, value in cadences.items():
        if value % k:
            raise config_lib.ConfigError(
                f"{key}: expected a multiple of train.steps_per_dispatch={k} (the loop sees "
                f"only every {k}th step), got {value}"
            )
    if start_step % k:
        raise config_lib.ConfigError(
            f"train.steps_per_dispatch: expected a divisor of the resume step {start_step} "
            f"(the checkpoint this run continues from), got {k}"
        )
    return k


MAX_AUTO_UNROLL = 10


def scan_unroll(cfg: config_lib.Config) -> int:
    """The K-step loop's unroll (`train.scan_unroll`), validated; 1 when K = 1.

    Auto (0) is the largest divisor of K up to MAX_AUTO_UNROLL. Why: XLA:CPU pays a fixed
    cost per loop iteration (the carry, the loop's own kernels) that is large next to a
    small model's step. The bench MLP at K=50, hand-written scan, 5 alternating rounds,
    medians (docs/performance.md): unroll 1: 3201 steps/s, 4: 3359, 8: 3599, 10: 3659,
    25: 2802, 50: 1895 (past ~10 the program outgrows the instruction cache). Compile time
    grows with it (0.39 s at 1, 1.56 s at 10, 9.9 s at 50), which is why K > 1 is for small
    models and `train.scan_unroll=1` is there for large ones. A divisor, so that every
    iteration is alike and the compute report's FLOPs per step stay exact.

    Raises:
      ConfigError: not an int >= 0, or not a divisor of K.
    """
    k = cfg.train.steps_per_dispatch
    u = cfg.train.scan_unroll
    if isinstance(u, bool) or not isinstance(u, int) or u < 0:
        raise config_lib.ConfigError(
            f"train.scan_unroll: expected an int >= 0 (0 = auto), got {u!r}"
        )
    if k == 1:
        return 1
    if u == 0:
        return max(d for d in range(1, min(k, MAX_AUTO_UNROLL) + 1) if k % d == 0)
    if k % u:
        raise config_lib.ConfigError(
            f"train.scan_unroll: expected a divisor of train.steps_per_dispatch={k}, got {u}"
        )
    return u


def stack(batches: Iterator[dict[str, np.ndarray]], k: int) -> Iterator[dict[str, np.ndarray]]:
    """Groups an iterator of batches into stacked batches of k: each leaf (B, ...) -> (K, B, ...).

    Ends when fewer than k batches remain (the training loader never ends). A `Loader`
    reads its k batches at once (`Loader.next_stacked`: the same arrays).
    """
    if isinstance(batches, Loader):
        while True:
            yield batches.next_stacked(k)
    while True:
        group = []
        for _ in range(k):
            try:
                group.append(next(batches))
            except StopIteration:
                return
        yield stack_batches(group)


def scan_steps(state, acc, batches, *, loss_fn, axis_name=None, unroll=1, **step_options):
    """K train steps over `batches` (leaves (K, B, ...)) with `lax.scan`, metrics summed,
    `unroll` steps per loop iteration (see `scan_unroll`).

    Args:
      state: the `TrainState`.
      acc: the metric accumulator (as `metrics.merge` takes it).
      batches: stacked batches, each leaf with a leading axis of K steps.
      loss_fn, axis_name, step_options: as `steps.train_step` takes them.
      unroll: steps per iteration of the compiled loop (a divisor of K).
    Returns:
      (state, acc) after the K steps.
    """

    def body(carry, batch):
        state, acc = carry
        state, metrics = steps.train_step(
            state, batch, loss_fn=loss_fn, axis_name=axis_name, **step_options
        )
        return (state, metrics_lib.merge(acc, metrics)), None

    (state, acc), _ = jax.lax.scan(body, (state, acc), batches, unroll=unroll)
    return state, acc
