"""One command for an accelerator: time-to-accuracy, tokens/s and MFU of the zoo's jobs.

    python -m benchmarks.accelerator                       # full sizes, ~8 min on one H100
    python -m benchmarks.accelerator --smoke --out /tmp/a  # tiny sizes, any backend (tests)
    python -m benchmarks.accelerator --only cnn,lm --budget-s 120

Runs on whatever JAX backend is present (the first device; one device):
- cnn: fashion_mnist_cnn until eval accuracy >= 91% on the official test set (its target):
  time-to-accuracy from the first step, evaluated every 250 steps.
- resnet: fashion_mnist_resnet until eval accuracy >= 94%, evaluated every epoch (469 steps).
- lm: kjv_char_lm in bfloat16 for a fixed number of steps: tokens/s and MFU (against the data
  sheet peak of `dlkit.compute.PEAK_FLOPS_TABLE`; absent for unknown devices).
Each job stops at its target, at its configured steps, or after `--budget-s` seconds of
training, whichever comes first; the table says which. Times are wall-clock from the first
step (compilation, which the first step includes, is reported separately by `fit`'s log).
Writes OUT/accelerator.json (everything) and OUT/accelerator.md (a table for BENCHMARKS.md).

Data: nothing is bundled or downloaded; `--smoke` reads the same files. `--only` runs fewer
jobs and needs fewer files (`--only lm`: KJV alone).
- cnn, resnet: Fashion-MNIST's four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte,
  t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, plain or .gz), found in $DLKIT_DATA_DIR/
  fashion-mnist or $DLKIT_DATA_DIR when that is set, else /usr/share/datasets/fashion-mnist
  (`apt-get install dataset-fashion-mnist`); see `dlkit.data.datasets`.
- lm: the King James Bible as kjv.txt in the data cache, $DLKIT_DATA_DIR when that is set,
  else ~/.cache/dlkit. When the file is absent, Debian's `bible` program writes it once
  (`apt-get install bible-kjv bible-kjv-text`); on a machine without them, copy kjv.txt from
  one that has it. See `dlkit.data.text.kjv_path`.
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import dlkit

JOBS = {
    "cnn": {
        "experiment": "fashion_mnist_cnn",
        "target": 0.91,
        "set": ["train.eval_every=250", "checkpoint.every_steps=0"],
    },
    "resnet": {
        "experiment": "fashion_mnist_resnet",
        "target": 0.94,
        "set": ["train.eval_every=469", "checkpoint.every_steps=0"],
    },
    "lm": {
        "experiment": "kjv_char_lm",
        "target": None,
        "set": [
            "train.precision=bfloat16",
            "train.steps=1000",
            "train.eval_every=0",
            "checkpoint.every_steps=0",
        ],
    },
}

# Smoke sizes: seconds on a CPU; they check the plumbing, not the figures.
SMOKE = {
    "common": [
        "train.steps=4",
        "optim.warmup_steps=1",
        "train.log_every=2",
        "train.batch_size=16",
        "train.eval_batch_size=16",
        "data.train_examples=64",
        "data.validation_examples=32",
        "data.eval_split=validation",
        "data.audit=off",
        "train.summary=false",
        "train.plots=false",
        "train.diagnosis=false",
    ],
    "cnn": ["train.eval_every=2"],
    "resnet": ["train.eval_every=2"],
    "lm": ["data.seq_len=32", "data.validation_examples=0", "data.eval_split=test"],
}
SMOKE_MODEL = {"resnet": {"stage_sizes": (1,), "width": 4}, "lm": {"num_layers": 1, "max_len": 32}}


class _Watch(dlkit.Callback):
    """A dlkit Callback: time from the first step to the target, and a wall-clock budget."""

    def __init__(self, target, budget_s):
        self.target, self.budget_s = target, budget_s
        self.start = self.reached_s = self.reached_step = None
        self.stopped_by = None

    def on_train_start(self, run):
        self.start = time.perf_counter()

    def on_row(self, run, row):
        elapsed = time.perf_counter() - self.start
        acc = row.get("eval/accuracy")
        if self.target is not None and acc is not None and acc >= self.target:
            if self.reached_s is None:
                self.reached_s, self.reached_step = elapsed, row["step"]
            self.stopped_by = "target"
            run.request_stop("target reached")
        elif elapsed > self.budget_s and self.stopped_by is None:
            self.stopped_by = "budget"
            run.request_stop("time budget")


def run_job(name: str, smoke: bool, budget_s: float, workdir: pathlib.Path) -> dict:
    job = JOBS[name]
    overrides = ["parallel.num_devices=1", *job["set"]] + (
        SMOKE["common"] + SMOKE[name] if smoke else []
    )
    cfg = dlkit.load_config(job["experiment"], overrides=overrides)
    cfg.train.progress = False
    if smoke:
        cfg.model.options.update(SMOKE_MODEL.get(name, {}))
    watch = _Watch(job["target"], budget_s)
    t0 = time.perf_counter()
    result = dlkit.fit(cfg, workdir / name, callbacks=[watch])
    wall = time.perf_counter() - t0
    rows = [r for r in result.history if "perf/steps_per_s" in r]
    steady = rows[1:] or rows  # the first interval holds the first step's compilation

    def median(key):
        values = [r[key] for r in steady if key in r]
        return statistics.median(values) if values else None

    evals = [r for r in result.history if "eval/accuracy" in r or "eval/loss" in r]
    report = result.compute_report
    return {
        "job": name,
        "experiment": job["experiment"],
        "precision": cfg.train.precision,
        "batch_size": cfg.train.batch_size,
        "steps_run": int(result.history[-1]["step"]) if result.history else 0,
        "target": job["target"],
        "reached_s": watch.reached_s,
        "reached_step": watch.reached_step,
        "stopped_by": watch.stopped_by or "steps",
        "wall_s": wall,
        "steps_per_s": median("perf/steps_per_s"),
        "examples_per_s": median("perf/examples_per_s"),
        "tokens_per_s": median("perf/tokens_per_s"),
        "mfu": median("perf/mfu"),
        "mfu_vs_measured_peak": median("perf/mfu_vs_measured_peak"),
        "final_eval": {k: v for k, v in (evals[-1] if evals else {}).items() if "eval/" in k},
        "flops_per_step": report.get("flops_per_step"),
        "peak_flops_per_s": report.get("peak_flops_per_s"),
        "peak_source": report.get("peak_source"),
    }


def _fmt(x, spec=".4g"):
    return "-" if x is None else format(x, spec)


def markdown(results: list[dict], device: str, backend: str) -> str:
    lines = [
        f"Device: {device} (JAX backend `{backend}`)",
        "",
        "| job | precision | steps | stopped by | time to target (s) | final eval | steps/s "
        "| examples/s | tokens/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        final = r["final_eval"]
        shown = (
            f"acc {final['eval/accuracy']:.4f}"
            if "eval/accuracy" in final
            else f"loss {final['eval/loss']:.4f}"
            if "eval/loss" in final
            else "-"
        )
        target = f"{_fmt(r['reached_s'], '.1f')} (>= {r['target']:.0%})" if r["target"] else "n/a"
        mfu = _fmt(r["mfu"], ".3f")
        if r["mfu"] is None and r["mfu_vs_measured_peak"] is not None:
            mfu = f"{r['mfu_vs_measured_peak']:.3f} (vs measured CPU peak)"
        lines.append(
            f"| {r['job']} | {r['precision']} | {r['steps_run']} | {r['stopped_by']} | {target} "
            f"| {shown} | {_fmt(r['steps_per_s'])} | {_fmt(r['examples_per_s'])} "
            f"| {_fmt(r['tokens_per_s'])} | {mfu} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU tests)")
    p.add_argument("--only", default="cnn,resnet,lm", help="comma list of cnn, resnet, lm")
    p.add_argument("--budget-s", type=float, default=150.0, help="training seconds per job")
    p.add_argument("--out", default="benchmarks/results", help="where the JSON and table go")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    bad = [n for n in names if n not in JOBS]
    if bad:
        p.error(f"--only: expected names from {list(JOBS)}, got {bad}")
    import jax

    device = jax.devices()[0]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results.append(run_job(name, args.smoke, args.budget_s, pathlib.Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    meta = {
        "device_kind": device.device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "smoke": args.smoke,
        "load_average": os.getloadavg(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    (out / "accelerator.json").write_text(json.dumps({**meta, "jobs": results}, indent=2) + "\n")
    table = markdown(results, device.device_kind, meta["backend"])
    (out / "accelerator.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
