"""EMA of the weights: the recurrence, skipped steps, evaluation on it, checkpoints and resume."""

import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_digits_config

import dlkit
from dlkit import step_wrappers


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _setup(decay):
    cfg = tiny_digits_config(**{"train.ema_decay": decay})
    cfg.parallel.num_devices = 1
    c = dlkit.build(cfg)
    step = jax.jit(step_wrappers.make_train_step(c.loss_fn, ema_decay=decay))
    batch = dlkit.data.get_batch(c.train_source, np.arange(32))
    batch["mask"] = np.ones((32,), np.float32)
    return c, step, batch


def test_ema_follows_the_closed_form_recurrence():
    d = 0.6
    c, step, batch = _setup(d)
    state = c.init_state()
    params = [_leaves(state.params)]
    np.testing.assert_array_equal(_leaves(state.ema_params)[0], params[0][0])  # starts equal
    for _ in range(3):
        state, _ = step(state, batch)
        params.append(_leaves(state.params))
    # Bias-corrected: ema_3 = (1 - d) (d^2 p_1 + d p_2 + p_3) / (1 - d^3); p_0 has no weight.
    weights = [0.0, (1 - d) * d**2, (1 - d) * d, 1 - d]
    for i, got in enumerate(_leaves(state.ema_params)):
        want = sum(w * p[i] for w, p in zip(weights, params, strict=True)) / (1 - d**3)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert np.abs(_leaves(state.ema_params)[0] - params[-1][0]).max() > 1e-4  # not the params


def test_a_skipped_step_leaves_the_ema_unchanged():
    c, step, batch = _setup(0.9)
    state, _ = step(c.init_state(), batch)
    bad = dict(batch, inputs=np.full_like(batch["inputs"], np.nan))
    after, _ = step(state, bad)
    assert int(after.guard.skipped) == 1
    for a, b in zip(_leaves(state.ema_params), _leaves(after.ema_params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_without_ema_the_state_has_no_extra_leaves():
    c = dlkit.build(tiny_digits_config())
    state = c.abstract_state()
    assert state.ema_params is None
    assert len(jax.tree.leaves(state)) == len(
        jax.tree.leaves((state.step, state.params, state.model_state, state.opt_state))
    ) + len(jax.tree.leaves((state.rng, state.guard)))


def test_bad_decay_is_rejected_before_compiling():
    with pytest.raises(dlkit.ConfigError, match=r"train.ema_decay.*\[0, 1\).*got 1.0"):
        dlkit.build(tiny_digits_config(**{"train.ema_decay": 1.0}))


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ema") / "run"
    cfg = tiny_digits_config(**{"train.ema_decay": 0.8})
    return dlkit.fit(cfg, workdir), workdir


def test_eval_uses_the_ema_and_reports_the_raw_weights_too(ema_run):
    result, workdir = ema_run
    last = result.history[-1]
    assert last["step"] == 12
    assert abs(last["eval/loss"] - last["eval_raw/loss"]) > 1e-4
    # `dlkit.evaluate` scores the EMA, as the run did.
    assert dlkit.evaluate(workdir)["loss"] == pytest.approx(last["eval/loss"], rel=1e-6)
    ema, _ = dlkit.load_checkpoint(workdir)
    raw, _ = dlkit.load_checkpoint(workdir, weights="raw")
    for a, b in zip(_leaves(ema.params), _leaves(result.state.ema_params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(raw.params), _leaves(result.state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_with_ema_is_bitwise_identical(ema_run, tmp_path):
    full, workdir = ema_run
    part = tmp_path / "part"
    shutil.copytree(workdir, part)
    shutil.rmtree(part / "checkpoints" / "12")  # as if killed after step 6's checkpoint
    resumed = dlkit.fit(tiny_digits_config(**{"train.ema_decay": 0.8}), part)
    a, b = _leaves(full.state), _leaves(resumed.state)
    assert (
        len(a)
        == len(b)
        == len(_leaves(full.state.ema_params)) * 2
        + len(_leaves((full.state.step, full.state.opt_state, full.state.rng, full.state.guard)))
    )
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
