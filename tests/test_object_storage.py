"""Runs in a bucket: `--workdir gs://...` on a GCS emulator that these tests start on localhost.

Every file of the run (checkpoints through Orbax and TensorStore's `gcs` driver; config.json,
metrics.jsonl and the rest through etils.epath and gcsfs) goes to the emulator; nothing is
written to the local disk. The emulator is the PyPI `gcp-storage-emulator` (the `test` extra).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
from conftest import assert_bitwise_equal, tiny_digits_config
from etils import epath

import dlkit
from dlkit import checkpoint as ckpt_lib
from dlkit import cli, storage

BUCKET = "dlkit-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
    """A GCS emulator on a free localhost port with an empty bucket, and the environment that
    points TensorStore (`TENSORSTORE_GCS_HTTP_URL`) and gcsfs (`STORAGE_EMULATOR_HOST`) at it;
    stopped after the module's tests."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1"]
        + ["--port", str(port), "--in-memory", "--default-bucket", BUCKET],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        "GOOGLE_CLOUD_PROJECT": "dlkit-test",
    }
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the GCS emulator did not start on port {port}") from None
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _run_url() -> str:
    return f"gs://{BUCKET}/{uuid.uuid4().hex[:8]}/run"


def _committed(ckpt_dir: epath.Path) -> list[int]:
    if not ckpt_dir.exists():
        return []
    return sorted(
        int(p.name)
        for p in ckpt_dir.iterdir()
        if p.name.isdigit() and (p / ckpt_lib.COMMIT_MARKER).exists()
    )


def _rows(path) -> list[dict]:
    """metrics.jsonl's rows without the timings (perf/)."""
    rows = [json.loads(line) for line in epath.Path(path).read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def test_train_resume_and_eval_in_a_bucket_match_a_local_run(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a local "gs:" directory would appear here
    url = _run_url()
    local = dlkit.fit(tiny_digits_config(), tmp_path / "local")
    remote = dlkit.fit(tiny_digits_config(), url)
    assert sorted(os.listdir(tmp_path)) == ["local"]
    assert_bitwise_equal(local.state, remote.state)
    run = epath.Path(url)
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.jsonl", "compute.json", "checkpoints"} <= names
    assert _committed(run / "checkpoints") == [6, 12]
    assert _rows(run / "metrics.jsonl") == _rows(tmp_path / "local" / "metrics.jsonl")
    assert ckpt_lib.verify_step(run / "checkpoints" / "12") == []

    # A save killed before Orbax wrote step 12's commit marker: the step is an unfinished save,
    # removed at the next start, and the run redoes 7..12 from step 6 to the same bits.
    (run / "checkpoints" / "12" / ckpt_lib.COMMIT_MARKER).unlink()
    resumed = dlkit.fit(tiny_digits_config(), url)
    assert_bitwise_equal(local.state, resumed.state)
    assert [r["step"] for r in resumed.history] == [4, 6, 8, 12]
    assert _committed(run / "checkpoints") == [6, 12]

    # Evaluation and the run summary read the bucket.
    assert dlkit.evaluate(url) == dlkit.evaluate(tmp_path / "local")
    summary = dlkit.report.run_summary(url)
    assert summary["checkpoints"] == [6, 12] and summary["steps_done"] == 12

    # A flipped byte in step 12's arrays: detected, the step is moved to .quarantine/ in the
    # bucket with its reason, and the run falls back to step 6 and ends on the same bits.
    step_dir = run / "checkpoints" / "12"
    files = json.loads((step_dir / ckpt_lib.MANIFEST).read_text())["files"]
    data = step_dir / max(
        (rel for rel in files if rel.startswith("state/")), key=lambda r: files[r]["size"]
    )
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    again = dlkit.fit(tiny_digits_config(), url)
    assert_bitwise_equal(local.state, again.state)
    quarantined = sorted(p.name for p in (run / "checkpoints" / ckpt_lib.QUARANTINE).iterdir())
    assert len(quarantined) == 2 and quarantined[0].startswith("12-")
    assert "CRC-32 mismatch" in (run / "checkpoints" / ".quarantine" / quarantined[1]).read_text()


def test_sigkill_in_a_bucket_and_restart_is_bitwise_identical_to_uninterrupted(gcs, tmp_path):
    sets = [
        "train.steps=300",
        "checkpoint.every_steps=50",
        "train.log_every=50",
        "train.eval_every=0",
        "checkpoint.max_to_keep=2",
        "parallel.num_devices=2",
        "train.batch_size=64",
    ]
    subprocess.run(
        cli.train_command("digits_mlp", tmp_path / "ref", sets), check=True, capture_output=True
    )
    url = _run_url()
    proc = subprocess.Popen(
        cli.train_command("digits_mlp", url, sets),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt_dir = epath.Path(url) / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if any(s >= 100 for s in _committed(ckpt_dir)):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(_committed(ckpt_dir))
    assert killed_at < 300
    out = subprocess.run(
        cli.train_command("digits_mlp", url, sets), check=True, capture_output=True, text=True
    )
    assert f"resuming from step {killed_at}" in out.stdout
    ref_state, _ = dlkit.load_checkpoint(tmp_path / "ref")
    resumed_state, _ = dlkit.load_checkpoint(url)
    assert int(resumed_state.step) == 300
    assert_bitwise_equal(ref_state, resumed_state)
    # Retention deleted the older steps in the bucket: only the newest two remain, whole.
    assert _committed(ckpt_dir) == [250, 300]
    assert not any(p.name == ckpt_lib.TRASH for p in ckpt_dir.iterdir())


@pytest.mark.parametrize(
    "url, expected",
    [
        ("foo://bucket/run", "cannot store a run under foo://"),
        ("s3://bucket/run", "gs:// only"),
        ("gs:///run", "no bucket"),
        ("gs://b/run", "expected a GCS bucket name"),
        ("gs://My_Bucket/run", "expected a GCS bucket name"),
    ],
)
def test_a_url_that_cannot_be_served_is_refused_before_anything_runs(
    url, expected, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="workdir") as e:
        dlkit.fit(tiny_digits_config(), url)
    assert expected in str(e.value) and url in str(e.value)
    assert cli.main(["train", "--workdir", url, "--no-progress"]) == 2
    assert "--workdir" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # no local "foo:" / "s3:" / "gs:" directory


def test_a_local_workdir_under_home_is_expanded_not_made_as_a_tilde_directory(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("~/runs/x") == epath.Path(tmp_path / "home" / "runs" / "x")
    with dlkit.Checkpointer("~/ckpt") as ckpt:
        assert ckpt.directory == epath.Path(tmp_path / "home" / "ckpt")
    assert not (tmp_path / "~").exists()


def test_gs_without_gcsfs_names_the_package_to_install(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(storage, "_installed", lambda package: False)
    with pytest.raises(ValueError, match=r"gcsfs.*pip install 'dlkit\[gcs\]'"):
        dlkit.fit(tiny_digits_config(), "gs://bucket/run")
    assert os.listdir(tmp_path) == []
