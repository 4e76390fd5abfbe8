"""Checkpoints: resume is bitwise, restore works on another device count and in a notebook."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import flax
import jax
import numpy as np
import pytest
from conftest import abstract_of, assert_bitwise_equal, tiny_digits_config

import dlkit
from dlkit import cli
from dlkit.checkpoint import store


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
    # Three Orbax items: the state (PyTree), the data position and the config (JSON).
    assert {"state", "data", "config"} <= {p.name for p in step_dir.iterdir()}
    assert json.loads((step_dir / "data" / "metadata").read_text()) == {"position": 12}
    assert json.loads((step_dir / "config" / "metadata").read_text()) == cfg.to_dict()
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


def test_every_seconds_saves_at_the_first_logged_row_that_long_after_the_last_save(tmp_path):
    """Rows every 4 steps; each row's callback takes 0.5 s; 0.75 s between saves. After a save
    the clock restarts, so the next two rows (~0 s and ~0.5 s after it) do not save and the
    third (~1 s) does: mid-run saves 12 steps apart. The first comes at row 12 or earlier, as
    the run's start-up adds to the time before it; the last step always saves."""

    class SlowRows(dlkit.Callback):
        def on_row(self, run, row):
            time.sleep(0.5)

    timed = {"checkpoint.every_steps": 0, "train.eval_every": 0, "checkpoint.max_to_keep": 20}
    cfg = tiny_digits_config(**timed, **{"train.steps": 36, "checkpoint.every_seconds": 0.75})
    dlkit.fit(cfg, tmp_path / "timed", callbacks=[SlowRows()])
    saved = sorted(int(p.name) for p in (tmp_path / "timed" / "checkpoints").iterdir())
    mid_run, last = saved[:-1], saved[-1]
    assert last == 36 and mid_run and mid_run[0] <= 12, saved
    assert set(np.diff(mid_run)) <= {12}, saved
    # An interval longer than the run: only the last step.
    dlkit.fit(tiny_digits_config(**timed, **{"checkpoint.every_seconds": 3600.0}), tmp_path / "h")
    assert [p.name for p in (tmp_path / "h" / "checkpoints").iterdir()] == ["12"]


def test_a_step_records_eval_metrics_only_when_it_was_evaluated(tmp_path):
    """Saves every 4 steps, evals every 8: steps 4 and 12 were not evaluated. Their manifests
    must not carry an earlier step's eval/loss, which `keep_best` would rank them by."""
    from dlkit.checkpoint import commit

    cfg = tiny_digits_config(
        **{"train.steps": 16, "train.eval_every": 8, "checkpoint.every_steps": 4}
    )
    cfg.checkpoint.max_to_keep = 10
    result = dlkit.fit(cfg, tmp_path)
    evals = dict(zip(*result.history.series("eval/loss"), strict=True))
    assert sorted(evals) == [8, 16]
    recorded = {
        step: commit.read_manifest(tmp_path / "checkpoints" / str(step))["metrics"]
        for step in (4, 8, 12, 16)
    }
    assert recorded[4] == {} and recorded[12] == {}
    assert recorded[8]["eval/loss"] == pytest.approx(evals[8])
    assert recorded[16]["eval/loss"] == pytest.approx(evals[16])


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


