"""Checkpoints: resume is bitwise, restore works on another device count and in a notebook."""

import json
import os
import shutil
import signal
import subprocess
import time

import flax
import jax
import numpy as np
import pytest
from conftest import abstract_of, assert_bitwise_equal, tiny_digits_config

import dlkit
from dlkit import cli


def test_resume_in_process_is_bitwise_identical(tmp_path):
    full = dlkit.fit(tiny_digits_config(), tmp_path / "full")
    part = tiny_digits_config()
    part_dir = tmp_path / "part"
    first = dlkit.fit(part, part_dir)  # writes checkpoints at steps 6 and 12
    ckpt = dlkit.Checkpointer(part_dir / "checkpoints")
    assert ckpt.all_steps() == [6, 12]
    ckpt.close()
    # Delete the final step: the workdir now looks like a run killed after step 6's save.
    shutil.rmtree(part_dir / "checkpoints" / "12")
    resumed = dlkit.fit(tiny_digits_config(), part_dir)
    assert_bitwise_equal(full.state, first.state)
    assert_bitwise_equal(full.state, resumed.state)
    # History: rows past the restored step were dropped and rewritten, not duplicated.
    steps = [r["step"] for r in resumed.history]
    assert steps == [4, 6, 8, 12]
    lines = (part_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [4, 6, 8, 12]


def _cli(workdir, *sets):
    return cli.train_command("digits_mlp", workdir, sets)


def _committed_steps(ckpt_dir):
    if not ckpt_dir.exists():
        return []
    return sorted(
        int(p.name)
        for p in ckpt_dir.iterdir()
        if p.name.isdigit() and (p / "commit_success.txt").exists()
    )


def test_sigkill_and_restart_is_bitwise_identical_to_uninterrupted(tmp_path):
    sets = [
        "train.steps=1500",
        "checkpoint.every_steps=100",
        "train.log_every=100",
        "train.eval_every=0",
        "checkpoint.max_to_keep=2",
        "parallel.num_devices=2",
        "train.batch_size=64",
    ]
    env = dict(os.environ)
    # Uninterrupted reference.
    subprocess.run(_cli(tmp_path / "ref", *sets), check=True, env=env, capture_output=True)
    # Interrupted: SIGKILL as soon as a checkpoint past step 100 is committed.
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(killed_dir, *sets), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(s >= 200 for s in _committed_steps(killed_dir / "checkpoints")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(_committed_steps(killed_dir / "checkpoints"))
    assert killed_at < 1500
    out = subprocess.run(
        _cli(killed_dir, *sets), check=True, env=env, capture_output=True, text=True
    )
    assert f"resuming from step {killed_at}" in out.stdout
    ref_state, _ = dlkit.load_checkpoint(tmp_path / "ref")
    resumed_state, _ = dlkit.load_checkpoint(killed_dir)
    assert int(resumed_state.step) == 1500
    assert_bitwise_equal(ref_state, resumed_state)


def test_checkpoint_saved_on_8_devices_restores_on_1(tmp_path):
    cfg = tiny_digits_config()
    result = dlkit.fit(cfg, tmp_path)
    assert len(jax.tree.leaves(result.state.params)[0].sharding.device_set) == 8
    one = dlkit.make_strategy("jit", num_devices=1)
    state, loaded_cfg = dlkit.load_checkpoint(tmp_path, strategy=one)
    assert loaded_cfg.to_dict() == cfg.to_dict()
    leaf = jax.tree.leaves(state.params)[0]
    assert leaf.sharding.device_set == {jax.devices()[0]}
    assert_bitwise_equal(result.state, state)
    # The default (a notebook's) also lands on one plain CPU device.
    state_default, _ = dlkit.load_checkpoint(tmp_path)
    assert jax.tree.leaves(state_default.params)[0].sharding.device_set == {jax.devices("cpu")[0]}
    # And training continues from it on 1 device with the same loader position.
    more = tiny_digits_config(**{"train.steps": 18, "parallel.num_devices": 1})
    cont = dlkit.fit(more, tmp_path)
    assert int(cont.state.step) == 18


def test_checkpoint_holds_state_data_position_and_config(tmp_path):
    cfg = tiny_digits_config()
    dlkit.fit(cfg, tmp_path)
    step_dir = tmp_path / "checkpoints" / "12"
    # One Orbax item: the position and the config are JSON files beside the arrays.
    assert "state" in {p.name for p in step_dir.iterdir()}
    assert not (step_dir / "data").exists() and not (step_dir / "config").exists()
    assert json.loads((step_dir / "state" / "data.json").read_text()) == {"position": 12}
    assert json.loads((step_dir / "state" / "config.json").read_text()) == cfg.to_dict()
    with dlkit.Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.restore_config(12) == cfg.to_dict()
        c = dlkit.build(cfg)
        _, position = ckpt.restore(c.abstract_state(), 6)
    assert position == 6
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.to_dict()


def test_keeps_the_latest_n_and_async_saves_are_complete_when_fit_returns(tmp_path):
    cfg = tiny_digits_config(**{"checkpoint.every_steps": 2, "checkpoint.max_to_keep": 3})
    assert cfg.checkpoint.async_save
    dlkit.fit(cfg, tmp_path)
    names = sorted((p.name for p in (tmp_path / "checkpoints").iterdir()), key=int)
    assert names == ["8", "10", "12"]
    assert all((tmp_path / "checkpoints" / n / "commit_success.txt").exists() for n in names)


def test_restore_of_missing_step_names_the_saved_steps(tmp_path):
    dlkit.fit(tiny_digits_config(), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"expected one of the saved steps \[6, 12\]"):
        dlkit.load_checkpoint(tmp_path, step=7)


def test_a_checkpoint_written_compressed_by_orbax_standard_handler_restores(tmp_path):
    """dlkit writes the state uncompressed; checkpoints of earlier versions (Orbax's
    StandardCheckpointHandler, zstd) must still restore, bit for bit."""
    import orbax.checkpoint as ocp

    from dlkit import checkpoint as checkpoint_lib

    cfg = tiny_digits_config()
    c = dlkit.build(cfg)
    state = c.init_state()
    directory = tmp_path / "checkpoints"
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )
    manager.save(
        3,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"position": 3}),
            config=ocp.args.JsonSave(cfg.to_dict()),
        ),
    )
    manager.close()
    metadata = json.loads((directory / "3" / "state" / "_METADATA").read_text())
    assert "zstd" in json.dumps(metadata) or any(
        "zstd" in p.read_text(errors="ignore")
        for p in (directory / "3" / "state").rglob("*")
        if p.is_file() and p.stat().st_size < 100_000
    )  # the old format really is compressed
    checkpoint_lib.write_manifest(directory / "3", 3)
    with dlkit.Checkpointer(directory) as ckpt:
        restored, position = ckpt.restore(c.abstract_state())
        assert ckpt.restore_config(3) == cfg.to_dict()  # from the old "config" item
    assert position == 3  # from the old "data" item
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_run_writes_the_state_as_raw_bytes(tmp_path):
    """No compression, no container: each leaf's bytes sit in the data file at the offset its
    index entry names (weights barely compress, and decompressing halved restore speed)."""
    result = dlkit.fit(tiny_digits_config(), tmp_path)
    state_dir = tmp_path / "checkpoints" / "12" / "state"
    index = json.loads((state_dir / "index.p0.json").read_text())
    data = (state_dir / "data.p0.bin").read_bytes()
    pieces = index["pieces"]
    kernels = [p for p in pieces if p["key"][0] == "params" and p["key"][-1] == "kernel"]
    assert kernels
    flat = flax.traverse_util.flatten_dict(dict(result.state.params))
    for piece in kernels:
        (start, stop), (c0, c1) = piece["index"]  # a replicated (whole) 2-D kernel
        want = np.asarray(flat[tuple(piece["key"][1:])])
        assert (stop - start, c1 - c0) == want.shape
        assert data[piece["offset"] : piece["offset"] + piece["nbytes"]] == want.tobytes()


