"""TensorBoard event files: every metric row as scalars, in WORKDIR/tensorboard/.

    dlkit train digits_mlp --set train.tensorboard=true
    tensorboard --logdir runs/digits_mlp/tensorboard

JSONL (`metrics.jsonl`) is always written; this adds event files for TensorBoard, written
with tensorboardX (a light writer without TensorFlow: `pip install 'dlkit[tensorboard]'`).
It is a `Callback` the config turns on (`train.tensorboard`, default off). It sees only rows
the loop has already fetched, so it adds no device syncs. Process 0 writes; the file is
flushed after every row, so a killed run keeps what it logged. A resumed run appends a new
event file in the same directory; TensorBoard shows both as one run.
"""

from __future__ import annotations

import math
import os
from typing import Any

from etils import epath

from dlkit import callbacks as callbacks_lib
from dlkit import config as config_lib


def _summary_writer_class():
    try:
        import tensorboardX
    except ImportError as e:
        raise config_lib.ConfigError(
            "train.tensorboard: expected the tensorboardX package to be installed "
            "(pip install 'dlkit[tensorboard]'), got ImportError: tensorboardX not found; "
            "or set train.tensorboard=false"
        ) from e
    return tensorboardX.SummaryWriter


class TensorBoardCallback(callbacks_lib.Callback):
    """Writes each metric row's numbers as TensorBoard scalars (tag = metric key)."""

    def __init__(self, logdir: str | epath.PathLike):
        self.logdir = epath.Path(logdir)
        self._writer_class = _summary_writer_class()  # fail before anything compiles
        self.writer = None

    def on_train_start(self, run: callbacks_lib.Run) -> None:
        if run.is_main:
            self.writer = self._writer_class(logdir=os.fspath(self.logdir))

    def on_row(self, run: callbacks_lib.Run, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(key, float(value), global_step=step)
        self.writer.flush()

    def on_train_end(self, run: callbacks_lib.Run, result) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def from_config(cfg, workdir) -> TensorBoardCallback | None:
    """TensorBoard event files under WORKDIR/tensorboard when `train.tensorboard` is on."""
    if not cfg.train.tensorboard:
        return None
    if workdir is None:
        raise config_lib.ConfigError(
            "train.tensorboard: expected a workdir to write event files into "
            "(fit(cfg, workdir=...)), got workdir=None"
        )
    return TensorBoardCallback(epath.Path(workdir) / "tensorboard")
