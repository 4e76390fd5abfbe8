"""Pictures and a summary of a run: `dlkit report WORKDIR`, and curves.png after training.

    dlkit report runs/digits_mlp      # prints the run summary, writes curves.png and,
                                      # for classifiers, confusion_matrix.png into the workdir

    info = dlkit.report.report("runs/digits_mlp")            # the same from Python
    matrix, step = dlkit.report.confusion_matrix("runs/digits_mlp")

The summary (experiment, steps done, best and last eval metrics, training time, checkpoints on
disk) is read from the workdir's files; the confusion matrix evaluates the newest checkpoint on
the run's eval split on one device (`dlkit.load_checkpoint`). `PlotsCallback`, on by default
when a run has a workdir (`train.plots`), writes curves.png at the end of every run. matplotlib
is optional (`pip install 'dlkit[plots]'`): without it the callback says so once and the run
goes on; `report` still prints the summary and says why no picture was written.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import jax
import numpy as np
from etils import epath

from dlkit import callbacks as callbacks_lib
from dlkit import data as data_lib
from dlkit import evaluation, parallel, storage
from dlkit import metrics as metrics_lib

_INSTALL_HINT = "pip install 'dlkit[plots]' (or pip install matplotlib)"


def has_matplotlib() -> bool:
    """Whether matplotlib is installed, found without importing it: the plots are drawn at the
    end of a run, and importing matplotlib at its start would delay the first step."""
    return importlib.util.find_spec("matplotlib") is not None


def _save_png(fig, path: str | os.PathLike) -> epath.Path:
    """Saves a matplotlib figure as a PNG at `path` (a local path or a `gs://` URL)."""
    path = epath.Path(path)
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def write_curves(history: metrics_lib.History, path: str | os.PathLike) -> epath.Path:
    """Saves `history.plot()` (train vs eval per metric, step on x) as a PNG at `path`."""
    return _save_png(history.plot(), path)


def _is_classifier(cfg, eval_source) -> bool:
    if cfg.loss.name != "softmax_cross_entropy":
        return False
    labels = data_lib.get_batch(eval_source, np.array([0]))["labels"]
    return labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer)


def confusion_matrix(
    workdir: str | os.PathLike,
    step: int | None = None,
    *,
    batch_size: int = 256,
    eval_source=None,
    model=None,
) -> tuple[np.ndarray, int]:
    """Counts (true class, predicted class) over the run's eval split, on one device.

    Args:
      workdir: a run's directory with checkpoints.
      step: the checkpoint; None = the newest valid one.
      batch_size: examples per compiled call (the last batch is padded, then cut).
      eval_source, model: as for `dlkit.evaluate` (needed when the run was given Python
        objects; without them the run's recorded data and model are used).
    Returns:
      (matrix, step): int64 (K, K), rows = true label, columns = argmax of the model's outputs,
      K = the model's number of outputs; `matrix.sum()` is the eval set size and
      `trace(matrix) / sum(matrix)` the accuracy. `step` is the checkpoint evaluated.
    Raises:
      ValueError: the run is not a classifier (softmax cross-entropy on one integer label
        per example).
    """
    workdir = storage.resolve(workdir, "workdir")
    strategy = parallel.make_strategy("jit", num_devices=1)
    with evaluation.open_existing(workdir) as ckpt:
        step = ckpt.valid_step(step)
    state, cfg = evaluation.load_checkpoint(workdir, step, strategy=strategy, model=model)
    c = evaluation.build_for(workdir, cfg, strategy, eval_source=eval_source, model=model)
    source = c.eval_source
    if not _is_classifier(cfg, source):
        raise ValueError(
            f"confusion_matrix: expected a classifier run (loss softmax_cross_entropy, one "
            f"integer label per example), got loss {cfg.loss.name!r} on data {cfg.data.name!r}"
        )

    @jax.jit
    def predict(state, inputs):
        variables = {"params": state.params, **state.model_state}
        return state.apply_fn(variables, inputs, train=False)  # (B, K)

    n = len(source)
    matrix = None
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        padded = np.resize(idx, batch_size)  # same shape every call: one compile
        batch = data_lib.get_batch(source, padded)
        logits = np.asarray(predict(state, batch["inputs"]))
        if matrix is None:
            matrix = np.zeros((logits.shape[-1],) * 2, np.int64)
        predicted = np.argmax(logits[: len(idx)], axis=-1)
        np.add.at(matrix, (batch["labels"][: len(idx)], predicted), 1)
    return matrix, step


def write_confusion_matrix(
    matrix: np.ndarray, path: str | os.PathLike, *, title: str = ""
) -> epath.Path:
    """Saves a (K, K) confusion matrix (rows true, columns predicted) as an annotated PNG."""
    fig = metrics_lib._matplotlib_figure()(figsize=(6, 5.2), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    k = matrix.shape[0]
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"{title} accuracy {accuracy:.2%} (n={matrix.sum()})".strip())
    if k <= 20:
        threshold = matrix.max() / 2
        for i in range(k):
            for j in range(k):
                color = "white" if matrix[i, j] > threshold else "black"
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color, size=7)
    return _save_png(fig, path)


def _train_seconds(history: metrics_lib.History) -> float:
    """Seconds spent in train steps (evals and checkpoints excluded), from perf/steps_per_s."""
    total, previous = 0.0, 0
    for row in history:
        rate = row.get("perf/steps_per_s")
        if rate and rate > 0:
            total += (row["step"] - previous) / rate
            previous = row["step"]
    return total


def run_summary(workdir: str | os.PathLike) -> dict[str, Any]:
    """What a run did, from its files: config.json, metrics.jsonl, checkpoints/.

    Returns:
      {"workdir", "experiment", "steps_done", "steps_planned", "last": {key: value} of the last
      eval row, "best": {key: {"value", "step"}} per eval metric (max for accuracy-like keys,
      min for losses), "train_seconds", "checkpoints": [steps on disk]}.
    """
    workdir = storage.resolve(workdir, "workdir")
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {workdir}; is it a run's workdir?")
    cfg = json.loads(config_path.read_text())
    history = metrics_lib.JsonlWriter(workdir / "metrics.jsonl").read()
    eval_keys = [k for k in history.keys() if k.startswith("eval/")]
    best = {}
    for key in eval_keys:
        steps, values = history.series(key)
        pick = np.argmin if "loss" in key or "error" in key else np.argmax
        i = int(pick(values))
        best[key] = {"value": values[i], "step": steps[i]}
    last_eval = next((r for r in reversed(history) if any(k in r for k in eval_keys)), {})
    ckpt_dir = workdir / "checkpoints"
    checkpoints = (
        sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
        if ckpt_dir.is_dir()
        else []
    )
    return {
        "workdir": str(workdir),
        "experiment": cfg.get("name", "?"),
        "steps_done": history[-1]["step"] if history else 0,
        "steps_planned": cfg.get("train", {}).get("steps"),
        "last": {k: v for k, v in last_eval.items() if k.startswith("eval/")},
        "best": best,
        "train_seconds": _train_seconds(history),
        "checkpoints": checkpoints,
    }


def format_summary(info: dict[str, Any]) -> str:
    """`run_summary`'s dict as the lines `dlkit report` prints."""
    lines = [
        f"run        {info['workdir']}",
        f"experiment {info['experiment']}",
        f"steps      {info['steps_done']} of {info['steps_planned']}",
        f"train time {info['train_seconds']:.1f} s (steps only, from perf/steps_per_s)",
        f"checkpoints on disk: {info['checkpoints'] or 'none'}",
    ]
    for key, value in info["last"].items():
        best = info["best"].get(key)
        line = f"{key:<20} last {value:.4f}"
        if best:
            line += f"   best {best['value']:.4f} at step {best['step']}"
        lines.append(line)
    return "\n".join(lines)


def report(
    workdir: str | os.PathLike, *, plots: bool = True, log=print, eval_source=None, model=None
) -> dict[str, Any]:
    """Prints a run's summary and writes curves.png (and confusion_matrix.png for classifiers,
    on the data the run evaluated on: see `confusion_matrix` for `eval_source` and `model`).

    Returns:
      `run_summary(workdir)` plus "files": the PNGs written, and for classifiers
      "confusion_matrix" (a nested list) and "confusion_step".
    """
    workdir = storage.resolve(workdir, "workdir")
    info = run_summary(workdir)
    log(format_summary(info))
    info["files"] = []
    if not plots:
        return info
    if not has_matplotlib():
        log(f"no plots written: matplotlib is not installed; {_INSTALL_HINT}")
        return info
    history = metrics_lib.JsonlWriter(workdir / "metrics.jsonl").read()
    if history:
        info["files"].append(str(write_curves(history, workdir / "curves.png")))
    if info["checkpoints"]:
        try:
            matrix, step = confusion_matrix(workdir, eval_source=eval_source, model=model)
        except ValueError as e:  # not a classifier: no confusion matrix, said why
            log(f"no confusion matrix: {e}")
        else:
            path = write_confusion_matrix(
                matrix, workdir / "confusion_matrix.png", title=f"{info['experiment']} step {step}"
            )
            info["files"].append(str(path))
            info["confusion_matrix"] = matrix.tolist()
            info["confusion_step"] = step
    for f in info["files"]:
        log(f"wrote {f}")
    return info


class PlotsCallback(callbacks_lib.Callback):
    """Writes WORKDIR/curves.png when a run ends (also after Ctrl-C), on process 0."""

    def on_train_end(self, run: callbacks_lib.Run, result) -> None:
        if run.is_main and run.workdir is not None and result.history:
            path = write_curves(result.history, run.workdir / "curves.png")
            run.log(f"wrote {path}")


_warned_no_matplotlib = False


def plots_from_config(cfg, workdir) -> PlotsCallback | None:
    """curves.png at the end of the run when `train.plots` is on and matplotlib is there."""
    global _warned_no_matplotlib
    if not cfg.train.plots or workdir is None:
        return None
    if not has_matplotlib():
        if not _warned_no_matplotlib:
            print(f"note: curves.png is not written: matplotlib is missing; {_INSTALL_HINT}")
            _warned_no_matplotlib = True
        return None
    return PlotsCallback()
