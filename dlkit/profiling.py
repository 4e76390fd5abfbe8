"""A `jax.profiler` trace of chosen train steps: `train.profile_steps=START:STOP`.

    dlkit train digits_mlp --workdir runs/p --set train.profile_steps=100:110
    dlkit.fit(cfg, "runs/p", profile="100:110")       # or profile=(100, 110)

Steps START to STOP-1 (as a Python slice; steps count from 1) are traced into
WORKDIR/profile/ (`plugins/profile/<run>/<host>.xplane.pb`, plus a Perfetto trace). Each
compiled call is wrapped in `jax.profiler.StepTraceAnnotation("train", step_num=step)`, so
the viewers split the timeline into steps. Tracing starts just before the first chosen step,
so it never contains the compilation (step 1 does, with START=1), and stops after the device
finished the last chosen step. View it with TensorBoard's profile plugin / XProf
(`tensorboard --logdir WORKDIR/profile`, or `xprof WORKDIR/profile`) or open the
`.trace.json.gz` in https://ui.perfetto.dev (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import pathlib

import jax

from dlkit import errors


def parse_profile_steps(spec) -> tuple[int, int] | None:
    """(start, stop) of "START:STOP" or a (start, stop) pair; None for "" / None.

    Raises:
      ConfigError: naming train.profile_steps, unless 1 <= START < STOP.
    """
    if spec is None or spec == "":
        return None
    try:
        if isinstance(spec, str):
            start_s, stop_s = spec.split(":")
            start, stop = int(start_s), int(stop_s)
        else:
            start, stop = (int(x) for x in spec)
    except (ValueError, TypeError):
        start = stop = None
    if start is None or not 1 <= start < stop:
        raise errors.ConfigError(
            "train.profile_steps: expected START:STOP with 1 <= START < STOP (steps START to "
            f"STOP-1 are traced), got {spec!r}"
        )
    return start, stop


class StepProfiler:
    """Starts and stops the trace around the chosen steps; annotates each traced step."""

    def __init__(self, directory: pathlib.Path | None, start: int, stop: int):
        self.directory, self.start, self.stop = directory, start, stop
        self.tracing = False
        self.done = directory is None

    def step(self, step: int, k: int = 1):
        """A context for the compiled call that runs steps step-k+1 .. step."""
        if self.done or step < self.start:
            return contextlib.nullcontext()
        if not self.tracing:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after(self, step: int, outputs) -> None:
        """After the call for `step`: ends the trace once the last chosen step is done."""
        if self.tracing and step >= self.stop - 1:
            # The call only queued the work: wait for it so the trace holds the device time.
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
        self.done = True

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


NO_PROFILE = StepProfiler(None, 1, 2)


def from_config(cfg, workdir: pathlib.Path | None) -> StepProfiler:
    """The run's profiler (`NO_PROFILE` when `train.profile_steps` is empty).

    Raises:
      ConfigError: a bad `train.profile_steps`, or one without a workdir to write to.
    """
    steps = parse_profile_steps(cfg.train.profile_steps)
    if steps is None:
        return NO_PROFILE
    if workdir is None:
        raise errors.ConfigError(
            "train.profile_steps: the trace goes to WORKDIR/profile/, so a workdir is needed; "
            f"got {cfg.train.profile_steps!r} with workdir=None"
        )
    return StepProfiler(pathlib.Path(workdir) / "profile", *steps)
