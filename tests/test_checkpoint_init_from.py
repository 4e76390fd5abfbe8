"""Fine-tuning with checkpoint.init_from: a pretrained Fashion-MNIST CNN gets a new head."""

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import assert_bitwise_equal

import dlkit
from dlkit.checkpoint import init_from
from dlkit.data import datasets, sources

FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(
    not FASHION_DIR.is_dir(),
    reason="Fashion-MNIST IDX files missing: apt-get install dataset-fashion-mnist",
)
FOOTWEAR = (5, 7, 9)  # sandal, sneaker, ankle boot: the new label set is footwear or not


def _config(num_classes: int, steps: int, **overrides) -> dlkit.Config:
    cfg = dlkit.load_config("fashion_mnist_cnn")
    cfg.model.options = {
        "features": (8, 16),
        "dense_size": 32,
        "dropout_rate": 0.0,
        "num_classes": num_classes,
    }
    cfg.train.steps = steps
    cfg.train.batch_size = 64
    cfg.train.eval_batch_size = 250
    cfg.train.log_every = steps
    cfg.train.eval_every = steps
    cfg.train.progress = False
    cfg.train.plots = False
    cfg.optim.warmup_steps = min(10, steps)
    cfg.checkpoint.every_steps = 0
    cfg.parallel.num_devices = 1
    dlkit.apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])
    return cfg


@pytest.fixture(scope="module")
def data():
    train = datasets.load_dataset("fashion_mnist", "train")
    test = datasets.load_dataset("fashion_mnist", "test")

    def cut(source, n, relabel, start=0):
        arrays = {k: np.asarray(v[start : start + n]) for k, v in source.arrays.items()}
        if relabel:
            arrays["labels"] = np.isin(arrays["labels"], FOOTWEAR).astype(arrays["labels"].dtype)
        return sources.ArraySource(**arrays)

    return {
        "train10": cut(train, 4096, False),
        "test10": cut(test, 500, False),
        "train2": cut(train, 1024, True, start=4096),  # images the body never saw
        "test2": cut(test, 500, True),
    }


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data):
    workdir = tmp_path_factory.mktemp("pretrained")
    result = dlkit.fit(
        _config(10, 120), workdir, train_source=data["train10"], eval_source=data["test10"]
    )
    return workdir, result.state


HEAD = "params/Dense_1/"


def test_init_from_loads_the_body_and_starts_a_new_head_and_optimizer(pretrained, data, capsys):
    workdir, pre = pretrained
    c = dlkit.build(_config(2, 1), train_source=data["train2"], eval_source=data["test2"])
    fresh = c.init_state()
    state = init_from.apply(fresh, str(workdir), f"^{HEAD}.*=", log=print)
    out = capsys.readouterr().out
    flat_pre = dlkit.checkpoint.store.flat_leaves(pre.params)
    body = [k for k in flat_pre if not k.startswith("Dense_1")]
    assert f"loaded {len(body)} leaves, newly initialised 2" in out
    assert "unused 0" in out  # the dropped head is not "unused": the map dropped it
    flat_new = dlkit.checkpoint.store.flat_leaves(state.params)
    flat_fresh = dlkit.checkpoint.store.flat_leaves(fresh.params)
    for key in body:
        np.testing.assert_array_equal(np.asarray(flat_new[key]), np.asarray(flat_pre[key]))
    for key in ("Dense_1/kernel", "Dense_1/bias"):
        assert flat_new[key].shape == flat_fresh[key].shape != flat_pre[key].shape
        np.testing.assert_array_equal(np.asarray(flat_new[key]), np.asarray(flat_fresh[key]))
    assert_bitwise_equal(state.opt_state, fresh.opt_state)  # the optimizer starts fresh
    assert int(state.step) == 0


def test_a_new_head_of_another_shape_is_an_error_naming_the_leaf(pretrained, data):
    workdir, _ = pretrained
    c = dlkit.build(_config(2, 1), train_source=data["train2"], eval_source=data["test2"])
    with pytest.raises(
        ValueError,
        match=r"params/Dense_1/kernel: this model expects shape \(32, 2\), .* has \(32, 10\)",
    ):
        init_from.apply(c.init_state(), str(workdir), "", log=print)


def test_fit_fine_tunes_from_a_plain_orbax_params_tree(pretrained, data, tmp_path, capsys):
    """The CLI path (`--set checkpoint.init_from=...`) from params saved by plain Orbax: the run
    starts at step 0 from the pretrained body, so after a few steps on the new label set its
    body is far closer to the pretrained one than a run from scratch is."""
    _, pre = pretrained
    params_dir = tmp_path / "params"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, jax.device_get(pre.params))
    checkpointer.close()
    sets = {
        "checkpoint.init_from": str(params_dir),
        "checkpoint.init_from_map": "^params/Dense_1/.*=",
    }
    tuned = dlkit.fit(
        _config(2, 5, **sets),
        tmp_path / "tuned",
        train_source=data["train2"],
        eval_source=data["test2"],
    )
    out = capsys.readouterr().out
    assert "init_from" in out and "newly initialised 2" in out and "resuming" not in out
    scratch = dlkit.fit(
        _config(2, 5), tmp_path / "scratch", train_source=data["train2"], eval_source=data["test2"]
    )
    flat_pre = dlkit.checkpoint.store.flat_leaves(pre.params)

    def distance(params):
        flat = dlkit.checkpoint.store.flat_leaves(params)
        return sum(
            float(np.abs(np.asarray(flat[k]) - np.asarray(v)).sum())
            for k, v in flat_pre.items()
            if not k.startswith("Dense_1")
        )

    assert int(tuned.state.step) == 5
    assert distance(tuned.state.params) < 0.2 * distance(scratch.state.params)
