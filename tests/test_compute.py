"""Compute report (FLOPs, memory, MFU), --find-batch-size, and the compilation cache."""

import json
import os
import pathlib
import subprocess
import sys
import types

import pytest
from conftest import tiny_digits_config

import dlkit
from dlkit import compute

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_device_run():
    return dlkit.fit(tiny_digits_config(**{"parallel.num_devices": 1}))


def test_flops_per_step_match_the_matmul_count(one_device_run):
    report = one_device_run.compute_report
    # MLP 64 -> 32 -> 10 on a batch of 32: forward 2*B*D*H per layer; backward the weight
    # gradient of both layers and the input gradient of the second only.
    b, d, h, k = 32, 64, 32, 10
    matmuls = 2 * (2 * b * d * h) + 3 * (2 * b * h * k)
    assert matmuls <= report["flops_per_step"] <= 1.5 * matmuls
    assert report["num_devices"] == 1


def test_memory_analysis_covers_the_state(one_device_run):
    mem = one_device_run.compute_report["memory"]
    state = one_device_run.compute_report["state_bytes_per_device"]
    assert mem["argument_bytes"] >= state["params"] + state["opt_state"]
    assert mem["alias_bytes"] > 0  # the donated state is reused for the new one
    assert mem["peak_bytes_per_device"] == (
        mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] + mem["temp_bytes"]
    )


def test_perf_metrics_are_logged(one_device_run):
    report = one_device_run.compute_report
    rows = [r for r in one_device_run.history if "perf/steps_per_s" in r]
    assert len(rows) > 1
    # The first row has the measured-peak MFU only if the peak was stored before the run.
    for r in rows if "perf/mfu_vs_measured_peak" in rows[0] else rows[1:]:
        assert r["perf/flops_per_s"] == pytest.approx(
            report["flops_per_step"] * r["perf/steps_per_s"]
        )
        # On CPU MFU is against the measured peak, labelled so, and at most 1 by construction.
        assert "perf/mfu" not in r
        assert 0 < r["perf/mfu_vs_measured_peak"] <= 1
        assert r["perf/mfu_vs_measured_peak"] == pytest.approx(
            r["perf/flops_per_s"] / report["peak_flops_per_s"]
        )
        assert r["perf/examples_per_s"] == pytest.approx(
            r["perf/steps_per_s"] * 32  # tiny_digits_config: batch 32
        )
        assert "perf/tokens_per_s" not in r  # digits: no tokens


def test_peak_table_and_measured_cpu_peak():
    h100 = types.SimpleNamespace(
        platform="gpu", device_kind="NVIDIA H100 80GB HBM3", process_index=0
    )
    assert compute.peak_flops_per_s([h100] * 8)[0] == 8 * 989e12
    pcie = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 PCIe", process_index=0)
    assert compute.peak_flops_per_s([pcie])[0] == 756e12
    odd = types.SimpleNamespace(platform="gpu", device_kind="Mystery 9000", process_index=0)
    assert compute.peak_flops_per_s([odd])[0] is None
    assert compute.perf_metrics({"flops_per_step": 10.0, "peak_flops_per_s": None}, 2.0) == {
        "perf/flops_per_s": 20.0
    }
    h200 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200", process_index=0)
    assert compute.peak_flops_per_s([h200], "float32") == (
        494.7e12,
        "data sheet float32 (TF32) dense, H200",
    )
    v5e = types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite", process_index=0)
    assert compute.peak_flops_per_s([v5e] * 4, "bfloat16")[0] == 4 * 197e12
    assert compute.peak_flops_per_s([v5e], "float32")[0] is None  # absent, not invented
    peak = compute.measure_cpu_peak_flops()
    assert 1e8 < peak < 1e14  # a real measurement, not a placeholder
    assert compute.measure_cpu_peak_flops() == peak  # measured once


@pytest.mark.parametrize(
    "kind, bf16",
    [
        # Device kinds as JAX reports them (the CUDA device name on NVIDIA).
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", None),  # not an L4: no figure in the table
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", None),  # not the SXM part
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", None),  # a slice of the chip
        ("NVIDIA A10", None),
        ("Tesla V100-SXM2-16GB", 125e12),
        ("Tesla V100-PCIE-16GB", None),  # the PCIe card's peak is lower than the SXM2 row
        ("TPU v4", 275e12),
        ("TPU v4 lite", None),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v6 lite", 918e12),
        ("TPU7x", None),
        ("Mystery 9000", None),
    ],
)
def test_peak_table_matches_a_device_kind_whole(kind, bf16):
    device = types.SimpleNamespace(platform="gpu", device_kind=kind, process_index=0)
    peak, source = compute.peak_flops_per_s([device] * 2, "bfloat16")
    assert peak == (None if bf16 is None else 2 * bf16)
    if bf16 is None:
        assert source == f"unknown device kind {kind!r}"


def test_mfu_against_a_measured_peak_never_exceeds_one():
    # A run that beats the matmul (the digits run logged 1.0471 before) raises the peak.
    report = {"flops_per_step": 1e9, "peak_flops_per_s": 1e9, "peak_measured": True}
    fast = compute.perf_metrics(report, steps_per_s=3.0, examples_per_step=8, tokens_per_example=4)
    assert fast["perf/mfu_vs_measured_peak"] == 1.0
    assert report["peak_flops_per_s"] == 3e9
    slow = compute.perf_metrics(report, steps_per_s=1.5)
    assert slow["perf/mfu_vs_measured_peak"] == pytest.approx(0.5)
    assert fast["perf/examples_per_s"] == 24.0 and fast["perf/tokens_per_s"] == 96.0


