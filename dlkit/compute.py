"""What a step costs: FLOPs and memory from XLA, achieved FLOP/s, MFU, the largest batch.

    compiled = train_fn.lower(state, acc, batch_spec).compile()
    report = dlkit.compute.analyze(compiled, strategy.devices)
    report["flops_per_step"], report["memory"]["peak_bytes_per_device"]
    dlkit.compute.perf_metrics(report, steps_per_s=50.0)   # {"perf/flops_per_s", "perf/mfu", ...}
    dlkit.compute.find_batch_size(components)               # compiles, never runs

FLOPs come from XLA's cost analysis of the compiled step (the whole program: forward,
backward, optimizer update). For a program partitioned over n devices XLA reports one
device's share, so `flops_per_step` is that times n. Memory comes from XLA's memory analysis
of the same executable: arguments + outputs - donated (aliased) buffers + temporaries, per
device. Model-FLOPs utilisation (MFU) is achieved FLOP/s over the peak FLOP/s of the devices:
accelerators use the vendor's dense figure for the compute dtype from `PEAK_FLOPS_TABLE`
(`perf/mfu`; absent where the table has no figure); a CPU has no such figure, so its float32
peak is measured once per process with a large matmul (`measure_cpu_peak_flops`; set
DLKIT_CPU_PEAK_FLOPS to pin it) and reported as `perf/mfu_vs_measured_peak`, at most 1.

`find_batch_size` compiles the step ahead of time for growing batch sizes and reads the
memory analysis: no step runs, so nothing runs out of memory while searching.

`enable_compilation_cache(dir)` turns on JAX's persistent compilation cache.
"""

import json
import os
import pathlib
import platform
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from dlkit import step_wrappers

# Dense (no sparsity) peak FLOP/s of one JAX device from vendor data sheets (not measured here),
# as (device kind, 16-bit figure, float32 figure). The 16-bit column is bfloat16 (float16 on
# V100, which has no bfloat16 units); the float32 column is TF32 tensor-core throughput on
# NVIDIA, because XLA runs float32 matmuls in TF32 there by default. None = no published figure:
# MFU is then not reported rather than guessed (TPUs publish no float32 matmul peak). A row
# matches a `device.device_kind` whole, not as a substring (see `_kind_key`): "NVIDIA L40S" is
# not an "L4", and "NVIDIA H100 NVL" or "NVIDIA H200 NVL", parts with other figures, match no
# row and get no MFU instead of the SXM figure. TPU v2/v3 expose each of a chip's two cores as a
# device: half the chip figure. Sources: docs/performance.md.
PEAK_FLOPS_TABLE: tuple[tuple[str, float | None, float | None], ...] = (
    ("B200", 2250e12, 1100e12),
    ("H200", 989e12, 494.7e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494.7e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100", 312e12, 156e12),  # SXM: "NVIDIA A100-SXM4-80GB"
    ("A100 PCIe", 312e12, 156e12),  # the data sheet gives PCIe and SXM the same figures
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("V100", 125e12, None),  # SXM2: "Tesla V100-SXM2-16GB"; the PCIe card's figure is lower
    ("TPU v2", 22.5e12, None),
    ("TPU v3", 61.5e12, None),
    ("TPU v4", 275e12, None),
    ("TPU v5 lite", 197e12, None),  # v5e
    ("TPU v5e", 197e12, None),  # another spelling of the same chip (jax's Pallas accepts both)
    ("TPU v5", 459e12, None),  # v5p
    ("TPU v5p", 459e12, None),
    ("TPU v6 lite", 918e12, None),  # v6e (Trillium)
    ("TPU v6e", 918e12, None),
)

# Words of a device kind that do not change its peak: the vendor, the memory size and type, and
# the SXM form factor (the table's rows without a form factor are the SXM parts).
_KIND_NOISE = re.compile(r"nvidia|tesla|\d+gb|hbm\d\w*|sxm\d*")


def _kind_key(kind: str) -> tuple[str, ...]:
    """A device kind as the words that name its part: "NVIDIA A100-SXM4-80GB" -> ("a100",),
    "NVIDIA H100 PCIe" -> ("h100", "pcie"), "TPU v5 lite" -> ("tpu", "v5", "lite")."""
    words = re.split(r"[\s_-]+", kind.strip().casefold())
    return tuple(w for w in words if w and not _KIND_NOISE.fullmatch(w))


def _peak_row(device_kind: str) -> tuple[str, float | None, float | None] | None:
    """The `PEAK_FLOPS_TABLE` row of `device_kind` (a `jax.Device.device_kind`), or None."""
    key = _kind_key(device_kind)
    return next((row for row in PEAK_FLOPS_TABLE if _kind_key(row[0]) == key), None)


# The 16-bit column alone, as (device kind, FLOP/s), for callers of earlier versions.
PEAK_FLOPS_PER_DEVICE: tuple[tuple[str, float], ...] = tuple(
    (kind, bf16) for kind, bf16, _ in PEAK_FLOPS_TABLE if bf16 is not None
)


def cache_dir() -> pathlib.Path | None:
    """dlkit's per-user cache: $DLKIT_CACHE_DIR, else $XDG_CACHE_HOME/dlkit, else
    ~/.cache/dlkit. None when DLKIT_CACHE_DIR is set but empty (nothing is cached)."""
    env = os.environ.get("DLKIT_CACHE_DIR")
    if env is not None:
        return pathlib.Path(env).expanduser() if env else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "dlkit"


# Peaks this process measured, by matmul size: the per-process record that lets a later call
# (or `stored_cpu_peak_flops`) skip the matmul when there is no cache directory to store it in.
_measured: dict[int, float] = {}


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """The host's float32 matmul FLOP/s (best of `repeats` (n, n) @ (n, n) products).

    XLA:CPU runs one matmul on all cores, so this is the whole host's peak; simulated CPU
    devices share it. Measured once per machine (about 0.1-0.5 s) and kept in
    `cache_dir()/cpu_peak_flops.json`, keyed by CPU model, core count and JAX version, so
    later runs start without it; DLKIT_CPU_PEAK_FLOPS pins the figure.
    """
    known = stored_cpu_peak_flops(n)
    if known is not None:
        return known
    path, key = _peak_cache(n)
    stored = _read_json(path)
    peak = _matmul_flops(n, repeats)
    _measured[n] = peak
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**stored, key: peak}, indent=1) + "\n")
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
        except OSError:
            pass  # a read-only home only costs the measurement again next time
    return peak


