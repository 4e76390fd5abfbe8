"""`python -m benchmarks.save_cpu`: each way it times writes a real step (the one Orbax or
TensorStore reads back) and is timed once per save (the full run's figures are in
docs/performance.md)."""

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from benchmarks import save_cpu

STATE = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4), "step": jnp.asarray(7)}


def test_every_orbax_way_writes_a_step_plain_orbax_restores(tmp_path):
    for i, (name, make) in enumerate(save_cpu.WAYS.items()):
        if name.startswith("TensorStore") or "state only" in name:
            continue
        directory = epath.Path(tmp_path) / str(i)
        rows = save_cpu.measure(make(), directory, STATE, {"lr": 0.1}, saves=2)
        assert len(rows) == 2 and all(cpu > 0 for cpu, _, _ in rows), name
        last = save_cpu.WARMUP_SAVES + 1
        with ocp.CheckpointManager(directory) as manager:
            restored = manager.restore(last)
        np.testing.assert_array_equal(restored["state"]["w"], np.asarray(STATE["w"]), err_msg=name)
        assert restored["data"] == {"position": last} and restored["config"] == {"lr": 0.1}


def test_the_state_only_ways_write_the_state_plain_orbax_restores(tmp_path):
    from orbax.checkpoint.experimental import v1 as ocp_v1

    load = {
        "v0 API": lambda path: ocp.PyTreeCheckpointer().restore(path),
        "v1": ocp_v1.load,
    }
    names = [name for name in save_cpu.WAYS if "state only" in name]
    assert len(names) == 2
    for i, name in enumerate(names):
        directory = epath.Path(tmp_path) / str(i)
        rows = save_cpu.measure(save_cpu.WAYS[name](), directory, STATE, {}, saves=1)
        assert len(rows) == 1, name
        (restore,) = [fn for key, fn in load.items() if key in name]
        restored = restore(directory / str(save_cpu.WARMUP_SAVES))
        np.testing.assert_array_equal(restored["w"], np.asarray(STATE["w"]), err_msg=name)
        assert int(restored["step"]) == 7, name


def test_the_tensorstore_floor_writes_every_leaf_as_a_zarr3_array(tmp_path):
    directory = epath.Path(tmp_path)
    rows = save_cpu.measure(save_cpu.TensorStoreWay(), directory, STATE, {}, saves=1)
    assert len(rows) == 1
    arrays = [
        ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(directory / f"2/{i}")}}
        )
        .result()
        .read()
        .result()
        for i in range(3)
    ]
    assert sorted(a.shape for a in arrays) == [(), (3, 4), (4,)]
    assert any(np.array_equal(a, np.arange(12.0).reshape(3, 4)) for a in arrays)
