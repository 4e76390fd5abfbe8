"""data.name=arrays: keras-style .npz files and memory-mapped .npy directories, with uint8
scaling as documented; the Python route and the command line give the same numbers."""

import json

import numpy as np
import pytest

import dlkit
from dlkit import cli, run_record
from dlkit.data import arrays
from dlkit.data.datasets import load_dataset


def _uint8_digits():
    # The digits as uint8 grey images (N, 8, 8), as keras.datasets.mnist stores its images.
    out = {}
    for split in ("train", "test"):
        s = load_dataset("digits", split).arrays
        out[f"x_{split}"] = np.round(s["inputs"][..., 0] * 255).astype(np.uint8)
        out[f"y_{split}"] = s["labels"].astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("arrays") / "digits.npz"
    np.savez(path, **_uint8_digits())
    return path


def test_npz_is_read_with_a_channel_axis_and_scaled(npz):
    raw = _uint8_digits()
    train = arrays.load_arrays(str(npz), "train")
    batch = train.get_batch(np.arange(5))
    assert batch["inputs"].shape == (5, 8, 8, 1) and batch["inputs"].dtype == np.float32
    np.testing.assert_array_equal(batch["inputs"][..., 0], raw["x_train"][:5] / np.float32(255))
    assert batch["labels"].dtype == np.int32
    assert len(arrays.load_arrays(str(npz), "test")) == 360
    kept = arrays.load_arrays(str(npz), "train", scale="none").get_batch(np.arange(5))
    assert kept["inputs"].dtype == np.uint8


def test_npy_directory_is_memory_mapped_and_gives_the_same_examples(npz, tmp_path):
    for key, value in _uint8_digits().items():
        np.save(tmp_path / f"{key}.npy", value)
    source = arrays.load_arrays(str(tmp_path), "train")
    assert isinstance(source.source.arrays["inputs"].base, np.memmap)
    idx = np.array([3, 1000, 7])
    a = source.get_batch(idx)
    b = arrays.load_arrays(str(npz), "train").get_batch(idx)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["labels"], b["labels"])


def test_bad_files_say_what_was_expected(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"x_train, y_train, x_test, y_test .* got \['images'\]"):
        arrays.load_arrays(str(bad), "train")
    with pytest.raises(ValueError, match="data.scale"):
        arrays.load_arrays(str(bad), "train", scale="255")


def _overrides(npz, workdir):
    return [
        "data.name=arrays",
        f"data.path={npz}",
        "model.hidden_sizes=[32]",
        "train.steps=40",
        "train.batch_size=32",
        "train.log_every=20",
        "train.eval_every=20",
        "train.progress=false",
        "train.plots=false",
        "optim.warmup_steps=2",
        "optim.learning_rate=3e-3",
    ]


def test_python_and_command_line_routes_give_the_same_numbers(npz, tmp_path, capsys):
    overrides = _overrides(npz, tmp_path)
    cfg = dlkit.load_config("digits_mlp", overrides)
    python = dlkit.fit(cfg, tmp_path / "python")
    assert python.history.last("eval/accuracy") > 0.4  # chance is 0.1: it learnt from the file
    capsys.readouterr()
    args = ["train", "digits_mlp", "--workdir", str(tmp_path / "cli"), "--no-progress"]
    assert cli.main(args + [f"--set={o}" for o in overrides]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["eval/accuracy"] == pytest.approx(python.history.last("eval/accuracy"))
    assert printed["eval/loss"] == pytest.approx(python.history.last("eval/loss"))
    # `dlkit eval` rebuilds the recorded file and agrees with both.
    assert cli.main(["eval", str(tmp_path / "cli")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["accuracy"] == pytest.approx(printed["eval/accuracy"], abs=1e-6)
    record = json.loads((tmp_path / "cli" / "run.json").read_text())
    assert record["train"]["name"] == "arrays"
    assert record["train"]["bytes"] == npz.stat().st_size


def test_npy_directory_run_evaluates_again_and_refuses_a_changed_file(tmp_path, capsys):
    data = tmp_path / "digits"
    data.mkdir()
    for key, value in _uint8_digits().items():
        np.save(data / f"{key}.npy", value)
    overrides = _overrides(data, tmp_path)
    python = dlkit.fit(dlkit.load_config("digits_mlp", overrides), tmp_path / "python")
    assert python.history.last("eval/accuracy") > 0.4  # chance is 0.1: it learnt from the files
    record = json.loads((tmp_path / "python" / "run.json").read_text())
    assert record["eval"]["path"] == str(data.resolve())
    assert sorted(record["eval"]["files"]) == [
        "x_test.npy",
        "x_train.npy",
        "y_test.npy",
        "y_train.npy",
    ]
    assert record["eval"]["files"]["y_test.npy"]["bytes"] == (data / "y_test.npy").stat().st_size
    evaluated = dlkit.evaluate(tmp_path / "python")
    assert evaluated["accuracy"] == pytest.approx(python.history.last("eval/accuracy"), abs=1e-6)
    assert evaluated["loss"] == pytest.approx(python.history.last("eval/loss"), rel=1e-5)
    assert evaluated["num_examples"] == 360
    # The command line: train, then `dlkit eval` on the same directory.
    capsys.readouterr()
    args = ["train", "digits_mlp", "--workdir", str(tmp_path / "cli"), "--no-progress"]
    assert cli.main(args + [f"--set={o}" for o in overrides]) == 0
    assert cli.main(["eval", str(tmp_path / "cli")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["accuracy"] == pytest.approx(evaluated["accuracy"], abs=1e-6)
    # Relabelled test labels, same size: other data, so both routes refuse and name the file.
    y = np.load(data / "y_test.npy")
    np.save(data / "y_test.npy", (y + 1) % 10)
    with pytest.raises(run_record.RecordError, match=r"data.path: .*changed.*y_test\.npy: was"):
        dlkit.evaluate(tmp_path / "python")
    assert cli.main(["eval", str(tmp_path / "cli")]) != 0
    err = capsys.readouterr().err
    assert "data.path" in err and "y_test.npy" in err
