"""A run remembers its data (run.json): evaluation after the run uses the data the run
evaluated on, or refuses when they were Python objects and none are given; `fit` never
evaluates on the config's dataset when it was given other training data."""

import json

import numpy as np
import pytest
from conftest import tiny_digits_config

import dlkit
from dlkit import cli, run_record
from dlkit.data import ArraySource
from dlkit.data.datasets import load_dataset


def _own_data():
    # The digits, relabelled: other data than the config's digits, so evaluating the config's
    # dataset instead gives a visibly different accuracy.
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    relabel = lambda s: ArraySource(  # noqa: E731
        inputs=s.arrays["inputs"], labels=(s.arrays["labels"] + 3) % 10
    )
    return relabel(train), relabel(test)


@pytest.fixture(scope="module")
def python_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "own"
    train, test = _own_data()
    cfg = tiny_digits_config()
    cfg.train.steps = 60
    cfg.optim.learning_rate = 3e-3
    result = dlkit.fit(cfg, workdir, train_source=train, eval_source=test)
    return workdir, result, test


def test_the_workdir_records_python_objects(python_run):
    workdir, _, test = python_run
    record = json.loads((workdir / "run.json").read_text())
    assert record["train"] == {"kind": "python", "type": "ArraySource", "examples": 1437}
    assert record["eval"] == {"kind": "python", "type": "ArraySource", "examples": len(test)}
    assert record["model"]["kind"] == "config"


def test_evaluate_refuses_the_configs_dataset_and_uses_the_given_one(python_run, capsys):
    workdir, result, test = python_run
    with pytest.raises(run_record.RecordError, match="eval_source: .* Python objects"):
        dlkit.evaluate(workdir)
    metrics = dlkit.evaluate(workdir, eval_source=test)
    assert metrics["accuracy"] == pytest.approx(result.history.last("eval/accuracy"), abs=1e-6)
    assert metrics["accuracy"] > 0.5  # the relabelled data, learnt
    assert metrics["num_examples"] == len(test)
    # The command line has no Python objects: it says so instead of printing other numbers.
    assert cli.main(["eval", str(workdir)]) != 0
    assert "eval_source" in capsys.readouterr().err


def test_report_numbers_agree(python_run):
    workdir, result, test = python_run
    logs = []
    info = dlkit.report.report(workdir, log=logs.append)
    assert "confusion_matrix" not in info
    assert any("no confusion matrix: eval_source" in line for line in logs)
    info = dlkit.report.report(workdir, log=logs.append, eval_source=test)
    matrix = np.asarray(info["confusion_matrix"])
    assert matrix.sum() == len(test)
    accuracy = np.trace(matrix) / matrix.sum()
    assert accuracy == pytest.approx(result.history.last("eval/accuracy"), abs=1e-6)


def test_fit_without_eval_source_never_borrows_the_configs_dataset(capsys):
    train, _ = _own_data()
    cfg = tiny_digits_config()
    result = dlkit.fit(cfg, train_source=train)  # no eval_source: a tenth of train_source
    assert "eval data: the last 143 examples of train_source" in capsys.readouterr().out
    state = result.state
    variables = {"params": state.params, **state.model_state}
    logits = state.apply_fn(variables, train.arrays["inputs"][-143:], train=False)
    expected = float(np.mean(np.argmax(logits, -1) == train.arrays["labels"][-143:]))
    assert result.history.last("eval/accuracy") == pytest.approx(expected, abs=1e-6)
    cfg = tiny_digits_config()
    cfg.data.validation_examples = 200
    result = dlkit.fit(cfg, train_source=train)
    assert "eval data: the last 200 examples of train_source" in capsys.readouterr().out
    # Evaluated on the last 200 examples of the relabelled data: checked by hand.
    state = result.state
    variables = {"params": state.params, **state.model_state}
    logits = state.apply_fn(variables, train.arrays["inputs"][-200:], train=False)
    expected = float(np.mean(np.argmax(logits, -1) == train.arrays["labels"][-200:]))
    assert result.history.last("eval/accuracy") == pytest.approx(expected, abs=1e-6)


def test_a_changed_data_file_is_refused(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("abc " * 200)
    cfg = dlkit.load_config("kjv_char_lm")
    cfg.data.name, cfg.data.path = "text", str(text)
    record = run_record.describe(cfg, None, None, None)
    assert record["train"]["bytes"] == 800
    (tmp_path / "w").mkdir()
    run_record.write(tmp_path / "w", record)
    run_record.check(tmp_path / "w")  # unchanged: fine
    text.write_text("abd " * 200)
    with pytest.raises(run_record.RecordError, match="data.path: .*sha256"):
        run_record.check(tmp_path / "w")


def test_a_path_the_dataset_ignores_is_an_error():
    cfg = dlkit.load_config("kjv_char_lm", overrides=["data.path=/tmp/some.txt"])
    with pytest.raises(dlkit.ConfigError, match="data.path: .*data.name='kjv', which ignores it"):
        cfg.validate()


def test_token_ids_are_not_warned_about_but_uint8_images_are(tmp_path):
    from dlkit.data import text, validate

    path = tmp_path / "t.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    tokens = text.load_text(str(path), "train", seq_len=16)
    assert validate.check_split(tokens, "train", num_outputs=None, classification=True) == []
    images = ArraySource(inputs=np.zeros((4, 8, 8, 1), np.uint8), labels=np.zeros((4,), np.int32))
    warned = validate.check_split(images, "train", num_outputs=10, classification=True)
    assert any("divide by 255" in w for w in warned)
