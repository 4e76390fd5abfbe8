"""The chaos harness's fault cases: each failure of issue 21, provoked against real processes.

    python -m dlkit.chaos_cases --trials 3                      # every case, 3 trials each
    python -m dlkit.chaos_cases --only two_writers --trials 6   # one case

Each case starts `dlkit train` / `dlkit eval` processes (the CLI a user runs) on a copy of one
finished reference run, provokes one failure and checks what a user relies on: the exit
status, a one-line `dlkit <command>: error: ...` without a traceback, checkpoint files
unchanged (SHA-256), metric rows kept, the step a reader skipped named. The bad-array cases run
the input checks in this process. A case passes a trial when every check holds; the summary
is {case: [passed, trials]}.
"""

import argparse
import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from dlkit import chaos, cli

STEPS = 200
SETS = (
    f"train.steps={STEPS}",
    "checkpoint.every_steps=50",
    "checkpoint.max_to_keep=2",
    "train.log_every=20",
    "train.eval_every=100",
    "train.batch_size=64",
    "parallel.num_devices=1",
    "optim.warmup_steps=10",
    "train.plots=false",
)


def _train_cmd(workdir: pathlib.Path, *extra: str) -> list[str]:
    return cli.train_command("digits_mlp", workdir, (*SETS, *extra))


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=chaos._env(), capture_output=True, text=True, timeout=timeout)


def _eval(workdir: pathlib.Path) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dlkit.cli", "eval", str(workdir)])


def _hashes(path: pathlib.Path) -> dict:
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _rows(workdir: pathlib.Path) -> list[dict]:
    """metrics.jsonl's rows without the perf/ timings (which differ between runs)."""
    rows = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.append({k: v for k, v in row.items() if not k.startswith("perf/")})
    return rows


def _one_line_error(proc: subprocess.CompletedProcess, command: str, *needles: str) -> None:
    err = proc.stderr.strip()
    prefix = f"dlkit {command}: error: "
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert proc.returncode != 0, f"expected a failure, got exit 0:\n{proc.stdout[-1500:]}"
    assert "Traceback" not in err, f"a traceback:\n{err[-2000:]}"
    assert lines, f"no '{prefix}...' line:\n{err[-2000:]}"
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err[-2000:]}"


def _newest(workdir: pathlib.Path) -> int:
    return max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _data_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in step_dir.glob("state/*/c/**/*") if p.is_file()]
    return max(files, key=lambda p: (p.stat().st_size, str(p)))


# ---- the cases ----------------------------------------------------------------------------
# Each takes (a fresh copy of the finished reference run, a fresh empty directory, the
# reference), raises AssertionError naming what did not hold, and may return a note.


def nan_learning_rate(run, empty, ref):
    before = _hashes(run / "checkpoints")
    proc = _run(_train_cmd(run, "optim.learning_rate=nan"))
    _one_line_error(proc, "train", "optim.learning_rate")
    assert _hashes(run / "checkpoints") == before, "checkpoints changed"


