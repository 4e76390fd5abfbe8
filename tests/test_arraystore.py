"""The checkpoint's "state" item (dlkit.arraystore): raw bytes, restored onto any layout, paced
async writes that are safe from the donating step that follows."""

import json
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import abstract_of, assert_bitwise_equal, tiny_digits_config
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import dlkit
from dlkit import arraystore
from dlkit import checkpoint as checkpoint_lib


def _tree():
    rng = np.random.default_rng(0)
    return {
        # 8.4 MB: crosses the manifest's 8 MiB chunk boundary inside one array
        "big": jnp.asarray(rng.standard_normal((3, 1000, 700), dtype=np.float32)),
        "half": jnp.asarray(rng.standard_normal(17), dtype=jnp.bfloat16),
        "count": jnp.asarray(7, jnp.int32),
        "empty": jnp.zeros((0, 4), jnp.float32),
        "nested": (jnp.arange(5, dtype=jnp.uint32), {"k": jnp.full((2, 3), -1.5)}),
    }


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_is_bitwise_and_the_manifest_crcs_match_the_files(tmp_path, async_save):
    tree = _tree()
    with checkpoint_lib.Checkpointer(tmp_path / "c", async_save=async_save, log=print) as ck:
        ck.save(1, tree, data_position=4)
        ck.wait()
        restored, position = ck.restore(abstract_of(tree))
    assert position == 4
    assert_bitwise_equal(tree, restored)
    step_dir = tmp_path / "c" / "1"
    names = sorted(p.name for p in (step_dir / "state").iterdir())
    # The arrays, their index, and the position and config beside them. (Orbax's manager also
    # puts a commit marker in the item; on a POSIX filesystem the step's rename is what
    # commits, so dlkit's single-process writer leaves that file out.)
    expected = ["config.json", "data.json", "data.p0.bin", "index.p0.json"]
    assert names == expected
    # The data file is the arrays' bytes, nothing else: its size is the sum of theirs.
    nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))
    assert (step_dir / "state" / "data.p0.bin").stat().st_size == nbytes
    # The CRCs computed from memory while writing equal the ones read back from disk.
    manifest = json.loads((step_dir / checkpoint_lib.MANIFEST).read_text())
    copy = tmp_path / "copy"
    shutil.copytree(step_dir, copy)
    checkpoint_lib.write_manifest(copy, 1)
    reread = json.loads((copy / checkpoint_lib.MANIFEST).read_text())
    assert len(manifest["files"]["state/data.p0.bin"]["crc32"]) == 2  # two 8 MiB chunks
    assert manifest["files"] == reread["files"]


def test_sharded_state_restores_onto_other_layouts(tmp_path):
    devices = np.array(jax.devices())
    mesh8 = Mesh(devices, ("x",))
    value = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
    tree = {
        "rows": jax.device_put(value, NamedSharding(mesh8, PartitionSpec("x"))),
        "replicated": jax.device_put(value[0], NamedSharding(mesh8, PartitionSpec())),
    }
    with checkpoint_lib.Checkpointer(tmp_path / "c", async_save=False) as ck:
        ck.save(1, tree, data_position=0)
    index = json.loads((tmp_path / "c" / "1" / "state" / "index.p0.json").read_text())
    # 8 row shards, and the replicated array once (replica 0 only).
    assert sorted(len([p for p in index["pieces"] if p["key"] == [k]]) for k in tree) == [1, 8]
    mesh42 = Mesh(devices.reshape(4, 2), ("a", "b"))
    targets = [
        jax.sharding.SingleDeviceSharding(jax.devices()[3]),
        NamedSharding(mesh42, PartitionSpec("a", "b")),  # rows 4 ways, columns 2 ways
        NamedSharding(mesh8, PartitionSpec(None, "x")),  # columns 8 ways
    ]
    with checkpoint_lib.Checkpointer(tmp_path / "c", read_only=True) as ck:
        for target in targets:
            abstract = {
                "rows": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=target),
                "replicated": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=target)
                if isinstance(target, jax.sharding.SingleDeviceSharding)
                else jax.ShapeDtypeStruct(
                    (8,), jnp.float32, sharding=NamedSharding(mesh8, PartitionSpec("x"))
                ),
            }
            restored, _ = ck.restore(abstract)
            assert restored["rows"].sharding == target
            np.testing.assert_array_equal(np.asarray(restored["rows"]), value)
            np.testing.assert_array_equal(np.asarray(restored["replicated"]), value[0])


