"""Async saves through the writer process (`dlkit.checkpoint.writer`): the same step directory
as Orbax writes in this process, errors raised here, deletions done there, and no orphan."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import psutil
import pytest
from conftest import abstract_of, assert_bitwise_equal, tiny_digits_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dlkit
from dlkit.checkpoint import writer

# Files whose content names the path or the time they were written at.
_VARYING = ("_CHECKPOINT_METADATA", "commit_success.txt")


def _sharded_state():
    """Leaves on an 8-device mesh: split by rows, split by columns, replicated; plus an int
    scalar, a bfloat16 array, an empty dict and None (Orbax records the empty nodes)."""
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    rng = np.random.default_rng(0)

    def put(x, spec):
        return jax.device_put(x, NamedSharding(mesh, spec))

    return {
        "params": {
            "rows": put(rng.normal(size=(16, 6)).astype(np.float32), P("data")),
            "cols": put(rng.normal(size=(3, 8)).astype(np.float32), P(None, "model")),
            "both": put(rng.normal(size=(8, 4)).astype(np.float32), P("data", "model")),
        },
        "step": put(np.int32(42), P()),
        "low": put(rng.normal(size=(5,)).astype(jnp.bfloat16), P()),
        "single": jax.device_put(np.arange(3, dtype=np.int32), jax.devices()[3]),
        "model_state": {},
        "ema": None,
    }


def _files(step_dir):
    return sorted(
        os.path.relpath(os.path.join(root, name), step_dir)
        for root, _, names in os.walk(step_dir)
        for name in names
    )


def test_a_step_written_by_the_process_equals_the_one_orbax_writes_in_process(tmp_path):
    """Same files, same bytes (but for paths and times), same shardings in the metadata, and
    the same values restored, for leaves split and replicated over 8 devices."""
    state = _sharded_state()
    for way in ("process", "inprocess"):
        with dlkit.Checkpointer(tmp_path / way, async_writer=way, log=lambda s: None) as ckpt:
            ckpt.save(5, state, data_position=9, config={"a": 1}, metrics={"eval/loss": 0.25})
            ckpt.wait()
            restored, position = ckpt.restore(abstract_of(state))
        assert position == 9
        assert_bitwise_equal(state, restored)
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
            assert got.sharding == want.sharding
    by_process, in_process = tmp_path / "process" / "5", tmp_path / "inprocess" / "5"
    assert _files(by_process) == _files(in_process)
    assert "state/_sharding" in _files(by_process)
    compared = 0
    for name in _files(by_process):
        if os.path.basename(name) in _VARYING or name == "dlkit_manifest.json":
            continue
        assert (by_process / name).read_bytes() == (in_process / name).read_bytes(), name
        compared += 1
    assert compared > 10
    manifests = [
        json.loads((step / "dlkit_manifest.json").read_text()) for step in (by_process, in_process)
    ]
    assert manifests[0]["metrics"] == manifests[1]["metrics"] == {"eval/loss": 0.25}
    assert sorted(manifests[0]["files"]) == sorted(manifests[1]["files"])


def test_async_saves_on_the_cpu_backend_go_to_one_writer_process_by_default(tmp_path):
    state = {"w": jnp.arange(8.0)}
    with dlkit.Checkpointer(tmp_path / "a") as first, dlkit.Checkpointer(tmp_path / "b") as second:
        first.save(1, state, data_position=1)
        second.save(1, state, data_position=1)
        first.wait()
        second.wait()
    writers = [p for p in psutil.Process().children() if "writer._serve" in " ".join(p.cmdline())]
    assert len(writers) == 1  # shared by every Checkpointer of this process
    assert writers[0].nice() == 19
    assert dlkit.Checkpointer(tmp_path / "c", async_save=False)._process_writer is None


def test_a_failed_save_in_the_writer_is_raised_once_and_the_next_save_works(tmp_path):
    """Orbax refuses the config (a set is not JSON) in the writer process: `wait` raises it
    naming the step, the older step stays, and the writer goes on serving."""
    state = {"w": jnp.arange(6.0)}
    with dlkit.Checkpointer(tmp_path, async_writer="process", log=lambda s: None) as ckpt:
        ckpt.save(1, state, data_position=1)
        ckpt.save(2, state, data_position=2, config={"bad": {1, 2}})
        with pytest.raises(dlkit.checkpoint.CheckpointError, match=r"step 2 .*TypeError.*set"):
            ckpt.wait()
        ckpt.wait()  # raised once, not again
        assert ckpt.all_steps() == [1]
        ckpt.save(2, {"w": state["w"] * 3}, data_position=2)
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
        restored, position = ckpt.restore(abstract_of(state))
    assert position == 2
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(6.0) * 3)


def _writer_process():
    (child,) = [p for p in psutil.Process().children() if "writer._serve" in " ".join(p.cmdline())]
    return child


def test_a_writer_killed_mid_save_fails_that_save_and_the_next_starts_a_new_one(tmp_path):
    small = {"w": jnp.arange(4.0)}
    big = {"w": jnp.ones((64, 1 << 20), jnp.float32)}  # 256 MiB: still in flight when killed
    with dlkit.Checkpointer(tmp_path, async_writer="process", log=lambda s: None) as ckpt:
        ckpt.save(1, small, data_position=1)
        ckpt.wait()
        child = _writer_process()
        ckpt.save(2, big, data_position=2)
        # Kill it once Orbax is writing step 2 (killed before it has the job, the writer is
        # replaced and nothing is lost: the next test).
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("2.orbax-checkpoint-tmp*")):
            assert time.monotonic() < deadline, "the writer never started step 2"
            time.sleep(0.001)
        child.kill()
        with pytest.raises(dlkit.checkpoint.CheckpointError, match="step 2.*writer process"):
            ckpt.wait()
        ckpt.save(3, small, data_position=3)
        ckpt.wait()
        assert ckpt.all_steps() == [1, 3]
        assert _writer_process().pid != child.pid
    with dlkit.Checkpointer(tmp_path, log=lambda s: None) as again:  # cleans what step 2 left
        assert again.all_steps() == [1, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "3"]


def test_sigint_and_sigterm_reach_the_training_process_not_the_writer(tmp_path):
    """Ctrl-C (SIGINT to the whole foreground group) or a scheduler's SIGTERM to every process
    must not kill the save the training process is making in answer to it."""
    big = {"w": jnp.ones((16, 1 << 20), jnp.float32)}
    with dlkit.Checkpointer(tmp_path, async_writer="process", log=lambda s: None) as ckpt:
        ckpt.save(1, {"w": jnp.arange(2.0)}, data_position=1)
        ckpt.wait()
        child = _writer_process()
        assert os.getsid(child.pid) != os.getsid(0)  # not in the terminal's session
        ckpt.save(2, big, data_position=2)
        child.send_signal(signal.SIGINT)
        child.send_signal(signal.SIGTERM)
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
        assert _writer_process().pid == child.pid


def test_a_writer_killed_between_saves_is_replaced_without_losing_a_save(tmp_path):
    state = {"w": jnp.arange(4.0)}
    with dlkit.Checkpointer(tmp_path, async_writer="process", log=lambda s: None) as ckpt:
        ckpt.save(1, state, data_position=1)
        ckpt.wait()
        child = _writer_process()
        child.kill()
        child.wait(30)
        ckpt.save(2, state, data_position=2)
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]


def test_retention_removes_old_steps_in_the_writer_and_close_leaves_no_trash(tmp_path):
    state = {"w": jnp.arange(1024.0)}
    with dlkit.Checkpointer(tmp_path, max_to_keep=1, async_writer="process") as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, state, data_position=step)
        ckpt.wait()
        assert ckpt.all_steps() == [3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]


def test_the_writer_dies_with_a_sigkilled_training_process(tmp_path):
    """No orphan: killing the training process kills its writer, which leaves at most an
    uncommitted step that the next Checkpointer cleans."""
    script = textwrap.dedent(
        f"""
        import os, sys, time
        import jax.numpy as jnp, psutil, dlkit
        ckpt = dlkit.Checkpointer({str(tmp_path)!r}, async_writer="process")
        ckpt.save(1, {{"w": jnp.arange(4.0)}}, data_position=1)
        ckpt.wait()
        (child,) = psutil.Process().children()
        print(child.pid, flush=True)
        time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(proc.stdout.readline())
        assert psutil.pid_exists(child_pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 20
        while psutil.pid_exists(child_pid) and time.monotonic() < deadline:
            try:
                if psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
        alive = psutil.pid_exists(child_pid) and (
            psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE
        )
        assert not alive, "the writer outlived its SIGKILLed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
    with dlkit.Checkpointer(tmp_path, log=lambda s: None) as ckpt:
        assert ckpt.all_steps() == [1]


def test_fit_through_the_writer_resumes_bitwise_like_fit_in_process(tmp_path):
    """Two runs stopped at step 20 and resumed to 40, one per writer, end in the same state as
    each other (and the steps hold the same arrays)."""
    finals = []
    for way in ("process", "inprocess"):
        cfg = tiny_digits_config()
        cfg.train.steps = 20
        cfg.checkpoint.every_steps = 10
        cfg.checkpoint.async_writer = way
        dlkit.fit(cfg, tmp_path / way)
        cfg.train.steps = 40
        result = dlkit.fit(cfg, tmp_path / way)
        finals.append(result.state)
    assert_bitwise_equal(finals[0].params, finals[1].params)
    assert_bitwise_equal(finals[0].opt_state, finals[1].opt_state)


def test_bad_async_writer_values_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match=r"async_writer: expected one of .* got 'fork'"):
        dlkit.Checkpointer(tmp_path, async_writer="fork")
    cfg = tiny_digits_config()
    cfg.checkpoint.async_writer = "threads"
    with pytest.raises(dlkit.ConfigError, match=r"checkpoint.async_writer.*threads"):
        cfg.validate()


def test_a_leaf_the_writer_cannot_rebuild_keeps_the_save_in_process():
    """`encode` gives None (the Checkpointer then saves with Orbax in this process) for a leaf
    the writer cannot rebuild exactly: a typed PRNG key."""
    assert writer.encode({"w": jnp.arange(3.0), "key": jax.random.key(0)}) is None
    sent = writer.encode({"w": jnp.arange(3.0), "n": 4})
    assert sent["n"] == 4 and np.array_equal(sent["w"].value, np.arange(3.0))
