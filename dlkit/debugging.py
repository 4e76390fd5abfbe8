"""Debugging runs: `train.fast_dev_run` and `train.overfit_batches`.

    dlkit train fashion_mnist_cnn --fast-dev-run          # the whole pipeline, one step
    dlkit train digits_mlp --set train.overfit_batches=2  # can the model memorise 2 batches?

    cfg = dlkit.load_config("digits_mlp", ["train.fast_dev_run=true"])
    result = dlkit.fit(cfg)            # 1 train step, 1 eval batch, checkpoint saved + restored

`fast_dev_run` is the quickest end-to-end check of a config: it builds everything `fit` builds
(data, audit, model, optimizer, compiled train and eval steps, checkpointer), runs one train
step and one eval batch, writes a checkpoint of step 1, restores it and checks that it equals
the state in memory, then returns. With no workdir it uses a temporary directory that is
deleted afterwards; a workdir that already holds checkpoints is refused (it would resume
instead of checking anything, and the one-step config would be written over a real run's).

`overfit_batches=N` trains on the first N*batch_size examples only, in the same order every
epoch (no shuffling), and evaluates on those same examples: a model and loss that work should
reach ~100% accuracy on them. If they do not, look at the model, the loss, the labels or the
learning rate before training on the whole dataset.
"""

from __future__ import annotations

import copy
import tempfile

import jax
import numpy as np
from etils import epath

from dlkit import callbacks as callbacks_lib
from dlkit import checkpoint as checkpoint_lib
from dlkit import config as config_lib
from dlkit.data import sources


def prepare(
    cfg: config_lib.Config, workdir: epath.Path | None
) -> tuple[config_lib.Config, epath.Path | None, tempfile.TemporaryDirectory | None]:
    """The config and workdir `fit` runs with, given the debugging keys.

    Returns:
      (cfg, workdir, tmp): `cfg` itself when no debugging key is set, else an adjusted copy;
      `tmp` is the temporary directory made for a fast_dev_run without a workdir (the caller
      cleans it up), else None.
    Raises:
      ConfigError: train.overfit_batches < 0, or a fast_dev_run into a workdir with checkpoints.
    """
    t = cfg.train
    if t.overfit_batches < 0:
        raise config_lib.ConfigError(
            f"train.overfit_batches: expected an int >= 0 (0 = off), got {t.overfit_batches}"
        )
    if not t.fast_dev_run and not t.overfit_batches:
        return cfg, workdir, None
    cfg = copy.deepcopy(cfg)
    if t.overfit_batches:
        cfg.data.shuffle = False  # the same N batches, in the same order, every epoch
        # ... and the same pixels: augmentation would make them new batches every epoch.
        cfg.data.random_crop_padding = 0
        cfg.data.horizontal_flip = False
        cfg.data.mixup_alpha = cfg.data.cutmix_alpha = 0.0
    tmp = None
    if t.fast_dev_run:
        cfg.train.steps = 1
        cfg.train.log_every = cfg.train.eval_every = cfg.checkpoint.every_steps = 1
        cfg.optim.warmup_steps = 0  # a warm-up longer than the run is refused by the schedule
        if workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="dlkit-fast-dev-run-")
            workdir = epath.Path(tmp.name)
        else:
            checkpoints = epath.Path(workdir) / "checkpoints"
            if checkpoints.is_dir() and any(checkpoints.iterdir()):
                raise config_lib.ConfigError(
                    f"train.fast_dev_run: expected a workdir without checkpoints (or none, for a "
                    f"temporary one), got {str(workdir)!r}, which holds {checkpoints}"
                )
    return cfg, workdir, tmp


def overfit_sources(train_source, num_batches: int, batch_size: int):
    """(train, eval): both the first `num_batches * batch_size` training examples.

    Raises:
      ConfigError: the training split has fewer examples than that.
    """
    n = num_batches * batch_size
    if n > len(train_source):
        raise config_lib.ConfigError(
            f"train.overfit_batches: expected at most {len(train_source) // batch_size} "
            f"batches of train.batch_size={batch_size} ({len(train_source)} training examples), "
            f"got {num_batches}"
        )
    subset = sources.Subset(train_source, n, what="train.overfit_batches")
    return subset, subset


class FastDevRunCheck(callbacks_lib.Callback):
    """After a fast_dev_run: restores the newest checkpoint and compares it with the state."""

    def on_train_end(self, run, result):
        directory = run.workdir / "checkpoints"
        with checkpoint_lib.Checkpointer(directory, max_to_keep=None, read_only=True) as ckpt:
            step = ckpt.latest_step()
            if step is None:
                raise checkpoint_lib.CheckpointError(f"fast_dev_run: no checkpoint in {directory}")
            restored, _ = ckpt.restore(run.components.abstract_state(), step)
        saved = jax.tree.leaves(jax.device_get(restored))
        live = jax.tree.leaves(jax.device_get(result.state))
        if len(saved) != len(live) or not all(
            np.array_equal(a, b) for a, b in zip(saved, live, strict=True)
        ):
            raise checkpoint_lib.CheckpointError(
                f"fast_dev_run: the checkpoint of step {step} in {directory} does not equal the "
                "state it was saved from"
            )
        run.log(
            f"fast_dev_run: ok (1 train step, 1 eval batch, checkpoint of step {step} saved and "
            f"restored equal, {len(live)} arrays)"
        )
        return None


def fast_dev_run_check(cfg, workdir) -> FastDevRunCheck | None:
    """The fast_dev_run check when `train.fast_dev_run` is on and the run has a workdir."""
    return FastDevRunCheck() if cfg.train.fast_dev_run and workdir is not None else None
