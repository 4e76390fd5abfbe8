"""`train.profile_steps` / `fit(profile=...)`: a jax.profiler trace of the chosen steps."""

import gzip
import json

import pytest
from conftest import tiny_digits_config

import dlkit
from dlkit import profiling


def _trace_files(workdir):
    return sorted((workdir / "profile").rglob("*.xplane.pb")), sorted(
        (workdir / "profile").rglob("*.trace.json.gz")
    )


def test_profile_steps_write_a_trace_that_names_the_train_steps(tmp_path):
    cfg = tiny_digits_config(**{"train.profile_steps": "5:8", "checkpoint.every_steps": 0})
    dlkit.fit(cfg, tmp_path / "run")
    xplanes, traces = _trace_files(tmp_path / "run")
    assert len(xplanes) == 1 and xplanes[0].stat().st_size > 0
    assert b"train" in xplanes[0].read_bytes()
    # The Perfetto trace holds one "train" step annotation per traced step, numbered 5..7.
    events = json.loads(gzip.decompress(traces[0].read_bytes()))["traceEvents"]
    steps = sorted(
        {int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "args" in e}
    )
    assert steps == [5, 6, 7]


def test_fit_profile_argument_and_bad_values(tmp_path):
    dlkit.fit(tiny_digits_config(**{"checkpoint.every_steps": 0}), tmp_path / "a", profile=(2, 3))
    assert _trace_files(tmp_path / "a")[0]
    with pytest.raises(dlkit.ConfigError, match=r"train.profile_steps: .*got '8:3'"):
        dlkit.fit(tiny_digits_config(), tmp_path / "b", profile="8:3")
    with pytest.raises(dlkit.ConfigError, match="train.profile_steps: .*workdir=None"):
        dlkit.fit(tiny_digits_config(), None, profile="1:2")
    assert not (tmp_path / "b").exists()  # rejected before anything was written
    assert profiling.parse_profile_steps("") is None
