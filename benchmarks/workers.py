"""One benchmark contender per process: `python -m benchmarks.workers NAME MODEL DATA.npz`.

The process builds its contender (model, optimizer, data), compiles/warms it up, prints
`READY`, then answers each request line on stdin (`{"steps": N, "warmup": W}`) with one line
`RESULT {"steps_per_s": ..., "seconds": ...}` measured over N steady-state steps after W
warm-up steps. `run.py` drives several of these in turn, so contenders alternate.

Every contender trains the same model with the same batch size, Adam (lr 1e-3), softmax
cross-entropy on integer labels, and the same data (the .npz written by `run.py`):
- MLP: flatten -> 256 -> ReLU -> 256 -> ReLU -> 10 (sklearn digits, 8x8x1 inputs).
- CNN: [3x3 conv SAME -> ReLU -> 2x2 max-pool] x (32, 64) -> 128 -> ReLU -> 10 (28x28x1).
"""

import json
import os
import sys
import tempfile
import time

import numpy as np

BATCH = 128
LR = 1e-3


def _request_loop(measure):
    """Answers requests until stdin closes. `measure(warmup, steps) -> seconds`."""
    print("READY", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        seconds, extra = measure(req["warmup"], req["steps"])
        result = {"steps_per_s": req["steps"] / seconds, "seconds": seconds, **extra}
        print("RESULT " + json.dumps(result), flush=True)


def _batches(x, y, seed=0):
    """Endless shuffled (x, y) numpy batches of BATCH rows, last partial batch dropped."""
    rng = np.random.default_rng(seed)
    n = len(x) // BATCH * BATCH
    while True:
        order = rng.permutation(len(x))[:n]
        for i in range(0, n, BATCH):
            idx = np.sort(order[i : i + BATCH])
            yield x[idx], y[idx]


# --------------------------------------------------------------------------------------------
# JAX: a hand-written jit loop (the overhead floor), and the same with K steps per dispatch.


def _flax_model(model):
    import flax.linen as nn
    import jax.numpy as jnp

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)  # (B, 64)
            x = nn.relu(nn.Dense(256)(x))
            x = nn.relu(nn.Dense(256)(x))
            return nn.Dense(10)(x)

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            for ch in (32, 64):
                x = nn.relu(nn.Conv(ch, (3, 3), padding="SAME")(x))
                b, h, w, c = x.shape
                x = jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))  # 2x2 pool
            x = x.reshape(x.shape[0], -1)  # (B, 7*7*64)
            x = nn.relu(nn.Dense(128)(x))
            return nn.Dense(10)(x)

    return MLP() if model == "mlp" else CNN()


def hand_step(model, x, scan_k=0):
    """The hand-written loop's compiled step and its initial carry: `run(carry, batch) ->
    (carry, loss)` on (x, y) numpy batches, or on K stacked batches with `lax.scan`."""
    import jax
    import optax

    module = _flax_model(model)
    params = module.init(jax.random.key(0), x[:1])
    tx = optax.adam(LR)

    def step(carry, batch):
        params, opt_state = carry
        bx, by = batch

        def loss_fn(p):
            logits = module.apply(p, bx)
            return optax.softmax_cross_entropy_with_integer_labels(logits, by).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    if scan_k:
        run = jax.jit(lambda c, b: jax.lax.scan(step, c, b), donate_argnums=0)
    else:
        run = jax.jit(step, donate_argnums=0)
    return run, (params, tx.init(params))


