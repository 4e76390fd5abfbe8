"""The Grain input pipeline (`data.pipeline=grain`): its training speed against the in-memory
loader, and its memory when training from a dataset larger than memory should need.

    python -m benchmarks.grain_input --quick        # a few minutes
    python -m benchmarks.grain_input                # ~15 minutes
    python -m benchmarks.grain_input --only memory --dir /data/tmp --keep

Speed: `fashion_mnist_cnn` (its model, optimizer and batch 128) trained by `dlkit.fit` from
the in-memory loader and from Grain (over the same in-memory arrays, and over Fashion-MNIST
written to ArrayRecord files with 0 and 2 worker processes). Each contender runs in its own
process, started once; every measurement is a fresh `dlkit.fit` whose steps/s are timed
between two metric rows after a warm-up, and the contenders alternate, the order rotating
every repeat, so drift in the machine's load hits all alike. The table gives medians, min-max
and the ratio against the in-memory loader (of the medians, and paired within each repeat).

Memory: a dataset of `--size-gib` GiB (64x64x3 uint8 images, int32 labels) is written once
as ArrayRecord files (`dlkit.data.arrayrecord.write_split`), then a small CNN trains from it
with `data.pipeline=grain` and 0, 1 and 2 workers, each in a fresh process, for a fixed
number of steps. A poller reads /proc every 50 ms for the peak of the summed RSS of the whole
process tree (the training process and Grain's workers) and of its summed PSS (shared pages
split between the processes that share them; the summed RSS counts them once per process);
the training process reports its own peak (`getrusage`) and its examples/s. ArrayRecord is
read with pread, so the file's pages sit in the page cache, not in any process's RSS.

Both parts print markdown tables and write their figures as JSON (`--json`).
"""

import argparse
import datetime
import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import run as run_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENT = "fashion_mnist_cnn"
LOG_EVERY = 10  # metric rows every N steps: the timing marks
# Contender -> config overrides of `EXPERIMENT` ("{ar}": Fashion-MNIST's ArrayRecord directory).
GRAIN_AR = {"data.name": "arrayrecord", "data.path": "{ar}", "data.pipeline": "grain"}
SPEED_CONTENDERS = {
    "memory": {},
    "grain_memory_w0": {"data.pipeline": "grain"},
    "grain_ar_w0": GRAIN_AR,
    "grain_ar_w2": {**GRAIN_AR, "data.grain_workers": 2},
}
SPEED_LABELS = {
    "memory": "in-memory loader (data.pipeline=memory)",
    "grain_memory_w0": "Grain over the in-memory arrays, 0 workers",
    "grain_ar_w0": "Grain over ArrayRecord files, 0 workers",
    "grain_ar_w2": "Grain over ArrayRecord files, 2 workers",
}
# (warm-up, measured) steps per speed measurement, and repeats.
SPEED_PLAN = {"quick": (20, 100, 3), "full": (40, 200, 5)}
# The memory part: image shape, batch, steps (warm-up, measured), worker counts.
IMAGE = (64, 64, 3)
MEMORY_BATCH = 128
MEMORY_PLAN = {"quick": (20, 100), "full": (40, 400)}
MEMORY_WORKERS = (0, 1, 2)
MEMORY_MODEL = {"features": (16, 32), "dense_size": 64, "dropout_rate": 0.0}
RSS_LIMIT_GIB = 1.5


# --------------------------------------------------------------------------------------------
# Shared: a `dlkit.fit` timed between metric rows.


def timed_fit(cfg, warmup: int, steps: int, **fit_kwargs) -> tuple[float, object]:
    """Runs `dlkit.fit(cfg)` for `warmup + steps + LOG_EVERY` steps in a temporary workdir and
    returns (seconds from the row of step `warmup` to the row of step `warmup + steps`, the
    result). `warmup` and `steps` are multiples of LOG_EVERY."""
    import dlkit

    class RowTimes(dlkit.Callback):
        def __init__(self):
            self.times = {}

        def on_row(self, run, row):
            self.times[row["step"]] = time.perf_counter()

    cfg.train.log_every = LOG_EVERY
    cfg.train.steps = warmup + steps + LOG_EVERY
    # The learning-rate warm-up must fit in the run; the speed does not depend on its length.
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, warmup)
    cfg.train.eval_every = 0  # only at the end, outside the timed window
    cfg.train.plots = False
    cfg.data.validate = "off"
    cfg.data.audit = "off"
    rows = RowTimes()
    with tempfile.TemporaryDirectory() as workdir:
        result = dlkit.fit(cfg, workdir, progress=False, callbacks=[rows], **fit_kwargs)
    return rows.times[warmup + steps] - rows.times[warmup], result


