"""Checkpoint speed for a 100 MiB state: `python -m benchmarks.checkpoint_speed [--mib 100]`.

Against the disk's own limit (`np.save` of the same bytes + fsync; `np.load` back), measures
dlkit's `Checkpointer` (Orbax underneath, integrity manifest included): a synchronous save,
an async save (how long `save` blocks the loop in the steady state, where its retention also
deletes an old step, and how long until the step is durable), a restore, and how much an
async save slows jitted training-like steps that run while it writes: at the default pace
(`checkpoint.async_write_share`, 0.05) and flat out (1.0). Medians of alternating repeats,
after one untimed save of each kind (the first save in a process pays one-time costs; it is
reported on its own row). Reads hit the page cache
(nothing drops it), so restore figures are an upper bound of what a cold disk gives. Also
`--only checkpoint` of `python -m benchmarks.run`.
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

from dlkit import checkpoint as checkpoint_lib


def _state(mib: int) -> dict:
    n = mib * (1 << 20) // 4 // 4  # four float32 arrays
    rng = np.random.default_rng(0)
    return {f"w{i}": jnp.asarray(rng.standard_normal(n, dtype=np.float32)) for i in range(4)}


def _np_save(state, directory: pathlib.Path) -> float:
    t = time.perf_counter()
    for name, arr in state.items():
        path = directory / f"{name}.npy"
        with open(path, "wb") as f:
            np.save(f, np.asarray(arr))
            f.flush()
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t


def _np_load(state, directory: pathlib.Path) -> float:
    t = time.perf_counter()
    out = {name: jnp.asarray(np.load(directory / f"{name}.npy")) for name in state}
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


def _async_save(directory, state, share, step, x) -> tuple[float, float, float]:
    """(seconds `save` blocked, seconds until durable, step rate while it wrote)."""
    with checkpoint_lib.Checkpointer(
        directory, max_to_keep=1, async_save=True, async_write_share=share, log=lambda s: None
    ) as ck:

        def busy():
            return ck.saving()

        # The steady state of a run: two steps exist, and the timed save's retention deletes
        # the older one (max_to_keep=1) while the loop waits.
        for old in (1, 2):
            ck.save(old, state, data_position=0)
            ck.wait()
        t = time.perf_counter()
        ck.save(3, state, data_position=0)
        block = time.perf_counter() - t
        during = _steps_per_s(step, x, 0, busy)
        ck.wait()
        return block, time.perf_counter() - t, during


def measure(mib: int = 100, repeats: int = 5) -> dict:
    state = _state(mib)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )
    step = jax.jit(lambda x: jnp.tanh(x @ x) * 0.5)  # a training-like compute step
    x = jnp.ones((384, 384), jnp.float32)
    step(x).block_until_ready()
    r = {
        k: []
        for k in (
            "np_save",
            "np_load",
            "sync_save",
            "async_block",
            "async_durable",
            "restore",
            "steps_alone",
            "steps_during_async",
            "async_block_flat",
            "async_durable_flat",
            "steps_during_async_flat",
        )
    }
    # The first save in a process pays one-time costs (Orbax's thread pools and tensorstore
    # contexts), so it is timed apart (BENCHMARKS.md has the figures), and the
    # medians below are of the steady state that a run saving every N steps sees.
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_CKPT_DIR")) as tmp:
        tmp = pathlib.Path(tmp)
        with checkpoint_lib.Checkpointer(tmp / "s", async_save=False, log=lambda s: None) as ck:
            t = time.perf_counter()
            ck.save(0, state, data_position=0)
            first_sync = time.perf_counter() - t
            jax.block_until_ready(ck.restore(abstract)[0])
        with checkpoint_lib.Checkpointer(tmp / "a", async_save=True, log=lambda s: None) as ck:
            ck.save(0, state, data_position=0)
    for i in range(repeats):
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_CKPT_DIR")) as tmp:
            tmp = pathlib.Path(tmp)
            (tmp / "np").mkdir()
            r["np_save"].append(_np_save(state, tmp / "np"))
            r["np_load"].append(_np_load(state, tmp / "np"))
            with checkpoint_lib.Checkpointer(
                tmp / "sync", max_to_keep=2, async_save=False, log=lambda s: None
            ) as ck:
                t = time.perf_counter()
                ck.save(i + 1, state, data_position=0)
                r["sync_save"].append(time.perf_counter() - t)
                t = time.perf_counter()
                restored, _ = ck.restore(abstract)
                jax.block_until_ready(restored)
                r["restore"].append(time.perf_counter() - t)
            r["steps_alone"].append(_steps_per_s(step, x, 1.0))
            for share, suffix in ((checkpoint_lib.DEFAULT_WRITE_SHARE, ""), (1.0, "_flat")):
                block, durable, during = _async_save(tmp / f"async{suffix}", state, share, step, x)
                r["async_block" + suffix].append(block)
                r["async_durable" + suffix].append(durable)
                r["steps_during_async" + suffix].append(during)
    medians = {k: statistics.median(v) for k, v in r.items()}
    return medians | {"mib": mib, "repeats": repeats, "first_sync_save": first_sync}


def report(quick: bool = False, mib: int = 100) -> str:
    m = measure(mib, 2 if quick else 5)
    gib = mib / 1024
    rate = lambda s: f"{gib / s * 1024:.0f} MiB/s"  # noqa: E731
    lines = [
        f"## Checkpoint speed ({mib} MiB state, medians of {m['repeats']}; "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())})",
        "",
        "| operation | seconds | throughput | vs np.save+fsync / np.load |",
        "|---|---:|---:|---:|",
        f"| np.save + fsync | {m['np_save']:.3f} | {rate(m['np_save'])} | 1.00x |",
        f"| dlkit sync save | {m['sync_save']:.3f} | {rate(m['sync_save'])} | "
        f"{m['np_save'] / m['sync_save']:.2f}x |",
        f"| dlkit sync save, the first in the process (one run) | {m['first_sync_save']:.3f} | "
        f"{rate(m['first_sync_save'])} | {m['np_save'] / m['first_sync_save']:.2f}x |",
        f"| dlkit async save: blocks the loop (incl. deleting an old step) | "
        f"{m['async_block']:.3f} | | "
        f"{m['async_block'] / m['sync_save']:.0%} of a sync save |",
        f"| dlkit async save: until durable (paced: async_write_share="
        f"{checkpoint_lib.DEFAULT_WRITE_SHARE}) | {m['async_durable']:.3f} | "
        f"{rate(m['async_durable'])} | {m['np_save'] / m['async_durable']:.2f}x |",
        f"| dlkit async save flat out (async_write_share=1): blocks the loop | "
        f"{m['async_block_flat']:.3f} | | {m['async_block_flat'] / m['sync_save']:.0%} of a "
        "sync save |",
        f"| dlkit async save flat out: until durable | {m['async_durable_flat']:.3f} | "
        f"{rate(m['async_durable_flat'])} | {m['np_save'] / m['async_durable_flat']:.2f}x |",
        f"| np.load | {m['np_load']:.3f} | {rate(m['np_load'])} | 1.00x |",
        f"| dlkit restore (verify + read) | {m['restore']:.3f} | {rate(m['restore'])} | "
        f"{m['np_load'] / m['restore']:.2f}x |",
        "",
        f"Steps overlapped by an async save ran at {m['steps_during_async']:.1f}/s against "
        f"{m['steps_alone']:.1f}/s alone "
        f"({m['steps_during_async'] / m['steps_alone']:.2f}x); flat out, at "
        f"{m['steps_during_async_flat']:.1f}/s "
        f"({m['steps_during_async_flat'] / m['steps_alone']:.2f}x).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(report(args.quick, args.mib))


if __name__ == "__main__":
    main()