def test_an_async_save_outlives_the_donation_of_the_state_it_was_given(tmp_path):
    """The train step donates the state right after `save` returns; the write must not read
    those buffers (here deleted outright, as donation does)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    state = {"w": jnp.asarray(rng.normal(size=(256, 256)), jnp.float32), "step": jnp.int32(7)}
    expected = {k: np.asarray(v).copy() for k, v in state.items()}
    abstract = abstract_of(state)
    with dlkit.Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(7, state, data_position=7)
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        ckpt.wait()
        restored, position = ckpt.restore(abstract)
    assert position == 7
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(restored[key]), value)


@pytest.mark.parametrize("async_save", [True, False])
def test_retention_removes_old_steps_off_the_loop_and_close_leaves_no_trash(
    tmp_path, monkeypatch, async_save
):
    """An old step leaves the listing inside `save`; its files are removed on a background
    thread (here held back), which `close` waits for."""
    import threading

    import jax.numpy as jnp

    from dlkit import checkpoint as checkpoint_lib

    gate = threading.Event()
    real_rmtree = shutil.rmtree

    def held_rmtree(path, *args, **kwargs):
        assert gate.wait(60), "the test never opened the gate"
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_lib.shutil, "rmtree", held_rmtree)
    state = {"w": jnp.arange(1024.0)}
    ckpt = dlkit.Checkpointer(tmp_path, max_to_keep=1, async_save=async_save)
    for step in (1, 2, 3):
        ckpt.save(step, state, data_position=step)  # returns while the removal is held
        ckpt.wait()
    assert ckpt.all_steps() == [3]
    trashed = list((tmp_path / ".trash").iterdir())
    assert sorted(p.name.split("-")[0] for p in trashed) == ["1", "2"]  # renamed, not removed
    assert all((p / "dlkit_manifest.json").exists() for p in trashed)
    gate.set()
    ckpt.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]


def test_a_step_number_deleted_by_retention_can_be_saved_again(tmp_path):
    """Orbax keeps its own list of steps; it must not refuse a number retention freed."""
    import jax.numpy as jnp

    state = {"w": jnp.arange(16.0)}
    with dlkit.Checkpointer(
        tmp_path, max_to_keep=1, keep_best=1, best_metric="loss", async_save=True
    ) as ckpt:
        for step, loss in ((1, 5.0), (2, 4.0), (3, 3.0)):
            ckpt.save(step, state, data_position=step, metrics={"loss": loss})
        ckpt.wait()
        assert ckpt.all_steps() == [3]
        ckpt.save(1, {"w": state["w"] * 2}, data_position=1, metrics={"loss": 0.5})
        ckpt.wait()
        assert ckpt.all_steps() == [1, 3]  # step 1 is now the best
        restored, position = ckpt.restore(abstract_of(state), step=1)
    assert position == 1
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(16.0) * 2)


@pytest.mark.parametrize("where", ["write_manifest", "arraystore._write_task"])
def test_a_failed_async_save_is_raised_by_the_next_call_and_keeps_older_steps(
    tmp_path, monkeypatch, where
):
    """The disk fills up while step 2 is written: in the arrays' writer, or in the manifest."""
    import jax.numpy as jnp

    from dlkit import arraystore
    from dlkit import checkpoint as checkpoint_lib

    state = {"w": jnp.arange(12.0)}
    with dlkit.Checkpointer(tmp_path, async_save=True, log=lambda s: None) as ckpt:
        ckpt.save(1, state, data_position=1)
        ckpt.wait()

        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        if where == "write_manifest":
            monkeypatch.setattr(checkpoint_lib, "write_manifest", disk_full)
        else:
            monkeypatch.setattr(arraystore, "_write_task", disk_full)
        ckpt.save(2, state, data_position=2)  # fails on its thread
        with pytest.raises(
            checkpoint_lib.CheckpointError,
            match=r"async save of step 2 .*"
            r"failed: OSError: .*No space left on device",
        ):
            ckpt.wait()
        ckpt.wait()  # raised once, not again
        monkeypatch.undo()
        assert ckpt.all_steps() == [1]  # step 2 has no manifest: not a step
        restored, position = ckpt.restore(abstract_of(state))
    assert position == 1
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(12.0))
    # The next Checkpointer on this directory cleans what the failed save left.
    with dlkit.Checkpointer(tmp_path, log=lambda s: None) as ckpt:
        assert ckpt.all_steps() == [1]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["1"]