def test_find_batch_size_uses_the_memory_analysis_only():
    c = dlkit.build(tiny_digits_config())
    limit = compute.step_memory(c, 8 * 40)  # a budget that a batch of 320 just fits
    traced = c.strategy.trace_counts["train"]
    found = compute.find_batch_size(c, memory_limit_bytes=limit, max_batch_size=4096)
    assert c.strategy.trace_counts["train"] - traced == len(found["probes"])  # compiled only
    b = found["batch_size"]
    assert b % 8 == 0 and b >= 320
    assert found["peak_bytes_per_device"] <= limit
    assert compute.step_memory(c, b + 8) > limit  # the next valid batch does not fit


def test_find_batch_size_cli(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dlkit.cli",
            "train",
            "digits_mlp",
            "--find-batch-size",
            "--memory-limit-mb",
            "0.25",
            "--set",
            "model.hidden_sizes=64",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["batch_size"] > 0 and result["batch_size"] % 2 == 0
    assert result["peak_bytes_per_device"] <= 2**18 == result["memory_limit_bytes"]


def test_compilation_cache_is_written_then_reused(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "dlkit.cli",
        "train",
        "digits_mlp",
        "--no-progress",
        "--set",
        "train.steps=2",
        "--set",
        "optim.warmup_steps=0",
        "--set",
        "train.eval_every=0",
        "--set",
        f"train.compilation_cache_dir={cache}",
    ]
    subprocess.run(
        cmd + ["--workdir", str(tmp_path / "a")],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    first = set(os.listdir(cache))
    assert any("train_and_accumulate" in name for name in first), first
    subprocess.run(
        cmd + ["--workdir", str(tmp_path / "b")],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    assert set(os.listdir(cache)) == first  # every program came from the cache


def test_default_caches_go_to_the_user_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DLKIT_CACHE_DIR", str(tmp_path / "c"))
    assert compute.compilation_cache_dir("auto") == str(tmp_path / "c" / "jax")
    assert compute.compilation_cache_dir("") is None
    assert dlkit.Config().train.compilation_cache_dir == "auto"  # on by default
    monkeypatch.setenv("DLKIT_CACHE_DIR", "")
    assert compute.compilation_cache_dir("auto") is None  # DLKIT_CACHE_DIR="" turns it off
    monkeypatch.delenv("DLKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compute.cache_dir() == tmp_path / "xdg" / "dlkit"


def test_first_row_does_not_measure_the_cpu_peak(tmp_path, monkeypatch):
    # A first run on a machine: nothing stored, nothing measured in this process yet.
    monkeypatch.setenv("DLKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DLKIT_CPU_PEAK_FLOPS", raising=False)
    monkeypatch.setattr(compute, "_measured", {})
    calls = []
    monkeypatch.setattr(compute, "_matmul_flops", lambda n, r: calls.append(n) or 4e9)
    report = {"flops_per_step": 1e9, "peak_flops_per_s": None, "peak_measured": True}
    first = compute.perf_metrics(dict(report), steps_per_s=1.0, measure_peak=False)
    assert first == {"perf/flops_per_s": 1e9} and calls == []  # no MFU, no matmul
    second = compute.perf_metrics(dict(report), steps_per_s=1.0)
    assert second["perf/mfu_vs_measured_peak"] == 0.25 and calls == [1024]
    # Once measured (and stored), a first row has it without measuring again.
    monkeypatch.setattr(compute, "_measured", {})
    third = compute.perf_metrics(dict(report), steps_per_s=2.0, measure_peak=False)
    assert third["perf/mfu_vs_measured_peak"] == 0.5 and calls == [1024]


def test_cpu_peak_is_measured_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("DLKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compute, "_measured", {})  # past what this process measured
    measure = compute.measure_cpu_peak_flops
    peak = measure(n=64, repeats=1)
    stored = json.loads((tmp_path / "cpu_peak_flops.json").read_text())
    assert list(stored.values()) == [peak]
    # A later process reads the stored figure instead of measuring again.
    (tmp_path / "cpu_peak_flops.json").write_text(json.dumps({k: 1.5e9 for k in stored}))
    monkeypatch.setattr(compute, "_measured", {})  # what this process measured
    assert measure(n=64, repeats=1) == 1.5e9


def test_printed_rows_round_floats_and_the_jsonl_keeps_them(tmp_path):
    from dlkit import progress

    row = {"step": 3, "perf/flops_per_s": 26383561844.8379, "train/loss": 0.123456789}
    assert progress.format_row(row) == "step 3  perf/flops_per_s=2.6384e+10  train/loss=0.12346"
    result = dlkit.fit(tiny_digits_config(**{"parallel.num_devices": 1}), tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    on_disk = {r["step"]: r["train/loss"] for r in logged if "train/loss" in r}
    in_memory = {r["step"]: r["train/loss"] for r in result.history if "train/loss" in r}
    assert on_disk and on_disk == in_memory  # full precision on disk, not the printed digits
    assert any(len(repr(v)) > 8 for v in on_disk.values())
