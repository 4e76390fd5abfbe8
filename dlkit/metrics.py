"""Metrics: device-side sums and counts, and the writers that record them.

A step returns `{name: Mean(total, count)}`; accumulating is a tree-wide add inside the compiled
step, so nothing leaves the device until a logging step fetches the sums:

    acc = dlkit.metrics.zeros_like(metrics_shape)
    acc = dlkit.metrics.merge(acc, step_metrics)        # on device, in the step
    dlkit.metrics.compute(jax.device_get(acc))          # {"loss": 0.31, "accuracy": 0.91}

Sums are reduced over devices inside the step (global arrays under jit, `psum` under pmap), so
a mean is the mean over the global batch whatever the device count.

Writers: `JsonlWriter` appends one JSON object per line (`{"step": 100, "train/loss": ...}`).
"""

import json
import math
import os
import pathlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Mean:
    """A weighted mean kept as (total, count), float32 scalars."""

    total: jax.Array
    count: jax.Array

    @classmethod
    def from_values(cls, values: jax.Array, weights: jax.Array) -> "Mean":
        """Sum of `values * weights` over every element, with `sum(weights)` as the count."""
        # A (B,) mask weighs every element of its row, e.g. each token of a (B, T) loss.
        weights = weights.reshape(weights.shape + (1,) * (values.ndim - weights.ndim))
        weights = jnp.broadcast_to(weights, values.shape)
        return cls(total=jnp.sum(values.astype(jnp.float32) * weights), count=jnp.sum(weights))

    @classmethod
    def scalar(cls, value: jax.Array) -> "Mean":
        """One observation of a scalar (e.g. the gradient norm of one step)."""
        return cls(total=jnp.asarray(value, jnp.float32), count=jnp.ones((), jnp.float32))


def merge(a: dict[str, Mean], b: dict[str, Mean]) -> dict[str, Mean]:
    """Elementwise sum of two metric trees of the same structure."""
    return jax.tree.map(jnp.add, a, b)


def zeros_like(metrics: Any) -> Any:
    """A zero accumulator shaped like `metrics` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), metrics)


def compute(metrics: dict[str, Mean], prefix: str = "") -> dict[str, float]:
    """Host-side means, `{prefix + name: total / count}`; NaN where the count is 0."""
    out = {}
    for name, m in metrics.items():
        count = float(m.count)
        out[prefix + name] = float(m.total) / count if count > 0 else math.nan
    return out


class History(list):
    """The run's metric rows (dicts with "step"), in order; a list with a few helpers."""

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of every row that has `key`."""
        rows = [r for r in self if key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    def last(self, key: str) -> float | None:
        """The latest value of `key`, or None."""
        for row in reversed(self):
            if key in row:
                return row[key]
        return None

    def keys(self) -> list[str]:
        """Every metric key that appears, in first-seen order."""
        seen: dict[str, None] = {}
        for row in self:
            seen.update(dict.fromkeys(k for k in row if k != "step"))
        return list(seen)


class JsonlWriter:
    """Appends metric rows to `path`, one JSON object per line, flushed on every write."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> History:
        """Rows already in the file (a missing file is empty; a torn last line is ignored)."""
        if not self.path.exists():
            return History()
        rows = History()
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash: everything after it is unreliable
        return rows

    def truncate_after(self, step: int) -> History:
        """Keeps the rows with step <= `step` and returns them.

        A resumed run restarts from its last checkpoint; rows a killed run wrote past that
        point are redone, so they are dropped rather than duplicated. Written to a temporary
        file and renamed, so a crash here leaves either the old or the new file.
        """
        rows = History(r for r in self.read() if r.get("step", 0) <= step)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)
        return rows

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