def _small_state(scale=1):
    import jax.numpy as jnp

    return {
        "params": {
            "dense": {
                "kernel": jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4) * scale,
                "bias": jnp.full((4,), 0.5 * scale, jnp.float32),
            },
            "embed": jnp.arange(10, dtype=jnp.int32).reshape(5, 2) * scale,
        },
        "step": jnp.int32(7 * scale),
    }


@pytest.mark.parametrize("async_save", [True, False])
def test_a_step_dlkit_writes_is_listed_and_restored_by_a_plain_orbax_manager(tmp_path, async_save):
    """Single-process steps are written by dlkit itself, not by Orbax's manager, in the layout
    that manager writes: users (and dlkit's own restore, which goes through Orbax) rely on a
    plain `ocp.CheckpointManager` with dlkit's handler listing such a step, reading its
    metadata and restoring it bit for bit."""
    import orbax.checkpoint as ocp

    from dlkit import arraystore

    state = _small_state()
    abstract = abstract_of(state)
    ckpt_dir = tmp_path / "dlkit"
    with dlkit.Checkpointer(ckpt_dir, async_save=async_save) as ckpt:
        ckpt.save(7, state, data_position=7, config={"lr": 0.1})
    # What Orbax's own manager writes for the same item, to compare the layout with.
    reference = ocp.CheckpointManager(
        tmp_path / "orbax",
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
        item_handlers={"state": arraystore.StateHandler()},
    )
    reference.save(7, args=ocp.args.Composite(state=arraystore.StateSave(state)))
    reference.close()

    step_dir = ckpt_dir / "7"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["7"]  # renamed into place, no tmp dir
    orbax_names = {p.name for p in (tmp_path / "orbax" / "7").iterdir()}
    assert {p.name for p in step_dir.iterdir()} == orbax_names | {"dlkit_manifest.json"}
    assert orbax_names == {"_CHECKPOINT_METADATA", "commit_success.txt", "state"}
    meta = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
    orbax_meta = json.loads((tmp_path / "orbax" / "7" / "_CHECKPOINT_METADATA").read_text())
    assert meta["item_handlers"] == {"state": "dlkit.arraystore.StateHandler"}
    assert meta["item_handlers"] == orbax_meta["item_handlers"]
    assert set(meta) == set(orbax_meta)
    assert meta["init_timestamp_nsecs"] <= meta["commit_timestamp_nsecs"]
    assert (step_dir / "commit_success.txt").read_text() == (
        f"Checkpoint commit was successful to {step_dir}"
    )

    manager = ocp.CheckpointManager(
        ckpt_dir,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers={"state": arraystore.StateHandler()},
    )
    try:
        assert manager.all_steps() == [7]
        saved = manager.item_metadata(7)["state"]
        assert jax.tree.structure(saved) == jax.tree.structure(abstract)
        for got, want in zip(jax.tree.leaves(saved), jax.tree.leaves(abstract), strict=True):
            assert (tuple(got.shape), got.dtype) == (want.shape, want.dtype)
        restored = manager.restore(
            7, args=ocp.args.Composite(state=arraystore.StateRestore(abstract))
        )["state"]
    finally:
        manager.close()
    assert_bitwise_equal(state, restored)


