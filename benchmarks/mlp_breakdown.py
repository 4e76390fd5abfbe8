"""Where the bench MLP's time goes in dlkit: `python -m benchmarks.mlp_breakdown [--k 50]`.

One process, alternating rounds, medians (steps/s and the ratio to the first row):
- `bare`: the hand-written `jax.jit` step (benchmarks.workers' `jax_worker` step, `lax.scan`
  over K steps when --k > 1) on pre-made numpy batches: the floor;
- `dlkit step`: dlkit's compiled train step (what `fit` runs: metrics accumulation, the
  non-finite guard, the gradient norm) in a bare loop on the same batches;
- `fit, no checkpoints`: `dlkit.fit` with its loader, prefetch, progress bar and a logged row
  every 100 steps, checkpoints only at the end (outside the window);
- `fit, checkpoints every 500`: the same with async checkpoints every 500 steps, as
  `benchmarks.run`'s `dlkit` contender.
Steady state only: timed between two logged rows of `fit` (`on_row`), after warm-up.
"""

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np

import dlkit
import dlkit.data
from benchmarks import workers
from dlkit import programs

STEPS = 3000
WARMUP = 500


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[..., None], d.target.astype(np.int32)


def _config(k: int, every: int) -> dlkit.Config:
    cfg = dlkit.Config(name="bench_mlp")
    cfg.model.name = "mlp"
    cfg.model.options = {"hidden_sizes": (256, 256), "dropout_rate": 0.0, "num_classes": 10}
    cfg.optim.name = "adam"
    cfg.optim.learning_rate = workers.LR
    cfg.train.batch_size = workers.BATCH
    cfg.train.log_every = 100
    cfg.train.eval_every = 0
    cfg.train.steps = WARMUP + STEPS + 100
    cfg.data.validate = "off"
    cfg.checkpoint.every_steps = every
    if k > 1:
        cfg.train.steps_per_dispatch = k
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=1, help="steps per dispatch (1 = plain steps)")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    k = args.k
    x, y = _digits()
    batches = workers._batches(x, y)  # noqa: SLF001
    groups = []
    for _ in range(64):
        g = [next(batches) for _ in range(k)]
        groups.append((np.stack([a for a, _ in g]), np.stack([b for _, b in g])) if k > 1 else g[0])

    # The floor: the hand-written step (the `jax_jit` contender's).
    run, initial = workers.hand_step("mlp", x, k if k > 1 else 0)
    carry = [initial]

    def bare() -> float:
        c, loss = run(carry[0], groups[0])
        jax.block_until_ready(loss)
        t = time.perf_counter()
        for i in range(STEPS // k):
            c, loss = run(c, groups[i % 64])
        jax.block_until_ready(loss)
        carry[0] = c
        return STEPS / (time.perf_counter() - t)

    # dlkit's compiled step, alone.
    source = dlkit.data.ArraySource(inputs=x, labels=y)
    step_cfg = _config(k, 0)
    c = dlkit.build(step_cfg, train_source=source, eval_source=source)
    state = c.init_state()
    spec = c.abstract_metrics(state)
    compiled, _ = programs.compile_train(c, state, spec)
    ones = np.ones(groups[0][1].shape, np.float32)
    dbatches = [{"inputs": bx, "labels": by, "mask": ones} for bx, by in groups]
    held = [state, c.strategy.zeros(spec)]

    def dlkit_step() -> float:
        s, acc = compiled(held[0], held[1], dbatches[0])
        jax.block_until_ready(acc)
        t = time.perf_counter()
        for i in range(STEPS // k):
            s, acc = compiled(s, acc, dbatches[i % 64])
        jax.block_until_ready(acc)
        held[:] = [s, acc]
        return STEPS / (time.perf_counter() - t)

    class RowTimes(dlkit.Callback):
        def __init__(self):
            self.times = {}

        def on_row(self, run, row):
            self.times[row["step"]] = time.perf_counter()

    def fit(every: int) -> float:
        times = RowTimes()
        with tempfile.TemporaryDirectory() as workdir:
            dlkit.fit(
                _config(k, every),
                workdir,
                train_source=source,
                eval_source=source,
                progress=True,
                callbacks=[times],
            )
        return STEPS / (times.times[WARMUP + STEPS] - times.times[WARMUP])

    contenders = {
        "bare": bare,
        "dlkit step": dlkit_step,
        "fit, no checkpoints": lambda: fit(0),
        "fit, checkpoints every 500": lambda: fit(500),
    }
    fit(0)  # imports and caches
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, measure in contenders.items():
            results[name].append(measure())
    print_rates(f"MLP, K={k}", results, "vs bare")


def print_rates(title: str, results: dict[str, list[float]], versus: str) -> None:
    """A markdown table of each row's median steps/s, its ratio to the first row's median,
    and every round's rate."""
    first = statistics.median(next(iter(results.values())))
    print(f"| {title} | steps/s (median) | {versus} | rounds |")
    print("|---|---:|---:|---|")
    for name, rates in results.items():
        m = statistics.median(rates)
        print(f"| {name} | {m:.0f} | {m / first:.3f}x | {', '.join(f'{r:.0f}' for r in rates)} |")


if __name__ == "__main__":
    main()
