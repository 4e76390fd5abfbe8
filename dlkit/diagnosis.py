"""The end-of-run diagnosis: did the run overfit, underfit, or go well?

    report = dlkit.diagnosis.diagnose(result.history)       # a dict, see `diagnose`
    print(dlkit.diagnosis.format_diagnosis(report))

`fit` runs it at the end of every run (`train.diagnosis`, on by default): it prints the
summary and writes `diagnosis.json` and `diagnosis.txt` into the workdir. It reads only the
metric history, so it costs nothing during training and works on any `metrics.jsonl`:

    rows = dlkit.metrics.JsonlWriter("runs/x/metrics.jsonl").read()
    dlkit.diagnosis.diagnose(rows)

Caveats: `train/loss` is the mean over the last logging interval, measured with dropout and
augmentation on (and on the raw weights), while `eval/loss` is on clean data (and on the EMA
weights when `train.ema_decay` > 0); so with strong regularisation a negative gap is normal.
"""

from __future__ import annotations

import math
from typing import Any

from dlkit import callbacks, finite_json
from dlkit import config as config_lib


def _series(history, key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in history if isinstance(r.get(key), int | float)]
    return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]


def _last_at_or_before(steps: list[int], values: list[float], step: int) -> float | None:
    out = None
    for s, v in zip(steps, values, strict=True):
        if s <= step:
            out = v
    return out


def monitored_metric(history) -> tuple[str, str]:
    """(metric, mode) a run is judged by: eval/accuracy (max) when the history has it (a
    classifier), else eval/loss (min)."""
    if any(isinstance(r.get("eval/accuracy"), int | float) for r in history):
        return "eval/accuracy", "max"
    return "eval/loss", "min"


def diagnose(
    history, *, metric: str | None = None, mode: str = "min", tolerance: float = 0.01
) -> dict[str, Any]:
    """Reads a run's metric rows and says what happened.

    Args:
      history: metric rows (dicts with "step"), e.g. `FitResult.history` or a read
        metrics.jsonl; uses train/loss, eval/loss, train/accuracy, eval/accuracy and
        train/skipped_steps where present.
      metric, mode: the metric the run is judged by (e.g. the early stopping metric); it
        ranks evaluations for "best" and is the only evidence for "overfitting". None =
        `monitored_metric(history)` (eval accuracy for classifiers, else eval loss).
      tolerance: relative change below which a value counts as flat (0.01 = 1%).
    Returns:
      {"verdict": "overfitting" | "underfitting" | "healthy" | "not enough data",
       "last_step": int | None,
       "best": {"metric", "step", "value"} or None,
       "final": {"step", "train/loss", "eval/loss", "train/accuracy", "eval/accuracy"}
                (keys present in the history),
       "gap": {"loss": eval - train, "accuracy": train - eval} (where both exist),
       "overfitting": bool, "overfitting_onset_step": int | None (the best step of the
                monitored metric when it then got worse by more than `tolerance` while train
                loss fell),
       "evidence": str (one line: what the monitored metric and train loss did),
       "eval_loss_rose_from_step": int | None (eval loss rose past `tolerance` after this
                step; a warning only when the monitored metric is not eval loss),
       "train_loss_fell": bool | None (the lowest later train loss is more than `tolerance`
                below the first), "underfitting": bool (it did not fall),
       "skipped_steps": int (non-finite/spike updates skipped),
       "advice": [str, ...]}.
    """
    history = list(history)
    if metric is None:
        metric, mode = monitored_metric(history)
    train_steps, train_loss = _series(history, "train/loss")
    eval_steps, eval_loss = _series(history, "eval/loss")
    out: dict[str, Any] = {
        "verdict": "not enough data",
        "last_step": max((int(r["step"]) for r in history), default=None),
        "best": None,
        "final": {},
        "gap": {},
        "overfitting": False,
        "overfitting_onset_step": None,
        "evidence": "",
        "eval_loss_rose_from_step": None,
        "train_loss_fell": None,
        "underfitting": False,
        "skipped_steps": 0,
        "advice": [],
    }
    m_steps, m_values = _series(history, metric)
    finite = [(v, s) for s, v in zip(m_steps, m_values, strict=True) if math.isfinite(v)]
    if finite:
        # Best value; ties go to the earlier step (as checkpoint.keep_best ranks them).
        value, step = min(finite, key=lambda vs: (vs[0] if mode == "min" else -vs[0], vs[1]))
        out["best"] = {"metric": metric, "step": step, "value": value}

    final = {}
    for key in ("train/loss", "eval/loss", "train/accuracy", "eval/accuracy"):
        steps, values = _series(history, key)
        if values:
            final[key] = values[-1]
    if final:
        out["final"] = {"step": out["last_step"], **final}
    if "train/loss" in final and "eval/loss" in final:
        out["gap"]["loss"] = final["eval/loss"] - final["train/loss"]
    if "train/accuracy" in final and "eval/accuracy" in final:
        out["gap"]["accuracy"] = final["train/accuracy"] - final["eval/accuracy"]
    _, skipped = _series(history, "train/skipped_steps")
    out["skipped_steps"] = int(skipped[-1]) if skipped else 0

    if len(train_loss) >= 2:
        fell = min(train_loss[1:]) < train_loss[0] * (1 - tolerance)
        out["train_loss_fell"] = fell
        out["underfitting"] = not fell
    out["eval_loss_rose_from_step"] = _worsened_from(
        eval_steps, eval_loss, "min", tolerance, train_steps, train_loss
    )
    onset = _worsened_from(m_steps, m_values, mode, tolerance, train_steps, train_loss)
    if onset is not None:
        out["overfitting"] = True
        out["overfitting_onset_step"] = onset
    out["evidence"] = _evidence(out, metric, m_steps, m_values, train_steps, train_loss)

    advice = out["advice"]
    if out["underfitting"]:
        out["verdict"] = "underfitting"
        advice.append(
            "train loss never fell: check the learning rate (try the LR range test or 3-10x "
            "lower/higher), the labels, and that the model can fit one batch"
        )
    elif out["overfitting"]:
        out["verdict"] = "overfitting"
        advice.append(
            f"{metric} was best at step {out['overfitting_onset_step']} and got worse after "
            "while train loss kept falling: stop earlier (train.early_stopping_metric), add "
            "augmentation (data.*), label smoothing, weight decay, dropout or an EMA"
        )
    elif out["train_loss_fell"] is not None and m_values:
        out["verdict"] = "healthy"
        rose = out["eval_loss_rose_from_step"]
        if rose is not None and metric != "eval/loss":
            advice.append(
                f"eval loss rose after step {rose} while {metric} did not get worse: the model "
                "grows more confident on the examples it gets wrong; watch it if you use its "
                "probabilities (label smoothing or an earlier stop calibrate them)"
            )
    if out["skipped_steps"]:
        advice.append(
            f"{out['skipped_steps']} update(s) were skipped for non-finite or spiking loss: "
            "lower the learning rate or clip gradients (optim.grad_clip_norm)"
        )
    return out


