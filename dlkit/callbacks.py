"""Hooks into `fit`: what a run does besides stepping, without growing the loop.

`fit` owns the hot loop (step, metric accumulation, eval cadence, checkpoints, signals). Every
feature that only needs to *watch* a run, or to ask it to stop, is a `Callback`: early stopping,
TensorBoard, plots, the end-of-run diagnosis, the model summary. They see the run through one
`Run` object and never touch the compiled step, so they cannot cause a recompile or a
host-device sync in the hot loop: `on_row` only fires on logging/eval steps, with metrics the
loop has already fetched.

Why callbacks rather than more `if cfg.x:` blocks in `fit`: each feature lives in the module
named after it, is testable on its own (call its hooks with a fake `Run`), and users add their
own the same way:

    class PrintAccuracy(dlkit.Callback):
        def on_row(self, run, row):
            if "eval/accuracy" in row:
                run.log(f"acc {row['eval/accuracy']:.3f}")

    dlkit.fit(cfg, callbacks=[PrintAccuracy()])

Order of calls: `on_train_start` once, after the state is restored/created and the step is
compiled; `on_row` for every metric row (in step order); `on_train_end` once, after the last
checkpoint is written and waited for, and only if the run did not raise. `on_train_end` may
return a replacement `FitResult` (early stopping returns the best state).

Timing of rows: a row of train metrics alone reaches `on_row` one call late, once the next
call of the compiled step is queued, so the device computes while the host logs (the loop
never waits on a log read; see `dlkit.loop`). Its metrics are those of its own step; only
`run.get_state()` has moved on, and a stop it requests ends the run after the call in flight.
Rows with eval metrics, and those of checkpoint, stop and last steps, arrive at their step.
"""

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass
class Run:
    """What a callback may see of a running `fit`.

    Attributes:
      config: the run's Config.
      components: the built pieces (module, sources, strategy, loss, optimizer, schedule).
      workdir: the run's directory, or None when nothing is kept on disk.
      checkpointer: the run's Checkpointer, or None.
      log: prints a line above the progress bar (main process only).
      is_main: True on process 0 (write files only there).
      start_step: the step the run started (or resumed) from.
      compute_report: the compiled train step's FLOPs/memory report.
      get_state: returns the current TrainState (a device pytree; fetch only what you need).
      history: the run's metric rows so far (including those before a resume).
    """

    # The types are named in the docstring, not imported: the modules that define them
    # import this one.
    config: Any  # dlkit.Config
    components: Any  # dlkit.build.Components
    workdir: pathlib.Path | None
    checkpointer: Any  # dlkit.checkpoint.Checkpointer | None
    log: Callable[[str], None]
    is_main: bool
    start_step: int
    compute_report: dict[str, Any]
    get_state: Callable[[], Any]
    history: Any
    stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        """Asks `fit` to stop after the current step (a checkpoint of it is written).

        From a row of train metrics alone (delivered one call late, see the module doc) the
        current step is the one of the call in flight, K steps past the row's."""
        if self.stop_reason is None:
            self.stop_reason = reason


class Callback:
    """Base class: override the hooks you need; each default does nothing."""

    def on_train_start(self, run: Run) -> None:
        """Once, after the state exists and the step is compiled, before the first step."""

    def on_row(self, run: Run, row: dict[str, Any]) -> None:
        """After each metric row (train metrics on logging steps, eval metrics after evals)."""

    def on_train_end(self, run: Run, result: Any) -> Any:
        """Once, after the last checkpoint is durable, with the run's `dlkit.FitResult`.
        Return a FitResult to replace it (or None)."""
        return None


def check_callbacks(callbacks: Sequence[Any]) -> list[Callback]:
    """Validates the user's `callbacks=` argument before anything compiles."""
    out = []
    for i, cb in enumerate(callbacks):
        if not isinstance(cb, Callback):
            raise TypeError(
                f"fit(callbacks=...): item {i} must be a dlkit.Callback instance; "
                f"got {type(cb).__name__}"
            )
        out.append(cb)
    return out
