"""Checkpoint speed: `python -m benchmarks.checkpoint_speed [--mib 100] [--repeats 5] [--sweep]`.

Against the disk's own limit (`np.save` of the same bytes + fsync; `np.load` back), measures
dlkit's `Checkpointer` (Orbax's standard format, manifest included) on two states of the same
size: few leaves (four float32 arrays) and ~300 leaves (a model-like mix of sizes). Per state:
a synchronous save, an async save (how long `save` blocks the loop in the steady state, where
its retention also deletes an old step, and how long until the step is durable), a restore
(verification included), and the rate of jitted training-like steps while an async save
writes. Medians of alternating repeats, after one untimed save of each kind (the first save in
a process pays one-time costs; it is reported on its own row). Reads hit the page cache, so
restore figures are an upper bound of what a cold disk gives.

`--sweep` also times a plain Orbax PyTree save of the few-leaf state (no manifest) under the
options dlkit could choose (OCDBT on/off, zarr3 or zarr2, zstd compression on/off): the
measurements behind `dlkit.checkpoint.store.STATE_OPTIONS`. Also `--only checkpoint` of
`python -m benchmarks.run`.
"""

import argparse
import os
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dlkit import checkpoint as checkpoint_lib

SWEEP = {
    "dlkit: no OCDBT, zarr3, uncompressed": {
        "use_ocdbt": False,
        "use_zarr3": True,
        "use_compression": False,
    },
    "no OCDBT, zarr2, uncompressed": {
        "use_ocdbt": False,
        "use_zarr3": False,
        "use_compression": False,
    },
    "OCDBT, zarr3, uncompressed": {"use_ocdbt": True, "use_zarr3": True, "use_compression": False},
    "Orbax default: OCDBT, zarr2, zstd": {},
    "no OCDBT, zarr3, zstd": {"use_ocdbt": False, "use_zarr3": True, "use_compression": True},
}


def few_leaves(mib: int) -> dict:
    n = mib * (1 << 20) // 4 // 4  # four float32 arrays
    rng = np.random.default_rng(0)
    return {f"w{i}": jnp.asarray(rng.standard_normal(n, dtype=np.float32)) for i in range(4)}


def many_leaves(mib: int, layers: int = 100) -> dict:
    """~3 leaves per layer (kernel, bias, scale) of a model-like state totalling `mib` MiB."""
    rng = np.random.default_rng(0)
    width = int((mib * (1 << 20) / 4 / layers) ** 0.5)  # kernels (width, width) hold the bytes
    return {
        f"layer_{i:03d}": {
            "kernel": jnp.asarray(rng.standard_normal((width, width), dtype=np.float32)),
            "bias": jnp.asarray(rng.standard_normal(width, dtype=np.float32)),
            "scale": jnp.asarray(rng.standard_normal(width, dtype=np.float32)),
        }
        for i in range(layers)
    }


def _np_save(state, directory: pathlib.Path) -> float:
    flat = checkpoint_lib.store.flat_leaves(state)
    t = time.perf_counter()
    for i, arr in enumerate(flat.values()):
        with open(directory / f"{i}.npy", "wb") as f:
            np.save(f, np.asarray(arr))
            f.flush()
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t


def _np_load(state, directory: pathlib.Path) -> float:
    n = len(jax.tree.leaves(state))
    t = time.perf_counter()
    out = [jnp.asarray(np.load(directory / f"{i}.npy")) for i in range(n)]
    jax.block_until_ready(out)
    return time.perf_counter() - t


def _steps_per_s(step, x, seconds: float, busy=None) -> float:
    """Rate of `step` over `seconds`, or while `busy()` is true if given."""
    n, t = 0, time.perf_counter()
    while (busy() if busy else time.perf_counter() - t < seconds) or n < 3:
        x = step(x)
        x.block_until_ready()
        n += 1
    return n / (time.perf_counter() - t)


def _async_save(directory, state, step, x) -> tuple[float, float, float]:
    """(seconds `save` blocked, seconds until durable, step rate while it wrote)."""
    with checkpoint_lib.Checkpointer(
        directory, max_to_keep=1, async_save=True, log=lambda s: None
    ) as ck:
        # The steady state of a run: two steps exist, and the timed save's retention deletes
        # the older one (max_to_keep=1) while the loop waits.
        for old in (1, 2):
            ck.save(old, state, data_position=0)
            ck.wait()
        t = time.perf_counter()
        ck.save(3, state, data_position=0)
        block = time.perf_counter() - t
        during = _steps_per_s(step, x, 0, ck.saving)
        ck.wait()
        return block, time.perf_counter() - t, during


def _orbax_save(state, directory: pathlib.Path, options: dict) -> float:
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**options))
    t = time.perf_counter()
    checkpointer.save(directory, args=ocp.args.PyTreeSave(state))
    seconds = time.perf_counter() - t
    checkpointer.close()
    return seconds


def _abstract(state):
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )


