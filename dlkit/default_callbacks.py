"""The callbacks a `Config` turns on, in the order they run.

    cbs = dlkit.default_callbacks.from_config(cfg, workdir)   # what `fit` runs before yours

An explicit list rather than registration at import time, so the order never depends on which
module happened to be imported first: the fast_dev_run check, early stopping (its log lines
come before the diagnosis's), the end-of-run diagnosis, the curves plot, the model summary,
TensorBoard. Each factory is `(cfg, workdir) -> Callback | None` and lives with its callback.
"""

import pathlib

from dlkit import callbacks, debugging, diagnosis, early_stopping, report, summary, tensorboard

FACTORIES = (
    debugging.fast_dev_run_check,
    early_stopping.from_config,
    diagnosis.from_config,
    report.plots_from_config,
    summary.from_config,
    tensorboard.from_config,
)


def from_config(cfg, workdir: pathlib.Path | None) -> list[callbacks.Callback]:
    """The callbacks `cfg` turns on, in `FACTORIES` order."""
    return [cb for factory in FACTORIES if (cb := factory(cfg, workdir)) is not None]
