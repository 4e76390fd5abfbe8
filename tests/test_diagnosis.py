"""The end-of-run diagnosis on synthetic histories (overfitting, healthy, underfitting)."""

import json

import pytest

from dlkit import diagnosis


def _history(train_loss, eval_loss, train_acc=None, eval_acc=None, skipped=0, every=100):
    rows = []
    for i, (t, e) in enumerate(zip(train_loss, eval_loss, strict=True)):
        row = {"step": every * (i + 1), "train/loss": t, "train/skipped_steps": skipped}
        if e is not None:
            row["eval/loss"] = e
        if train_acc is not None:
            row["train/accuracy"] = train_acc[i]
        if eval_acc is not None and e is not None:
            row["eval/accuracy"] = eval_acc[i]
        rows.append(row)
    return rows


def test_overfitting_run():
    rows = _history(
        [2.0, 1.0, 0.5, 0.2, 0.1],
        [2.1, 1.2, 0.9, 1.0, 1.3],
        train_acc=[0.3, 0.7, 0.9, 0.97, 1.0],
        eval_acc=[0.3, 0.6, 0.75, 0.74, 0.72],
    )
    report = diagnosis.diagnose(rows)
    assert report["verdict"] == "overfitting"
    assert report["overfitting"] is True
    assert report["overfitting_onset_step"] == 300
    # A classifier is judged by eval accuracy: best 0.75 at step 300, then worse.
    assert report["best"] == {"metric": "eval/accuracy", "step": 300, "value": 0.75}
    assert report["evidence"] == (
        "eval/accuracy best 0.75 at step 300, last 0.72 at step 500 (-4.0%); "
        "train loss 0.5 -> 0.1 over the same steps"
    )
    assert report["final"] == {
        "step": 500,
        "train/loss": 0.1,
        "eval/loss": 1.3,
        "train/accuracy": 1.0,
        "eval/accuracy": 0.72,
    }
    assert report["gap"]["loss"] == pytest.approx(1.2)
    assert report["gap"]["accuracy"] == pytest.approx(0.28)
    assert report["train_loss_fell"] is True and report["underfitting"] is False
    assert report["skipped_steps"] == 0
    text = diagnosis.format_diagnosis(report)
    assert "overfitting from step 300: eval/accuracy got worse" in text
    assert "  evidence: eval/accuracy best 0.75 at step 300" in text
    json.dumps(report)  # serialisable as diagnosis.json


def test_healthy_run():
    report = diagnosis.diagnose(_history([2.0, 1.0, 0.6, 0.5], [2.0, 1.1, 0.7, 0.65]))
    assert report["verdict"] == "healthy"
    assert report["overfitting"] is False and report["overfitting_onset_step"] is None
    assert report["best"]["step"] == 400
    assert report["advice"] == []


def test_eval_loss_rising_while_train_loss_is_flat_is_not_overfitting():
    report = diagnosis.diagnose(_history([1.0, 0.5, 0.5, 0.5], [1.0, 0.6, 0.7, 0.8]))
    assert report["overfitting"] is False  # train loss did not fall after the eval minimum


def test_underfitting_run_and_skipped_steps():
    report = diagnosis.diagnose(_history([2.30, 2.31, 2.29, 2.30], [2.3] * 4, skipped=3))
    assert report["verdict"] == "underfitting"
    assert report["train_loss_fell"] is False and report["underfitting"] is True
    assert report["skipped_steps"] == 3
    assert any("learning rate" in a for a in report["advice"])
    assert any("3 update(s) were skipped" in a for a in report["advice"])


def test_eval_loss_rising_while_accuracy_improves_is_not_overfitting():
    # The flagship job's shape: eval loss bottoms early, eval accuracy keeps rising.
    rows = _history(
        [2.0, 1.0, 0.5, 0.3, 0.2],
        [2.0, 0.8, 0.7, 0.9, 1.1],
        train_acc=[0.3, 0.7, 0.85, 0.92, 0.96],
        eval_acc=[0.3, 0.70, 0.80, 0.82, 0.83],
    )
    report = diagnosis.diagnose(rows)
    assert report["verdict"] == "healthy"
    assert report["overfitting"] is False and report["overfitting_onset_step"] is None
    assert report["best"] == {"metric": "eval/accuracy", "step": 500, "value": 0.83}
    assert report["eval_loss_rose_from_step"] == 300
    assert any("eval loss rose after step 300" in a for a in report["advice"])
    text = diagnosis.format_diagnosis(report)
    assert "diagnosis: healthy" in text and "overfitting" not in text
    # Judged by eval loss on purpose (e.g. early stopping on it), the same history overfits.
    by_loss = diagnosis.diagnose(rows, metric="eval/loss", mode="min")
    assert by_loss["verdict"] == "overfitting" and by_loss["overfitting_onset_step"] == 300


def test_accuracy_within_tolerance_of_its_best_is_not_evidence():
    rows = _history(
        [2.0, 1.0, 0.5, 0.3],
        [2.0, 0.8, 0.9, 1.0],
        train_acc=[0.3, 0.7, 0.9, 0.95],
        eval_acc=[0.3, 0.800, 0.801, 0.797],  # 0.5% below the best: noise, not overfitting
    )
    assert diagnosis.diagnose(rows)["verdict"] == "healthy"


def test_best_by_another_metric_and_mode():
    rows = _history([2.0, 1.0, 0.5], [2.0, 1.0, 1.1], eval_acc=[0.5, 0.8, 0.8], train_acc=[0] * 3)
    report = diagnosis.diagnose(rows, metric="eval/accuracy", mode="max")
    assert report["best"] == {"metric": "eval/accuracy", "step": 200, "value": 0.8}


def test_too_short_a_history():
    report = diagnosis.diagnose([{"step": 10, "train/loss": 1.0}])
    assert report["verdict"] == "not enough data"
    assert report["best"] is None and report["gap"] == {}
