"""Chaos test: training runs killed with SIGKILL at random moments, restarted until done.

    python -m dlkit.chaos --runs 20                # the manual mode (figures in RELIABILITY.md)
    python -m dlkit.chaos --runs 3 --quick         # what CI runs (tests/test_chaos.py)

Each run is `dlkit train digits_mlp` in its own workdir, with a checkpoint every few steps and
`max_to_keep=2`, so the process spends much of its time inside saves and deletions of old
steps. A kill lands at a uniformly random moment; just before it, the workdir is looked at to
record where it landed (inside a save: an Orbax temporary directory exists; inside a deletion:
`.trash/` exists; else inside a step). Before each restart the newest valid step is worked out
from the disk (both markers present, every checksum right); the restarted process must say it
resumes from exactly that step. When a run finishes, its final params must be bitwise equal to
an uninterrupted run's, and the checkpoint directory must hold nothing but valid steps.

The report: resumed from the newest valid step (target N/N runs), final params identical
(target N/N), leftovers on disk (target 0).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

from dlkit import checkpoint as ckpt_lib
from dlkit import cli

_SETS = (
    "checkpoint.every_steps=20",
    "checkpoint.max_to_keep=2",
    "train.log_every=50",
    "train.eval_every=0",
    "train.batch_size=64",
    "parallel.num_devices=1",
    "optim.warmup_steps=10",
)


@dataclasses.dataclass
class RunReport:
    kills: dict  # where the kills landed: {"step": n, "save": n, "delete": n}
    mismatches: list  # (expected step, resumed step or None, output tail) where they differ
    resumes_checked: int
    resumes_correct: int
    identical: bool
    leftovers: list


def _command(workdir: pathlib.Path, steps: int) -> list[str]:
    return cli.train_command("digits_mlp", workdir, (f"train.steps={steps}", *_SETS))


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def newest_valid_step(ckpt_dir: pathlib.Path) -> int | None:
    """What a restart must resume from: the newest step with both markers and good checksums."""
    if not ckpt_dir.is_dir():
        return None
    steps = sorted((int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()), reverse=True)
    for step in steps:
        if not ckpt_lib.verify_step(ckpt_dir / str(step)):
            return step
    return None


def _phase(ckpt_dir: pathlib.Path) -> str:
    if not ckpt_dir.is_dir():
        return "step"
    names = [p.name for p in ckpt_dir.iterdir()]
    if any(".orbax-checkpoint-tmp" in n for n in names):
        return "save"
    if ckpt_lib.TRASH in names:
        return "delete"
    return "step"


def leftovers(workdir: pathlib.Path) -> list[str]:
    """Anything in checkpoints/ that is not a valid step; torn or repeated metrics rows."""
    out = []
    ckpt_dir = workdir / "checkpoints"
    for p in sorted(ckpt_dir.iterdir()):
        if not p.name.isdigit():
            out.append(p.name)
        elif ckpt_lib.verify_step(p):
            out.append(f"{p.name} (invalid)")
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    if steps != sorted(set(steps)):
        out.append("metrics.jsonl (repeated or unordered rows)")
    return out


def _final_params(workdir: pathlib.Path):
    import jax
    import numpy as np

    import dlkit

    state, _ = dlkit.load_checkpoint(workdir)
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def params_equal(a, b) -> bool:
    """Two lists of parameter arrays (see `_final_params`) are bitwise equal."""
    import numpy as np

    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _names(ckpt_dir: pathlib.Path) -> set[str]:
    return {p.name for p in ckpt_dir.iterdir()} if ckpt_dir.is_dir() else set()


def _wait_for_training(proc, ckpt_dir: pathlib.Path, before: set[str], timeout: float) -> None:
    """Returns once the process writes a step entry that was not there when it started."""
    deadline = time.perf_counter() + timeout
    while proc.poll() is None and time.perf_counter() < deadline:
        if any(n.split(".")[0].isdigit() for n in _names(ckpt_dir) - before):
            return
        time.sleep(0.005)


def chaos_run(
    workdir: pathlib.Path, steps: int, train_time: float, kills: int, rng: random.Random, reference
) -> RunReport:
    import numpy as np

    landed = {"step": 0, "save": 0, "delete": 0}
    checked = correct = 0
    mismatches = []
    ckpt_dir = workdir / "checkpoints"
    for attempt in range(kills + 1):
        expected = newest_valid_step(ckpt_dir)
        before = _names(ckpt_dir)
        proc = subprocess.Popen(
            _command(workdir, steps),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if attempt < kills:
            # Startup (imports, compilation) is most of a short run: wait until this process
            # writes its first new step, then kill at a random moment of the training time.
            _wait_for_training(proc, ckpt_dir, before, timeout=300)
            time.sleep(rng.uniform(0.0, 1.0) * train_time)
            if proc.poll() is None:
                landed[_phase(ckpt_dir)] += 1
                proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
        match = re.search(r"resuming from step (\d+)", out)
        # A process killed before it wrote anything new cannot show where it resumed.
        observed = proc.returncode == 0 or bool(_names(ckpt_dir) - before) or match
        if observed and (expected is not None or match):
            checked += 1
            got = int(match.group(1)) if match else None
            if got == expected:
                correct += 1
            else:
                mismatches.append((expected, got, out[-2000:]))
        if proc.returncode == 0:
            break
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"training failed (exit {proc.returncode}):\n{out[-3000:]}")
    final = _final_params(workdir)
    identical = all(np.array_equal(a, b) for a, b in zip(final, reference, strict=True))
    return RunReport(landed, mismatches, checked, correct, identical, leftovers(workdir))


def run_chaos(
    runs: int,
    *,
    steps: int = 600,
    kills: int = 3,
    seed: int = 0,
    base: pathlib.Path | None = None,
    log=print,
) -> dict:
    """Runs the chaos test; returns the summary (see the module docstring)."""
    rng = random.Random(seed)
    base = pathlib.Path(base or tempfile.mkdtemp(prefix="dlkit-chaos-"))
    proc = subprocess.Popen(
        _command(base / "reference", steps),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    t = time.perf_counter()
    _wait_for_training(proc, base / "reference" / "checkpoints", set(), timeout=300)
    started = time.perf_counter()
    if proc.wait() != 0:
        raise RuntimeError("the uninterrupted reference run failed")
    train_time = time.perf_counter() - started
    reference = _final_params(base / "reference")
    log(f"reference run: {steps} steps, {started - t:.1f} s start-up, {train_time:.1f} s training")
    reports = []
    for i in range(runs):
        report = chaos_run(base / f"run{i}", steps, train_time, kills, rng, reference)
        reports.append(report)
        log(
            f"run {i}: kills {report.kills}, resumed right {report.resumes_correct}/"
            f"{report.resumes_checked}, identical {report.identical}, "
            f"leftovers {report.leftovers or 0}"
        )
        for expected, got, tail in report.mismatches:
            log(f"  expected to resume from {expected}, resumed from {got}; output:\n{tail}")
    summary = {
        "runs": runs,
        "kills": {k: sum(r.kills[k] for r in reports) for k in ("step", "save", "delete")},
        "resumed_from_newest_valid": sum(r.resumes_correct == r.resumes_checked for r in reports),
        "resume_checks": sum(r.resumes_checked for r in reports),
        "final_params_identical": sum(r.identical for r in reports),
        "leftovers": sum(len(r.leftovers) for r in reports),
    }
    log(
        f"resumed from the newest valid step: {summary['resumed_from_newest_valid']}/{runs} runs "
        f"({summary['resume_checks']} restarts checked)"
    )
    log(
        f"final params identical to the uninterrupted run: {summary['final_params_identical']}"
        f"/{runs}"
    )
    log(f"kills landed: {summary['kills']}")
    log(f"leftovers on disk: {summary['leftovers']}")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs per run before it may end")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="CI size: fewer steps and kills")
    parser.add_argument("--dir", type=pathlib.Path, default=None, help="where runs go")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.kills = 400, 2
    s = run_chaos(args.runs, steps=args.steps, kills=args.kills, seed=args.seed, base=args.dir)
    ok = (
        s["resumed_from_newest_valid"] == s["final_params_identical"] == args.runs
        and s["leftovers"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