def jax_worker(model, x, y, scan_k=0):
    import jax

    run, carry = hand_step(model, x, scan_k)
    batches = _batches(x, y)

    def next_input():
        if not scan_k:
            return next(batches)
        group = [next(batches) for _ in range(scan_k)]
        return np.stack([g[0] for g in group]), np.stack([g[1] for g in group])

    carry, loss = run(carry, next_input())
    jax.block_until_ready(loss)
    per_call = scan_k or 1

    def measure(warmup, steps):
        nonlocal carry
        for _ in range(max(warmup // per_call, 1)):
            carry, loss = run(carry, next_input())
        jax.block_until_ready(loss)
        t = time.perf_counter()
        for _ in range(steps // per_call):
            carry, loss = run(carry, next_input())
        jax.block_until_ready(loss)
        return time.perf_counter() - t, {"final_loss": float(np.mean(loss))}

    _request_loop(measure)


# --------------------------------------------------------------------------------------------
# dlkit: `dlkit.fit` end to end.


def dlkit_worker(model, x, y, steps_per_dispatch=1, conv_impl="", mid_run_saves=True):
    """`dlkit.fit` with async checkpoints every `ckpt_every` steps, or (`mid_run_saves=False`)
    with its one checkpoint at the end, after the timed window: the two apart show what the
    training loop costs and what the saves cost."""
    import dlkit
    import dlkit.data

    source = dlkit.data.ArraySource(inputs=x, labels=y)
    if model == "mlp":
        log_every, ckpt_every = 100, 500
        options = {"hidden_sizes": (256, 256), "dropout_rate": 0.0, "num_classes": 10}
    else:
        log_every, ckpt_every = 10, 20
        options = {"features": (32, 64), "dense_size": 128, "dropout_rate": 0.0}
        if conv_impl:
            options["conv_impl"] = conv_impl

    class RowTimes(dlkit.Callback):
        def __init__(self):
            self.times = {}

        def on_row(self, run, row):
            self.times[row["step"]] = time.perf_counter()

    def fit(warmup, steps):
        cfg = dlkit.Config(name=f"bench_{model}")
        cfg.model.name = model
        cfg.model.options = dict(options)
        cfg.optim.name = "adam"
        cfg.optim.learning_rate = LR
        cfg.train.batch_size = BATCH
        cfg.train.log_every = log_every
        cfg.train.eval_every = 0  # only at the end, outside the timed window
        cfg.train.steps = warmup + steps + log_every
        cfg.checkpoint.every_steps = ckpt_every if mid_run_saves else 0
        cfg.checkpoint.async_save = True
        cfg.data.validate = "off"
        if steps_per_dispatch > 1:
            cfg.train.steps_per_dispatch = steps_per_dispatch
        times = RowTimes()
        with tempfile.TemporaryDirectory() as workdir:
            result = dlkit.fit(
                cfg,
                workdir,
                train_source=source,
                eval_source=source,
                progress=True,
                callbacks=[times],
            )
        seconds = times.times[warmup + steps] - times.times[warmup]
        return seconds, {
            "final_loss": result.history.last("train/loss"),
            "trace_counts": result.trace_counts,
        }

    fit(2 * log_every, 2 * log_every)  # imports, caches, the first compile
    _request_loop(lambda warmup, steps: fit(max(warmup, log_every), steps))


# --------------------------------------------------------------------------------------------
# PyTorch eager on CPU, 2 threads.


def torch_worker(model, x, y):
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "2")))
    torch.manual_seed(0)
    nn = torch.nn
    if model == "mlp":
        net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(int(np.prod(x.shape[1:])), 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )
    else:
        c = x.shape[-1]
        net = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (x.shape[1] // 4) * (x.shape[2] // 4), 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (N, C, H, W): PyTorch's layout
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    batches = _batches(x, y.astype(np.int64))

    def step():
        bx, by = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(torch.from_numpy(bx)), torch.from_numpy(by))
        loss.backward()
        opt.step()
        return loss

    for _ in range(5):
        step()

    def measure(warmup, steps):
        for _ in range(warmup):
            step()
        # Capped at BENCH_MAX_SECONDS (default 20): under load, eager execution can slow so far
        # that the run would not end; the rate is then measured over the steps done.
        limit = float(os.environ.get("BENCH_MAX_SECONDS", "20"))
        t = time.perf_counter()
        done = 0
        while done < steps:
            loss = step()
            done += 1
            if done % 10 == 0 and time.perf_counter() - t > limit:
                break
        seconds = time.perf_counter() - t
        return seconds * steps / done, {"final_loss": float(loss.detach()), "steps_done": done}

    _request_loop(measure)


# --------------------------------------------------------------------------------------------
# Keras 3 on JAX, `model.fit`.


def keras_worker(model, x, y):
    os.environ["KERAS_BACKEND"] = "jax"
    import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    if model == "mlp":
        body = [
            layers.Flatten(),
            layers.Dense(256, activation="relu"),
            layers.Dense(256, activation="relu"),
        ]
    else:
        body = [
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
        ]
    net = keras.Sequential([keras.Input(x.shape[1:]), *body, layers.Dense(10)])
    net.compile(
        optimizer=keras.optimizers.Adam(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)

    def fit(n_steps):
        idx = rng.integers(0, len(x), n_steps * BATCH)
        hist = net.fit(x[idx], y[idx], batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
        return hist.history["loss"][-1]

    fit(5)

    def measure(warmup, steps):
        fit(warmup)
        # One fit() call over exactly `steps` batches: Keras's per-call setup is included
        # (a few ms, small against the hundreds of steps measured).
        t = time.perf_counter()
        loss = fit(steps)
        return time.perf_counter() - t, {"final_loss": float(loss)}

    _request_loop(measure)


CONTENDERS = {
    "jax_jit": lambda m, x, y: jax_worker(m, x, y),
    "jax_jit_scan": lambda m, x, y: jax_worker(m, x, y, scan_k=int(os.environ["BENCH_K"])),
    "dlkit": lambda m, x, y: dlkit_worker(m, x, y, conv_impl=os.environ.get("BENCH_CONV", "")),
    "dlkit_k": lambda m, x, y: dlkit_worker(
        m, x, y, int(os.environ["BENCH_K"]), os.environ.get("BENCH_CONV", "")
    ),
    "dlkit_matmul_grad": lambda m, x, y: dlkit_worker(m, x, y, conv_impl="matmul_grad"),
    "dlkit_end_save": lambda m, x, y: dlkit_worker(
        m, x, y, conv_impl=os.environ.get("BENCH_CONV", ""), mid_run_saves=False
    ),
    "dlkit_k_end_save": lambda m, x, y: dlkit_worker(
        m, x, y, int(os.environ["BENCH_K"]), os.environ.get("BENCH_CONV", ""), mid_run_saves=False
    ),
    "torch": torch_worker,
    "keras_jax": keras_worker,
}


def main(argv):
    name, model, data_path = argv
    data = np.load(data_path)
    CONTENDERS[name](model, data["inputs"], data["labels"])


if __name__ == "__main__":
    main(sys.argv[1:])
