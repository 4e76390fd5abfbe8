"""Crash safety: commit rules, corruption fallback, retention, NaN policy, stop signals."""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib

import jax
import numpy as np
import pytest
from conftest import tiny_digits_config

import dlkit
from dlkit import checkpoint as ckpt_lib
from dlkit import cli


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A finished tiny run with checkpoints at steps 6 and 12."""
    workdir = tmp_path_factory.mktemp("ref")
    result = dlkit.fit(tiny_digits_config(), workdir)
    return workdir, result


def _copy(reference, tmp_path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    return workdir


def _data_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The largest array file of the state item (Orbax's zarr3 chunk files under state/)."""
    files = [p for p in step_dir.glob("state/*/c/**/*") if p.is_file()]
    return max(files, key=lambda p: (p.stat().st_size, str(p)))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero(path):
    path.write_bytes(bytes(path.stat().st_size))


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncate_data": (lambda d: _truncate(_data_file(d)), "size"),
    "zero_data": (lambda d: _zero(_data_file(d)), "CRC-32 mismatch"),
    "bitflip_data": (lambda d: _flip(_data_file(d)), "CRC-32 mismatch"),
    "delete_data": (lambda d: _data_file(d).unlink(), "missing"),
    "delete_index": (
        lambda d: (d / "state" / "_METADATA").unlink(),
        "state/_METADATA: missing",
    ),
    "delete_step_metadata": (lambda d: (d / "_CHECKPOINT_METADATA").unlink(), "missing"),
    "delete_manifest": (lambda d: (d / ckpt_lib.MANIFEST).unlink(), "not committed"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_newest_step_is_detected_reported_and_fallen_back_from(
    reference, tmp_path, capsys, name
):
    workdir = _copy(reference, tmp_path)
    corrupt, expected_message = CORRUPTIONS[name]
    corrupt(workdir / "checkpoints" / "12")
    resumed = dlkit.fit(tiny_digits_config(), workdir)
    out = capsys.readouterr().out
    assert "step 12" in out and expected_message in out, out
    assert "resuming from step 6" in out
    # The run redid steps 7..12 from step 6 and ended exactly where the reference did.
    assert _same(resumed.state, reference[1].state)
    quarantined = list((workdir / "checkpoints" / ".quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith("12-")
    with dlkit.Checkpointer(workdir / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [6, 12]
        assert ckpt_lib.verify_step(workdir / "checkpoints" / "12") == []


def test_empty_step_directory_is_removed_and_older_steps_still_restore(reference, tmp_path, capsys):
    workdir = _copy(reference, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "12")
    (workdir / "checkpoints" / "12").mkdir()
    resumed = dlkit.fit(tiny_digits_config(), workdir)
    out = capsys.readouterr().out
    assert "removing empty step directory" in out and "resuming from step 6" in out
    assert _same(resumed.state, reference[1].state)


def test_explicit_corrupt_step_is_an_error_naming_the_file(reference, tmp_path):
    workdir = _copy(reference, tmp_path)
    _flip(_data_file(workdir / "checkpoints" / "6"))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"step 6 is corrupt: .*CRC-32 mismatch"):
        dlkit.load_checkpoint(workdir, step=6)


def test_reader_skips_corrupt_steps_without_moving_them(reference, tmp_path):
    workdir = _copy(reference, tmp_path)
    _flip(_data_file(workdir / "checkpoints" / "12"))
    state, _ = dlkit.load_checkpoint(workdir)  # read-only: falls back, touches nothing
    assert int(state.step) == 6
    assert (workdir / "checkpoints" / "12").is_dir()
    assert not (workdir / "checkpoints" / ".quarantine").exists()


def test_interrupted_deletion_and_save_leftovers_are_cleaned(reference, tmp_path):
    workdir = _copy(reference, tmp_path)
    ckpts = workdir / "checkpoints"
    # A deletion killed after its rename, and a save killed before Orbax's commit.
    (ckpts / ".trash" / "3-abc").mkdir(parents=True)
    (ckpts / ".trash" / "3-abc" / "junk").write_text("x")
    shutil.copytree(ckpts / "12", ckpts / "18.orbax-checkpoint-tmp-1234")
    with dlkit.Checkpointer(ckpts) as ckpt:
        assert ckpt.all_steps() == [6, 12]
    assert sorted(p.name for p in ckpts.iterdir()) == ["12", "6"]


def test_retention_keeps_latest_and_best_and_never_deletes_the_newest(tmp_path):
    state = {"w": np.arange(4.0)}
    with dlkit.Checkpointer(tmp_path, max_to_keep=1, keep_best=1, best_metric="eval/loss") as c:
        for step, loss in [(1, 0.9), (2, 0.2), (3, 0.5), (4, 0.7), (5, 3.0)]:
            c.save(step, state, data_position=step, metrics={"eval/loss": loss})
        c.wait()
        # step 5 is the worst but the newest: kept; step 2 is the best: kept.
        assert c.all_steps() == [2, 5]


def test_async_save_not_waited_for_is_completed_at_exit(tmp_path):
    script = textwrap.dedent(f"""
        import numpy as np
        import dlkit
        c = dlkit.Checkpointer({str(tmp_path)!r})
        c.save(7, {{"w": np.ones((512, 512), np.float32)}}, data_position=7)
        # no close(), no wait(): the process just ends
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert ckpt_lib.verify_step(tmp_path / "7") == []
    with dlkit.Checkpointer(tmp_path) as c:
        assert c.all_steps() == [7]


def _committed_step_dir(tmp_path, payload: bytes) -> pathlib.Path:
    """A step directory holding one data file and Orbax's two marker files."""
    step_dir = tmp_path / "5"
    (step_dir / "state").mkdir(parents=True)
    (step_dir / "state" / "data").write_bytes(payload)
    (step_dir / ckpt_lib.COMMIT_MARKER).write_text("ok")
    (step_dir / ckpt_lib.STEP_METADATA).write_text("{}")
    return step_dir


def test_manifest_has_one_crc_per_chunk_and_a_flip_names_the_byte_range(tmp_path):
    chunk = ckpt_lib.CHUNK_BYTES
    payload = np.random.default_rng(0).bytes(2 * chunk + 1000)  # three chunks, the last short
    step_dir = _committed_step_dir(tmp_path, payload)
    ckpt_lib.write_manifest(step_dir, 5)
    manifest = json.loads((step_dir / ckpt_lib.MANIFEST).read_text())
    entry = manifest["files"]["state/data"]
    assert manifest["version"] == 2 and manifest["chunk_bytes"] == chunk
    assert entry["size"] == len(payload)
    assert entry["crc32"] == [
        zlib.crc32(payload[i : i + chunk]) for i in range(0, len(payload), chunk)
    ]
    assert ckpt_lib.verify_step(step_dir) == []
    ckpt_lib.write_manifest(step_dir, 5, parallel=False)  # as an async save writes it
    assert json.loads((step_dir / ckpt_lib.MANIFEST).read_text()) == manifest

    data = bytearray(payload)
    data[chunk + 7] ^= 0x01  # one bit in the second chunk
    (step_dir / "state" / "data").write_bytes(bytes(data))
    assert ckpt_lib.verify_step(step_dir) == [
        f"state/data: CRC-32 mismatch at bytes {chunk}-{2 * chunk} (the bytes changed after saving)"
    ]


def test_a_damaged_manifest_is_reported_not_raised(tmp_path):
    step_dir = _committed_step_dir(tmp_path, bytes(100))
    ckpt_lib.write_manifest(step_dir, 5)
    manifest = json.loads((step_dir / ckpt_lib.MANIFEST).read_text())
    manifest["files"]["state/data"]["crc32"].append(0)
    (step_dir / ckpt_lib.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt_lib.verify_step(step_dir) == [
        f"state/data: 2 chunk CRCs in {ckpt_lib.MANIFEST}, expected 1"
    ]
    manifest["chunk_bytes"] = 0
    (step_dir / ckpt_lib.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt_lib.verify_step(step_dir) == [
        f"{ckpt_lib.MANIFEST}: chunk_bytes is 0, not a positive int"
    ]


def test_a_version_1_manifest_whole_file_crc_still_verifies(tmp_path):
    """Checkpoints written before the chunked manifest keep restoring, and keep being checked."""
    payload = np.random.default_rng(1).bytes(3 << 20)
    step_dir = _committed_step_dir(tmp_path, payload)
    v1 = {
        "version": 1,
        "step": 5,
        "files": {"state/data": {"size": len(payload), "crc32": zlib.crc32(payload)}},
        "metrics": {},
    }
    (step_dir / ckpt_lib.MANIFEST).write_text(json.dumps(v1))
    assert ckpt_lib.verify_step(step_dir) == []
    (step_dir / "state" / "data").write_bytes(payload[:-1] + bytes([payload[-1] ^ 0x80]))
    assert ckpt_lib.verify_step(step_dir) == [
        "state/data: CRC-32 mismatch (the bytes changed after saving)"
    ]


# ---- NaN / Inf ----------------------------------------------------------------------------


def _nan_sources(bad_rows):
    train = dlkit.data.load_dataset("digits", "train")
    x = np.array(train.arrays["inputs"])
    x[bad_rows] = np.nan
    return dlkit.data.ArraySource(inputs=x, labels=train.arrays["labels"])


def _digits_test():
    # An explicit eval source keeps fit from holding out the end of train_source, so the
    # batches (and which of them hold the bad rows) are those of the full train split.
    return dlkit.data.load_dataset("digits", "test")


def _bad_steps(cfg, bad_rows, steps):
    loader = dlkit.data.Loader(
        dlkit.data.load_dataset("digits", "train"), cfg.train.batch_size, seed=cfg.train.seed
    )
    return [s for s in range(steps) if np.isin(loader.indices_at(s)[0], bad_rows).any()]


def test_nan_policy_skip_never_applies_a_non_finite_update():
    cfg = tiny_digits_config(**{"train.nan_policy": "skip", "data.validate": "off"})
    loader = dlkit.data.Loader(dlkit.data.load_dataset("digits", "train"), cfg.train.batch_size)
    bad_rows = [int(loader.indices_at(2)[0][0]), int(loader.indices_at(7)[0][5])]
    result = dlkit.fit(cfg, train_source=_nan_sources(bad_rows), eval_source=_digits_test())
    expected = len(_bad_steps(cfg, bad_rows, cfg.train.steps))
    assert expected >= 1
    assert result.history.last("train/skipped_steps") == expected
    assert all(np.isfinite(x).all() for x in _leaves(result.state))
    assert int(result.state.guard.skipped) == expected


def test_nan_policy_raise_names_the_step_and_keeps_checkpoints(reference, tmp_path):
    workdir = _copy(reference, tmp_path)
    before = {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (workdir / "checkpoints").rglob("*")
        if p.is_file()
    }
    cfg = tiny_digits_config(**{"train.steps": 24, "data.validate": "off"})
    bad_rows = list(range(0, 1437, 3))  # every batch from step 13 on holds a NaN row
    with pytest.raises(
        FloatingPointError,
        match=r"at step 13 the loss and the gradients went "
        r"non-finite",
    ):
        dlkit.fit(cfg, workdir, train_source=_nan_sources(bad_rows))
    after = {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (workdir / "checkpoints").rglob("*")
        if p.is_file()
    }
    assert before == after  # no checkpoint written, changed or removed


def test_nan_policy_skip_stops_after_max_consecutive():
    cfg = tiny_digits_config(
        **{"train.nan_policy": "skip", "data.validate": "off", "train.max_consecutive_nonfinite": 3}
    )
    with pytest.raises(FloatingPointError, match="consecutive updates were skipped"):
        dlkit.fit(cfg, train_source=_nan_sources(list(range(1437))))


def test_loss_spike_skipping():
    train = dlkit.data.load_dataset("digits", "train")
    x = np.array(train.arrays["inputs"])
    loader = dlkit.data.Loader(train, 32)
    x[loader.indices_at(20)[0][:3]] *= 1e4  # finite, but the loss of step 21's batch explodes
    cfg = tiny_digits_config(
        **{
            "train.steps": 30,
            "train.nan_policy": "skip",
            "train.loss_spike_factor": 5.0,
            "data.validate": "off",
            "train.max_consecutive_nonfinite": 30,
        }
    )
    result = dlkit.fit(
        cfg,
        train_source=dlkit.data.ArraySource(inputs=x, labels=train.arrays["labels"]),
        eval_source=_digits_test(),
    )
    assert result.history.last("train/skipped_steps") == 1
    assert int(result.state.guard.first_step) == 20  # 0-based: the 21st update
    assert int(result.state.guard.first_kind) == dlkit.nonfinite.SPIKE


# ---- stop signals --------------------------------------------------------------------------


def test_sigint_in_a_notebook_cell_saves_and_returns(tmp_path):
    cfg = tiny_digits_config(
        **{
            "train.steps": 200000,
            "checkpoint.every_steps": 0,
            "train.eval_every": 0,
            "train.log_every": 100,
        }
    )

    class InterruptOnFirstRow(dlkit.Callback):
        # The signal arrives once training is under way, however loaded the machine is.
        def on_row(self, run, row):
            os.kill(os.getpid(), signal.SIGINT)

    result = dlkit.fit(cfg, tmp_path, callbacks=[InterruptOnFirstRow()])
    assert result.stopped == "SIGINT"
    step = int(result.state.step)
    assert 100 <= step < 200000
    with dlkit.Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [step]


def test_sigterm_stops_the_cli_with_a_checkpoint_and_exit_0_and_resumes_bitwise(tmp_path):
    sets = [
        "train.steps=1500",
        "checkpoint.every_steps=500",
        "train.log_every=100",
        "train.eval_every=0",
        "parallel.num_devices=1",
        "train.batch_size=64",
    ]

    def command(workdir):
        return cli.train_command("digits_mlp", workdir, sets)

    subprocess.run(command(tmp_path / "ref"), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(command(tmp_path / "run"), stdout=subprocess.PIPE, text=True)
    # Wait for training to be under way (the first metrics row), then ask it to stop.
    deadline = time.time() + 120
    metrics = tmp_path / "run" / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM after step" in out
    with dlkit.Checkpointer(tmp_path / "run" / "checkpoints") as ckpt:
        stopped_at = ckpt.latest_step()
    assert stopped_at is not None and stopped_at < 1500
    again = subprocess.run(
        command(tmp_path / "run"), check=True, capture_output=True, text=True, timeout=300
    )
    assert f"resuming from step {stopped_at}" in again.stdout
    ref, _ = dlkit.load_checkpoint(tmp_path / "ref")
    resumed, _ = dlkit.load_checkpoint(tmp_path / "run")
    assert int(resumed.step) == 1500 and _same(ref, resumed)


def test_train_rows_read_one_call_late_equal_rows_read_at_once():
    # With no eval due, a train row is read after the next call is queued (dlkit.loop); an
    # eval every step makes every row read at once. The rows must not differ: each carries
    # its own step's metrics and guard counters (bad batches 2 and 3: a row that read the
    # counters one step late would be off by one skip).
    loader = dlkit.data.Loader(dlkit.data.load_dataset("digits", "train"), 32)
    bad_rows = [int(loader.indices_at(2)[0][0]), int(loader.indices_at(3)[0][1])]
    common = {"train.nan_policy": "skip", "data.validate": "off", "train.log_every": 1}
    late = dlkit.fit(
        tiny_digits_config(**common, **{"train.eval_every": 0}),
        train_source=_nan_sources(bad_rows),
        eval_source=_digits_test(),
    )
    at_once = dlkit.fit(
        tiny_digits_config(**common, **{"train.eval_every": 1}),
        train_source=_nan_sources(bad_rows),
        eval_source=_digits_test(),
    )
    steps = list(range(1, 13))
    assert [r["step"] for r in late.history] == [r["step"] for r in at_once.history] == steps
    assert late.history.series("train/skipped_steps")[1] == [0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    for key in ("train/skipped_steps", "train/loss", "train/accuracy", "train/grad_norm"):
        np.testing.assert_array_equal(
            late.history.series(key)[1], at_once.history.series(key)[1], err_msg=key
        )
    assert all(r > 0 for r in late.history.series("perf/steps_per_s")[1])


# ---- issue 21: no progress lost without a word; every fall-back said -----------------------


def test_with_every_step_corrupt_the_run_stops_listing_the_quarantined_steps(reference, tmp_path):
    workdir = _copy(reference, tmp_path)
    for step in ("6", "12"):
        _flip(_data_file(workdir / "checkpoints" / step))
    rows_before = (workdir / "metrics.jsonl").read_text()
    strategy = dlkit.make_strategy("jit", num_devices=1)
    pattern = r"no usable checkpoint is left .*\n  6-\S+: .*CRC-32 mismatch.*\n  12-\S+: .*CRC-32"
    with pytest.raises(ckpt_lib.CheckpointError, match=pattern):
        dlkit.fit(tiny_digits_config(), workdir, strategy=strategy)
    assert dict(strategy.trace_counts) == {}
    assert (workdir / "metrics.jsonl").read_text() == rows_before  # history untouched
    # A rerun does not quietly start over either: the quarantined steps still count.
    with pytest.raises(ckpt_lib.CheckpointError, match="on_no_valid_step=restart"):
        dlkit.fit(tiny_digits_config(), workdir)


def test_on_no_valid_step_restart_trains_from_0_and_keeps_the_old_history(
    reference, tmp_path, capsys
):
    workdir = _copy(reference, tmp_path)
    rows_before = (workdir / "metrics.jsonl").read_text()
    for step in ("6", "12"):
        (workdir / "checkpoints" / step / ckpt_lib.MANIFEST).unlink()
    cfg = tiny_digits_config(**{"checkpoint.on_no_valid_step": "restart"})
    result = dlkit.fit(cfg, workdir)
    out = capsys.readouterr().out
    assert "checkpoint.on_no_valid_step=restart: training from step 0" in out
    assert _same(result.state, reference[1].state)  # a fresh run, bitwise the reference
    archived = list(workdir.glob("metrics.archived-*.jsonl"))
    assert len(archived) == 1 and archived[0].read_text() == rows_before


def test_on_no_valid_step_is_checked():
    with pytest.raises(dlkit.ConfigError, match=r"checkpoint.on_no_valid_step: expected one of"):
        tiny_digits_config(**{"checkpoint.on_no_valid_step": "ignore"}).validate()


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: (d / ckpt_lib.MANIFEST).unlink(), "not committed (dlkit_manifest.json missing)"),
        (lambda d: (shutil.rmtree(d), d.mkdir()), "the step directory is empty"),
        (lambda d: _flip(_data_file(d)), "CRC-32 mismatch"),
    ],
    ids=["manifest_deleted", "step_emptied", "bit_flipped"],
)
def test_eval_and_load_checkpoint_say_which_step_they_skip_and_why(
    reference, tmp_path, capsys, damage, reason
):
    workdir = _copy(reference, tmp_path)
    damage(workdir / "checkpoints" / "12")
    assert cli.main(["eval", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[-1])["step"] == 6
    assert "skipping step 12" in out and reason in out, out
    state, _ = dlkit.load_checkpoint(workdir)
    assert int(state.step) == 6
    assert "skipping step 12" in capsys.readouterr().out
    confusion, step = dlkit.report.confusion_matrix(workdir)  # what `dlkit report` draws
    assert step == 6 and int(confusion.sum()) > 0
    assert "skipping step 12" in capsys.readouterr().out
    assert (workdir / "checkpoints" / "12").is_dir()  # a reader moves nothing


def test_retention_never_deletes_the_newest_good_step_for_a_worse_one(tmp_path):
    state = {"w": np.arange(4.0)}
    with dlkit.Checkpointer(tmp_path, max_to_keep=1) as c:
        c.save(1, state, data_position=1, metrics={"eval/loss": 0.4})
        c.save(2, state, data_position=2, metrics={"eval/loss": float("nan")})
        c.save(3, state, data_position=3, metrics={"eval/loss": float("inf")})
        c.wait()
        assert c.all_steps() == [1, 3]  # the newest, and the newest with finite metrics
        c.save(4, state, data_position=4, metrics={"eval/loss": 0.5})
        c.wait()
        assert c.all_steps() == [4]


def test_a_nan_metric_never_ranks_as_the_best_step(tmp_path):
    state = {"w": np.arange(4.0)}
    with dlkit.Checkpointer(tmp_path, max_to_keep=1, keep_best=1) as c:
        for step, loss in [(1, float("nan")), (2, 0.3), (3, 0.9), (4, 0.8)]:
            c.save(step, state, data_position=step, metrics={"eval/loss": loss})
            c.wait()
        assert c.all_steps() == [2, 4]
    with dlkit.Checkpointer(tmp_path / "nan", max_to_keep=2) as c:
        c.save(1, state, data_position=1, metrics={"eval/loss": float("nan")})
    manifest = (tmp_path / "nan" / "1" / ckpt_lib.MANIFEST).read_text()
    json.loads(manifest, parse_constant=lambda token: pytest.fail(f"bare {token}"))