def two_writers(run, empty, ref):
    procs = [
        subprocess.Popen(
            _train_cmd(empty),
            env=chaos._env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0, f"no run finished: {codes}\n{outs[0][1][-1500:]}"
    for proc, (out, err) in zip(procs, outs, strict=True):
        if proc.returncode:
            winner = next(p for p in procs if p is not proc)
            assert f"in use by another run: pid {winner.pid}" in err, err[-1500:]
            assert "Traceback" not in err, err[-2000:]
        else:
            assert "already exists" not in out + err
    assert codes in ([0, 2], [0, 0]), codes  # [0, 0]: the second started after the first ended
    assert _rows(empty) == ref["rows"], "metrics.jsonl differs from the reference run's"
    assert not (empty / "dlkit.lock").exists(), "the lock was left behind"
    return "the second run was refused" if codes == [0, 2] else "the runs did not overlap"


def all_steps_corrupt(run, empty, ref):
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    for step in steps:
        path = _data_file(run / "checkpoints" / str(step))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    rows = (run / "metrics.jsonl").read_text()
    proc = _run(_train_cmd(run))
    _one_line_error(proc, "train", "no usable checkpoint", *(f"\n  {s}-" for s in steps))
    assert (run / "metrics.jsonl").read_text() == rows, "metrics.jsonl changed"
    proc = _run(_train_cmd(run, "checkpoint.on_no_valid_step=restart"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert chaos.params_equal(chaos._final_params(run), ref["params"]), "the restart differs"
    archived = list(run.glob("metrics.archived-*.jsonl"))
    assert len(archived) == 1 and archived[0].read_text() == rows, "old metrics not kept"


def torn_metrics_line(run, empty, ref):
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    middle = len(lines) // 2
    torn = lines[middle][: len(lines[middle]) // 2]
    path.write_text("\n".join([*lines[:middle], torn, *lines[middle + 1 :]]) + "\n")
    proc = _run(_train_cmd(run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unreadable line(s)" in proc.stdout, proc.stdout[-1500:]
    expected = [r for i, r in enumerate(ref["rows"]) if i != middle]
    assert _rows(run) == expected, "rows were lost"
    assert (run / "metrics.jsonl.unreadable").read_text() == torn + "\n"


def workdir_is_a_file(run, empty, ref):
    target = empty / "run"
    target.write_text("x")
    _one_line_error(_run(_train_cmd(target)), "train", str(target), "regular file")
    assert target.read_text() == "x"


def workdir_under_a_file(run, empty, ref):
    (empty / "file").write_text("x")
    target = empty / "file" / "run"
    _one_line_error(_run(_train_cmd(target)), "train", str(target), "regular file")


def workdir_read_only(run, empty, ref):
    before = _hashes(run)
    if subprocess.run(["chattr", "+i", str(run)], capture_output=True).returncode:
        raise AssertionError("chattr +i failed: this case needs a filesystem that supports it")
    try:
        proc = _run(_train_cmd(run, f"train.steps={STEPS + 50}"))
        _one_line_error(proc, "train", str(run), "permission denied")
        evaluated = _eval(run)
    finally:
        subprocess.run(["chattr", "-i", str(run)], check=True)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout.splitlines()[-1])["step"] == STEPS
    assert _hashes(run) == before, "files changed"


def _eval_falls_back(run, damage, reason):
    newest = _newest(run)
    damage(run / "checkpoints" / str(newest))
    proc = _eval(run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1])["step"] < newest
    assert f"skipping step {newest}" in proc.stdout and reason in proc.stdout, proc.stdout[-1500:]


def newest_manifest_deleted(run, empty, ref):
    _eval_falls_back(run, lambda d: (d / "dlkit_manifest.json").unlink(), "manifest.json missing")


def newest_step_emptied(run, empty, ref):
    _eval_falls_back(run, lambda d: (shutil.rmtree(d), d.mkdir()), "step directory is empty")


def bad_arrays(run, empty, ref):
    import numpy as np

    import dlkit
    from dlkit.data import validate

    train = dlkit.data.load_dataset("digits", "train")
    x, y = np.asarray(train.arrays["inputs"]), np.asarray(train.arrays["labels"])
    src = dlkit.data.ArraySource
    try:
        validate.check_split(
            src(inputs=x[:, 2, 3, 0].copy(), labels=y), "train", num_outputs=10, classification=True
        )
    except validate.DataError as e:
        assert "expected a batch axis and a feature axis" in str(e), str(e)
    else:
        raise AssertionError("1-D inputs were accepted")
    warned = validate.check_split(
        src(inputs=x * 255.0, labels=y), "train", num_outputs=10, classification=True
    )
    assert len(warned) == 1 and "divide by 255" in warned[0], warned
    tokens = np.random.default_rng(0).integers(0, 50, size=(32, 9)).astype(np.int32)
    lm = src(inputs=tokens[:, :-1], labels=tokens[:, 1:])
    assert validate.check_split(lm, "train", num_outputs=None, classification=False) == []


CASES = {
    f.__name__: f
    for f in (
        nan_learning_rate,
        two_writers,
        all_steps_corrupt,
        torn_metrics_line,
        workdir_is_a_file,
        workdir_under_a_file,
        workdir_read_only,
        newest_manifest_deleted,
        newest_step_emptied,
        bad_arrays,
    )
}


def run_cases(base: pathlib.Path, *, trials: int = 1, only=None, log=print) -> dict:
    """Runs each case `trials` times; returns {case: [passed, trials]}."""
    base = pathlib.Path(base)
    names = list(only or CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise ValueError(f"--only: expected names from {sorted(CASES)}, got {unknown}")
    t = time.perf_counter()
    proc = _run(_train_cmd(base / "reference"))
    if proc.returncode:
        raise RuntimeError(f"the reference run failed:\n{proc.stderr[-3000:]}")
    ref = {"rows": _rows(base / "reference"), "params": chaos._final_params(base / "reference")}
    log(f"reference run: {STEPS} steps in {time.perf_counter() - t:.1f} s")
    summary = {}
    for name in names:
        passed = 0
        for trial in range(trials):
            run, empty = base / f"{name}-{trial}" / "run", base / f"{name}-{trial}" / "empty"
            shutil.copytree(base / "reference", run)
            empty.mkdir()
            t = time.perf_counter()
            try:
                note = CASES[name](run, empty, ref)
            except AssertionError as e:
                log(f"{name} trial {trial}: FAILED: {e}")
            else:
                passed += 1
                note = f"; {note}" if note else ""
                log(f"{name} trial {trial}: passed ({time.perf_counter() - t:.1f} s{note})")
        summary[name] = [passed, trials]
    log("cases: " + ", ".join(f"{k} {p}/{n}" for k, (p, n) in summary.items()))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1, help="trials per case")
    parser.add_argument("--only", action="append", help="this case only (repeatable)")
    parser.add_argument("--dir", type=pathlib.Path, default=None, help="where runs go")
    args = parser.parse_args(argv)
    base = args.dir or pathlib.Path(tempfile.mkdtemp(prefix="dlkit-chaos-cases-"))
    summary = run_cases(base, trials=args.trials, only=args.only)
    return 0 if all(p == n for p, n in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