@pytest.mark.parametrize(
    "fails_at", ["index.p0.json", "_CHECKPOINT_METADATA", "commit_success.txt"]
)
def test_a_save_that_fails_midway_leaves_no_step_and_the_next_save_of_that_step_succeeds(
    tmp_path, monkeypatch, fails_at
):
    """The disk fills up during a sync save, after the arrays' data file is written (at the
    state's index, the step's metadata, or the commit marker): the step must not be listed,
    older steps must still restore, and saving the same step again must work even though the
    failed save left its `<step>.orbax-checkpoint-tmp` directory behind."""
    import orbax.checkpoint as ocp

    from dlkit import arraystore

    first, second, retry = _small_state(1), _small_state(2), _small_state(3)
    real_write_bytes = arraystore.write_bytes

    def disk_full_at(path, data):
        if os.path.basename(path) == fails_at:
            raise OSError(28, "No space left on device")
        return real_write_bytes(path, data)

    tmp_dir = tmp_path / "2.orbax-checkpoint-tmp"
    with dlkit.Checkpointer(tmp_path, async_save=False, log=lambda s: None) as ckpt:
        ckpt.save(1, first, data_position=1)
        monkeypatch.setattr(arraystore, "write_bytes", disk_full_at)
        with pytest.raises(OSError, match="No space left on device"):
            ckpt.save(2, second, data_position=2)
        monkeypatch.undo()
        assert (tmp_dir / "state" / "data.p0.bin").exists()  # it failed after the data file
        assert not (tmp_path / "2").exists()
        assert ckpt.all_steps() == [1]
        manager = ocp.CheckpointManager(
            tmp_path,
            options=ocp.CheckpointManagerOptions(read_only=True, create=False),
            item_handlers={"state": arraystore.StateHandler()},
        )
        assert manager.all_steps() == [1]  # nor by Orbax
        manager.close()
        restored, position = ckpt.restore(abstract_of(first))
        assert position == 1
        assert_bitwise_equal(first, restored)

        ckpt.save(2, retry, data_position=2)  # the leftover tmp directory must not block it
        assert ckpt.all_steps() == [1, 2]
        assert not tmp_dir.exists()
        restored, position = ckpt.restore(abstract_of(retry))
        assert position == 2
        assert_bitwise_equal(retry, restored)
        restored, _ = ckpt.restore(abstract_of(first), step=1)
        assert_bitwise_equal(first, restored)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def test_a_plain_dict_state_with_params_restores_and_a_misfit_names_the_leaf(tmp_path):
    """`restore` compares saved and expected params by name before reading; a plain dict
    state (not a TrainState) with a "params" entry goes through the same check."""
    state = _small_state()
    with dlkit.Checkpointer(tmp_path) as ckpt:
        ckpt.save(7, state, data_position=7)
        ckpt.wait()
        restored, _ = ckpt.restore(abstract_of(state))
        assert_bitwise_equal(restored, state)
        misfit = abstract_of(state)
        misfit["params"]["dense"]["bias"] = jax.ShapeDtypeStruct((5,), np.float32)
        with pytest.raises(
            dlkit.checkpoint.CheckpointError,
            match=r"params/dense/bias: this model expects shape \(5,\), the checkpoint has \(4,\)",
        ):
            ckpt.restore(misfit)
