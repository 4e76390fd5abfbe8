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


def test_the_data_file_is_hashed_once_for_both_splits(tmp_path, monkeypatch):
    """The train and eval records name the same data.path; describing a run reads it once."""
    text = tmp_path / "tiny.txt"
    text.write_text("abc " * 200)
    cfg = dlkit.load_config("kjv_char_lm")
    cfg.data.name, cfg.data.path = "text", str(text)
    hashed = []
    real = run_record._sha256
    monkeypatch.setattr(run_record, "_sha256", lambda *a: hashed.append(a[0]) or real(*a))
    record = run_record.describe(cfg, None, None, None)
    assert hashed == [text]
    assert record["train"]["sha256"] == record["eval"]["sha256"]
    assert record["eval"]["bytes"] == 800


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


def test_a_directory_records_its_npy_files_and_a_changed_one_is_refused(tmp_path):
    data = tmp_path / "arrays"
    data.mkdir()
    np.save(data / "x_train.npy", np.zeros((4, 3), np.uint8))
    np.save(data / "y_train.npy", np.arange(4, dtype=np.uint8))
    (data / "notes.txt").write_text("not read by data.name=arrays")
    cfg = dlkit.load_config("digits_mlp", ["data.name=arrays", f"data.path={data}"])
    record = run_record.describe(cfg, None, None, None)
    files = record["train"]["files"]
    assert sorted(files) == ["x_train.npy", "y_train.npy"]
    assert files["x_train.npy"]["bytes"] == (data / "x_train.npy").stat().st_size
    assert len(files["x_train.npy"]["sha256"]) == 64
    (tmp_path / "w").mkdir()
    run_record.write(tmp_path / "w", record)
    run_record.check(tmp_path / "w")  # unchanged: fine
    (data / "notes.txt").write_text("edited")
    run_record.check(tmp_path / "w")  # a file the dataset does not read: still fine
    np.save(data / "y_train.npy", np.arange(4, dtype=np.uint8)[::-1])
    with pytest.raises(run_record.RecordError, match=r"data.path: .*y_train\.npy: was .* sha256"):
        run_record.check(tmp_path / "w")
    (data / "y_train.npy").unlink()
    with pytest.raises(run_record.RecordError, match=r"y_train\.npy: .* now missing"):
        run_record.check(tmp_path / "w")


def test_a_large_file_is_hashed_by_samples_and_a_change_at_its_end_is_refused(
    tmp_path, monkeypatch
):
    path = tmp_path / "big.txt"
    path.write_bytes(b"a" * (3 << 20))
    cfg = dlkit.load_config("kjv_char_lm")
    cfg.data.name, cfg.data.path = "text", str(path)
    whole = run_record.describe(cfg, None, None, None)["train"]
    assert "sha256_of" not in whole
    monkeypatch.setattr(run_record, "FULL_HASH_BYTES", 1 << 20)
    record = run_record.describe(cfg, None, None, None)
    assert record["train"]["sha256_of"] == "sampled"
    assert record["train"]["sha256"] != whole["sha256"]
    (tmp_path / "w").mkdir()
    run_record.write(tmp_path / "w", record)
    run_record.check(tmp_path / "w")
    # A record hashed whole is checked whole, whatever the size limit is now.
    (tmp_path / "old").mkdir()
    run_record.write(tmp_path / "old", {**record, "train": whole, "eval": whole})
    run_record.check(tmp_path / "old")
    with open(path, "r+b") as f:  # the last byte, same size
        f.seek(-1, 2)
        f.write(b"b")
    for workdir in ("w", "old"):
        with pytest.raises(run_record.RecordError, match="data.path: .*big.txt: was"):
            run_record.check(tmp_path / workdir)
