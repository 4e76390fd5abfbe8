"""metrics.jsonl: NaN/Inf rows are valid JSON, and no readable row is ever lost to a damaged
line (issue 21, items 1 and 3)."""

import json
import math

import flax.linen as nn
import jax.numpy as jnp
import pytest
from conftest import tiny_digits_config

import dlkit
from dlkit import metrics as metrics_lib


def _strict_loads(text):
    """json.loads that rejects the bare NaN/Infinity tokens Python would otherwise accept."""

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_inf_metrics_are_valid_json_and_read_back_as_floats(tmp_path):
    writer = metrics_lib.JsonlWriter(tmp_path / "metrics.jsonl")
    writer.write({"step": 1, "train/loss": math.nan, "train/grad_norm": math.inf})
    writer.write({"step": 2, "train/loss": -math.inf, "eval/accuracy": 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert _strict_loads(lines[0]) == {
        "step": 1,
        "train/loss": "NaN",
        "train/grad_norm": "Infinity",
    }
    assert _strict_loads(lines[1])["train/loss"] == "-Infinity"
    rows = dlkit.read_history(tmp_path)
    assert math.isnan(rows[0]["train/loss"]) and rows[0]["train/grad_norm"] == math.inf
    assert rows[1]["train/loss"] == -math.inf and rows[1]["eval/accuracy"] == 0.5
    rows = writer.truncate_after(2)  # a resume rewrites the file: still valid JSON
    assert [
        _strict_loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ] == [1, 2]
    assert math.isnan(rows[0]["train/loss"])


class _NaNDense(nn.Module):
    """A classifier whose weights start as NaN: every loss and gradient norm is NaN."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        return x @ self.param("w", lambda key, shape: jnp.full(shape, jnp.nan), (x.shape[-1], 10))


def test_a_diverged_run_writes_strict_json_everywhere(tmp_path):
    cfg = tiny_digits_config(
        **{
            "train.nan_policy": "skip",
            "train.max_consecutive_nonfinite": 1000,
            "train.log_every": 2,
            "train.eval_every": 2,
            "checkpoint.every_steps": 4,
            "data.validate": "off",
        }
    )
    with pytest.raises(FloatingPointError):  # the NaN state is not checkpointed at step 4
        dlkit.fit(cfg, tmp_path, module=_NaNDense())
    rows = [_strict_loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[0]["train/loss"] == "NaN" and rows[0]["eval/loss"] == "NaN"
    assert math.isnan(dlkit.read_history(tmp_path)[1]["eval/loss"])
    _strict_loads((tmp_path / "compute.json").read_text())


def test_finite_json_round_trips_nested_values():
    from dlkit import finite_json

    value = {"a": [1.0, math.nan, {"b": -math.inf}], "c": "text", "d": 3}
    back = finite_json.loads(finite_json.dumps(value))
    assert math.isnan(back["a"][1]) and back["a"][2]["b"] == -math.inf
    assert back["c"] == "text" and back["d"] == 3


def test_a_torn_line_in_the_middle_keeps_every_readable_row_and_is_kept_aside(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in range(1, 41)]
    lines[12] = lines[12][:9]  # torn by a crash in the middle of the history
    lines[30] = "\x00\x00garbage"
    path.write_text("\n".join(lines) + "\n")
    writer = metrics_lib.JsonlWriter(path)
    rows = writer.truncate_after(40, log=print)
    assert [r["step"] for r in rows] == [s for s in range(1, 41) if s not in (13, 31)]
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [
        r["step"] for r in rows
    ]
    kept = writer.unreadable_path.read_text().splitlines()
    assert kept == [lines[12], lines[30]]
    out = capsys.readouterr().out
    assert "2 unreadable line(s) (line 13, 31); kept in" in out
    # Readers skip the same lines, say so, and read on.
    path.write_text("\n".join(lines) + "\n")
    assert len(dlkit.read_history(tmp_path, log=print)) == 38
    assert "2 unreadable line(s)" in capsys.readouterr().out


def test_a_resume_keeps_every_row_before_and_after_a_torn_line(tmp_path, capsys):
    cfg = tiny_digits_config(**{"train.log_every": 2, "train.eval_every": 0})
    dlkit.fit(cfg, tmp_path)
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 6
    lines[1] = lines[1][:10]
    path.write_text("\n".join(lines) + "\n")
    cfg.train.steps = 18
    result = dlkit.fit(cfg, tmp_path)
    steps = [json.loads(x)["step"] for x in path.read_text().splitlines()]
    assert steps == [2, 6, 8, 10, 12, 14, 16, 18]
    assert [r["step"] for r in result.history] == steps
    assert (tmp_path / "metrics.jsonl.unreadable").read_text() == lines[1] + "\n"
    assert "unreadable line(s) (line 2)" in capsys.readouterr().out