def _config(experiment: str, overrides: dict):
    from dlkit.config import experiments

    sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    return experiments.load_config(experiment, sets)


# --------------------------------------------------------------------------------------------
# Speed: in-memory loader vs Grain, alternating processes.


def speed_worker(experiment: str, overrides: dict, eval_examples: int) -> None:
    """One contender's process: answers `{"warmup": W, "steps": N}` lines on stdin with
    `RESULT {"steps_per_s": ...}` lines (benchmarks.workers' protocol)."""
    from benchmarks import workers
    from dlkit import data

    eval_source = data.load_dataset(_config(experiment, {}).data.name, "test")
    eval_source = data.ArraySource(**data.get_batch(eval_source, np.arange(eval_examples)))

    def measure(warmup, steps):
        seconds, result = timed_fit(
            _config(experiment, overrides), warmup, steps, eval_source=eval_source
        )
        return seconds, {"final_loss": result.history.last("train/loss")}

    measure(LOG_EVERY, LOG_EVERY)  # imports, caches, the first compile
    workers._request_loop(measure)


class SpeedWorker(run_lib.Worker):
    """A `speed_worker` process (run.py's Worker, started with this module's worker)."""

    def __init__(self, name, experiment, overrides, log_dir, eval_examples):
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)  # one CPU device, as a user's script gets
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.name = name
        self.stderr = open(os.path.join(log_dir, f"speed_{name}.log"), "w")  # noqa: SIM115
        argv = [sys.executable, "-m", "benchmarks.grain_input", "--speed-worker"]
        argv += [json.dumps([experiment, overrides, eval_examples])]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            cwd=REPO,
            env=env,
        )
        self._expect("READY")


def measure_speed(
    contenders: dict[str, dict],
    *,
    experiment: str = EXPERIMENT,
    warmup: int,
    steps: int,
    repeats: int,
    log_dir: str,
    eval_examples: int = 1000,
) -> dict:
    """Steps/s of each contender (name -> config overrides of `experiment`), `repeats`
    alternating measurements of `steps` steps after `warmup`.

    Returns:
      {"results": {name: [steps/s per repeat]}, "warmup", "steps", "load": "before -> after"}.
    """
    load_before = run_lib.load_average()
    names = list(contenders)
    results = {n: [] for n in names}
    procs = {}
    try:
        for n in names:
            print(f"[speed] starting {n} ...", flush=True)
            procs[n] = SpeedWorker(n, experiment, contenders[n], log_dir, eval_examples)
        for r in range(repeats):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                res = procs[n].measure(warmup, steps)
                results[n].append(res["steps_per_s"])
                print(f"[speed] repeat {r + 1}/{repeats} {n}: {res['steps_per_s']:.1f} steps/s")
    finally:
        for p in procs.values():
            p.close()
    load = f"{load_before} -> {run_lib.load_average()}"
    return {"results": results, "warmup": warmup, "steps": steps, "load": load}


