"""Learning-rate range test: train briefly with an exponentially growing rate, suggest one.

    dlkit lr-find digits_mlp                       # runs/digits_mlp/lr_find/lr_find.{png,json}

    cfg = dlkit.load_config("fashion_mnist_cnn")
    result = dlkit.lr_finder.lr_find(cfg, "runs/lr", min_lr=1e-6, max_lr=1.0, num_steps=100)
    result.suggested_lr, result.method          # e.g. 3e-3, "min_loss/10"

The sweep (Smith 2015, "Cyclical Learning Rates", section 3.3): starting from the config's fresh
initialisation, step k of K trains with rate min_lr * (max_lr / min_lr) ** (k / (K - 1)), an
`optax.exponential_decay` schedule with a growth factor, so the rate changes inside the one
compiled step and the sweep compiles once. The optimizer is the config's (name, betas,
momentum, weight decay, clipping) with that schedule in place of the config's. Each step's
training loss is recorded and smoothed by a bias-corrected exponential moving average; the
sweep stops early once the smoothed loss exceeds `diverge_factor` x its best (or is NaN/Inf).

The suggestion: by default a tenth of the rate at the smoothed loss's minimum ("min_loss/10").
The rate at the minimum itself is already at the edge of divergence, and a tenth of it is
where the loss was still falling fast. The other common rule, the steepest descent of the
smoothed loss against log(rate) ("steepest"), is reported too and can be chosen with
`suggest="steepest"`, but on a short sweep it often lands on noise in the flat low-rate part of
the curve, so it is not the default.

Nothing of a run is touched: no checkpoint is read or written, only `lr_find.json` and
`lr_find.png` in the output directory.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np
import optax

from dlkit import components, finite_json, optim, precision, step_wrappers
from dlkit import config as config_lib
from dlkit import metrics as metrics_lib

SUGGESTIONS = ("min_loss/10", "steepest")


@dataclasses.dataclass
class LRFindResult:
    """What `lr_find` measured and suggests.

    Attributes:
      lrs, losses, smoothed: per step run (at most `num_steps`): the rate, the batch's training
        loss and the smoothed loss.
      suggested_lr: the suggestion, by `method`.
      method: "min_loss/10" or "steepest" (see the module docstring).
      min_loss_lr: the rate at the smoothed loss's minimum.
      steepest_lr: the rate where the smoothed loss falls fastest against log(rate), before
        the minimum; None when the minimum is within the first 3 points.
      loss_at_suggestion: the smoothed loss at `suggested_lr` (interpolated in log(rate)).
      diverged: True if the sweep stopped early because the loss blew up.
      files: paths written (lr_find.json, lr_find.png).
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested_lr: float
    method: str
    min_loss_lr: float
    steepest_lr: float | None
    loss_at_suggestion: float
    diverged: bool
    num_steps: int
    files: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite losses (a diverged last step) become None."""

        def clean(v):
            if isinstance(v, list):
                return [clean(x) for x in v]
            return None if isinstance(v, float) and not np.isfinite(v) else v

        return {k: clean(v) for k, v in dataclasses.asdict(self).items()}

    def summary(self) -> str:
        steepest = "n/a" if self.steepest_lr is None else f"{self.steepest_lr:.3g}"
        stop = (
            f"stopped at step {len(self.lrs)} of {self.num_steps} (loss diverged)"
            if self.diverged
            else f"{len(self.lrs)} steps"
        )
        return (
            f"lr-find: suggested learning rate {self.suggested_lr:.3g} ({self.method}); "
            f"min loss at {self.min_loss_lr:.3g}, steepest descent at {steepest}; {stop}"
        )


def _check_args(min_lr, max_lr, num_steps, smoothing, diverge_factor, suggest) -> None:
    if not min_lr > 0:
        raise ValueError(f"min_lr: expected a float > 0, got {min_lr}")
    if not max_lr > min_lr:
        raise ValueError(f"max_lr: expected a float > min_lr={min_lr}, got {max_lr}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 5:
        raise ValueError(f"num_steps: expected an int >= 5, got {num_steps!r}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing: expected a float in [0, 1), got {smoothing}")
    if not diverge_factor > 1:
        raise ValueError(f"diverge_factor: expected a float > 1, got {diverge_factor}")
    if suggest not in SUGGESTIONS:
        raise ValueError(f"suggest: expected one of {SUGGESTIONS}, got {suggest!r}")


def suggest_lr(
    lrs: np.ndarray, smoothed: np.ndarray, method: str = "min_loss/10"
) -> tuple[float, float, float | None]:
    """(suggested, min_loss_lr, steepest_lr) from a sweep's rates (K,) and smoothed losses (K,)."""
    lrs, smoothed = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
    finite = np.isfinite(smoothed)
    best = int(np.argmin(np.where(finite, smoothed, np.inf)))
    min_loss_lr = float(lrs[best])
    steepest_lr = None
    if best >= 2:  # a slope needs points before the minimum
        slope = np.gradient(smoothed[: best + 1], np.log(lrs[: best + 1]))
        # The minimum's own one-sided slope is the last drop into it, not the descent.
        steepest_lr = float(lrs[int(np.argmin(slope[:best]))])
    if method == "steepest" and steepest_lr is not None:
        return steepest_lr, min_loss_lr, steepest_lr
    return min_loss_lr / 10, min_loss_lr, steepest_lr


