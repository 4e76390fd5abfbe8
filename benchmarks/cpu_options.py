"""XLA:CPU compile options, A/B on dlkit's compiled train step: `python -m benchmarks.cpu_options`.

Compiles the bench MLP's train step (what `fit` runs, K steps per call) once per variant and
times them in one process, alternating rounds of the same pre-made batches, medians (steps/s
and the ratio to the first variant). A variant is `NAME=SETTING,SETTING,...`, where a setting
is a dlkit config override (`train.xla_cpu_ynn_fusions=none`) or a raw XLA option added to
dlkit's (`xla_cpu_enable_custom_matmul_tiling=true`; see XLA's DebugOptions). A piece without
`=` continues the previous setting's value, so `train.xla_cpu_ynn_fusions=individual_dot,reduce`
is one setting. A raw option this jaxlib rejects makes that variant compile with XLA's
defaults, with a warning.

    python -m benchmarks.cpu_options                        # the train.xla_cpu_ynn_fusions choices
    python -m benchmarks.cpu_options --k 1 --variant base= \
        --variant nomof=xla_cpu_use_multi_output_fusion=false
    python -m benchmarks.cpu_options --variant base= \
        --variant w512=xla_cpu_prefer_vector_width=512    # 256- vs 512-bit vectors

The default variants are dlkit's `train.xla_cpu_ynn_fusions` default, no YNNPACK fusions, and
XLA's own defaults (docs/performance.md).
"""

import argparse
import time

import jax
import numpy as np

import dlkit
import dlkit.data
from benchmarks import mlp_breakdown as mb
from benchmarks import workers
from dlkit import components, programs

STEPS = 3000
DEFAULT_VARIANTS = (
    "ynn_default=train.xla_cpu_ynn_fusions=individual_dot,reduce",
    "ynn_none=train.xla_cpu_ynn_fusions=none",
    "xla=train.xla_cpu_ynn_fusions=xla",
)


def _value(text: str):
    """'true' / 'false' / an int / anything else as a string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return text


def parse_variant(spec: str) -> tuple[str, list[str], dict]:
    """'NAME=a.b=1,xla_opt=2' -> (NAME, config overrides, raw XLA options)."""
    name, sep, settings = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"--variant: expected NAME=SETTING,..., got {spec!r}")
    settings_list: list[str] = []
    for piece in filter(None, (s.strip() for s in settings.split(","))):
        if "=" in piece or not settings_list:
            settings_list.append(piece)
        else:  # a comma inside a value: `train.xla_cpu_ynn_fusions=individual_dot,reduce`
            settings_list[-1] += f",{piece}"
    overrides, raw = [], {}
    for setting in settings_list:
        key, eq, value = setting.partition("=")
        if not eq:
            raise ValueError(f"--variant {name}: expected KEY=VALUE, got {setting!r}")
        if key.startswith("xla_"):
            raw[key] = _value(value)
        else:
            overrides.append(setting)
    return name, overrides, raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=50, help="steps per call (1 = plain steps)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--variant", action="append", help="NAME=SETTING,... (repeatable)")
    args = ap.parse_args()
    k = args.k
    x, y = mb._digits()  # noqa: SLF001
    source = dlkit.data.ArraySource(inputs=x, labels=y)
    batches = workers._batches(x, y)  # noqa: SLF001
    groups = []
    for _ in range(64):
        g = [next(batches) for _ in range(k)]
        bx = np.stack([a for a, _ in g]) if k > 1 else g[0][0]
        by = np.stack([b for _, b in g]) if k > 1 else g[0][1]
        groups.append({"inputs": bx, "labels": by, "mask": np.ones(by.shape, np.float32)})
    groups = [jax.device_put(b) for b in groups]

    runs = {}
    for spec in args.variant or DEFAULT_VARIANTS:
        name, overrides, raw = parse_variant(spec)
        cfg = mb._config(k, 0)  # noqa: SLF001
        dlkit.apply_overrides(cfg, overrides)
        options = {**components.compiler_options(cfg), **raw}
        strategy = dlkit.make_strategy("jit", num_devices=1, compiler_options=options)
        c = dlkit.build(cfg, train_source=source, eval_source=source, strategy=strategy)
        state = c.init_state()
        spec_ = c.abstract_metrics(state)
        compiled, _ = programs.compile_train(c, state, spec_)
        print(f"{name}: {strategy.compiler_options}", flush=True)
        runs[name] = [compiled, state, strategy.zeros(spec_)]

    def measure(run) -> float:
        compiled, state, acc = run
        state, acc = compiled(state, acc, groups[0])
        jax.block_until_ready(acc)
        t = time.perf_counter()
        for i in range(STEPS // k):
            state, acc = compiled(state, acc, groups[i % 64])
        jax.block_until_ready(acc)
        run[1:] = [state, acc]
        return STEPS // k * k / (time.perf_counter() - t)

    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            results[name].append(measure(run))
    mb.print_rates(f"bench MLP step, K={k}", results, "vs first")


if __name__ == "__main__":
    main()
