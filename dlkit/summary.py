"""Model summary: parameters per layer with shapes, dtypes and bytes, and the totals.

    table = dlkit.summary.summarize(state)      # a TrainState, or any params pytree
    print(table)                                 # one row per array, then the totals
    table.total_params, table.total_bytes        # numbers, e.g. for a test or a log

`fit` prints this table at the start of a run (process 0) and writes it to
`WORKDIR/summary.txt` (see `SummaryCallback`). Only shapes and dtypes are read, so it works on
abstract states (`jax.ShapeDtypeStruct`s) and on sharded arrays (global shapes) without
fetching anything from the devices. Model state that is not trained (e.g. BatchNorm
statistics) is listed and counted separately from the parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from dlkit import callbacks as callbacks_lib


@dataclasses.dataclass(frozen=True)
class Entry:
    """One array: its path in the tree ("Dense_0/kernel"), shape, dtype, size and bytes."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    count: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class Summary:
    """The arrays of a model, trained parameters and other model state apart.

    Attributes:
      params: one Entry per parameter array, in tree order.
      model_state: one Entry per non-trained variable (e.g. "batch_stats/BatchNorm_0/mean").
    """

    params: tuple[Entry, ...]
    model_state: tuple[Entry, ...] = ()

    @property
    def total_params(self) -> int:
        return sum(e.count for e in self.params)

    @property
    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.params)

    @property
    def state_count(self) -> int:
        return sum(e.count for e in self.model_state)

    @property
    def state_bytes(self) -> int:
        return sum(e.bytes for e in self.model_state)

    def __str__(self) -> str:
        rows = [("parameter", "shape", "dtype", "count", "bytes")]
        rows += [_cells(e) for e in self.params]
        rows.append(("total", "", "", f"{self.total_params:,}", _human(self.total_bytes)))
        if self.model_state:
            rows.append(("model state (not trained)", "", "", "", ""))
            rows += [_cells(e) for e in self.model_state]
            rows.append(
                ("total model state", "", "", f"{self.state_count:,}", _human(self.state_bytes))
            )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for i, r in enumerate(rows):
            lines.append(
                "  ".join(
                    c.ljust(w) if j < 3 else c.rjust(w)
                    for j, (c, w) in enumerate(zip(r, widths, strict=True))
                ).rstrip()
            )
            if i == 0:
                lines.append("-" * len(lines[0]))
        return "\n".join(lines)


def _cells(e: Entry) -> tuple[str, str, str, str, str]:
    return (e.path, str(e.shape), e.dtype, f"{e.count:,}", _human(e.bytes))


def _human(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _entries(tree: Any) -> tuple[Entry, ...]:
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = "/".join(_key_name(k) for k in path)
        shape = tuple(int(d) for d in leaf.shape)
        dtype = np.dtype(leaf.dtype)
        count = int(np.prod(shape, dtype=np.int64))
        out.append(Entry(name, shape, dtype.name, count, count * dtype.itemsize))
    return tuple(out)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def summarize(params_or_state: Any) -> Summary:
    """Lists every array of a model with its shape, dtype, element count and bytes.

    Args:
      params_or_state: a `TrainState` (its `params` and `model_state` are summarised), a
        Flax variables dict ({"params": ..., "batch_stats": ...}), or a params pytree. Leaves
        may be arrays or `jax.ShapeDtypeStruct`s; only shapes and dtypes are read.
    Returns:
      A `Summary`; `str(summary)` is the printable table. Bytes are count * itemsize of the
      whole (global) array, not per device.
    """
    tree = params_or_state
    if hasattr(tree, "params") and hasattr(tree, "model_state"):
        return Summary(_entries(tree.params), _entries(tree.model_state))
    if isinstance(tree, dict) and "params" in tree:
        rest = {k: v for k, v in tree.items() if k != "params"}
        return Summary(_entries(tree["params"]), _entries(rest))
    return Summary(_entries(tree))


class SummaryCallback(callbacks_lib.Callback):
    """Prints the model summary when a run starts and writes it to WORKDIR/summary.txt."""

    def on_train_start(self, run: callbacks_lib.Run) -> None:
        if not run.is_main:
            return
        text = str(summarize(run.get_state()))
        run.log(text)
        if run.workdir is not None:
            (run.workdir / "summary.txt").write_text(text + "\n")


def from_config(cfg, workdir) -> SummaryCallback | None:
    """The model summary when `train.summary` is on."""
    return SummaryCallback() if cfg.train.summary else None
