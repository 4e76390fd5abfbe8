"""Time to the first train step: `dlkit train` (the default job) against a hand-written loop.

    python -m benchmarks.startup               # 5 repeats each, interleaved
    python -m benchmarks.startup --repeats 3 --dlkit-args "--set train.compilation_cache_dir="

Both run in a fresh Python process and are timed from process start (before `import`) to the
moment the first step's result is on the host: imports, data loading, model init and
compilation included. The hand-written loop is the minimum a user would write for the same
job (digits, MLP 64-256-256-10, AdamW, batch 128, one `jax.jit` step). `dlkit train` runs
with `train.log_every=1` and no progress bar; its "step 1" row is printed once step 1's
metrics are read from the device, and the process is then stopped (the rest of the job is
not part of start-up). Each dlkit run gets a fresh workdir, so it never resumes.
`dlkit train` runs twice per repeat: with its default caches (the persistent compilation
cache and the stored CPU peak, warmed by one untimed run first: a user's second run) and with
none (DLKIT_CACHE_DIR="": a first run on a new machine). Medians over the repeats are printed
side by side with their ratios and the load average.
"""

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HAND_LOOP = r"""
import time
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

x, y = load_digits(return_X_y=True)
x = (x / 16.0).astype(np.float32)
y = y.astype(np.int32)

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(256)(x))
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(10)(x)

model = MLP()
params = model.init(jax.random.key(0), x[:1])
tx = optax.adamw(1e-3, weight_decay=1e-4)
opt_state = tx.init(params)

@jax.jit
def step(params, opt_state, bx, by):
    def loss_fn(p):
        logits = model.apply(p, bx)
        return optax.softmax_cross_entropy_with_integer_labels(logits, by).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

idx = np.random.default_rng(0).permutation(len(x))[:128]
params, opt_state, loss = step(params, opt_state, x[idx], y[idx])
print(f"step 1 loss={float(loss):.4f}", flush=True)
"""


def _time_to_line(argv: list[str], prefix: str, env: dict[str, str]) -> float:
    """Seconds from starting `argv` to its first stdout line starting with `prefix`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    try:
        for line in proc.stdout:
            if line.startswith(prefix):
                return time.perf_counter() - t0
        raise RuntimeError(f"{argv[:4]}... ended without a line starting with {prefix!r}")
    finally:
        proc.kill()
        proc.wait()


def measure(repeats: int, dlkit_args: list[str]) -> dict:
    """Medians of the hand-written loop, `dlkit train` with its default caches (warmed by one
    untimed run) and `dlkit train` with no cache (DLKIT_CACHE_DIR=""), interleaved."""
    warm_env = dict(os.environ)
    cold_env = dict(os.environ, DLKIT_CACHE_DIR="")
    if os.environ.get("DLKIT_CACHE_DIR") == "":
        warm_env.pop("DLKIT_CACHE_DIR")

    def dlkit_run(env):
        with tempfile.TemporaryDirectory() as tmp:
            argv = [sys.executable, "-m", "dlkit", "train", "--workdir", f"{tmp}/run"]
            argv += ["--no-progress", "--set", "train.log_every=1", *dlkit_args]
            return _time_to_line(argv, "step 1 ", env)

    dlkit_run(warm_env)  # fills the caches
    times: dict[str, list[float]] = {"hand": [], "dlkit": [], "dlkit_no_cache": []}
    for _ in range(repeats):
        # Interleaved, so a change in the machine's load hits all alike.
        times["hand"].append(_time_to_line([sys.executable, "-c", HAND_LOOP], "step 1 ", warm_env))
        times["dlkit"].append(dlkit_run(warm_env))
        times["dlkit_no_cache"].append(dlkit_run(cold_env))
    out: dict = {"load_average": os.getloadavg()}
    for name, ts in times.items():
        out[f"{name}_s"] = ts
        out[f"{name}_median_s"] = statistics.median(ts)
    out["ratio"] = out["dlkit_median_s"] / out["hand_median_s"]
    out["ratio_no_cache"] = out["dlkit_no_cache_median_s"] / out["hand_median_s"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dlkit-args", default="", help="extra arguments for `dlkit train`")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    r = measure(args.repeats, shlex.split(args.dlkit_args))
    print(f"load average before: {load_before[0]:.2f}, after: {r['load_average'][0]:.2f}")
    names = {"hand": "hand-written loop", "dlkit": "dlkit train", "dlkit_no_cache": "  no cache"}
    for key, name in names.items():
        runs = [round(t, 2) for t in r[f"{key}_s"]]
        print(f"{name:<18} median {r[f'{key}_median_s']:.2f} s  {runs}")
    print(f"ratio dlkit / hand: {r['ratio']:.2f}x (no cache: {r['ratio_no_cache']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
