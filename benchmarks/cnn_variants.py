"""CNN convolution variants on XLA:CPU: `python -m benchmarks.cnn_variants [--steps 20]`.

Times one jitted fwd+bwd+Adam step of the zoo CNN (features (32, 64), dense 128, batch 128,
28x28x1) for each way of writing the convolution, alternating repeats, median steps/s:
- xla:     `nn.Conv` (lax.conv_general_dilated, NHWC), dlkit's default;
- patches: `conv_impl="patches"` (shifted views concatenated on channels + one matmul);
- matmul_grad: `conv_impl="matmul_grad"` (the patches forward; custom VJP: kernel gradient as
  one matmul of the patch matrix, input gradient XLA's own).
See dlkit/models/conv.py. Compiled with dlkit's XLA:CPU options (`train.xla_cpu_ynn_fusions`,
default: YNNPACK for dots and reductions, not convolutions); `--ynn xla` compiles with XLA's
own defaults instead.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlkit import models, xla_cpu
from dlkit.models.conv import CONV_IMPLS


def make_step(impl, ynn=xla_cpu.DEFAULT_YNN_FUSIONS):
    module = models.build(
        "cnn",
        features=(32, 64),
        dense_size=128,
        dropout_rate=0.0,
        conv_impl=impl,
    )
    x = jnp.asarray(np.random.default_rng(0).normal(size=(128, 28, 28, 1)), jnp.float32)
    y = jnp.arange(128) % 10
    params = module.init(jax.random.key(0), x, train=False)["params"]
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    def loss(p):
        logits = module.apply({"params": p}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(p, o):
        g = jax.grad(loss)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    options = xla_cpu.compiler_options(ynn) or None
    return jax.jit(step, compiler_options=options), params, opt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--ynn",
        default=xla_cpu.DEFAULT_YNN_FUSIONS,
        help="train.xla_cpu_ynn_fusions for the step (xla = XLA's defaults)",
    )
    args = ap.parse_args()
    impls = CONV_IMPLS
    runs = {i: list(make_step(i, args.ynn)) for i in impls}
    for r in runs.values():
        r[1], r[2] = r[0](r[1], r[2])
        jax.block_until_ready(r[1])
    rates = {i: [] for i in impls}
    for _ in range(args.repeats):
        for i in impls:
            step, p, o = runs[i]
            t = time.perf_counter()
            for _ in range(args.steps):
                p, o = step(p, o)
            jax.block_until_ready(p)
            rates[i].append(args.steps / (time.perf_counter() - t))
            runs[i][1], runs[i][2] = p, o
    for i in impls:
        print(
            f"{i:8s} median {statistics.median(rates[i]):.1f} steps/s  "
            f"({min(rates[i]):.1f}-{max(rates[i]):.1f})"
        )


if __name__ == "__main__":
    main()
