"""Tests for what a user sees of a run: the model summary, TensorBoard event files, the history
plot, curves.png / confusion_matrix.png, `dlkit report`, and the progress bar's fallback."""

import contextlib
import io
import json
import struct
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits_config

import dlkit
from dlkit import cli, metrics, models, report, summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny digits run with TensorBoard on and a progress bar asked for, output captured."""
    workdir = tmp_path_factory.mktemp("run")
    cfg = tiny_digits_config(**{"train.tensorboard": True, "train.plots": True})
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = dlkit.fit(cfg, workdir, progress=True)
    return workdir, result, out.getvalue(), err.getvalue()


# --- model summary -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape, expected", [("mlp", (2, 8, 8, 1), 85_002), ("cnn", (2, 28, 28, 1), 421_642)]
)
def test_summary_totals_match_pinned_parameter_counts(name, shape, expected):
    module = models.build(name)
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.ones(shape), train=False))
    table = summary.summarize(variables)
    assert table.total_params == expected  # the counts pinned in test_models.py
    assert table.total_bytes == expected * 4  # float32
    for entry in table.params:
        assert entry.bytes == entry.count * np.dtype(entry.dtype).itemsize
        assert entry.count == int(np.prod(entry.shape))
    assert "Dense_0/kernel" in {e.path for e in table.params}
    assert f"{expected:,}" in str(table).splitlines()[-1]


def test_summary_lists_batchnorm_statistics_apart_from_params():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Dense(3)(x)  # 4*3 + 3 params
            return nn.BatchNorm(use_running_average=not train)(x)  # 3 + 3 params; 3 + 3 stats

    variables = Net().init(jax.random.key(0), jnp.ones((2, 4)))
    table = summary.summarize(variables)
    assert table.total_params == 4 * 3 + 3 + 3 + 3
    assert table.state_count == 6
    assert {e.path for e in table.model_state} == {
        "batch_stats/BatchNorm_0/mean",
        "batch_stats/BatchNorm_0/var",
    }
    assert "model state (not trained)" in str(table)


def test_fit_prints_the_summary_and_writes_summary_txt(run):
    workdir, result, out, _ = run
    text = (workdir / "summary.txt").read_text()
    expected = summary.summarize(result.state).total_params
    assert expected == 64 * 32 + 32 + 32 * 10 + 10  # tiny_digits_config's MLP
    assert text.splitlines()[-1].split()[:2] == ["total", f"{expected:,}"]
    assert text.strip() in out


# --- TensorBoard ---------------------------------------------------------------------------


def _read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Parses TFRecord event files (length, crc, Event proto, crc) into {tag: [(step, v)]}."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, f"no event file in {directory}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_event_files_hold_every_row(run):
    workdir, result, _, _ = run
    scalars = _read_scalars(workdir / "tensorboard")
    for key in ("train/loss", "eval/accuracy", "eval/loss", "perf/steps_per_s"):
        steps, values = result.history.series(key)
        assert [s for s, _ in scalars[key]] == steps
        np.testing.assert_allclose([v for _, v in scalars[key]], values, rtol=1e-6)


def test_tensorboard_without_tensorboardx_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import raises ImportError
    cfg = tiny_digits_config(**{"train.tensorboard": True})
    with pytest.raises(dlkit.ConfigError, match=r"train\.tensorboard.*pip install"):
        dlkit.fit(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # refused before anything ran


# --- History.plot --------------------------------------------------------------------------


def test_history_plot_draws_train_and_eval_per_metric():
    history = metrics.History(
        [
            {"step": 10, "train/loss": 2.0, "train/accuracy": 0.3},
            {"step": 20, "train/loss": 1.0, "train/accuracy": 0.6, "eval/loss": 1.2},
            {"step": 20, "eval/accuracy": 0.5},
            {"step": 30, "train/loss": 0.5, "train/accuracy": 0.8},
        ]
    )
    fig = history.plot()
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["loss", "accuracy"]
    lines = {line.get_label(): line for line in axes[0].get_lines()}
    assert set(lines) == {"train/loss", "eval/loss"}
    np.testing.assert_array_equal(lines["train/loss"].get_xdata(), [10, 20, 30])
    np.testing.assert_array_equal(lines["train/loss"].get_ydata(), [2.0, 1.0, 0.5])
    np.testing.assert_array_equal(lines["eval/loss"].get_ydata(), [1.2])
    # Two runs on the same axes, told apart by their labels.
    again = history.plot(keys=["loss"], ax=axes[0], label="B")
    assert again is fig
    assert "B train/loss" in [line.get_label() for line in axes[0].get_lines()]
    with pytest.raises(ValueError, match="History.plot.*'nope'"):
        history.plot(keys=["nope"])


# --- curves.png, confusion matrix, dlkit report -------------------------------------------


def test_fit_writes_curves_png(run):
    workdir, _, out, _ = run
    width, height = _png_size(workdir / "curves.png")
    assert width > 300 and height > 200
    assert f"wrote {workdir / 'curves.png'}" in out


def test_confusion_matrix_counts_the_eval_set_and_matches_evaluate(run):
    workdir, _, _, _ = run
    matrix, step = report.confusion_matrix(workdir, batch_size=100)  # 360 = 3 x 100 + padded 60
    evaluated = dlkit.evaluate(workdir)
    assert step == evaluated["step"] == 12
    assert matrix.shape == (10, 10)
    assert matrix.sum() == evaluated["num_examples"] == 360
    assert np.trace(matrix) / matrix.sum() == pytest.approx(evaluated["accuracy"], abs=1e-9)
    assert (matrix.sum(axis=1) == np.bincount(_eval_labels(), minlength=10)).all()


def _eval_labels():
    return dlkit.data.load_dataset("digits", "test").get_batch(np.arange(360))["labels"]


def test_report_command_prints_the_summary_and_writes_pngs(run, capsys):
    workdir, result, _, _ = run
    (workdir / "curves.png").unlink()
    assert cli.main(["report", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "experiment digits_mlp" in out
    assert "steps      12 of 12" in out
    assert "checkpoints on disk: [6, 12]" in out
    last_acc = result.history.last("eval/accuracy")
    assert f"eval/accuracy        last {last_acc:.4f}" in out
    _png_size(workdir / "curves.png")
    _png_size(workdir / "confusion_matrix.png")
    info = report.run_summary(workdir)
    assert info["steps_done"] == 12 and info["checkpoints"] == [6, 12]
    assert info["best"]["eval/accuracy"]["value"] == max(result.history.series("eval/accuracy")[1])


def test_report_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_plots_without_matplotlib_say_how_to_install_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(report, "has_matplotlib", lambda: False)
    monkeypatch.setattr(report, "_warned_no_matplotlib", False)
    cfg = tiny_digits_config(**{"train.plots": True})
    assert report.plots_from_config(cfg, tmp_path) is None
    assert report.plots_from_config(cfg, tmp_path) is None
    out = capsys.readouterr().out
    assert out.count("pip install 'dlkit[plots]'") == 1


# --- progress bar --------------------------------------------------------------------------


def test_progress_bar_off_when_output_is_not_a_terminal(run):
    _, result, out, err = run
    # A bar into a pipe or log file would add a line per redraw; rows are printed instead.
    assert "it/s" not in err and "step/s" not in err and "%|" not in err
    for row in result.history:
        assert any(line.startswith(f"step {row['step']} ") for line in out.splitlines())


def test_run_metrics_jsonl_reads_back_as_history(run):
    workdir, result, _, _ = run
    history = dlkit.read_history(workdir)
    assert history == result.history
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(history)
