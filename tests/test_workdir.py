"""One writer per workdir, and clear errors for workdirs a run cannot write (issue 21,
items 2 and 4)."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_digits_config

import dlkit
from dlkit import cli
from dlkit import workdir as workdir_lib

_TINY = [
    "model.hidden_sizes=[32]",
    "model.dropout_rate=0.0",
    "train.steps=12",
    "train.batch_size=32",
    "train.log_every=4",
    "train.eval_every=6",
    "checkpoint.every_steps=6",
    "optim.warmup_steps=2",
    "train.plots=false",
]


def _train(workdir, *sets):
    argv = ["train", "digits_mlp", "--workdir", str(workdir), "--no-progress"]
    for item in (*_TINY, *sets):
        argv += ["--set", item]
    return cli.main(argv)


def _hashes(path):
    return {
        p.relative_to(path): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in path.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (checkpoints at 6 and 12)."""
    workdir = tmp_path_factory.mktemp("finished")
    dlkit.fit(tiny_digits_config(), workdir)
    return workdir


def _fit_fails_before_compiling(workdir, match):
    strategy = dlkit.make_strategy("jit", num_devices=1)
    with pytest.raises(workdir_lib.WorkdirError, match=match):
        dlkit.fit(tiny_digits_config(), workdir, strategy=strategy)
    assert dict(strategy.trace_counts) == {}, "the step was compiled before the error"


# ---- the lock ----------------------------------------------------------------------------


def test_a_second_run_on_a_held_workdir_fails_at_once_naming_the_holder(tmp_path, capsys):
    with workdir_lib.lock(tmp_path):
        holder = json.loads((tmp_path / workdir_lib.LOCK).read_text())
        assert _train(tmp_path) == 2
        err = capsys.readouterr().err
    assert err.startswith("dlkit train: error: workdir: ")
    assert f"pid {os.getpid()} on host {holder['host']!r}" in err and "in use" in err
    assert len(err.strip().splitlines()) == 1
    # Nothing was written by the refused run; the lock is gone once its holder lets go.
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_fit_releases_the_lock_and_a_rerun_resumes(tmp_path, capsys):
    assert _train(tmp_path) == 0
    assert not (tmp_path / workdir_lib.LOCK).exists()
    assert _train(tmp_path, "train.steps=18") == 0
    assert "resuming from step 12" in capsys.readouterr().out


def test_a_stale_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    code = (
        "import sys, time; from dlkit import workdir\n"
        "with workdir.lock(sys.argv[1]):\n"
        "    print('locked', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(workdir_lib.WorkdirError, match=rf"pid {proc.pid} on host"):
            with workdir_lib.lock(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / workdir_lib.LOCK).exists()  # SIGKILL left it behind
    assert _train(tmp_path) == 0
    assert f"removing the stale lock of pid {proc.pid}" in capsys.readouterr().out


def test_a_lock_held_on_another_host_is_not_taken_over(tmp_path):
    holder = {"host": "some-other-host", "pid": 1, "started": "x", "command": "dlkit train"}
    (tmp_path / workdir_lib.LOCK).write_text(json.dumps(holder))
    with pytest.raises(workdir_lib.WorkdirError, match=r"pid 1 on host 'some-other-host'"):
        with workdir_lib.lock(tmp_path):
            pass
    assert json.loads((tmp_path / workdir_lib.LOCK).read_text()) == holder


def test_eval_and_report_read_a_workdir_that_is_being_trained(finished, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    with workdir_lib.lock(workdir):
        assert cli.main(["eval", str(workdir)]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 12
        assert cli.main(["report", str(workdir), "--no-plots"]) == 0


def test_a_url_workdir_is_not_locked_and_says_so():
    said = []
    with workdir_lib.lock("gs://bucket/run", log=said.append):
        pass
    assert said and "is object storage and is not locked" in said[0]


# ---- workdirs a run cannot write ----------------------------------------------------------


def test_a_workdir_that_is_a_regular_file_is_a_one_line_error(tmp_path, capsys):
    target = tmp_path / "run"
    target.write_text("not a directory")
    _fit_fails_before_compiling(target, r"which is a regular file")
    assert _train(target) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dlkit train: error: workdir: expected a directory, got '{target}'")
    assert len(err.strip().splitlines()) == 1
    assert target.read_text() == "not a directory"


def test_a_workdir_under_a_regular_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "run"
    _fit_fails_before_compiling(target, rf"is under {tmp_path / 'file'}, a regular file")
    assert _train(target) == 2
    assert "dlkit train: error: workdir: expected a directory" in capsys.readouterr().err


@contextlib.contextmanager
def _immutable(path):
    """`path` made immutable with chattr +i (read-only even for root), restored afterwards."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"chattr +i is not supported here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("locked", ["workdir", "checkpoints"])
def test_a_read_only_workdir_is_an_error_before_compiling_and_eval_still_works(
    finished, tmp_path, capsys, locked
):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    before = _hashes(workdir)
    target = workdir if locked == "workdir" else workdir / "checkpoints"
    with _immutable(target):
        _fit_fails_before_compiling(
            workdir,
            rf"expected a directory this run can write, got "
            rf"'{target}': permission denied",
        )
        assert _train(workdir, "train.steps=18") == 2
        err = capsys.readouterr().err
        assert err.startswith("dlkit train: error: workdir: ") and len(err.splitlines()) == 1
        assert cli.main(["eval", str(workdir)]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 12
    assert _hashes(workdir) == before


def test_a_run_that_fails_on_the_lock_leaves_checkpoints_untouched(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    before = _hashes(workdir)
    with workdir_lib.lock(workdir):
        lock_file = workdir / workdir_lib.LOCK
        time.sleep(0.01)
        _fit_fails_before_compiling(workdir, "is in use by another run")
        assert lock_file.exists()
    assert _hashes(workdir) == before


def test_in_a_multi_host_run_only_process_0_takes_the_lock(tmp_path):
    from dlkit import loop

    cfg = tiny_digits_config()
    with workdir_lib.lock(tmp_path):  # stands for process 0 of the job
        with contextlib.ExitStack() as resources:  # another process of the same job
            ckpt = loop._open_checkpointer(cfg, tmp_path, False, print, resources)
            assert ckpt.directory.name == "checkpoints"
        with contextlib.ExitStack() as resources, pytest.raises(workdir_lib.WorkdirError):
            loop._open_checkpointer(cfg, tmp_path, True, print, resources)
    with contextlib.ExitStack() as resources:
        loop._open_checkpointer(cfg, tmp_path, True, print, resources)
        holder = json.loads((tmp_path / workdir_lib.LOCK).read_text())
        assert holder["pid"] == os.getpid()
    assert not (tmp_path / workdir_lib.LOCK).exists()
