"""Why async checkpoint writes are paced: `python -m benchmarks.write_pacing [--rounds 3]`.

Times jitted 384x384 matmul steps (the checkpoint benchmark's training-like step) alone and
while 100 MiB are written + fsynced to a temporary directory by:
- another process doing `np.save` + fsync, at nice 0 and at nice 19;
- a thread of this process, writing 1 MiB pieces (with their CRC-32) and sleeping after each
  so that it is busy a share s of the time, for s in 1, 0.5, 0.2, 0.1, 0.05.
Prints, per writer, the step rate during the write over the rate alone (medians of rounds)
and how long the write took. docs/performance.md has the figures and what they decided.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.checkpoint_speed import _steps_per_s as _rate

_WRITER = r"""
import numpy as np, os, sys, time
a = np.random.default_rng(0).standard_normal(int(sys.argv[2]) * (1 << 18), dtype=np.float32)
sys.stdout.write("ready\n"); sys.stdout.flush()
for _ in sys.stdin:
    t = time.perf_counter()
    with open(os.path.join(sys.argv[1], "a.npy"), "wb") as f:
        np.save(f, a); f.flush(); os.fsync(f.fileno())
    sys.stdout.write(f"{time.perf_counter() - t}\n"); sys.stdout.flush()
"""


def _paced_write(path: str, data: memoryview, share: float) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, len(data), 1 << 20):
            t = time.thread_time()
            piece = data[off : off + (1 << 20)]
            os.write(fd, piece)
            zlib.crc32(piece)
            if share < 1:
                time.sleep((time.thread_time() - t) * (1 / share - 1))
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def _overlap(step, x, write) -> tuple[float, float]:
    """(rate while `write()` runs in a thread / rate alone, seconds the write took)."""
    alone = _rate(step, x, 0.7)
    done, took = threading.Event(), []
    thread = threading.Thread(target=lambda: (took.append(write()), done.set()))
    thread.start()
    during = _rate(step, x, 0, busy=lambda: not done.is_set())
    thread.join()
    return during / alone, took[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=100)
    args = ap.parse_args()
    step = jax.jit(lambda x: jnp.tanh(x @ x) * 0.5)
    x = jnp.ones((384, 384), jnp.float32)
    step(x).block_until_ready()
    data = memoryview(
        np.random.default_rng(0).standard_normal(args.mib * (1 << 18), dtype=np.float32)
    ).cast("B")
    results: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_CKPT_DIR")) as tmp:
        for nice in (0, 19):
            proc = subprocess.Popen(
                [sys.executable, "-c", _WRITER, tmp, str(args.mib)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=lambda n=nice: os.nice(n),  # noqa: PLW1509 - only os.nice
            )
            proc.stdout.readline()

            def other_process(proc=proc) -> float:
                proc.stdin.write("go\n")
                proc.stdin.flush()
                return float(proc.stdout.readline())

            for _ in range(args.rounds):
                results.setdefault(f"another process, nice {nice}", []).append(
                    _overlap(step, x, other_process)
                )
            proc.stdin.close()
            proc.wait()
        for share in (1.0, 0.5, 0.2, 0.1, 0.05):
            for _ in range(args.rounds):
                results.setdefault(f"this process, paced s={share}", []).append(
                    _overlap(step, x, lambda s=share: _paced_write(f"{tmp}/b.bin", data, s))
                )
    print(f"| {args.mib} MiB written by | steps during / alone | write took (s) |")
    print("|---|---:|---:|")
    for name, rows in results.items():
        ratios = [r for r, _ in rows]
        took = statistics.median(t for _, t in rows)
        print(
            f"| {name} | {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | {took:.2f} |"
        )


if __name__ == "__main__":
    main()
