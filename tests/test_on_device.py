"""`data.on_device`: the training set held on the device, each step gathering its own rows."""

import jax
import numpy as np
import pytest
from conftest import StopAt, tiny_digits_config

import dlkit
import dlkit.data as data
from dlkit import loop


def _params(result):
    return [np.asarray(p) for p in jax.tree.leaves(result.state.params)]


def _fit(mode, workdir=None, num_devices=1, **overrides):
    cfg = tiny_digits_config(**{"data.on_device": mode, "checkpoint.every_steps": 0, **overrides})
    cfg.parallel.num_devices = num_devices
    return dlkit.fit(cfg, workdir)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("last_batch", ["drop", "pad"])
def test_an_index_loader_yields_the_indices_of_the_rows_a_data_loader_gathers(shuffle, last_batch):
    n, b = 37, 8
    rows = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    kwargs = {"seed": 5, "shuffle": shuffle, "last_batch": last_batch}
    on_rows = data.Loader(data.ArraySource(x=rows), b, **kwargs)
    on_index = data.Loader(data.IndexSource(n), b, **kwargs)
    for position in range(0, 12):  # past two epochs
        got, want = on_index.batch_at(position), on_rows.batch_at(position)
        assert got["index"].dtype == np.int32
        np.testing.assert_array_equal(rows[got["index"]], want["x"])
        np.testing.assert_array_equal(got["mask"], want["mask"])
    stacked, want = on_index.stacked_at(3, 4), on_rows.stacked_at(3, 4)
    np.testing.assert_array_equal(rows[stacked["index"]], want["x"])
    np.testing.assert_array_equal(stacked["mask"], want["mask"])


def test_in_memory_arrays_are_array_sources_and_their_subsets_only():
    x = np.arange(10.0)
    source = data.ArraySource(inputs=x, labels=x * 2)
    np.testing.assert_array_equal(data.in_memory_arrays(source)["labels"], x * 2)
    sub = data.Subset(data.Subset(source, 8), 3, start=2)
    arrays = data.in_memory_arrays(sub)
    np.testing.assert_array_equal(arrays["inputs"], [2.0, 3.0, 4.0])
    np.testing.assert_array_equal(arrays["labels"], data.get_batch(sub, np.arange(3))["labels"])

    class Computed:  # a source whose rows are computed: nothing to hold on a device
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"inputs": np.full(2, i, np.float32)}

    assert data.in_memory_arrays(Computed()) is None
    assert data.in_memory_arrays(data.Subset(Computed(), 2)) is None


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"train.steps_per_dispatch": 4, "train.eval_every": 12},
        {"train.grad_accum_steps": 2, "data.last_batch": "pad"},
    ],
    ids=["k1", "k4", "accum-pad"],
)
def test_a_run_with_the_data_on_the_device_equals_one_fed_from_the_host(overrides):
    host = _fit(False, **overrides)
    device = _fit(True, **overrides)
    assert host.compute_report["data_on_device"] is False
    assert device.compute_report["data_on_device"] is True
    for a, b in zip(_params(host), _params(device), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    keys = ("train/loss", "train/accuracy", "train/grad_norm", "eval/loss")
    for key in keys:
        assert host.history.series(key)[0] == device.history.series(key)[0]
        np.testing.assert_allclose(
            host.history.series(key)[1], device.history.series(key)[1], rtol=1e-6
        )
    assert device.trace_counts == {"train": 1, "eval": 1}


def test_on_device_with_eight_devices_splits_the_indices_and_matches_the_host():
    host = _fit(False, num_devices=8)
    device = _fit(True, num_devices=8)
    assert device.compute_report["data_on_device"] is True
    for a, b in zip(_params(host), _params(device), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_resumed_on_device_run_lands_where_an_uninterrupted_one_does(tmp_path):
    straight = _fit(True)
    cfg = tiny_digits_config(**{"data.on_device": True})
    cfg.parallel.num_devices = 1
    # Stopped (and checkpointed) after step 9, off every cadence: the loader resumes mid-epoch.
    first = dlkit.fit(cfg, tmp_path, callbacks=[StopAt(8)])
    assert first.stopped == "test" and int(first.state.step) == 9
    resumed = dlkit.fit(cfg, tmp_path)
    assert int(resumed.state.step) == 12
    for a, b in zip(_params(straight), _params(resumed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_the_compiled_step_takes_indices_and_holds_the_data():
    cfg = tiny_digits_config(**{"data.on_device": True, "train.steps_per_dispatch": 2})
    cfg.parallel.num_devices = 1
    c = loop.build(cfg)
    state = c.init_state()
    compiled, _ = loop._compile_train(c, state, c.abstract_metrics(state))  # noqa: SLF001
    args, _ = compiled.args_info  # (state, acc, batch, data)
    assert set(args[2]) == {"index", "mask"}
    assert args[2]["index"]._aval.shape == (2, cfg.train.batch_size)  # noqa: SLF001
    assert args[2]["index"]._aval.dtype == np.int32  # noqa: SLF001
    assert set(args[3]) == {"inputs", "labels"}
    n = len(c.train_source)
    assert compiled.data["inputs"].shape[0] == n
    np.testing.assert_array_equal(np.asarray(compiled.data["labels"]), c.train_arrays["labels"])


def test_off_by_default_and_memory_mapped_arrays_can_be_held_too(tmp_path):
    assert loop.build(tiny_digits_config()).train_arrays is None
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(64, 8))
    x[:] = 1.0
    source = data.ArraySource(inputs=x, labels=np.arange(64, dtype=np.int32) % 10)
    cfg = tiny_digits_config(**{"data.on_device": True})
    arrays = loop.build(cfg, train_source=source, eval_source=source).train_arrays
    np.testing.assert_array_equal(arrays["inputs"], x)


def test_on_device_with_pmap_is_a_config_error_before_compiling():
    cfg = tiny_digits_config(**{"data.on_device": True, "parallel.strategy": "pmap"})
    with pytest.raises(
        dlkit.ConfigError,
        match=r"data\.on_device: expected false with parallel\.strategy=pmap .*got true",
    ):
        dlkit.fit(cfg)


def test_a_non_bool_on_device_is_a_config_error():
    cfg = tiny_digits_config()
    cfg.data.on_device = "on"
    with pytest.raises(
        dlkit.ConfigError, match=r"data\.on_device: expected true or false, got 'on'"
    ):
        dlkit.fit(cfg)


def test_on_asked_for_a_computed_source_says_why_it_cannot():
    class Computed:
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return {"inputs": np.full((8, 8, 1), i % 7, np.float32), "labels": np.int32(i % 10)}

    cfg = tiny_digits_config(**{"data.on_device": True, "data.validate": "off"})
    with pytest.raises(dlkit.ConfigError, match=r"not in-memory arrays \(Computed;"):
        dlkit.fit(cfg, train_source=Computed(), eval_source=Computed())