def test_a_run_writes_the_state_uncompressed_in_zarr3_without_ocdbt(tmp_path):
    """The options chosen by measurement (dlkit.checkpoint.store): one zarr3 array per leaf, no
    OCDBT database, no compression, so each kernel's bytes sit in its chunk file as they are."""
    result = dlkit.fit(tiny_digits_config(), tmp_path)
    state_dir = tmp_path / "checkpoints" / "12" / "state"
    assert not (state_dir / "ocdbt.process_0").exists() and not list(state_dir.glob("d/*"))
    flat = flax.traverse_util.flatten_dict(dict(result.state.params), sep=".")
    kernels = [k for k in flat if k.endswith("kernel")]
    assert kernels
    for key in kernels:
        array_dir = state_dir / f"params.{key}"
        meta = json.loads((array_dir / "zarr.json").read_text())
        assert meta["zarr_format"] == 3 and "zstd" not in json.dumps(meta["codecs"])
        rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        want = np.asarray(flat[key]).astype("<f4")
        chunks = sorted((array_dir / "c").glob("*/0"), key=lambda p: int(p.parent.name))
        assert len(chunks) == -(-want.shape[0] // rows)
        for i, chunk in enumerate(chunks):  # each chunk file: its rows' raw bytes, then an index
            assert chunk.read_bytes().startswith(want[i * rows : (i + 1) * rows].tobytes())


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
    from etils import epath

    gate = threading.Event()
    path_class = type(epath.Path(tmp_path))
    real_rmtree = path_class.rmtree

    def held_rmtree(self, *args, **kwargs):
        assert gate.wait(60), "the test never opened the gate"
        real_rmtree(self, *args, **kwargs)

    state = {"w": jnp.arange(1024.0)}
    ckpt = dlkit.Checkpointer(tmp_path, max_to_keep=1, async_save=async_save)
    monkeypatch.setattr(path_class, "rmtree", held_rmtree)
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


@pytest.mark.parametrize("where", ["write_manifest", "arrays"])
def test_a_failed_async_save_is_raised_by_the_next_call_and_keeps_older_steps(
    tmp_path, monkeypatch, where
):
    """The disk fills up while step 2 is written: in Orbax's array writer, or in the
    manifest."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from dlkit.checkpoint import commit

    state = {"w": jnp.arange(12.0)}
    with dlkit.Checkpointer(tmp_path, async_save=True, log=lambda s: None) as ckpt:
        ckpt.save(1, state, data_position=1)
        ckpt.wait()

        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        async def disk_full_async(*args, **kwargs):
            disk_full()

        if where == "write_manifest":
            monkeypatch.setattr(commit, "write_manifest", disk_full)
        else:
            monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save", disk_full_async)
        try:
            ckpt.save(2, state, data_position=2)  # fails on its thread (or here)
            ckpt.wait()
        except Exception as e:  # noqa: BLE001 - either way it names the step and the cause
            error = e
        assert "No space left on device" in str(error) or "No space left" in repr(error.__cause__)
        ckpt.wait()  # raised once, not again
        monkeypatch.undo()
        assert ckpt.all_steps() == [1]  # step 2 was never published
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
def test_a_step_dlkit_writes_is_what_a_plain_orbax_manager_writes(tmp_path, async_save):
    """The same files as Orbax's own CheckpointManager writes for the same items, plus the
    manifest; a plain manager, told nothing about handlers, lists and restores it."""
    import orbax.checkpoint as ocp

    state = _small_state()
    ckpt_dir = tmp_path / "dlkit"
    with dlkit.Checkpointer(ckpt_dir, async_save=async_save) as ckpt:
        ckpt.save(7, state, data_position=7, config={"lr": 0.1})
    reference = ocp.CheckpointManager(tmp_path / "orbax")
    reference.save(
        7,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            data=ocp.args.JsonSave({"position": 7}),
            config=ocp.args.JsonSave({"lr": 0.1}),
        ),
    )
    reference.close()
    step_dir = ckpt_dir / "7"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["7"]  # renamed into place, no tmp dir
    orbax_names = {p.name for p in (tmp_path / "orbax" / "7").iterdir()}
    assert {p.name for p in step_dir.iterdir()} == orbax_names | {"dlkit_manifest.json"}
    meta = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
    orbax_meta = json.loads((tmp_path / "orbax" / "7" / "_CHECKPOINT_METADATA").read_text())
    assert meta["item_handlers"] == orbax_meta["item_handlers"]
    assert meta["custom_metadata"] == {"dlkit": {"version": 1}}

    manager = ocp.CheckpointManager(ckpt_dir)
    try:
        assert manager.all_steps() == [7]
        restored = manager.restore(7)
    finally:
        manager.close()
    assert_bitwise_equal(state, restored["state"])
    assert restored["data"] == {"position": 7} and restored["config"] == {"lr": 0.1}


def test_plain_orbax_without_dlkit_restores_what_load_checkpoint_returns(tmp_path):
    """The recipe in README.md, run in a process that never imports dlkit."""
    dlkit.fit(tiny_digits_config(), tmp_path)
    script = f"""
import sys
import jax
import numpy as np
import orbax.checkpoint as ocp
items = ocp.CheckpointManager({str(tmp_path / "checkpoints")!r}).restore(12)
standard = ocp.StandardCheckpointer().restore({str(tmp_path / "checkpoints" / "12" / "state")!r})
assert not any(name.split(".")[0] == "dlkit" for name in sys.modules)
def name(path):
    return "/".join(str(getattr(e, "key", getattr(e, "name", getattr(e, "idx", e)))) for e in path)
flat = {{"position": np.asarray(items["data"]["position"])}}
for prefix, tree in (("manager", items["state"]), ("standard", standard)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[prefix + ":" + name(path)] = np.asarray(leaf)
np.savez({str(tmp_path / "plain.npz")!r}, **flat)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300, cwd="/")
    state, _ = dlkit.load_checkpoint(tmp_path)
    want = {k: np.asarray(v) for k, v in store.flat_leaves(state).items()}
    got = np.load(tmp_path / "plain.npz")
    assert int(got["position"]) == 12
    for prefix in ("manager", "standard"):
        leaves = {k.split(":", 1)[1]: got[k] for k in got.files if k.startswith(prefix + ":")}
        assert sorted(leaves) == sorted(want)
        for key, value in want.items():
            assert leaves[key].dtype == value.dtype, key
            np.testing.assert_array_equal(leaves[key], value, err_msg=key)


@pytest.mark.parametrize("fails_at", ["manifest", "arrays"])
def test_a_save_that_fails_midway_leaves_no_step_and_the_next_save_of_that_step_succeeds(
    tmp_path, monkeypatch, fails_at
):
    """The disk fills up during a sync save (in the arrays, or at the manifest just before the
    step is published): the step must not be listed, by dlkit or Orbax, older steps must still
    restore, and saving the same step again must work although the failed save left its
    temporary directory behind."""
    import orbax.checkpoint as ocp

    from dlkit.checkpoint import commit

    first, second, retry = _small_state(1), _small_state(2), _small_state(3)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    async def disk_full_async(*args, **kwargs):
        disk_full()

    with dlkit.Checkpointer(tmp_path, async_save=False, log=lambda s: None) as ckpt:
        ckpt.save(1, first, data_position=1)
        if fails_at == "manifest":
            monkeypatch.setattr(commit, "write_manifest", disk_full)
        else:
            monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save", disk_full_async)
        with pytest.raises(OSError, match="No space left on device"):
            ckpt.save(2, second, data_position=2)
        monkeypatch.undo()
        assert [p.name for p in tmp_path.glob("2.orbax-checkpoint-tmp*")]
        assert not (tmp_path / "2").exists()
        assert ckpt.all_steps() == [1]
        manager = ocp.CheckpointManager(tmp_path)
        assert manager.all_steps() == [1]  # nor by Orbax
        manager.close()
        restored, position = ckpt.restore(abstract_of(first))
        assert position == 1
        assert_bitwise_equal(first, restored)

        ckpt.save(2, retry, data_position=2)  # the leftover tmp directory must not block it
        assert ckpt.all_steps() == [1, 2]
        assert not list(tmp_path.glob("2.orbax-checkpoint-tmp*"))
        restored, position = ckpt.restore(abstract_of(retry))
        assert position == 2
        assert_bitwise_equal(retry, restored)
        restored, _ = ckpt.restore(abstract_of(first), step=1)
        assert_bitwise_equal(first, restored)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def test_a_plain_dict_state_with_params_restores_and_a_misfit_names_the_leaf(tmp_path):
    """`restore` compares saved and expected leaves by name before reading; a plain dict
    state (not a TrainState) goes through the same check."""
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


@pytest.mark.parametrize("url", ["s3://bucket/run", "foo://bucket/run"])
def test_a_url_dlkit_cannot_serve_is_refused_not_written_to_a_local_directory(tmp_path, url):
    import pathlib

    # gs:// is served (tests/test_object_storage.py); other schemes are refused.
    for directory in (url, pathlib.Path(url)):  # pathlib turns s3:// into s3:/
        with pytest.raises(ValueError, match=r"checkpoint directory: expected a local path or"):
            dlkit.Checkpointer(directory)
    assert not pathlib.Path(url.split(":")[0] + ":").exists()


def _replace_with_plain_orbax_step(ckpt_dir, step, tree):
    """What a user of plain Orbax leaves: one step with one "state" item, no dlkit files."""
    import orbax.checkpoint as ocp

    shutil.rmtree(ckpt_dir)
    manager = ocp.CheckpointManager(ckpt_dir)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
    manager.close()


def test_a_trainstate_saved_by_plain_orbax_resumes_like_a_dlkit_step(tmp_path, capsys):
    first = dlkit.fit(tiny_digits_config(), tmp_path / "orbax")
    shutil.copytree(tmp_path / "orbax", tmp_path / "dlkit")
    _replace_with_plain_orbax_step(tmp_path / "orbax" / "checkpoints", 12, first.state)
    capsys.readouterr()
    more = tiny_digits_config(**{"train.steps": 18})
    from_orbax = dlkit.fit(more, tmp_path / "orbax")
    out = capsys.readouterr().out
    assert "step 12" in out and "was not written by dlkit" in out
    assert "resuming from step 12" in out
    from_dlkit = dlkit.fit(more, tmp_path / "dlkit")
    assert int(from_orbax.state.step) == 18
    assert_bitwise_equal(from_dlkit.state, from_orbax.state)
    assert not (tmp_path / "orbax" / "checkpoints" / ".quarantine").exists()


def test_a_foreign_step_that_does_not_fit_stops_the_run_naming_the_step_and_what_is_missing(
    tmp_path,
):
    first = dlkit.fit(tiny_digits_config(), tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    _replace_with_plain_orbax_step(ckpt_dir, 12, {"params": first.state.params})
    with pytest.raises(
        dlkit.checkpoint.CheckpointError,
        match=r"step 12 in .* does not fit this model:\n  guard/.*: in this model, not in the "
        r"checkpoint",
    ) as raised:
        dlkit.fit(tiny_digits_config(**{"train.steps": 18}), tmp_path)
    assert "opt_state/" in str(raised.value) or "more" in str(raised.value)
    assert (ckpt_dir / "12" / "state").is_dir()  # left where it was: not quarantined, not redone
    assert not (ckpt_dir / ".quarantine").exists()


def test_saves_do_not_warn_of_an_ocdbt_merge_they_never_needed_and_others_still_do(
    tmp_path, caplog
):
    """Orbax tries an OCDBT merge after every save and warns when there is none to merge; the
    state item is written without OCDBT, so a run's log would get one such warning per save."""
    import jax.numpy as jnp
    from absl import logging as absl_logging

    caplog.set_level(logging.WARNING)
    state = {"w": jnp.ones((4, 3)), "step": jnp.int32(2)}
    for async_save in (True, False):
        with dlkit.Checkpointer(tmp_path / str(async_save), async_save=async_save) as ckpt:
            ckpt.save(1, state, data_position=1)
            ckpt.save(2, state, data_position=2)
    assert sorted(p.name for p in (tmp_path / "True").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert [r.getMessage() for r in caplog.records if "OCDBT" in r.getMessage()] == []
    # The same warning about a directory dlkit did not write still reaches the user.
    elsewhere = tmp_path / "users_own_orbax_save"
    absl_logging.warning(
        "[process=%s][thread=%s] Skipping merge of OCDBT checkpoints: No per-process OCDBT"
        " checkpoint subdirs found in %s, ",
        0,
        "MainThread",
        elsewhere,
    )
    assert [r.getMessage() for r in caplog.records if "OCDBT" in r.getMessage()] == [
        "[process=0][thread=MainThread] Skipping merge of OCDBT checkpoints: No per-process"
        f" OCDBT checkpoint subdirs found in {elsewhere}, "
    ]
