"""Shrunk CPU runs of the Fashion-MNIST zoo experiments (ResNet, ViT) on real data.

Each keeps the experiment's recipe (model family, optimizer, schedule, loss) and shrinks the
model, the data and the steps so it runs in seconds; it must learn well above chance (10%).
"""

import pathlib

import numpy as np
import pytest

import dlkit
from dlkit.data import datasets, sources

FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not FASHION_DIR.is_dir(),
    reason="Fashion-MNIST IDX files missing: apt-get install dataset-fashion-mnist",
)


def _subset(source, n: int) -> sources.ArraySource:
    return sources.ArraySource(**{k: np.asarray(v[:n]) for k, v in source.arrays.items()})


@pytest.fixture(scope="module")
def fashion_small():
    train = datasets.load_dataset("fashion_mnist", "train")
    test = datasets.load_dataset("fashion_mnist", "test")
    return _subset(train, 2048), _subset(test, 500)


SHRINK = [
    "train.steps=80",
    "train.batch_size=64",
    "train.eval_batch_size=250",
    "train.log_every=40",
    "train.eval_every=0",
    "train.progress=false",
    "optim.warmup_steps=8",
    "parallel.num_devices=1",
]


@needs_fashion
@pytest.mark.parametrize(
    "name, model, min_accuracy",
    [
        # With the recipe's crop-and-flip augmentation, 80 steps reach 58-66% (seeds 0-3).
        ("fashion_mnist_resnet", ["model.stage_sizes=1,1,1", "model.width=8"], 0.5),
        (
            "fashion_mnist_vit",
            ["model.num_layers=1", "model.d_model=32", "model.patch_size=7", "train.steps=160"],
            0.6,
        ),
    ],
)
def test_shrunk_experiment_learns_on_real_data(fashion_small, tmp_path, name, model, min_accuracy):
    cfg = dlkit.load_config(name, [*SHRINK, *model])
    train, test = fashion_small
    result = dlkit.fit(cfg, tmp_path / name, train_source=train, eval_source=test)
    assert result.trace_counts["train"] == 1
    accuracy = result.history.last("eval/accuracy")
    assert accuracy > min_accuracy, f"{name}: {accuracy:.3f} on 500 test images"
    # The experiment's recipe survives the shrink: same model family and optimizer.
    assert int(result.state.step) == cfg.train.steps
    assert (tmp_path / name / "checkpoints").is_dir()
