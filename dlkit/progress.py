"""What a run shows and records while it trains: the progress bar and the metric rows.

    bar = ProgressBar(enabled=True, total=2000, initial=0)
    rows = RowLog(bar, history, writer, callbacks, run, schedule, compute_report, cfg)
    rows.count(k)                                    # after each call of the train program
    rows.emit({"step": s, **rows.train_row(s, acc, state.guard)})

`RowLog` holds the logging and timing state of `fit`'s loop in one place: when the current
interval started, how many steps it holds, how much of it was spent outside training (evals,
checkpoints), and a row of train metrics set aside to be read one call late (`defer`), so
the device computes the next call while the host logs.
"""

import contextlib
import sys
import time
from typing import Any

import jax
import tqdm.auto

from dlkit import compute, nonfinite
from dlkit import metrics as metrics_lib


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython is only looked at if already imported)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def bar_renders() -> bool:
    """A progress bar redraws in place only in a terminal or a notebook; in a log file or a
    pipe each redraw would be another line, so there the loop prints metric rows instead."""
    return in_notebook() or sys.stderr.isatty()


class ProgressBar:
    """A tqdm bar (terminal or notebook) that is silent where it should be; a context
    manager that closes the bar."""

    def __init__(self, enabled: bool, total: int, initial: int, is_main: bool = True):
        enabled = enabled and bar_renders()
        self.bar = tqdm.auto.tqdm(
            total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not enabled
        )
        self.enabled = enabled
        self.is_main = is_main

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def show(self, **values: float) -> None:
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def write(self, text: str) -> None:
        """A line above the bar (or on stdout without one), from the main process only."""
        if self.enabled:
            self.bar.write(text)
        elif self.is_main:
            print(text, flush=True)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def format_row(row: dict[str, Any]) -> str:
    """`step 100  train/loss=0.1234  ...`: a metric row as one printed line.

    Floats are shown to 5 significant digits so a row stays short (metrics.jsonl keeps the
    full value).
    """
    parts = [f"step {row['step']}"]
    parts += [f"{k}={v:.5g}" for k, v in row.items() if k != "step" and isinstance(v, float)]
    return "  ".join(parts)


def enforce_health(guard, cfg) -> int:
    """Applies `train.nan_policy` to fetched guard counters; returns the skipped steps.

    Raises:
      FloatingPointError: the policy stops the run (see `dlkit.nonfinite.enforce`).
    """
    nonfinite.enforce(
        guard, policy=cfg.train.nan_policy, max_consecutive=cfg.train.max_consecutive_nonfinite
    )
    return int(guard.skipped)


@jax.jit
def _copy(tree):
    """Fresh device copies of `tree`'s arrays, queued behind the step that made them."""
    return jax.tree.map(jax.numpy.copy, tree)


class RowLog:
    """The metric rows of one `fit`: their timing, their reading from the device, and where
    they go (the history, metrics.jsonl, the bar or stdout, the callbacks)."""

    def __init__(self, bar, history, writer, callbacks, run, schedule, report, cfg):
        self.bar, self.history, self.writer = bar, history, writer
        self.callbacks, self.run = callbacks, run
        self.schedule, self.report, self.cfg = schedule, report, cfg
        self.interval_start = time.perf_counter()
        self.interval_steps = 0
        self.paused = 0.0  # seconds of the interval spent on evals and checkpoints
        self._deferred: tuple[int, Any, Any, int] | None = None
        self.rows_read = 0

    def count(self, steps: int) -> None:
        """`steps` more optimizer steps were queued in this interval."""
        self.interval_steps += steps
        self.bar.update(steps)

    @contextlib.contextmanager
    def pause(self):
        """Time inside is left out of `perf/steps_per_s` (evals, checkpoints)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - t

    def train_row(self, step: int, acc, guard) -> dict[str, Any]:
        """The train metrics of this interval's steps up to `step`, read from the device now
        (this waits for them) with the guard counters they ended on; starts a new interval."""
        return self._read(step, acc, guard, self._end_interval())

    def defer(self, step: int, acc, guard) -> None:
        """Sets this interval's train row aside, to be read after the next call is queued
        (`emit_deferred`). The step donates the state, so the guard counters get copies."""
        self._deferred = (step, acc, _copy(guard), self._end_interval())

    def emit_deferred(self) -> None:
        """Reads and emits the row set aside by `defer`, if any."""
        if self._deferred is not None:
            step, acc, guard, steps = self._deferred
            self._deferred = None
            self.emit({"step": step, **self._read(step, acc, guard, steps)})

    def emit(self, row: dict[str, Any]) -> None:
        """Records `row` and shows it: with a bar, only rows with eval metrics get a line
        (train metrics show in the bar); without one (logs, batch jobs), every row does."""
        self.history.append(row)
        if self.writer is not None:
            self.writer.write(row)
        if "eval/loss" in row or not self.bar.enabled:
            self.bar.write(format_row(row))
        for cb in self.callbacks:
            cb.on_row(self.run, row)

    def _end_interval(self) -> int:
        steps, self.interval_steps = self.interval_steps, 0
        return steps

    def _read(self, step: int, acc, guard, steps: int) -> dict[str, Any]:
        acc_host, guard_host = jax.device_get((acc, guard))
        row = metrics_lib.compute(acc_host, prefix="train/")
        row["train/skipped_steps"] = enforce_health(guard_host, self.cfg)
        elapsed = time.perf_counter() - self.interval_start - self.paused
        row["train/learning_rate"] = float(self.schedule(step - 1))
        row["perf/steps_per_s"] = steps / max(elapsed, 1e-9)
        # Text datasets' examples are sequences of seq_len tokens: tokens/s applies there.
        text = self.cfg.data.name in ("text", "kjv")
        row.update(
            compute.perf_metrics(
                self.report,
                row["perf/steps_per_s"],
                examples_per_step=self.cfg.train.batch_size,
                tokens_per_example=self.cfg.data.seq_len if text else 0,
                # A first run on a machine measures the CPU peak at the second row, not at
                # the first: the first row is part of start-up.
                measure_peak=self.rows_read > 0,
            )
        )
        self.rows_read += 1
        self.bar.show(loss=row["train/loss"])
        self.interval_start, self.paused = time.perf_counter(), 0.0
        return row
