"""Tests for dlkit.models.nnx_adapter: an NNX module (with dropout and BatchNorm) trains through
`dlkit.fit` like a Linen one, and its apply is pure and Linen-shaped."""

import flax.linen as nn
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


# --- An nnx.Module instance as `fit(model=...)`: the same numbers as the Linen model. -------


class NNXCNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs, dropout_rate: float = 0.3):
        self.conv = nnx.Conv(1, 8, (3, 3), use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.out = nnx.Linear(8 * 4 * 4, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.conv(x)))  # (B, 8, 8, 8)
        x = nnx.max_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)  # (B, 128)
        return self.out(self.dropout(x))  # (B, 10)


def _constant(value):
    return lambda *args: jnp.asarray(value)


class LinenCNN(nn.Module):
    """NNXCNN in Linen, initialised with the NNX instance's weights."""

    weights: dict
    dropout_rate: float = 0.3

    @nn.compact
    def __call__(self, x, train: bool = False):
        w = self.weights
        x = nn.Conv(8, (3, 3), use_bias=False, kernel_init=_constant(w["conv"]["kernel"]))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        out = w["out"]
        return nn.Dense(10, kernel_init=_constant(out["kernel"]), bias_init=_constant(out["bias"]))(
            x
        )


def _cnn_config():
    cfg = tiny_digits_config()
    cfg.parallel.strategy = "jit"
    cfg.parallel.num_devices = 8
    cfg.train.steps = 8
    cfg.train.eval_every = 0
    return cfg


def test_nnx_instance_matches_the_same_linen_model_on_8_devices():
    # Dropout masks come from different random streams in NNX and Linen, so the trajectories
    # are compared with dropout at rate 0 (the layer still present); with dropout on, the NNX
    # run on 8 devices is compared with the same run on 1 device below.
    model = NNXCNN(rngs=nnx.Rngs(0), dropout_rate=0.0)
    weights = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    nnx_result = dlkit.fit(_cnn_config(), model=model)
    linen_result = dlkit.fit(_cnn_config(), model=LinenCNN(weights, dropout_rate=0.0))
    assert len(jax.devices()) == 8
    trained = nnx_result.state.params
    assert _max_diff(trained["conv"]["kernel"], weights["conv"]["kernel"]) > 1e-3  # it trained
    lp = linen_result.state.params
    assert _max_diff(trained["conv"]["kernel"], lp["Conv_0"]["kernel"]) < 1e-5
    assert (
        _max_diff(
            trained["out"], {"bias": lp["Dense_0"]["bias"], "kernel": lp["Dense_0"]["kernel"]}
        )
        < 1e-5
    )
    ls = linen_result.state.model_state["batch_stats"]["BatchNorm_0"]
    ns = nnx_result.state.model_state["state"]["norm"]
    assert _max_diff(ns, ls) < 1e-5
    np.testing.assert_allclose(
        nnx_result.history.series("train/loss")[1],
        linen_result.history.series("train/loss")[1],
        rtol=1e-5,
    )
    # The user's instance is untouched; result.model is a new module with the trained weights.
    np.testing.assert_array_equal(model.conv.kernel[...], weights["conv"]["kernel"])
    assert isinstance(nnx_result.model, NNXCNN)
    np.testing.assert_array_equal(nnx_result.model.conv.kernel[...], trained["conv"]["kernel"])


def test_nnx_dropout_run_on_8_devices_matches_1_device():
    runs = []
    for devices in (8, 1):
        cfg = _cnn_config()
        cfg.parallel.num_devices = devices
        runs.append(dlkit.fit(cfg, model=NNXCNN(rngs=nnx.Rngs(0), dropout_rate=0.5)))
    eight, one = runs
    assert _max_diff(eight.state.params, one.state.params) < 1e-5
    assert _max_diff(eight.state.model_state, one.state.model_state) < 1e-5
    # Dropout was on: the same model without it ends elsewhere.
    cfg = _cnn_config()
    plain = dlkit.fit(cfg, model=NNXCNN(rngs=nnx.Rngs(0), dropout_rate=0.0))
    assert _max_diff(eight.state.params, plain.state.params) > 1e-4


def test_result_model_and_load_checkpoint_give_the_runs_numbers(tmp_path):
    cfg = _cnn_config()
    cfg.train.steps = 20
    model = NNXCNN(rngs=nnx.Rngs(1))
    result = dlkit.fit(cfg, tmp_path / "run", model=model)
    x = np.asarray(dlkit.data.datasets.load_dataset("digits", "test").arrays["inputs"][:64])
    state = result.state
    expected = result.model(jnp.asarray(x))  # eval mode: dropout off, running statistics
    linen_view = NNXAdapter.from_module(model).apply(
        {"params": state.params, "state": state.model_state["state"]}, x, train=False
    )
    np.testing.assert_allclose(expected, linen_view, atol=1e-6)
    # Restored into a fresh instance of the same class (other random weights).
    fresh = NNXCNN(rngs=nnx.Rngs(7))
    assert float(jnp.abs(fresh(jnp.asarray(x)) - expected).max()) > 1e-3
    dlkit.load_checkpoint(tmp_path / "run", model=fresh)
    np.testing.assert_allclose(fresh(jnp.asarray(x)), expected, atol=1e-6)
    metrics = dlkit.evaluate(tmp_path / "run", model=NNXCNN(rngs=nnx.Rngs(3)))
    assert metrics["accuracy"] == pytest.approx(result.history.last("eval/accuracy"), abs=1e-6)


def test_dlkit_eval_on_an_nnx_run(tmp_path, monkeypatch, capsys):
    import json
    import textwrap

    from dlkit import cli

    cfg = _cnn_config()
    cfg.parallel.num_devices = 1
    result = dlkit.fit(cfg, tmp_path / "run", model=NNXCNN(rngs=nnx.Rngs(1)))
    capsys.readouterr()
    # Without the model: an error naming it, not the config's MLP.
    assert cli.main(["eval", str(tmp_path / "run")]) == 2
    assert "--model MODULE:FUNCTION" in capsys.readouterr().err
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            import flax.nnx as nnx
            from test_nnx import NNXCNN

            def make_cnn():
                return NNXCNN(rngs=nnx.Rngs(5))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["eval", str(tmp_path / "run"), "--model", "my_models:make_cnn"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["accuracy"] == pytest.approx(result.history.last("eval/accuracy"), abs=1e-6)