def _worsened_from(steps, values, mode, tolerance, train_steps, train_loss) -> int | None:
    """The best step of `values` if the series then got worse by more than `tolerance`
    (relative) by its last value while train loss fell after that step; else None."""
    finite = [(v, s) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    if len(finite) < 2 or not train_loss:
        return None
    sign = 1.0 if mode == "min" else -1.0
    best, onset = min(finite, key=lambda vs: (sign * vs[0], vs[1]))
    last = values[-1]
    worse = (
        last > best + tolerance * abs(best)
        if mode == "min"
        else last < best - tolerance * abs(best)
    )
    train_at_onset = _last_at_or_before(train_steps, train_loss, onset)
    train_fell_after = train_at_onset is not None and train_loss[-1] < train_at_onset * (
        1 - tolerance
    )
    if onset < steps[-1] and math.isfinite(last) and worse and train_fell_after:
        return onset
    return None


def _evidence(out, metric, m_steps, m_values, train_steps, train_loss) -> str:
    """One line: the monitored metric's best and last values and what train loss did."""
    if out["best"] is None or not m_values:
        return f"no {metric} in the history"
    best = out["best"]
    last, last_step = m_values[-1], m_steps[-1]
    change = last - best["value"]
    rel = f" ({change / abs(best['value']):+.1%})" if best["value"] else ""
    line = (
        f"{metric} best {best['value']:.4g} at step {best['step']}, last {last:.4g} at step "
        f"{last_step}{rel}"
    )
    train_at = _last_at_or_before(train_steps, train_loss, best["step"])
    if train_at is not None and train_loss:
        line += f"; train loss {train_at:.4g} -> {train_loss[-1]:.4g} over the same steps"
    return line


def format_diagnosis(report: dict[str, Any]) -> str:
    """A few lines of text for the end of a run."""
    lines = [f"diagnosis: {report['verdict']}"]
    if report.get("evidence"):
        lines.append(f"  evidence: {report['evidence']}")
    best = report["best"]
    if best:
        lines.append(f"  best {best['metric']} = {best['value']:.4f} at step {best['step']}")
    final = report["final"]
    if final:
        parts = [f"{k}={v:.4f}" for k, v in final.items() if k != "step"]
        lines.append(f"  final (step {final['step']}): " + "  ".join(parts))
    gap = report["gap"]
    if gap:
        parts = []
        if "loss" in gap:
            parts.append(f"eval - train loss = {gap['loss']:+.4f}")
        if "accuracy" in gap:
            parts.append(f"train - eval accuracy = {gap['accuracy']:+.4f}")
        lines.append("  gap: " + ", ".join(parts))
    if report["overfitting"]:
        lines.append(
            f"  overfitting from step {report['overfitting_onset_step']}: "
            f"{report['best']['metric']} got worse while train loss fell"
        )
    if report["skipped_steps"]:
        lines.append(f"  skipped updates: {report['skipped_steps']}")
    lines += [f"  advice: {a}" for a in report["advice"]]
    return "\n".join(lines)


class Diagnosis(callbacks.Callback):
    """At the end of `fit`: prints the diagnosis and writes diagnosis.json / .txt (main
    process, when the run has a workdir). `result.diagnosis`-style access: `self.report`."""

    def __init__(self, metric: str | None = None, mode: str = "min"):
        self.metric, self.mode = metric, mode
        self.report: dict[str, Any] | None = None

    def on_train_end(self, run: callbacks.Run, result):
        self.report = diagnose(result.history, metric=self.metric, mode=self.mode)
        text = format_diagnosis(self.report)
        run.log(text)
        if run.is_main and run.workdir is not None:
            (run.workdir / "diagnosis.json").write_text(
                finite_json.dumps(self.report, indent=2) + "\n"
            )
            (run.workdir / "diagnosis.txt").write_text(text + "\n")
        return None


def from_config(cfg, workdir) -> Diagnosis | None:
    """On when `train.diagnosis`; judges by the early stopping metric when one is set, else
    by `monitored_metric` (eval accuracy for classifiers)."""
    if not cfg.train.diagnosis:
        return None
    if cfg.train.early_stopping_metric:
        metric = cfg.train.early_stopping_metric
        return Diagnosis(
            metric,
            config_lib.metric_mode(
                metric, cfg.train.early_stopping_mode, "train.early_stopping_mode"
            ),
        )
    return Diagnosis()
