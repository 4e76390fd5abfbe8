"""FSDP-style parameter sharding: same numbers as data parallelism, ~1/n of the state bytes."""

import jax
import numpy as np
import pytest
from conftest import tiny_digits_config
from jax.sharding import PartitionSpec as P

import dlkit
from dlkit import parallel

# Wide enough that the kernels (64x256, 256x256) are split and the biases (256,) are not.
MODEL = {"model.hidden_sizes": "256,256", "train.steps": 8, "train.eval_every": 0}


@pytest.fixture(scope="module")
def runs():
    return {
        sharding: dlkit.fit(tiny_digits_config(**MODEL, **{"parallel.param_sharding": sharding}))
        for sharding in ("replicated", "fsdp")
    }


def test_fsdp_spec_splits_the_largest_divisible_dimension():
    assert parallel.fsdp_spec((64, 256), 8, 1024) == P(None, "data")
    assert parallel.fsdp_spec((512, 256), 8, 1024) == P("data")
    assert parallel.fsdp_spec((256, 256), 8, 1024) == P("data")  # tie: the first
    assert parallel.fsdp_spec((10, 256), 8, 1024) == P(None, "data")
    assert parallel.fsdp_spec((256, 10), 8, 1024) == P("data")
    assert parallel.fsdp_spec((256,), 8, 1024) == P()  # small: replicated
    assert parallel.fsdp_spec((3, 3, 3, 10), 8, 0) == P()  # nothing divisible by 8
    assert parallel.fsdp_spec((), 8, 0) == P()


def test_fsdp_gives_the_same_results_as_data_parallel(runs):
    ref, got = runs["replicated"], runs["fsdp"]
    for a, b in zip(
        jax.tree.leaves(jax.device_get(ref.state.params)),
        jax.tree.leaves(jax.device_get(got.state.params)),
        strict=True,
    ):
        # Sharded reductions add in another order: float32 rounding, not a different result.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for key in ("train/loss", "train/grad_norm", "eval/loss"):
        np.testing.assert_allclose(ref.history.series(key)[1], got.history.series(key)[1], 1e-5)
    assert got.trace_counts == {"train": 1, "eval": 1}


def test_fsdp_state_is_split_and_the_report_shows_the_bytes(runs):
    kernel = runs["fsdp"].state.params["Dense_1"]["kernel"]  # (256, 256)
    assert kernel.sharding.spec == P("data")
    assert {s.data.shape for s in kernel.addressable_shards} == {(32, 256)}
    # Adam's moments of that kernel are split the same way.
    moments = [x for x in jax.tree.leaves(runs["fsdp"].state.opt_state) if x.shape == (256, 256)]
    assert len(moments) == 2 and all(m.sharding.spec == P("data") for m in moments)
    bias = runs["fsdp"].state.params["Dense_1"]["bias"]
    assert bias.sharding.is_fully_replicated
    dp = runs["replicated"].compute_report["state_bytes_per_device"]
    fsdp = runs["fsdp"].compute_report["state_bytes_per_device"]
    # 64*256 + 256*256 + 256*10 kernel floats split 8 ways, biases replicated.
    params_bytes = 4 * (64 * 256 + 256 * 256 + 256 * 10 + 256 + 256 + 10)
    assert dp["params"] == params_bytes
    assert fsdp["params"] == 4 * ((64 * 256 + 256 * 256 + 256 * 10) // 8 + 256 + 256 + 10)
    assert fsdp["opt_state"] < dp["opt_state"] / 6
    assert runs["fsdp"].compute_report["param_sharding"] == "fsdp"


def test_fsdp_checkpoint_restores_replicated_on_one_device(runs, tmp_path):
    cfg = tiny_digits_config(**{**MODEL, "parallel.param_sharding": "fsdp", "train.steps": 4})
    result = dlkit.fit(cfg, tmp_path)
    state, _ = dlkit.load_checkpoint(tmp_path)
    a = np.asarray(jax.device_get(result.state.params["Dense_1"]["kernel"]))
    b = np.asarray(state.params["Dense_1"]["kernel"])
    np.testing.assert_array_equal(a, b)


def test_pmap_rejects_fsdp_before_compiling():
    with pytest.raises(ValueError, match="parallel.param_sharding=fsdp: pmap keeps a full"):
        dlkit.build(
            tiny_digits_config(
                **{"parallel.strategy": "pmap"}, **{"parallel.param_sharding": "fsdp"}
            )
        )


def test_unknown_param_sharding_is_rejected():
    with pytest.raises(ValueError, match=r"parallel.param_sharding: expected one of"):
        dlkit.make_strategy("jit", param_sharding="zero9")
