"""Test setup: 8 simulated CPU devices, configured before JAX is imported anywhere.

The collective timeout turns a deadlocked CPU collective (see dlkit.parallel's docstring) into
a fast failure instead of a hung CI job.
"""

import os
import shutil
import tempfile

_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    "--xla_cpu_collective_call_terminate_timeout_seconds=20",
)
_existing = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_existing, *(f for f in _FLAGS if f not in _existing)]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One dlkit cache (JAX's persistent compilation cache, the CPU peak) for the whole test run,
# shared by the xdist workers and the CLI processes the tests start, as a user's runs share
# ~/.cache/dlkit: most tests train the same small programs, which each process would otherwise
# compile again. Never the user's own cache. The controller process
# makes it before it starts the workers (they inherit the variable) and removes it at the end.
# DLKIT_TEST_CACHE=off gives every test a cold start; tests of the cache set their own.
if "DLKIT_TEST_CACHE" not in os.environ:
    os.environ["DLKIT_TEST_CACHE"] = tempfile.mkdtemp(prefix="dlkit-test-cache-")
    _OWN_CACHE = True
else:
    _OWN_CACHE = False
_cache = os.environ["DLKIT_TEST_CACHE"]
os.environ["DLKIT_CACHE_DIR"] = "" if _cache == "off" else _cache

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import dlkit  # noqa: E402


def pytest_sessionfinish(session):
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(_cache, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, f"expected 8 simulated CPU devices, got {jax.devices()}"


def ynn_fusions(hlo: str) -> list[str]:
    """The YNNPACK fusion instructions of a compiled program's text (`Compiled.as_text()`)."""
    return [line for line in hlo.splitlines() if '"__ynn_fusion"' in line and " = " in line]


def tiny_digits_config(**overrides) -> dlkit.Config:
    """digits_mlp shrunk for tests: a small MLP, a few steps, no progress bar."""
    cfg = dlkit.load_config("digits_mlp")
    cfg.model.options = {"hidden_sizes": (32,), "dropout_rate": 0.0, "num_classes": 10}
    cfg.train.steps = 12
    cfg.train.batch_size = 32
    cfg.train.log_every = 4
    cfg.train.eval_every = 6
    cfg.train.progress = False
    cfg.optim.warmup_steps = 2
    cfg.checkpoint.every_steps = 6
    cfg.train.plots = False  # curves.png costs ~0.3-0.8 s per run; tests/test_report.py turns it on
    dlkit.apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])
    return cfg


def abstract_of(tree):
    """`tree` as a restore target: `jax.ShapeDtypeStruct` leaves with each leaf's sharding."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def assert_bitwise_equal(a, b):
    """Same leaves, dtypes, shapes and bytes."""
    la = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(a))]
    lb = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(b))]
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y), "states differ"


class StopAt(dlkit.Callback):
    """Asks the run to stop (reason "test") from the row of `step`."""

    def __init__(self, step):
        self.step = step

    def on_row(self, run, row):
        if row["step"] == self.step:
            run.request_stop("test")
