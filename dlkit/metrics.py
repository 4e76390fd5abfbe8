"""Metrics: device-side sums and counts, and the writers that record them.

A step returns `{name: Mean(total, count)}`; accumulating is a tree-wide add inside the compiled
step, so nothing leaves the device until a logging step fetches the sums:

    acc = dlkit.metrics.zeros_like(metrics_shape)
    acc = dlkit.metrics.merge(acc, step_metrics)        # on device, in the step
    dlkit.metrics.compute(jax.device_get(acc))          # {"loss": 0.31, "accuracy": 0.91}

Sums are reduced over devices inside the step (global arrays under jit, `psum` under pmap), so
a mean is the mean over the global batch whatever the device count.

Writers: `JsonlWriter` appends one JSON object per line (`{"step": 100, "train/loss": ...}`);
`read_history(workdir)` reads a run's rows back as a `History`, which can plot itself:

    history = dlkit.metrics.read_history("runs/digits")
    fig = history.plot()            # train vs eval per metric, step on x (needs matplotlib)
"""

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from etils import epath

from dlkit import finite_json, storage


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

    def plot(self, keys: Sequence[str] | None = None, ax=None, *, label: str = ""):
        """Plots the curves: one panel per metric, train and eval on shared axes, step on x.

        Args:
          keys: metric names without their prefix (e.g. ["loss", "accuracy"]), or full keys
            ("perf/steps_per_s"). None = every metric that has an eval series, else "loss".
          ax: a matplotlib Axes (one key) or a sequence of Axes (one per key) to draw into,
            e.g. to overlay two runs; None = a new Figure.
          label: prefixed to each line's label ("run A train/loss"), to tell runs apart.
        Returns:
          The matplotlib Figure, made without pyplot (no global state): a notebook cell ending
          with it shows it (after `%matplotlib inline`); `fig.savefig("curves.png")` saves it.
        Raises:
          ImportError: matplotlib is not installed (`pip install 'dlkit[plots]'`).
          ValueError: a key names no metric in this history.
        """
        names = self._plot_names(keys)
        if ax is None:
            figure_cls = _matplotlib_figure()
            fig = figure_cls(figsize=(4.5 * len(names), 3.4), layout="constrained")
            axes = list(fig.subplots(1, len(names), squeeze=False)[0])
        else:
            axes = [ax] if hasattr(ax, "plot") else list(ax)
            if len(axes) != len(names):
                raise ValueError(
                    f"History.plot(ax=...): expected {len(names)} Axes (one per key in "
                    f"{names}), got {len(axes)}"
                )
            fig = axes[0].figure
        for axis, name in zip(axes, names, strict=True):
            full = [name] if "/" in name else [f"train/{name}", f"eval/{name}"]
            for key in full:
                steps, values = self.series(key)
                if steps:
                    style = "o-" if key.startswith("eval/") else "-"
                    axis.plot(steps, values, style, markersize=3, label=f"{label} {key}".strip())
            axis.set_title(name)
            axis.set_xlabel("step")
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize="small")
        return fig

    def _plot_names(self, keys: Sequence[str] | None) -> list[str]:
        available = self.keys()
        if keys is None:
            names = [k.removeprefix("eval/") for k in available if k.startswith("eval/")]
            names = names or ["loss"]
        else:
            names = [keys] if isinstance(keys, str) else list(keys)
        for name in names:
            candidates = [name] if "/" in name else [f"train/{name}", f"eval/{name}"]
            if not any(c in available for c in candidates):
                raise ValueError(
                    f"History.plot(keys=...): expected metric names from {available} (with or "
                    f"without the train/ or eval/ prefix), got {name!r}"
                )
        if not names:
            raise ValueError("History.plot(keys=...): expected at least one key, got none")
        return names


def _matplotlib_figure():
    """matplotlib's Figure class, imported on first use (an optional dependency)."""
    try:
        import matplotlib.figure
    except ImportError as e:
        raise ImportError(
            "plots need matplotlib: pip install 'dlkit[plots]' (or pip install matplotlib)"
        ) from e
    return matplotlib.figure.Figure


def read_history(workdir: str | os.PathLike, log=None) -> History:
    """The metric rows of a run, read from `workdir/metrics.jsonl`.

    Args:
      workdir: the run's directory.
      log: told about each unreadable line, which is skipped (default: print).
    Raises:
      FileNotFoundError: the workdir has no metrics.jsonl.
    """
    path = storage.resolve(workdir, "workdir") / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"read_history: no metrics.jsonl in {workdir}")
    return JsonlWriter(path).read(log=log)


class JsonlWriter:
    """Appends metric rows to `path`, one JSON object per line, flushed on every write.

    NaN and Inf values are written as the strings "NaN", "Infinity", "-Infinity" (valid JSON,
    see `dlkit.finite_json`) and read back as floats.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = storage.resolve(path, "metrics path")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def unreadable_path(self) -> epath.Path:
        """Where `truncate_after` keeps the lines it could not parse."""
        return self.path.with_name(self.path.name + ".unreadable")

    def _parse(self) -> tuple[History, list[tuple[int, str]]]:
        """(readable rows, [(line number, text)] of the lines that are not a JSON object)."""
        rows, bad = History(), []
        if not self.path.exists():
            return rows, bad
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = finite_json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
            else:
                bad.append((number, line))
        return rows, bad

    def read(self, log=None) -> History:
        """Rows in the file (a missing file is empty). A line that is not a JSON row (torn by a
        crash, or damaged) is skipped, said through `log` (default: print), and every row
        after it is still read."""
        rows, bad = self._parse()
        _report_unreadable(self.path, bad, log or print)
        return rows

    def truncate_after(self, step: int, log=None) -> History:
        """Keeps the rows with step <= `step` and returns them.

        A resumed run restarts from its last checkpoint; rows a killed run wrote past that
        point are redone, so they are dropped rather than duplicated. Lines that cannot be
        parsed are appended to `metrics.jsonl.unreadable` (never dropped) and said through
        `log`; the rows after them are kept. Written to a temporary file and renamed, so a
        crash here leaves either the old or the new file.
        """
        rows, bad = self._parse()
        if bad:
            storage.append_text(self.unreadable_path, "".join(line + "\n" for _, line in bad))
            _report_unreadable(self.path, bad, log or print, kept=self.unreadable_path)
        rows = History(r for r in rows if r["step"] <= step)
        storage.write_text_atomic(self.path, "".join(finite_json.dumps(r) + "\n" for r in rows))
        return rows

    def write(self, row: dict[str, Any]) -> None:
        storage.append_text(self.path, finite_json.dumps(row) + "\n")


def _report_unreadable(path, bad: list[tuple[int, str]], log, kept=None) -> None:
    if not bad:
        return
    numbers = ", ".join(str(n) for n, _ in bad[:10]) + (" ..." if len(bad) > 10 else "")
    where = f"; kept in {kept}" if kept is not None else "; skipped"
    log(f"warning: {path}: {len(bad)} unreadable line(s) (line {numbers}){where}")
