"""The callback hooks of `fit`: order, rows seen, stop requests, replacing the result."""

import dataclasses

import pytest

import dlkit
from tests.conftest import tiny_digits_config


class Recorder(dlkit.Callback):
    def __init__(self, stop_at_step=None):
        self.events = []
        self.stop_at_step = stop_at_step

    def on_train_start(self, run):
        self.events.append(("start", run.start_step))

    def on_row(self, run, row):
        self.events.append(("row", row["step"]))
        if self.stop_at_step is not None and row["step"] >= self.stop_at_step:
            run.request_stop("recorder")

    def on_train_end(self, run, result):
        self.events.append(("end", int(result.state.step)))
        return dataclasses.replace(result, stopped=(result.stopped or "none") + "+seen")


def test_hooks_run_in_order_and_see_every_row(tmp_path):
    rec = Recorder()
    result = dlkit.fit(tiny_digits_config(), tmp_path / "run", callbacks=[rec])
    assert rec.events[0] == ("start", 0)
    rows = [s for kind, s in rec.events if kind == "row"]
    assert rows == [r["step"] for r in result.history]
    assert rows == [4, 6, 8, 12]
    assert rec.events[-1] == ("end", 12)
    assert result.stopped == "none+seen"  # on_train_end replaced the result


@pytest.mark.parametrize(
    ("stop_at", "ends_at"),
    [
        (6, 6),  # an eval row arrives at its step: the run ends there
        (4, 5),  # a train-only row arrives one call late: the run ends after that call
    ],
)
def test_request_stop_ends_the_run_with_a_checkpoint(tmp_path, stop_at, ends_at):
    rec = Recorder(stop_at_step=stop_at)
    result = dlkit.fit(tiny_digits_config(), tmp_path / "run", callbacks=[rec])
    assert int(result.state.step) == ends_at
    assert result.stopped == "recorder+seen"
    assert [r["step"] for r in result.history][-1] == stop_at  # the row that asked
    ckpt = dlkit.Checkpointer(tmp_path / "run" / "checkpoints", read_only=True)
    assert ckpt.latest_step() == ends_at


def test_bad_callback_is_rejected_before_compiling():
    with pytest.raises(TypeError, match=r"callbacks.*item 0.*dlkit.Callback.*got function"):
        dlkit.fit(tiny_digits_config(), callbacks=[lambda run: None])
