"""The strategies: jit on 1 device, jit on an 8-device mesh and pmap on 8 devices agree."""

import json
import re

import jax
import numpy as np
import pytest
from conftest import tiny_digits_config, ynn_fusions

import dlkit


def _fit(strategy: str, num_devices: int, **overrides):
    cfg = tiny_digits_config(**overrides)
    cfg.parallel.strategy = strategy
    cfg.parallel.num_devices = num_devices
    return dlkit.fit(cfg)


@pytest.fixture(scope="module")
def runs():
    return {
        "jit1": _fit("jit", 1),
        "jit8": _fit("jit", 8),
        "pmap8": _fit("pmap", 8),
    }


@pytest.mark.parametrize("other", ["jit8", "pmap8"])
def test_strategies_give_the_same_params(runs, other):
    ref = jax.device_get(runs["jit1"].state.params)
    got = jax.device_get(runs[other].state.params)
    assert int(runs[other].state.step) == 12
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    # The run actually moved the params (equal because trained, not because untouched).
    init = dlkit.build(tiny_digits_config()).init_state()
    moved = jax.tree.leaves(jax.device_get(init.params))[0] - jax.tree.leaves(ref)[0]
    assert np.abs(moved).max() > 1e-3


@pytest.mark.parametrize("other", ["jit8", "pmap8"])
def test_strategies_report_the_same_metrics(runs, other):
    ref, got = runs["jit1"].history, runs[other].history
    assert [r["step"] for r in ref] == [r["step"] for r in got] == [4, 6, 8, 12]
    for key in ("train/loss", "train/accuracy", "train/grad_norm", "eval/loss", "eval/accuracy"):
        np.testing.assert_allclose(ref.series(key)[1], got.series(key)[1], rtol=1e-4, err_msg=key)
    # eval covers all 360 test examples exactly once (padding masked): accuracy * 360 is whole.
    acc = got.last("eval/accuracy") * 360
    assert abs(acc - round(acc)) < 1e-3


@pytest.mark.parametrize("name", ["jit1", "jit8", "pmap8"])
def test_train_step_compiles_once_per_run(runs, name):
    assert runs[name].trace_counts == {"train": 1, "eval": 1}


def test_state_is_replicated_on_the_mesh(runs):
    for name, n in (("jit8", 8), ("pmap8", 8), ("jit1", 1)):
        leaf = jax.tree.leaves(runs[name].state.params)[0]
        assert leaf.sharding.is_fully_replicated
        assert len(leaf.sharding.device_set) == n


def test_pmap_batch_is_split_over_devices():
    strategy = dlkit.make_strategy("pmap")
    batch = {"x": np.arange(32, dtype=np.float32).reshape(16, 2)}
    out = strategy.put_batch(batch)["x"]
    assert out.shape == (8, 2, 2)
    shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start)
    np.testing.assert_array_equal(np.asarray(shards[3].data)[0], batch["x"][6:8])


def test_jit_batch_is_split_over_devices():
    strategy = dlkit.make_strategy("jit")
    out = strategy.put_batch({"x": np.arange(16, dtype=np.float32)})["x"]
    assert out.shape == (16,)
    assert {tuple(np.asarray(s.data)) for s in out.addressable_shards} == {
        (float(2 * i), float(2 * i + 1)) for i in range(8)
    }


def test_batch_size_not_divisible_by_devices_is_rejected_before_compiling():
    cfg = tiny_digits_config()
    cfg.train.batch_size = 12
    with pytest.raises(
        ValueError,
        match=r"train.batch_size: expected a positive multiple of the "
        r"device count 8 .* got 12",
    ):
        dlkit.fit(cfg)


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="parallel.strategy: expected one of"):
        dlkit.make_strategy("tpu_magic")


def test_sync_every_step_auto_is_on_for_multi_device_cpu_only():
    assert dlkit.make_strategy("jit").sync_every_step is True
    assert dlkit.make_strategy("jit", num_devices=1).sync_every_step is False
    assert dlkit.make_strategy("pmap", sync_every_step="false").sync_every_step is False
    with pytest.raises(ValueError, match="parallel.sync_every_step"):
        dlkit.make_strategy("jit", sync_every_step="sometimes")


