"""train.steps_per_dispatch: K steps per compiled call equal K single steps."""

import jax
import numpy as np
import pytest
from conftest import StopAt, tiny_digits_config

import dlkit


def _fit(strategy="jit", num_devices=1, workdir=None, **overrides):
    cfg = tiny_digits_config(**overrides)
    cfg.parallel.strategy = strategy
    cfg.parallel.num_devices = num_devices
    return dlkit.fit(cfg, workdir)


@pytest.fixture(scope="module")
def single():
    return _fit()


def _assert_params_close(ref, got):
    for a, b in zip(
        jax.tree.leaves(jax.device_get(ref.state.params)),
        jax.tree.leaves(jax.device_get(got.state.params)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _assert_same_run(ref, got):
    # Float tolerance, not bitwise: the K steps run inside a scan body, which XLA may fuse
    # and order differently from the standalone step (on XLA:CPU they usually match bitwise).
    assert int(got.state.step) == int(ref.state.step) == 12
    _assert_params_close(ref, got)
    assert [r["step"] for r in got.history] == [r["step"] for r in ref.history] == [4, 6, 8, 12]
    for key in ("train/loss", "train/accuracy", "train/grad_norm", "eval/loss"):
        np.testing.assert_allclose(
            ref.history.series(key)[1], got.history.series(key)[1], rtol=1e-5, err_msg=key
        )


@pytest.mark.parametrize("strategy,num_devices", [("jit", 1), ("pmap", 8)])
def test_k_steps_per_dispatch_equal_k_single_steps(single, strategy, num_devices):
    # K=2 divides every cadence of the tiny config (log 4, eval 6, checkpoint 6, steps 12).
    got = _fit(strategy, num_devices, **{"train.steps_per_dispatch": 2})
    ref = single if strategy == "jit" else _fit(strategy, num_devices)
    _assert_same_run(ref, got)
    assert got.trace_counts == {"train": 1, "eval": 1}  # one K-step program, compiled once
    assert got.compute_report["steps_per_dispatch"] == 2


def test_resume_with_k_continues_at_the_exact_data_position(single, tmp_path):
    # Stop after step 10 (checkpointed on stop, off every cadence), resume to 12 with K=2: the
    # same as one K=1 run. The stop is asked on step 8's train row, which arrives one call late.
    cfg = tiny_digits_config(**{"train.steps_per_dispatch": 2})
    cfg.parallel.num_devices = 1
    first = dlkit.fit(cfg, tmp_path, callbacks=[StopAt(8)])
    assert first.stopped == "test" and int(first.state.step) == 10
    got = dlkit.fit(cfg, tmp_path)
    assert int(got.state.step) == 12
    _assert_params_close(single, got)
    # The rows up to the stop match; the resumed run's one train row covers steps 11-12 only
    # (steps 9-10 were run but not logged before the stop), so only its eval is compared.
    assert [r["step"] for r in got.history] == [4, 6, 8, 12]
    for key in ("train/loss", "train/accuracy", "train/grad_norm", "eval/loss"):
        np.testing.assert_allclose(
            single.history.series(key)[1][:-1], got.history.series(key)[1][:-1], rtol=1e-5
        )
    np.testing.assert_allclose(
        single.history.last("eval/loss"), got.history.last("eval/loss"), rtol=1e-5
    )


@pytest.mark.parametrize(
    "key,value",
    [
        ("train.log_every", 3),
        ("train.eval_every", 5),
        ("checkpoint.every_steps", 9),
        ("train.steps", 13),
    ],
)
def test_cadences_must_be_multiples_of_k(key, value):
    strategy = dlkit.parallel.make_strategy("jit", num_devices=1)
    cfg = tiny_digits_config(**{"train.steps_per_dispatch": 2, key: value})
    expected = rf"{key}: expected a multiple of .*=2.*got {value}"
    with pytest.raises(dlkit.ConfigError, match=expected):
        dlkit.fit(cfg, strategy=strategy)
    assert dict(strategy.trace_counts) == {}, "the step was compiled before the error"


def test_k_must_be_positive():
    expected = r"train.steps_per_dispatch: expected an int >= 1, got 0"
    with pytest.raises(dlkit.ConfigError, match=expected):
        dlkit.fit(tiny_digits_config(**{"train.steps_per_dispatch": 0}))


# Cadences that K=4 divides (the tiny config's eval and checkpoint every 6 do not).
EVERY_4 = {"train.log_every": 4, "train.eval_every": 4, "checkpoint.every_steps": 4}


@pytest.fixture(scope="module")
def single_every_4():
    return _fit(**EVERY_4)


@pytest.mark.parametrize("unroll", [1, 2, 4])
def test_any_scan_unroll_gives_the_same_run_and_flops_per_step(single_every_4, unroll):
    """Unrolling the K-step loop changes how XLA schedules the steps, not what they compute;
    the compute report's FLOPs stay per optimizer step (the loop body holds `unroll`)."""
    ref = single_every_4
    got = _fit(**{"train.steps_per_dispatch": 4, "train.scan_unroll": unroll, **EVERY_4})
    assert got.compute_report["scan_unroll"] == unroll
    _assert_params_close(ref, got)
    np.testing.assert_allclose(
        ref.history.series("train/loss")[1], got.history.series("train/loss")[1], rtol=1e-5
    )
    np.testing.assert_allclose(
        got.compute_report["flops_per_step"], ref.compute_report["flops_per_step"], rtol=0.02
    )


@pytest.mark.parametrize(
    "k,expected", [(1, 1), (2, 2), (7, 7), (10, 10), (12, 6), (50, 10), (13, 1)]
)
def test_auto_scan_unroll_is_the_largest_divisor_of_k_up_to_10(k, expected):
    cfg = tiny_digits_config(**{"train.steps_per_dispatch": k})
    assert dlkit.config.resolved_scan_unroll(cfg.train) == expected


@pytest.mark.parametrize(
    "unroll,expected",
    [
        (-1, r"train.scan_unroll: expected an int >= 0 \(0 = auto\), got -1"),
        (3, r"train.scan_unroll: expected a divisor of train.steps_per_dispatch=2, got 3"),
    ],
)
def test_a_bad_scan_unroll_is_refused_before_compiling(unroll, expected):
    strategy = dlkit.parallel.make_strategy("jit", num_devices=1)
    cfg = tiny_digits_config(**{"train.steps_per_dispatch": 2, "train.scan_unroll": unroll})
    with pytest.raises(dlkit.ConfigError, match=expected):
        dlkit.fit(cfg, strategy=strategy)
    assert dict(strategy.trace_counts) == {}, "the step was compiled before the error"


@pytest.mark.parametrize("unroll,trips", [(1, "4"), (2, "2"), (4, None)])
def test_scan_unroll_sets_the_compiled_loops_trip_count(unroll, trips):
    """K=4 steps per call, `unroll` per iteration: XLA's loop runs K/unroll times (no loop at
    all when fully unrolled)."""
    import re

    from dlkit import programs

    cfg = tiny_digits_config(
        **{"train.steps_per_dispatch": 4, "train.scan_unroll": unroll, **EVERY_4}
    )
    cfg.parallel.num_devices = 1
    c = dlkit.build(cfg)
    state = c.init_state()
    compiled, _ = programs.compile_train(c, state, c.abstract_metrics(state))
    found = re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', compiled.as_text())
    assert found == ([trips] if trips else [])
