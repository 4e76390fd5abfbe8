"""dlkit.data.audit: planted problems are found exactly (counts and indices), and `fit` obeys
data.audit (fail raises before compiling, warn logs and writes audit.json)."""

import json

import numpy as np
import pytest

import dlkit
from dlkit.data import audit, datasets, sources
from dlkit.data.validate import DataError
from tests.conftest import tiny_digits_config


def _planted():
    """train: 200 x 6 float32 with planted problems; eval: 50 rows, two copied from train."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    y = np.array([0] * 120 + [1] * 60 + [2] * 20, np.int32)
    x[[10, 11]] = x[3]  # duplicates of row 3 (same label 0)
    x[20] = x[5]  # duplicate of row 5
    x[30] = x[7]  # duplicate of row 7 with another label: a conflict
    y[30] = 1
    x[50, 2] = np.nan
    x[60, 0] = np.inf
    x[:, 5] = 1.0  # a constant feature
    xe = rng.normal(size=(50, 6)).astype(np.float32)
    ye = (np.arange(50) % 3).astype(np.int32)
    xe[4], ye[4] = x[100], y[100]  # leakage
    xe[9], ye[9] = x[150], y[150]
    return sources.ArraySource(inputs=x, labels=y), sources.ArraySource(inputs=xe, labels=ye)


def test_planted_problems_are_found_exactly():
    train, eval_ = _planted()
    report = audit.audit_datasets(train, eval_)
    assert {(i.check, i.split) for i in report.issues} == {
        ("duplicates", "train"),
        ("conflicting_labels", "train+eval"),
        ("nonfinite", "train"),
        ("constant_features", "train"),
        ("class_imbalance", "train"),
        ("leakage", "train+eval"),
    }
    dups = report.find("duplicates", "train")
    assert dups.count == 4  # rows 10, 11, 20, 30 repeat an earlier row
    assert sorted(sorted(g) for g in dups.examples) == [[3, 10, 11], [5, 20], [7, 30]]
    leak = report.find("leakage")
    assert leak.severity == "error" and leak.count == 2
    assert leak.examples == [{"eval": 4, "train": 100}, {"eval": 9, "train": 150}]
    conflict = report.find("conflicting_labels")
    assert conflict.count == 2
    assert conflict.examples == [
        [
            {"split": "train", "index": 7, "label": 0},
            {"split": "train", "index": 30, "label": 1},
        ]
    ]
    nonfinite = report.find("nonfinite")
    assert (nonfinite.count, nonfinite.examples) == (2, [50, 60])
    assert report.stats["train"]["nonfinite_values"] == 2
    assert report.stats["train"]["nan_values"] == 1
    constant = report.find("constant_features")
    assert (constant.count, constant.examples, constant.severity) == (1, [5], "info")
    s = report.stats["train"]
    assert s["class_counts"] == {0: 119, 1: 61, 2: 20}
    assert s["imbalance_ratio"] == pytest.approx(119 / 20)
    assert report.stats["eval"]["duplicate_examples"] == 0
    assert report.stats["eval"]["constant_features"] == 0
    # Ranges are over the finite values.
    finite = train.arrays["inputs"][np.isfinite(train.arrays["inputs"])]
    assert s["min"] == pytest.approx(float(finite.min()))
    assert s["max"] == pytest.approx(float(finite.max()))
    assert sorted(i.check for i in report.errors) == ["conflicting_labels", "leakage", "nonfinite"]
    d = json.loads(json.dumps(report.to_dict()))
    assert len(d["issues"]) == 6
    text = report.format()
    assert "leakage: 2 of 50 eval examples (4.00%)" in text
    assert "train: 4 exact duplicate examples (3 groups" in text


def test_clean_data_has_no_issues_and_sampling_is_reported():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = (np.arange(300) % 3).astype(np.int32)
    report = audit.audit_datasets(sources.ArraySource(inputs=x, labels=y), max_examples=100)
    assert report.issues == []
    assert report.stats["train"]["num_examples"] == 300
    assert report.stats["train"]["num_audited"] == 100
    assert "a random sample of 100" in report.format()


def test_token_sequences_skip_what_does_not_apply():
    tokens = np.tile(np.arange(8, dtype=np.int32), (10, 1))  # 10 identical sequences
    src = sources.ArraySource(inputs=tokens, labels=np.roll(tokens, -1, axis=1))
    report = audit.audit_datasets(src)
    assert [(i.check, i.count) for i in report.issues] == [("duplicates", 9)]
    assert "class_counts" not in report.stats["train"]
    assert report.skipped and "token sequences" in report.skipped[0]


def _leaky_eval():
    train = datasets.load_dataset("digits", "train")
    leaked = sources.ArraySource(**{k: v[:20] for k, v in train.arrays.items()})
    return train, leaked


def test_fit_with_audit_fail_raises_before_compiling():
    train, leaked = _leaky_eval()
    strategy = dlkit.make_strategy("jit")
    with pytest.raises(DataError, match=r"data.audit=fail: leakage: 20 of 20 eval examples"):
        dlkit.fit(
            tiny_digits_config(**{"data.audit": "fail"}),
            train_source=train,
            eval_source=leaked,
            strategy=strategy,
        )
    assert strategy.trace_counts.get("train", 0) == 0


def test_fit_with_audit_warn_logs_and_writes_the_report(tmp_path, capsys):
    train, leaked = _leaky_eval()
    cfg = tiny_digits_config(**{"train.steps": 2, "train.eval_every": 0})
    result = dlkit.fit(cfg, tmp_path, train_source=train, eval_source=leaked)
    assert int(result.state.step) == 2
    out = capsys.readouterr().out
    assert "warning: data audit: 1 error(s) (leakage[train+eval]=20" in out
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert [i["count"] for i in saved["issues"] if i["check"] == "leakage"] == [20]


def test_bad_audit_setting_is_rejected():
    with pytest.raises(dlkit.ConfigError, match=r"data.audit: expected one of warn \| fail"):
        dlkit.fit(tiny_digits_config(**{"data.audit": "strict"}))


def test_cli_audit_prints_writes_json_and_fails_on_leakage(tmp_path, capsys):
    from dlkit import cli

    out_json = tmp_path / "audit.json"
    assert cli.main(["audit", "digits_mlp", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "train: 1437 examples" in text and "eval: 360 examples" in text
    saved = json.loads(out_json.read_text())
    assert saved["stats"]["train"]["num_examples"] == 1437
    assert {(i["check"], i["split"], i["count"]) for i in saved["issues"]} == {
        ("constant_features", "train", 4),
        ("constant_features", "eval", 6),
    }
    # Evaluating on the training split is total leakage; data.audit=fail makes it exit 1.
    argv = ["audit", "digits_mlp", "--set", "data.eval_split=train", "--set", "data.audit=fail"]
    assert cli.main(argv) == 1
    assert "leakage: 1437 of 1437 eval examples (100.00%)" in capsys.readouterr().out