def test_host_feed_on_cpu_hands_numpy_to_the_jit_step_and_devices_arrays_to_pmap():
    """On CPU with one process the jit step takes the host batch as it is (its own argument
    handling splits it over the mesh); pmap keeps its per-device reshaping put."""
    batch = {"x": np.arange(16, dtype=np.float32), "mask": np.ones(16, np.float32)}
    jit = dlkit.make_strategy("jit")
    fed = jit.host_feed()(batch)
    assert all(type(v) is np.ndarray for v in fed.values())
    stacked = jit.host_feed(stacked=True)({k: np.stack([v, v]) for k, v in batch.items()})
    assert all(type(v) is np.ndarray for v in stacked.values())
    # The compiled step places it exactly as put_batch would: 2 rows on each of 8 devices.
    split = jax.jit(lambda b: b["x"] * 1.0, in_shardings=(jit.batch_sharding,))(fed)
    assert {tuple(np.asarray(s.data)) for s in split.addressable_shards} == {
        (float(2 * i), float(2 * i + 1)) for i in range(8)
    }
    pmap = dlkit.make_strategy("pmap")
    assert pmap.host_feed()(batch)["x"].shape == (8, 2)


# ---- XLA:CPU library fusions (train.xla_cpu_ynn_fusions) ------------------------------------


def test_cpu_compiler_options_map_the_setting_to_xla_names():
    from dlkit import xla_cpu

    key = "xla_cpu_experimental_ynn_fusion_type"
    assert xla_cpu.compiler_options() == {
        key: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    }
    assert xla_cpu.compiler_options("xla") == {}
    assert xla_cpu.compiler_options("none") == {key: ""}
    assert xla_cpu.compiler_options(" dot, eltwise ") == {
        key: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"
    }


@pytest.mark.parametrize("bad", ["conv", "", "dot,,foo"])
def test_unknown_ynn_fusion_names_are_a_config_error_before_compiling(bad):
    cfg = tiny_digits_config(**{"train.xla_cpu_ynn_fusions": bad})
    with pytest.raises(
        dlkit.ConfigError,
        match=r"train\.xla_cpu_ynn_fusions: expected xla \| none \| a comma list of dot, "
        r"eltwise, individual_convolution, individual_dot, reduce, got",
    ):
        dlkit.fit(cfg)


def _tiny_cnn(spec: str, steps: int = 3):
    cfg = tiny_digits_config(
        **{
            "train.xla_cpu_ynn_fusions": spec,
            "train.steps": steps,
            "checkpoint.every_steps": 0,
            "parallel.num_devices": 1,
        }
    )
    cfg.model.name = "cnn"
    cfg.model.options = {"features": (4, 8), "dense_size": 16, "dropout_rate": 0.0}
    rng = np.random.default_rng(0)
    source = dlkit.data.ArraySource(
        inputs=rng.normal(size=(128, 28, 28, 1)).astype(np.float32),
        labels=(np.arange(128) % 10).astype(np.int32),
    )
    return cfg, source


def _built_cnn(spec: str):
    """(Components, initial state) of the tiny CNN run with `train.xla_cpu_ynn_fusions=spec`."""
    cfg, source = _tiny_cnn(spec)
    c = dlkit.build(cfg, train_source=source, eval_source=source)
    return c, c.init_state()


def _compiled_train_text(c, state) -> str:
    """The train step `fit` would run, compiled, as text."""
    from dlkit import programs

    compiled, _ = programs.compile_train(c, state, c.abstract_metrics(state))
    return compiled.as_text()


def test_by_default_convolutions_are_not_handed_to_ynnpack():
    """The measured slowdown (docs/performance.md) came from YNNPACK's convolutions."""
    fusions = ynn_fusions(_compiled_train_text(*_built_cnn("individual_dot,reduce")))
    assert not [f for f in fusions if "conv_general_dilated" in f]
    assert not ynn_fusions(_compiled_train_text(*_built_cnn("none")))