def stored_cpu_peak_flops(n: int = 1024) -> float | None:
    """The host's peak as `measure_cpu_peak_flops` would return it, if that needs no
    measurement (DLKIT_CPU_PEAK_FLOPS, or stored in the cache); otherwise None."""
    if os.environ.get("DLKIT_CPU_PEAK_FLOPS"):
        return float(os.environ["DLKIT_CPU_PEAK_FLOPS"])
    if n in _measured:  # this process measured it (with no cache directory to store it in)
        return _measured[n]
    path, key = _peak_cache(n)
    stored = _read_json(path).get(key)
    return stored if isinstance(stored, float) else None


def _peak_cache(n: int) -> tuple[pathlib.Path | None, str]:
    """The cache file of measured peaks and this host's key in it."""
    path = cache_dir() / "cpu_peak_flops.json" if cache_dir() else None
    return path, f"{_cpu_model()}|{os.cpu_count()}|jax {jax.__version__}|n={n}"


def _matmul_flops(n: int, repeats: int) -> float:
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_json(path: pathlib.Path | None) -> dict:
    try:
        out = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def _column(compute_dtype) -> int:
    """1 (16-bit column) for bfloat16/float16 compute, 2 (float32 column) otherwise."""
    return 1 if jnp.dtype(compute_dtype).itemsize == 2 else 2