def speed_table(res: dict, base: str = "memory") -> str:
    """Markdown: median steps/s, min-max, ratio of medians and paired ratio against `base`."""
    med = {n: statistics.median(v) for n, v in res["results"].items()}
    lines = [
        "| contender | steps/s (median) | min-max | vs in-memory | vs in-memory, paired |",
        "|---|---:|---:|---:|---:|",
    ]
    for n, v in res["results"].items():
        paired = run_lib.paired_ratio(v, res["results"][base])
        lines.append(
            f"| {SPEED_LABELS.get(n, n)} | {med[n]:.1f} | {min(v):.1f}-{max(v):.1f} "
            f"| {med[n] / med[base]:.2f}x | {paired:.2f}x |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Memory: a dataset beyond what the process should hold, 0 / 1 / 2 workers.


class SyntheticImages:
    """`n` examples of uint8 images `shape` and int32 labels, generated from their index (the
    same bytes on every call): what `write_split` reads, without holding the dataset."""

    def __init__(self, n: int, shape=IMAGE):
        self.n, self.shape = int(n), tuple(shape)

    def __len__(self):
        return self.n

    def get_batch(self, indices):
        indices = np.asarray(indices)
        rng = np.random.default_rng(int(indices[0]))
        images = rng.integers(0, 256, (len(indices), *self.shape), dtype=np.uint8)
        return {"inputs": images, "labels": (indices % 10).astype(np.int32)}


def write_dataset(directory: str, size_bytes: float, shape=IMAGE, eval_examples=1024) -> dict:
    """Writes about `size_bytes` of train examples (and `eval_examples` test examples) to
    ArrayRecord files in `directory`.

    Returns:
      {"examples": int, "bytes": int (train files), "seconds": float, "MiB_per_s": float}.
    """
    from dlkit.data import arrayrecord

    n = max(int(np.ceil(size_bytes / np.prod(shape))), MEMORY_BATCH)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(directory)) or ".").free
    if free < 1.1 * size_bytes:
        raise OSError(
            f"--dir: expected {1.1 * size_bytes / 2**30:.1f} GiB free under {directory}, "
            f"got {free / 2**30:.1f} GiB"
        )
    t = time.perf_counter()
    files = arrayrecord.write_split(
        directory, "train", SyntheticImages(n, shape), num_files=max(1, min(16, n // 4096))
    )
    seconds = time.perf_counter() - t
    arrayrecord.write_split(directory, "test", SyntheticImages(eval_examples, shape))
    size = sum(os.path.getsize(f) for f in files)
    return {"examples": n, "bytes": size, "seconds": seconds, "MiB_per_s": size / 2**20 / seconds}


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (from /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass  # exited meanwhile
    return out


def _proc_kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(summed RSS, summed PSS, processes) of `pid`'s process tree now, bytes."""
    pids = _tree(pid)
    rss = sum(_proc_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
    pss = sum(_proc_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return rss * 1024, pss * 1024, len(pids)


def memory_child(path: str, workers: int, warmup: int, steps: int, options: dict, batch: int):
    """The training process of one memory run: prints `RESULT {json}`."""
    from dlkit.config import sections

    cfg = sections.Config(name="grain_memory")
    cfg.data.name, cfg.data.path, cfg.data.pipeline = "arrayrecord", path, "grain"
    cfg.data.grain_workers = workers
    cfg.model.name = "cnn"
    cfg.model.options = dict(options)
    cfg.optim.name = "adam"
    cfg.optim.learning_rate = 1e-4
    cfg.train.batch_size = batch
    cfg.checkpoint.every_steps = 0
    seconds, result = timed_fit(cfg, warmup, steps)
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    out = {
        "examples_per_s": steps * cfg.train.batch_size / seconds,
        "steps_per_s": steps / seconds,
        "main_peak_rss": own_peak,
        "final_loss": result.history.last("train/loss"),
    }
    print("RESULT " + json.dumps(out), flush=True)


def measure_memory(
    path: str,
    workers: int,
    *,
    warmup: int,
    steps: int,
    log_dir: str,
    options: dict = MEMORY_MODEL,
    batch: int = MEMORY_BATCH,
    poll_s: float = 0.05,
) -> dict:
    """Trains from the ArrayRecord files in `path` with `workers` Grain workers in a fresh
    process, polling its process tree's memory.

    Returns:
      {"workers", "examples_per_s", "steps_per_s", "main_peak_rss", "tree_peak_rss",
       "tree_peak_pss" (bytes), "max_processes", "final_loss"}.
    """
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    argv = [sys.executable, "-m", "benchmarks.grain_input", "--memory-child"]
    argv += [json.dumps([path, workers, warmup, steps, options, batch])]
    with open(os.path.join(log_dir, f"memory_w{workers}.log"), "w") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        peak_rss = peak_pss = most = 0
        while proc.poll() is None:
            rss, pss, count = tree_memory(proc.pid)
            peak_rss, peak_pss, most = max(peak_rss, rss), max(peak_pss, pss), max(most, count)
            time.sleep(poll_s)
        out = proc.stdout.read()
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"memory run, {workers} workers: exit {proc.returncode}; see {log.name}")
    res = json.loads(lines[-1][len("RESULT ") :])
    return {
        "workers": workers,
        **res,
        "tree_peak_rss": peak_rss,
        "tree_peak_pss": peak_pss,
        "max_processes": most,
    }


def memory_table(rows: list[dict]) -> str:
    """Markdown: per worker count, examples/s and the peaks in MiB."""
    mib = 2**20
    lines = [
        "| workers | examples/s | peak RSS, process tree (sum) | peak PSS, process tree (sum) "
        "| peak RSS, training process | processes |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['examples_per_s']:.0f} | {r['tree_peak_rss'] / mib:.0f} MiB "
            f"| {r['tree_peak_pss'] / mib:.0f} MiB | {r['main_peak_rss'] / mib:.0f} MiB "
            f"| {r['max_processes']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def run_speed(args, log_dir: str) -> dict:
    from dlkit.data import write_arrayrecord

    warmup, steps, repeats = SPEED_PLAN["quick" if args.quick else "full"]
    repeats = args.repeats or repeats
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ar = os.path.join(tmp, "fmnist_ar")
        write_arrayrecord.main(["fashion_mnist", ar, "--num-files", "4"])
        contenders = {
            n: {k: (v.format(ar=ar) if isinstance(v, str) else v) for k, v in o.items()}
            for n, o in SPEED_CONTENDERS.items()
        }
        res = measure_speed(
            contenders, warmup=warmup, steps=steps, repeats=repeats, log_dir=log_dir
        )
    res["table"] = speed_table(res)
    print("\n" + res["table"] + "\n", flush=True)
    return res


def run_memory(args, log_dir: str) -> dict:
    warmup, steps = MEMORY_PLAN["quick" if args.quick else "full"]
    os.makedirs(args.dir, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="dlkit-grain-", dir=args.dir)
    load_before = run_lib.load_average()
    try:
        written = write_dataset(directory, args.size_gib * 2**30)
        print(f"[memory] wrote {written}", flush=True)
        rows = []
        for w in MEMORY_WORKERS:
            rows.append(measure_memory(directory, w, warmup=warmup, steps=steps, log_dir=log_dir))
            print(f"[memory] {rows[-1]}", flush=True)
    finally:
        if args.keep:
            print(f"[memory] kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    res = {
        "written": written,
        "rows": rows,
        "warmup": warmup,
        "steps": steps,
        "load": f"{load_before} -> {run_lib.load_average()}",
        "table": memory_table(rows),
    }
    print("\n" + res["table"] + "\n", flush=True)
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer, shorter measurements")
    p.add_argument("--only", default="speed,memory", help="comma list of speed, memory")
    p.add_argument("--repeats", type=int, default=0, help="speed repeats (default 3 or 5)")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the datasets are written")
    p.add_argument("--keep", action="store_true", help="keep the written memory dataset")
    p.add_argument("--size-gib", type=float, default=4.25, help="the memory dataset's size")
    p.add_argument("--json", default="", help="write the figures here ('' = do not)")
    p.add_argument("--speed-worker", help=argparse.SUPPRESS)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.speed_worker:
        speed_worker(*json.loads(args.speed_worker))
        return
    if args.memory_child:
        memory_child(*json.loads(args.memory_child))
        return
    log_dir = tempfile.mkdtemp(prefix="dlkit-grain-bench-")
    only = [s for s in args.only.split(",") if s]
    out = {
        "date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "command": "python -m benchmarks.grain_input " + " ".join(argv or sys.argv[1:]),
        "machine": run_lib.machine(),
    }
    if "speed" in only:
        out["speed"] = run_speed(args, log_dir)
    if "memory" in only:
        out["memory"] = run_memory(args, log_dir)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    print(f"worker logs in {log_dir}")


if __name__ == "__main__":
    main()