def test_xla_setting_compiles_what_xla_compiles_without_options():

    def normalized(text):  # the program, without source locations
        text = text.split("\nFileNames")[0]
        return re.sub(r"metadata=\{[^}]*\}|stack_frame_id=\d+", "", text)

    c, state = _built_cnn("xla")
    assert c.strategy.compiler_options == {}
    plain = dlkit.make_strategy("jit", num_devices=1).compile_train(
        dlkit.step_wrappers.accumulating(c.train_step()), c.strategy.state_shardings(state)
    )
    spec = c.strategy.batch_spec(c.example_batch(), c.config.train.batch_size)
    expected = plain.lower(state, c.abstract_metrics(state), spec).compile().as_text()
    assert normalized(_compiled_train_text(c, state)) == normalized(expected)


def test_only_the_jit_strategy_on_cpu_takes_compile_options():
    """pmap compiles with XLA's defaults (it takes no options), so it must not claim any."""
    from dlkit import xla_cpu

    options = xla_cpu.compiler_options()
    assert dlkit.make_strategy("jit", compiler_options=options).compiler_options == options
    assert dlkit.make_strategy("pmap", compiler_options=options).compiler_options == {}
    assert xla_cpu.usable_compiler_options(options, "gpu") == {}


def test_compile_options_this_jaxlib_rejects_fall_back_to_xla_defaults_with_a_warning():
    """The YNNPACK option is experimental: a jaxlib without it must still train."""
    with pytest.warns(UserWarning, match=r"does not accept the XLA options .*xla_cpu_no_such"):
        strategy = dlkit.make_strategy("jit", compiler_options={"xla_cpu_no_such": "1"})
    assert strategy.compiler_options == {}
    result = dlkit.fit(tiny_digits_config(**{"train.steps": 4}), strategy=strategy)
    assert result.compute_report["compiler_options"] == {}
    assert np.isfinite(result.history.last("train/loss"))


def test_the_compile_options_are_recorded_in_the_compute_report(tmp_path):
    cfg = tiny_digits_config(**{"train.xla_cpu_ynn_fusions": "none", "train.steps": 2})
    result = dlkit.fit(cfg, tmp_path)
    expected = {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert result.compute_report["compiler_options"] == expected
    saved = json.loads((tmp_path / "compute.json").read_text())
    assert saved["compiler_options"] == expected


def test_the_fusion_setting_changes_speed_not_results():
    runs = {}
    for spec in ("individual_dot,reduce", "xla", "none"):
        cfg, source = _tiny_cnn(spec)
        result = dlkit.fit(cfg, train_source=source, eval_source=source)
        runs[spec] = jax.tree.leaves(jax.device_get(result.state.params))
    for spec in ("xla", "none"):
        for a, b in zip(runs["individual_dot,reduce"], runs[spec], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_auto_prefetch_reads_inline_only_where_nothing_is_copied_to_devices():
    jit1 = dlkit.make_strategy("jit", num_devices=1)
    assert jit1.prefetch_depth(-1) == 0  # CPU, one process: batches stay numpy
    assert jit1.prefetch_depth(-1, stacked=True) == 2  # K stacked batches: worth a thread
    assert jit1.prefetch_depth(3) == 3 and jit1.prefetch_depth(0) == 0  # explicit wins
    assert dlkit.make_strategy("pmap", num_devices=8).prefetch_depth(-1) == 2  # copies


def test_a_run_is_the_same_with_and_without_the_prefetch_thread():
    inline = dlkit.fit(tiny_digits_config(**{"parallel.num_devices": 1}))
    threaded = dlkit.fit(tiny_digits_config(**{"parallel.num_devices": 1, "data.prefetch": 2}))
    assert [r["train/loss"] for r in inline.history if "train/loss" in r] == [
        r["train/loss"] for r in threaded.history if "train/loss" in r
    ]
    for a, b in zip(
        jax.tree.leaves(inline.state.params), jax.tree.leaves(threaded.state.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prefetch_below_minus_one_is_refused_before_training(tmp_path):
    with pytest.raises(dlkit.ConfigError, match=r"data\.prefetch: expected an int >= 0, or -1"):
        dlkit.fit(tiny_digits_config(**{"data.prefetch": -2}), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