def peak_flops_per_s(devices, compute_dtype="bfloat16") -> tuple[float | None, str]:
    """(peak FLOP/s of all of `devices` together, where the figure comes from).

    Accelerators: the data sheet figure for `compute_dtype` from `PEAK_FLOPS_TABLE`; None if
    the device kind or its column is unknown (MFU is then not reported). CPU: the measured
    float32 matmul peak (`measure_cpu_peak_flops`), whatever `compute_dtype`.
    """
    d = devices[0]
    if d.platform == "cpu":
        hosts = len({x.process_index for x in devices})
        return measure_cpu_peak_flops() * hosts, "measured float32 matmul, per host"
    col = _column(compute_dtype)
    name = "16-bit" if col == 1 else "float32 (TF32)"
    row = _peak_row(d.device_kind)
    if row is None:
        return None, f"unknown device kind {d.device_kind!r}"
    if row[col] is None:
        return None, f"no published {name} peak for {row[0]}"
    return row[col] * len(devices), f"data sheet {name} dense, {row[0]}"


def _first(x):
    # cost_analysis() returned a list of per-program dicts in older JAX versions.
    return x[0] if isinstance(x, list | tuple) else x


def analyze(compiled, devices, compute_dtype="bfloat16") -> dict[str, Any]:
    """FLOPs and memory of a compiled step (a `jax.stages.Compiled`).

    On CPU the peak is left None here and measured by `perf_metrics` at the second logged
    row (`peak_measured` is True; the first row uses it only if it is stored), so neither
    start-up nor the first row waits for a matmul benchmark.

    Args:
      compiled: the compiled step, e.g. `jax.jit(f).lower(*args).compile()`.
      devices: the devices it runs on (the strategy's).
      compute_dtype: the dtype the model computes in; picks the peak table's column.
    Returns:
      {"flops_per_step": float (all devices), "flops_per_step_per_device": float,
       "peak_flops_per_s": float | None, "peak_source": str, "peak_measured": bool,
       "hosts": int, "device_kind": str,
       "num_devices": int, "memory": {"argument_bytes", "output_bytes", "alias_bytes",
       "temp_bytes", "generated_code_bytes", "peak_bytes_per_device"}}.
    """
    flops_per_device = flops_per_device_of(compiled)
    n = len(devices)
    measured = devices[0].platform == "cpu"
    if measured:
        peak, source = None, "a measured float32 matmul per host, from the second logged row"
    else:
        peak, source = peak_flops_per_s(devices, compute_dtype)
    report: dict[str, Any] = {
        "flops_per_step": flops_per_device * n,
        "flops_per_step_per_device": flops_per_device,
        "peak_flops_per_s": peak,
        "peak_source": source,
        "peak_measured": measured,
        "hosts": len({x.process_index for x in devices}),
        "device_kind": devices[0].device_kind,
        "num_devices": n,
    }
    report["memory"] = memory_of(compiled)
    return report


def flops_per_device_of(compiled) -> float:
    """XLA's FLOP count of one device's program in `compiled`.

    A loop body (e.g. `lax.scan`) is counted once, not once per iteration.
    """
    cost = _first(compiled.cost_analysis()) or {}
    return float(cost.get("flops", 0.0))


def memory_of(compiled) -> dict[str, int]:
    """XLA's memory analysis of `compiled`, per device, with the implied peak.

    peak = arguments + outputs - aliased (donated, reused for outputs) + temporaries.
    """
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
    }
    out["peak_bytes_per_device"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    )
    return out


def perf_metrics(
    report: dict[str, Any],
    steps_per_s: float,
    examples_per_step: int = 0,
    tokens_per_example: int = 0,
    measure_peak: bool = True,
) -> dict[str, float]:
    """`perf/...` metrics for a logging interval.

    perf/flops_per_s always; perf/examples_per_s and perf/tokens_per_s when
    `examples_per_step` / `tokens_per_example` are given. MFU: `perf/mfu` against a data
    sheet peak (absent where none is known); on CPU `perf/mfu_vs_measured_peak` against the
    measured matmul peak, which is raised to any rate the run itself achieved, so it never
    exceeds 1 (XLA's FLOP count can include work a hand matmul does not, e.g. fused
    elementwise ops, so a run can beat the matmul). With `measure_peak=False` a CPU peak that
    is not known yet is not measured, and the measured-peak MFU is left out.
    """
    achieved = report["flops_per_step"] * steps_per_s
    out = {"perf/flops_per_s": achieved}
    if examples_per_step:
        out["perf/examples_per_s"] = examples_per_step * steps_per_s
        if tokens_per_example:
            out["perf/tokens_per_s"] = examples_per_step * tokens_per_example * steps_per_s
    if report.get("peak_measured"):
        peak = report.get("peak_flops_per_s")
        if not peak:
            host_peak = measure_cpu_peak_flops() if measure_peak else stored_cpu_peak_flops()
            if host_peak is None:
                return out
            peak = host_peak * report.get("hosts", 1)
        if achieved > peak:
            report["peak_source"] = "measured: the highest of a float32 matmul and this run"
        report["peak_flops_per_s"] = max(peak, achieved)
        out["perf/mfu_vs_measured_peak"] = achieved / report["peak_flops_per_s"]
    elif report.get("peak_flops_per_s"):
        out["perf/mfu"] = achieved / report["peak_flops_per_s"]
    return out


