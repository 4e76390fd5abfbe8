"""Training speed, side by side: dlkit vs a hand-written jax.jit loop, PyTorch and Keras 3.

    pip install torch==2.13.0 keras            # benchmark-only packages (not dlkit's install)
    python -m benchmarks.run --quick           # a few minutes; the full run takes ~15
    python -m benchmarks.run --only mlp --repeats 7 --out BENCHMARKS.md

Each contender runs in its own process (`benchmarks.workers`), started and compiled once; the
measurements then alternate between contenders (the order rotates every repeat), so slow drift
in the machine's load hits all of them alike. Each measurement is N steady-state training
steps after W warm-up steps; the table gives the median steps/s and the min-max spread, and
ratios of medians against the hand-written loop and against PyTorch. Contenders whose package
is missing are reported as skipped.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
K = {"mlp": 50, "cnn": 10}  # steps per dispatch for the *_k / *_scan contenders
CONTENDERS = (
    "jax_jit",
    "jax_jit_scan",
    "dlkit",
    "dlkit_k",
    "dlkit_end_save",
    "dlkit_k_end_save",
    "dlkit_matmul_grad",
    "torch",
    "keras_jax",
)
LABELS = {
    "jax_jit": "hand-written jax.jit loop",
    "jax_jit_scan": "hand-written jax.jit, lax.scan K steps/call",
    "dlkit": "dlkit.fit",
    "dlkit_k": "dlkit.fit, train.steps_per_dispatch=K",
    "dlkit_end_save": "dlkit.fit, checkpoint only at the end",
    "dlkit_k_end_save": "dlkit.fit, steps_per_dispatch=K, checkpoint only at the end",
    "dlkit_matmul_grad": "dlkit.fit, model.conv_impl=matmul_grad",
    "torch": "PyTorch eager CPU (2 threads)",
    "keras_jax": "Keras 3 fit (JAX backend)",
}
# (warm-up, measured) steps per measurement.
PLAN = {
    "mlp": {"quick": (200, 1000), "full": (500, 3000)},
    "cnn": {"quick": (10, 40), "full": (20, 100)},
}


def _load(model: str) -> dict[str, np.ndarray]:
    from dlkit import data

    name = "digits" if model == "mlp" else "fashion_mnist"
    source = data.load_dataset(name, "train")
    batch = data.get_batch(source, np.arange(len(source)))
    return {"inputs": batch["inputs"], "labels": batch["labels"]}


def _available(name: str) -> str | None:
    """None if the contender can run here, else why not."""
    module = {"torch": "torch", "keras_jax": "keras"}.get(name)
    if module is None:
        return None
    probe = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        env={**os.environ, "KERAS_BACKEND": "jax"},
        capture_output=True,
    )
    return None if probe.returncode == 0 else f"{module} not installed"


class Worker:
    """A contender's process; `measure` sends one request and waits for its result."""

    def __init__(self, name: str, model: str, data_path: str, conv_impl: str, log_dir: str):
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)  # one CPU device, as a user's script gets
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(BENCH_K=str(K[model]), BENCH_CONV=conv_impl, KERAS_BACKEND="jax")
        self.name = name
        self.stderr = open(os.path.join(log_dir, f"{model}_{name}.log"), "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.workers", name, model, data_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            cwd=REPO,
            env=env,
        )
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise RuntimeError(f"{self.name}: exited early; see {self.stderr.name}")

    def measure(self, warmup: int, steps: int) -> dict:
        self.proc.stdin.write(json.dumps({"warmup": warmup, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("RESULT "))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.stderr.close()


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def machine() -> dict[str, str]:
    cpu = platform.processor()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    os.environ.setdefault("KERAS_BACKEND", "jax")  # as the Keras worker runs it
    for mod in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "keras"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - reported as missing
            versions[mod] = "missing"
    return {
        "cpu": f"{cpu}, {os.cpu_count()} logical cores",
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
    }


def bench_model(model, names, repeats, quick, conv_impl, log_dir) -> dict:
    warmup, steps = PLAN[model]["quick" if quick else "full"]
    results = {n: [] for n in names}
    extras = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, f"{model}.npz")
        np.savez(data_path, **_load(model))
        load_before = load_average()
        workers = {}
        try:
            for n in names:
                print(f"[{model}] starting {n} ...", flush=True)
                workers[n] = Worker(n, model, data_path, conv_impl, log_dir)
            for r in range(repeats):
                order = names[r % len(names) :] + names[: r % len(names)]
                for n in order:
                    res = workers[n].measure(warmup, steps)
                    results[n].append(res["steps_per_s"])
                    extras[n] = res
                    print(
                        f"[{model}] repeat {r + 1}/{repeats} {n}: {res['steps_per_s']:.1f} steps/s",
                        flush=True,
                    )
        finally:
            for w in workers.values():
                w.close()
    return {
        "warmup": warmup,
        "steps": steps,
        "results": results,
        "extras": extras,
        "load": f"{load_before} -> {load_average()}",
    }


def table(model: str, res: dict) -> str:
    med = {n: statistics.median(v) for n, v in res["results"].items() if v}
    base, torch = med.get("jax_jit"), med.get("torch")
    lines = [
        f"| {model} contender (K={K[model]}) | steps/s (median) | min-max | vs jax.jit "
        "| vs jax.jit, paired | vs PyTorch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n, v in res["results"].items():
        if not v:
            lines.append(f"| {LABELS[n]} | skipped | | | | |")
            continue
        vs_jit = f"{med[n] / base:.2f}x" if base else "-"
        paired = paired_ratio(v, res["results"].get("jax_jit", []))
        vs_paired = f"{paired:.2f}x" if paired is not None else "-"
        vs_torch = f"{med[n] / torch:.2f}x" if torch else "-"
        lines.append(
            f"| {LABELS[n]} | {med[n]:.1f} | {min(v):.1f}-{max(v):.1f} | {vs_jit} | {vs_paired} "
            f"| {vs_torch} |"
        )
    return "\n".join(lines)


def paired_ratio(rates: list[float], base: list[float]) -> float | None:
    """The median over repeats of rate / base rate in the same repeat, or None.

    Each repeat measures every contender once, one after another, so a ratio within a repeat
    compares them under the same load; on a shared machine whose speed drifts between
    repeats this is steadier than the ratio of the two medians (both are reported)."""
    if not rates or len(rates) != len(base):
        return None
    return statistics.median(r / b for r, b in zip(rates, base, strict=True))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer, shorter repeats (minutes)")
    p.add_argument("--only", default="mlp,cnn", help="comma list of mlp, cnn, checkpoint")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--repeats", type=int, default=0, help="default 3 (--quick) or 5")
    p.add_argument(
        "--conv-impl", default="xla", help="dlkit CNN's conv_impl: xla | patches | matmul_grad"
    )
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="'' = do not write")
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    only = [s for s in args.only.split(",") if s]
    sections, log_dir = [], tempfile.mkdtemp(prefix="dlkit-bench-")
    started = time.time()
    wanted = [n for n in args.contenders.split(",") if n]
    skipped = {n: _available(n) for n in wanted}
    for model in [m for m in only if m in PLAN]:
        names = [n for n in wanted if skipped[n] is None]
        if model == "cnn" and args.contenders == ",".join(CONTENDERS):
            # Convolutions inside lax.scan run far slower on XLA:CPU (BENCHMARKS.md): K steps
            # per call only on request (--contenders) for the CNN.
            names = [n for n in names if n not in ("jax_jit_scan", "dlkit_k", "dlkit_k_end_save")]
        # No convolutions in the MLP: conv_impl would run the same program as "dlkit".
        not_for_model = {"dlkit_matmul_grad"} if model == "mlp" else set()
        names = [n for n in names if n not in not_for_model]
        res = bench_model(model, names, repeats, args.quick, args.conv_impl, log_dir)
        for n in wanted:
            if n not in not_for_model:
                res["results"].setdefault(n, [])
        text = table(model, res)
        print("\n" + text + "\n", flush=True)
        sections.append((model, res, text))
    ckpt_text = ""
    if "checkpoint" in only:
        from benchmarks import checkpoint_speed

        ckpt_text = checkpoint_speed.report(quick=args.quick)
        print("\n" + ckpt_text + "\n", flush=True)
    elapsed = time.time() - started
    if args.out:
        write_markdown(args, sections, ckpt_text, skipped, repeats, elapsed)
        print(f"wrote {args.out} ({elapsed:.0f} s; worker logs in {log_dir})")


def write_markdown(args, sections, ckpt_text, skipped, repeats, elapsed) -> None:
    m = machine()
    cmd = "python -m benchmarks.run " + " ".join(sys.argv[1:])
    out = [
        "# Benchmarks",
        "",
        f"Written by `{cmd.strip()}` on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC "
        f"({elapsed:.0f} s). See benchmarks/README.md for what is measured and how.",
        "",
        f"- CPU: {m['cpu']}; {m['os']}; Python {m['python']}",
        f"- {m['versions']}",
        f"- {repeats} alternating repeats per contender; batch 128, Adam 1e-3, float32.",
        "",
    ]
    for n, why in skipped.items():
        if why:
            out.append(f"- {LABELS[n]}: skipped ({why}; `pip install torch==2.13.0 keras`)")
    for model, res, text in sections:
        out += [
            "",
            f"## {model.upper()}",
            "",
            f"{res['warmup']} warm-up + {res['steps']} measured steps per repeat; "
            f"load average (1/5/15 min) {res['load']}.",
            "",
            text,
        ]
    if ckpt_text:
        out += ["", ckpt_text]
    out += _kept_sections(pathlib.Path(args.out), "\n".join(out))
    pathlib.Path(args.out).write_text("\n".join(out) + "\n")


def _kept_sections(path: pathlib.Path, written: str) -> list[str]:
    """The `## ` sections of the file at `path` that this run does not write (figures of other
    benchmarks, added by hand), so that a rerun replaces its own sections and keeps those."""
    if not path.exists():
        return []
    mine = {line for line in written.splitlines() if line.startswith("## ")}
    kept, keep = [], False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            while kept and not kept[-1].strip():
                kept.pop()
            keep = line not in mine
            if keep:
                kept.append("")
        if keep:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    return kept


if __name__ == "__main__":
    main()