def lr_find(
    cfg: config_lib.Config,
    out_dir: str | pathlib.Path | None = None,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_steps: int = 100,
    smoothing: float = 0.9,
    diverge_factor: float = 4.0,
    suggest: str = "min_loss/10",
    module=None,
    train_source=None,
    strategy=None,
) -> LRFindResult:
    """Runs the range test on `cfg`'s model, data and optimizer.

    Args:
      cfg: the run's Config (train.batch_size, train.seed, optim.* except the schedule).
      out_dir: where lr_find.json and lr_find.png go; None = write nothing.
      min_lr, max_lr: the first and the last rate of the sweep.
      num_steps: K, the steps of the sweep (one batch each).
      smoothing: the moving average's decay (0 = no smoothing).
      diverge_factor: stop once the smoothed loss exceeds this multiple of its best.
      suggest: "min_loss/10" or "steepest".
      module, train_source, strategy: replace the config's choice (see `dlkit.build`).
    Returns:
      An `LRFindResult`.
    """
    _check_args(min_lr, max_lr, num_steps, smoothing, diverge_factor, suggest)
    # The sweep never evaluates: all of a given train_source trains (none is held out for eval).
    c = components.build(
        cfg,
        module=module,
        train_source=train_source,
        eval_source=train_source,
        strategy=strategy,
    )
    # rate(k) = min_lr * (max_lr / min_lr) ** (k / (K - 1)): exponential growth, in the step.
    schedule = optax.exponential_decay(min_lr, num_steps - 1, max_lr / min_lr)
    o = cfg.optim
    tx, _ = optim.make_optimizer(
        o.name,
        schedule,
        total_steps=num_steps,
        momentum=o.momentum,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        grad_clip_norm=o.grad_clip_norm,
    )
    if c.policy.loss_scaling:
        tx = precision.with_loss_scaling(tx)
    c = dataclasses.replace(c, tx=tx, schedule=schedule)
    strategy = c.strategy
    state = c.init_state()
    acc_spec = c.abstract_metrics(state)
    # The sweep's steps are the run's without augmentation or EMA: it asks how the loss
    # answers the learning rate alone.
    step = c.train_step(augment=None, ema_decay=0.0)
    train_fn = strategy.compile_train(
        step_wrappers.accumulating(step), strategy.state_shardings(state)
    )
    loader = c.train_loader()
    batches = strategy.batches(iter(loader), cfg.data.prefetch)
    lrs, losses, smoothed = [], [], []
    avg, best, diverged = 0.0, np.inf, False
    try:
        for k in range(num_steps):
            state, acc = train_fn(state, strategy.zeros(acc_spec), next(batches))
            loss = metrics_lib.compute(jax.device_get(acc))["loss"]  # one sync per step
            avg = smoothing * avg + (1 - smoothing) * loss
            value = avg / (1 - smoothing ** (k + 1))  # bias-corrected
            lrs.append(float(schedule(k)))
            losses.append(float(loss))
            smoothed.append(float(value))
            best = min(best, value)
            if not np.isfinite(value) or value > diverge_factor * best:
                diverged = True
                break
    finally:
        batches.close()
        if hasattr(loader, "close"):  # a GrainLoader: stops its worker processes
            loader.close()

    suggested, min_loss_lr, steepest_lr = suggest_lr(np.array(lrs), np.array(smoothed), suggest)
    method = suggest if (suggest != "steepest" or steepest_lr is not None) else "min_loss/10"
    finite = np.isfinite(smoothed)
    at = float(
        np.interp(np.log(suggested), np.log(np.array(lrs)[finite]), np.array(smoothed)[finite])
    )
    result = LRFindResult(
        lrs, losses, smoothed, suggested, method, min_loss_lr, steepest_lr, at, diverged, num_steps
    )
    if out_dir is not None and strategy.process_index == 0:
        result.files = _write(result, pathlib.Path(out_dir))
    return result


def _write(result: LRFindResult, out_dir: pathlib.Path) -> list[str]:
    """Writes lr_find.json and (with matplotlib) lr_find.png; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "lr_find.json"
    files = [str(json_path)]
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print("lr-find: matplotlib is not installed (pip install 'dlkit[plots]'); no plot")
    else:
        png = out_dir / "lr_find.png"
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss")
        ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed loss")
        ax.axvline(
            result.suggested_lr, color="C3", ls="--", label=f"suggested {result.suggested_lr:.2g}"
        )
        ax.axvline(result.min_loss_lr, color="0.4", ls=":", label="min loss")
        if result.steepest_lr is not None:
            ax.axvline(result.steepest_lr, color="C2", ls=":", label="steepest descent")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        finite = [v for v in result.losses if np.isfinite(v)]
        top = 1.5 * max(result.smoothed[0], result.losses[0])
        if np.isfinite(top):  # the diverged tail would flatten the rest of the curve
            ax.set_ylim(min(0.0, min(finite)), top)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)
        files.append(str(png))
    result.files = files
    json_path.write_text(finite_json.dumps(result.to_dict(), indent=2) + "\n")
    return files
