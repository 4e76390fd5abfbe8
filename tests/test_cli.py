"""The `dlkit` command, run as a user runs it: a subprocess from another directory."""

import json
import subprocess
import sys

import pytest


def _dlkit(*args, cwd, check=True):
    return subprocess.run(
        [sys.executable, "-m", "dlkit.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=check,
    )


def test_cli_trains_digits_end_to_end_and_eval_reports_accuracy(tmp_path):
    workdir = tmp_path / "run"
    train = _dlkit(
        "train",
        "digits_mlp",
        "--workdir",
        str(workdir),
        "--no-progress",
        "--set",
        "train.steps=600",
        "--set",
        "checkpoint.every_steps=300",
        "--set",
        "train.eval_every=300",
        cwd=tmp_path,
    )
    summary = json.loads(train.stdout.strip().splitlines()[-1])
    assert summary["step"] == 600
    assert summary["eval/accuracy"] >= 0.95
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 600
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [100, 200, 300, 400, 500, 600]
    assert {
        "train/loss",
        "train/accuracy",
        "eval/loss",
        "eval/accuracy",
        "perf/steps_per_s",
    } <= set(rows[-1])
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [300, 600]

    ev = _dlkit("eval", str(workdir), cwd=tmp_path)
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert result["step"] == 600 and result["split"] == "test" and result["num_examples"] == 360
    assert result["accuracy"] == pytest.approx(summary["eval/accuracy"], abs=1e-6)
    # The workdir also as `--workdir`, the option that trained it.
    ev = _dlkit("eval", "--workdir", str(workdir), "--step", "300", cwd=tmp_path)
    assert json.loads(ev.stdout.strip().splitlines()[-1])["step"] == 300


def test_cli_default_workdir_is_runs_experiment_and_rerun_resumes(tmp_path):
    common = (
        "--no-progress",
        "--set",
        "optim.warmup_steps=0",
        "--set",
        "train.log_every=20",
        "--set",
        "train.eval_every=0",
    )
    _dlkit("train", "digits_mlp", *common, "--set", "train.steps=40", cwd=tmp_path)
    assert (tmp_path / "runs" / "digits_mlp" / "checkpoints" / "40").is_dir()
    again = _dlkit("train", "digits_mlp", *common, "--set", "train.steps=60", cwd=tmp_path)
    assert "resuming from step 40" in again.stdout
    assert json.loads(again.stdout.strip().splitlines()[-1])["step"] == 60


def test_cli_list_names_the_experiments(tmp_path):
    out = _dlkit("list", cwd=tmp_path).stdout
    assert "digits_mlp" in out and "fashion_mnist_cnn" in out
    assert "97%" in out  # the first docstring line is the description


def test_cli_unknown_key_is_a_clear_error_listing_valid_keys(tmp_path):
    bad = _dlkit("train", "digits_mlp", "--set", "train.stepz=5", cwd=tmp_path, check=False)
    assert bad.returncode == 2
    assert "unknown config key 'train.stepz'" in bad.stderr
    for key in (
        "train.steps",
        "train.batch_size",
        "train.seed",
        "optim.learning_rate",
        "parallel.strategy",
        "checkpoint.every_steps",
        "model.hidden_sizes",
    ):
        assert key in bad.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_wrong_type_is_a_clear_error(tmp_path):
    bad = _dlkit("train", "--set", "train.batch_size=big", cwd=tmp_path, check=False)
    assert bad.returncode == 2
    assert "train.batch_size: expected an int, got 'big'" in bad.stderr


def test_cli_unknown_experiment_lists_known_ones(tmp_path):
    bad = _dlkit("train", "no_such_experiment", cwd=tmp_path, check=False)
    assert bad.returncode == 2
    assert "digits_mlp" in bad.stderr and "no_such_experiment" in bad.stderr


def test_cli_eval_of_empty_workdir_says_there_is_no_checkpoint(tmp_path):
    bad = _dlkit("eval", str(tmp_path / "nothing"), cwd=tmp_path, check=False)
    assert bad.returncode == 2
    assert "no checkpoint in" in bad.stderr


def test_cli_workdir_is_required_once_as_argument_or_option(tmp_path):
    missing = _dlkit("report", cwd=tmp_path, check=False)
    assert missing.returncode == 2
    assert "report: the workdir is required: dlkit report WORKDIR" in missing.stderr
    two = _dlkit("eval", "a", "--workdir", "b", cwd=tmp_path, check=False)
    assert two.returncode == 2
    assert "eval: two workdirs given, 'a' and --workdir 'b'" in two.stderr
    empty = _dlkit("eval", "--workdir", str(tmp_path / "nothing"), cwd=tmp_path, check=False)
    assert empty.returncode == 2 and "no checkpoint in" in empty.stderr