def format_report(report: dict[str, Any]) -> str:
    """One human-readable paragraph of `report` (as printed at the start of `fit`)."""
    mem = report.get("memory", {})
    lines = [
        f"compute: {report['flops_per_step'] / 1e9:.4g} GFLOP/step on "
        f"{report['num_devices']} x {report['device_kind']}; peak "
        + (
            f"{report['peak_flops_per_s'] / 1e12:.4g} TFLOP/s ({report['peak_source']})"
            if report.get("peak_flops_per_s")
            else report["peak_source"]
            if report.get("peak_measured")
            else f"unknown ({report['peak_source']})"
        )
    ]
    if mem:
        lines.append(
            f"memory per device: peak {_mib(mem['peak_bytes_per_device'])} = arguments "
            f"{_mib(mem['argument_bytes'])} + outputs {_mib(mem['output_bytes'])} - donated "
            f"{_mib(mem['alias_bytes'])} + temporaries {_mib(mem['temp_bytes'])}"
        )
    state = report.get("state_bytes_per_device")
    if state:
        lines.append(
            f"state per device ({report.get('param_sharding', 'replicated')}): params "
            f"{_mib(state['params'])}, optimizer state {_mib(state['opt_state'])}"
        )
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


# --------------------------------------------------------------------------------------------
# The largest batch that fits, from the compiled memory analysis.


def device_memory_limit(devices) -> tuple[int, str]:
    """(bytes one device may use, where that figure comes from).

    Accelerators report `bytes_limit` in `memory_stats()`; on CPU it is the host's available
    memory (MemAvailable) shared by its simulated devices.
    """
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "device memory_stats bytes_limit"
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    local = sum(1 for d in devices if d.process_index == devices[0].process_index)
    return available // local, f"host MemAvailable / {local} local device(s)"


def step_memory(components, batch_size: int) -> int:
    """Peak bytes per device of the compiled train step at `batch_size` (compiled, not run)."""
    c = components
    strategy = c.strategy
    abstract = c.abstract_state()
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    train_fn = strategy.compile_train(step_wrappers.accumulating(c.train_step()), shardings)
    example = c.example_batch()
    acc = c.abstract_metrics(abstract)
    lowered = train_fn.lower(abstract, acc, strategy.batch_spec(example, batch_size))
    return memory_of(lowered.compile())["peak_bytes_per_device"]


