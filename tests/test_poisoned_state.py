"""A state holding NaN or Inf is never checkpointed (issue 21, item 1)."""

import flax.linen as nn
import jax.numpy as jnp
import pytest
from conftest import tiny_digits_config

import dlkit


class NaNDense(nn.Module):
    """A classifier whose weights start as NaN: every step's loss is NaN, so the guard skips
    every update and the params stay NaN."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        w = self.param("w", lambda key, shape: jnp.full(shape, jnp.nan), (x.shape[-1], 10))
        return x @ w


def test_a_non_finite_state_is_never_written_as_a_checkpoint(tmp_path):
    cfg = tiny_digits_config(
        **{
            "train.nan_policy": "skip",
            "train.max_consecutive_nonfinite": 100,
            "train.steps": 4,
            "checkpoint.every_steps": 2,
            "train.eval_every": 0,
            "data.validate": "off",
            "parallel.num_devices": 1,
        }
    )
    with pytest.raises(FloatingPointError, match=r"step 2: the state holds NaN or Inf values"):
        dlkit.fit(cfg, tmp_path, module=NaNDense())
    steps = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == []


def test_a_finite_state_is_written_as_before(tmp_path):
    cfg = tiny_digits_config(**{"train.steps": 4, "checkpoint.every_steps": 2})
    dlkit.fit(cfg, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
