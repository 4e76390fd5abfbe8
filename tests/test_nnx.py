"""Tests for dlkit.models.nnx_adapter: an NNX module (with dropout and BatchNorm) trains through
`dlkit.fit` like a Linen one, and its apply is pure and Linen-shaped."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits_config

import dlkit
from dlkit.models.nnx_adapter import NNXAdapter


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, hidden: int = 64, dropout_rate: float = 0.1):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.norm = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)  # (B, 64)
        return self.out(self.dropout(nnx.relu(self.norm(self.hidden(x)))))  # (B, 10)


def test_init_and_apply_are_linen_shaped_and_pure():
    module = NNXAdapter(NNXMLP)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    variables = module.init({"params": jax.random.key(0)}, x)
    assert set(variables) == {"params", "state"}
    assert variables["params"]["hidden"]["kernel"].shape == (64, 64)
    assert set(variables["state"]["norm"]) == {"mean", "var"}
    out = module.apply(variables, x, train=False)
    assert out.shape == (4, 10)
    np.testing.assert_array_equal(out, module.apply(variables, x, train=False))
    a, updates = module.apply(
        variables, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["state"]
    )
    b, _ = module.apply(
        variables, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["state"]
    )
    assert float(jnp.abs(a - b).max()) > 1e-4  # the step's key drives dropout
    moved = updates["state"]["norm"]["mean"] - variables["state"]["norm"]["mean"]
    assert float(jnp.abs(moved).max()) > 1e-4  # batch statistics were updated ...
    assert float(jnp.abs(variables["state"]["norm"]["mean"]).max()) == 0.0  # ... as new values


@pytest.mark.parametrize("strategy", ["jit", "pmap"])
def test_fit_trains_an_nnx_mlp_on_digits(strategy):
    cfg = tiny_digits_config()
    cfg.parallel.strategy = strategy
    cfg.train.steps = 150
    cfg.train.eval_every = 0
    cfg.train.log_every = 50
    cfg.optim.learning_rate = 3e-3
    result = dlkit.fit(cfg, module=NNXAdapter(NNXMLP))
    assert result.history.last("eval/accuracy") > 0.9
    assert result.trace_counts == {"train": 1, "eval": 1}
    assert "state" in result.state.model_state  # BatchNorm statistics live in model_state


class NNXBNNet(nnx.Module):
    # No bias before BatchNorm: its true gradient is 0, and Adam would turn the rounding
    # noise in it into +-lr updates that differ between any two summation orders.
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 32, use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
        self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.norm(self.hidden(x.reshape(x.shape[0], -1)))))


def _fit_nnx_bn(strategy):
    cfg = tiny_digits_config()
    cfg.parallel.strategy = strategy
    cfg.parallel.num_devices = 8
    cfg.train.steps = 6
    cfg.train.eval_every = 0
    return dlkit.fit(cfg, module=NNXAdapter(NNXBNNet))


def _max_diff(a, b):
    a, b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b, strict=True)
    )


def test_nnx_batchnorm_statistics_are_global_under_pmap(monkeypatch):
    jit, pmap = _fit_nnx_bn("jit").state, _fit_nnx_bn("pmap").state
    assert _max_diff(jit.model_state, pmap.model_state) < 1e-5
    assert _max_diff(jit.params, pmap.params) < 1e-5
    # With per-device statistics (B/8 rows each) the numbers differ: the check has teeth.
    from dlkit import components

    monkeypatch.setattr(components, "module_for_strategy", lambda module, strategy: module)
    local = _fit_nnx_bn("pmap").state
    assert _max_diff(jit.model_state, local.model_state) > 1e-3
    assert _max_diff(jit.params, local.params) > 1e-3