def test_async_save_keeps_the_saved_bytes_while_the_next_steps_donate_the_state(
    tmp_path, monkeypatch
):
    """The writer reads zero-copy views of the state while donating steps run: XLA must not
    reuse those buffers, or the checkpoint would hold later steps' values. The writer thread
    is held back until the donating steps have run, so the order does not depend on timing."""
    state = {"a": jnp.zeros((2048, 1024), jnp.float32), "b": jnp.zeros((2048, 1024), jnp.float32)}
    update = jax.jit(lambda s: jax.tree.map(lambda a: a + 1, s), donate_argnums=0)
    donated = threading.Event()
    as_bytes = arraystore._as_bytes

    def after_donation(data):
        assert donated.wait(60)
        return as_bytes(data)

    monkeypatch.setattr(arraystore, "_as_bytes", after_donation)
    with checkpoint_lib.Checkpointer(
        tmp_path / "c", async_save=True, async_write_share=0.01, log=print
    ) as ck:
        ck.save(1, state, data_position=0)
        in_flight = ck.saving()
        for _ in range(5):
            state = update(state)
        jax.block_until_ready(state)
        donated.set()
        ck.wait()
        restored, _ = ck.restore(abstract_of(state))
    assert in_flight  # the steps really overlapped the write
    np.testing.assert_array_equal(np.asarray(state["b"]), 5.0)
    np.testing.assert_array_equal(np.asarray(restored["a"]), 0.0)
    np.testing.assert_array_equal(np.asarray(restored["b"]), 0.0)


def test_async_save_is_paced_until_someone_waits_for_it(tmp_path):
    """At a tiny write share the save would take minutes; `wait()` finishes it flat out."""
    state = {"w": jnp.ones((16, 1 << 20), jnp.float32)}  # 64 MiB
    with checkpoint_lib.Checkpointer(
        tmp_path / "c", async_save=True, async_write_share=1e-4, log=print
    ) as ck:
        ck.save(1, state, data_position=0)
        time.sleep(0.5)  # flat out, 64 MiB take well under 0.5 s here
        paced = ck.saving()
        t = time.perf_counter()
        ck.wait()
        waited = time.perf_counter() - t
        assert ck.all_steps() == [1]
        restored, _ = ck.restore(abstract_of(state))
    assert paced
    # Unpaced it would sleep ~1e4 times its write time (minutes); hurried it is done in well
    # under a second on 2 cores.
    assert waited < 20, waited
    np.testing.assert_array_equal(np.asarray(restored["w"]), 1.0)


@pytest.mark.parametrize("share", [0, -0.1, 1.5, True, "fast"])
def test_bad_async_write_share_names_the_key(tmp_path, share):
    with pytest.raises(ValueError, match=r"checkpoint\.async_write_share: expected a number in"):
        checkpoint_lib.Checkpointer(tmp_path / "c", async_write_share=share)


def test_a_leaf_of_another_shape_is_named_at_restore(tmp_path):
    tree = {"opt": {"mu": jnp.zeros((3, 4))}}
    with checkpoint_lib.Checkpointer(tmp_path / "c", async_save=False) as ck:
        ck.save(1, tree, data_position=0)
        with pytest.raises(
            checkpoint_lib.CheckpointError,
            match=r"step 1 .* does not fit: state: opt/mu: this run expects shape \(4, 4\)",
        ):
            ck.restore(abstract_of({"opt": {"mu": jnp.zeros((4, 4))}}))


def test_typed_prng_keys_are_refused_with_the_fix(tmp_path):
    with checkpoint_lib.Checkpointer(tmp_path / "c", async_save=False) as ck:
        with pytest.raises(TypeError, match=r"rng is a typed PRNG key array.*key_data"):
            ck.save(1, {"rng": jax.random.key(0)}, data_position=0)


def test_the_index_records_each_leaf_and_metadata_reads_it(tmp_path):
    tree = _tree()
    with checkpoint_lib.Checkpointer(tmp_path / "c", async_save=False) as ck:
        ck.save(2, tree, data_position=0)
    item = tmp_path / "c" / "2" / "state"
    meta = arraystore.StateHandler().metadata(item)
    assert meta["big"].shape == (3, 1000, 700) and meta["big"].dtype == jnp.float32
    assert meta["half"].dtype == jnp.bfloat16
    assert meta["nested"]["1"]["k"].shape == (2, 3)
    assert not arraystore.StateHandler.is_legacy(item)


def test_fit_refuses_a_bad_write_share_before_it_trains(tmp_path):
    cfg = tiny_digits_config(**{"checkpoint.async_write_share": 0.0})
    with pytest.raises(ValueError, match=r"checkpoint\.async_write_share: .* got 0\.0"):
        dlkit.fit(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "metrics.jsonl").exists()