def find_batch_size(
    components, memory_limit_bytes: int | None = None, max_batch_size: int = 1 << 20
) -> dict[str, Any]:
    """The largest global batch whose compiled train step fits in device memory.

    Batch sizes are multiples of a unit (devices x accumulation steps). The search keeps a
    bracket (largest fitting, smallest not fitting) and picks the next probe where a line
    through two probes meets the limit (a step's memory is close to affine in the batch),
    then confirms the neighbour; it bisects when that stalls. A near-affine curve is settled
    in about five probes. Every probe is an ahead-of-time compilation; nothing runs.

    Args:
      components: a `dlkit.components.Components` (from `dlkit.build(cfg)`).
      memory_limit_bytes: per-device budget; None = `device_memory_limit`.
      max_batch_size: stop searching here.
    Returns:
      {"batch_size": int (0 if even the smallest does not fit), "peak_bytes_per_device": int,
       "memory_limit_bytes": int, "limit_source": str, "probes": [(batch_size, bytes), ...]}.
    """
    c = components
    strategy = c.strategy
    if memory_limit_bytes is None:
        limit, source = device_memory_limit(strategy.devices)
    else:
        limit, source = int(memory_limit_bytes), "given"
    unit = strategy.num_devices * getattr(c.config.train, "grad_accum_steps", 1)
    k_max = max_batch_size // unit
    need: dict[int, int] = {}  # k -> bytes at batch k * unit
    probes: list[tuple[int, int]] = []
    lo, hi = 0, k_max + 1  # lo fits (0 = none yet); hi does not fit (or is past the maximum)
    k, stalls = 1, 0
    while k_max >= 1:
        width = hi - lo
        need[k] = step_memory(c, k * unit)
        probes.append((k * unit, need[k]))
        if need[k] <= limit:
            lo = k
        else:
            hi = k
        if hi - lo <= 1:
            break
        # Bisect after two probes in a row that did not halve a measured bracket, so an odd
        # (non-affine) memory curve still costs O(log) probes.
        stalls = stalls + 1 if hi in need and 2 * (hi - lo) > width else 0
        k = (lo + hi) // 2 if stalls >= 2 else _linear_probe(need, limit, lo, hi)
    return {
        "batch_size": lo * unit,
        "peak_bytes_per_device": need.get(lo, 0),
        "memory_limit_bytes": limit,
        "limit_source": source,
        "probes": probes,
    }


def _linear_probe(need: dict[int, int], limit: int, lo: int, hi: int) -> int:
    """The next k strictly inside (lo, hi) where a line through two probes meets `limit`.

    The line goes through the bracket's ends when both are measured, else the last two
    probes, else through the origin and the only probe. A guess equal to lo (or hi) becomes
    lo + 1 (hi - 1): the probe that confirms the answer.
    """
    ends = [(k, need[k]) for k in (lo, hi) if k in need]
    if len(ends) < 2:
        ends = list(need.items())[-2:]
    if len(ends) < 2:
        ends = [(0, 0), ends[0]]
    (k1, m1), (k2, m2) = ends
    slope = (m2 - m1) / (k2 - k1) if k2 != k1 else 0.0
    guess = int(k1 + (limit - m1) // slope) if slope > 0 else 2 * lo
    return min(max(guess, lo + 1), hi - 1)


# --------------------------------------------------------------------------------------------
# Persistent compilation cache.


def compilation_cache_dir(setting: str) -> str | None:
    """The directory `train.compilation_cache_dir` names: "auto" = `cache_dir()/jax` (None
    when DLKIT_CACHE_DIR is empty), "" = None (off), else the path itself."""
    if setting == "auto":
        base = cache_dir()
        return str(base / "jax") if base is not None else None
    return os.path.expanduser(setting) if setting else None


def enable_compilation_cache(directory: str | os.PathLike, min_compile_time_s: float = 0.0):
    """Stores compiled programs in `directory` and reuses them in later processes.

    Args:
      directory: the cache directory (created if missing). Trusted: whoever can write it can
        run code in your process, so do not share it with untrusted users.
      min_compile_time_s: only programs that took at least this long to compile are stored
        (JAX's default is 1 s; 0 stores every program).
    """
    from jax._src import compilation_cache  # reset_cache: re-read the directory setting

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    if jax.config.jax_compilation_cache_dir == directory:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # The cache object is built on first use from the directory then set; rebuild it.
    compilation_cache.reset_cache()


def bytes_summary(probes: list[tuple[int, int]]) -> str:
    """`probes` of `find_batch_size` as "batch: MiB" lines."""
    return "\n".join(f"  batch {b:>8}: {_mib(n)}" for b, n in probes)


__all__ = [
    "PEAK_FLOPS_PER_DEVICE",
    "PEAK_FLOPS_TABLE",
    "analyze",
    "bytes_summary",
    "cache_dir",
    "compilation_cache_dir",
    "device_memory_limit",
    "enable_compilation_cache",
    "find_batch_size",
    "flops_per_device_of",
    "format_report",
    "measure_cpu_peak_flops",
    "stored_cpu_peak_flops",
    "memory_of",
    "peak_flops_per_s",
    "perf_metrics",
    "step_memory",
]