def measure(mib: int = 100, repeats: int = 5, sweep: bool = False) -> dict:
    states = {"few": few_leaves(mib), "many": many_leaves(mib)}
    step = jax.jit(lambda x: jnp.tanh(x @ x) * 0.5)  # a training-like compute step
    x = jnp.ones((384, 384), jnp.float32)
    step(x).block_until_ready()
    r: dict[str, list[float]] = {}

    def add(key, value):
        r.setdefault(key, []).append(value)

    out = {
        "mib": mib,
        "repeats": repeats,
        "leaves": {k: len(jax.tree.leaves(s)) for k, s in states.items()},
    }
    bench_dir = os.environ.get("BENCH_CKPT_DIR")
    with tempfile.TemporaryDirectory(dir=bench_dir) as tmp:  # one-time costs, timed apart
        tmp = pathlib.Path(tmp)
        with checkpoint_lib.Checkpointer(tmp / "s", async_save=False, log=lambda s: None) as ck:
            t = time.perf_counter()
            ck.save(0, states["few"], data_position=0)
            out["first_sync_save"] = time.perf_counter() - t
            jax.block_until_ready(ck.restore(_abstract(states["few"]))[0])
        with checkpoint_lib.Checkpointer(tmp / "a", async_save=True, log=lambda s: None) as ck:
            ck.save(0, states["few"], data_position=0)
    for i in range(repeats):
        for name, state in states.items():
            with tempfile.TemporaryDirectory(dir=bench_dir) as tmp:
                tmp = pathlib.Path(tmp)
                (tmp / "np").mkdir()
                add(f"{name}/np_save", _np_save(state, tmp / "np"))
                add(f"{name}/np_load", _np_load(state, tmp / "np"))
                with checkpoint_lib.Checkpointer(
                    tmp / "sync", max_to_keep=2, async_save=False, log=lambda s: None
                ) as ck:
                    t = time.perf_counter()
                    ck.save(i + 1, state, data_position=0)
                    add(f"{name}/sync_save", time.perf_counter() - t)
                    t = time.perf_counter()
                    jax.block_until_ready(ck.restore(_abstract(state))[0])
                    add(f"{name}/restore", time.perf_counter() - t)
                add(f"{name}/steps_alone", _steps_per_s(step, x, 1.0))
                block, durable, during = _async_save(tmp / "async", state, step, x)
                add(f"{name}/async_block", block)
                add(f"{name}/async_durable", durable)
                add(f"{name}/steps_during_async", during)
                if sweep and name == "few":
                    for j, (label, options) in enumerate(SWEEP.items()):
                        add(f"sweep/{label}", _orbax_save(state, tmp / f"orbax{j}", options))
    return out | {k: statistics.median(v) for k, v in r.items()}


def report(
    quick: bool = False, mib: int = 100, repeats: int | None = None, sweep: bool = False
) -> str:
    repeats = repeats or (2 if quick else 5)
    m = measure(mib, repeats, sweep)
    rate = lambda s: f"{mib / s:.0f} MiB/s"  # noqa: E731
    lines = [
        f"## Checkpoint speed ({mib} MiB state, medians of {m['repeats']}; "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())})",
        "",
        "| state | operation | seconds | throughput | vs np.save+fsync / np.load / sync save |",
        "|---|---|---:|---:|---:|",
    ]
    for name in ("few", "many"):
        label = f"{name} leaves ({m['leaves'][name]})"
        g = lambda k, name=name: m[f"{name}/{k}"]  # noqa: E731
        lines += [
            f"| {label} | np.save + fsync | {g('np_save'):.3f} | {rate(g('np_save'))} | 1.00x |",
            f"| {label} | dlkit sync save | {g('sync_save'):.3f} | {rate(g('sync_save'))} | "
            f"{g('np_save') / g('sync_save'):.2f}x |",
            f"| {label} | dlkit async save: blocks the loop (incl. deleting an old step) | "
            f"{g('async_block'):.3f} | | {g('async_block') / g('sync_save'):.0%} of a sync save |",
            f"| {label} | dlkit async save: until durable | {g('async_durable'):.3f} | "
            f"{rate(g('async_durable'))} | {g('np_save') / g('async_durable'):.2f}x |",
            f"| {label} | np.load | {g('np_load'):.3f} | {rate(g('np_load'))} | 1.00x |",
            f"| {label} | dlkit restore (verify + read) | {g('restore'):.3f} | "
            f"{rate(g('restore'))} | {g('np_load') / g('restore'):.2f}x |",
        ]
    lines += [
        f"| few leaves | dlkit sync save, the first in the process (one run) | "
        f"{m['first_sync_save']:.3f} | | {m['few/np_save'] / m['first_sync_save']:.2f}x |",
        "",
    ]
    for name in ("few", "many"):
        lines.append(
            f"Steps overlapped by an async save ({name} leaves) ran at "
            f"{m[f'{name}/steps_during_async']:.1f}/s against {m[f'{name}/steps_alone']:.1f}/s "
            f"alone ({m[f'{name}/steps_during_async'] / m[f'{name}/steps_alone']:.2f}x)."
        )
    if sweep:
        lines += [
            "",
            "Plain Orbax PyTree save of the few-leaf state, by option (no manifest):",
            "",
            "| options | seconds | vs np.save+fsync |",
            "|---|---:|---:|",
        ]
        for label in SWEEP:
            s = m[f"sweep/{label}"]
            lines.append(f"| {label} | {s:.3f} | {m['few/np_save'] / s:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time Orbax's options")
    args = ap.parse_args()
    print(report(args.quick, args.mib, args.repeats, args.sweep))


if __name__ == "__main__":
    main()
