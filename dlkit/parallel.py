"""Where arrays live and how the step is compiled: the `jit` and `pmap` strategies.

    strategy = dlkit.parallel.make_strategy("jit")          # all devices, data parallel
    state = create_train_state(..., shardings=strategy.state_shardings)
    train = strategy.compile_train(loss_fn)                  # (state, acc, batch) -> (state, acc)
    state, acc = train(state, acc, strategy.put_batch(numpy_batch))

Both strategies share one `Mesh` with a single axis "data" over the chosen devices, and keep the
`TrainState` as global arrays replicated on it, so a state (and a checkpoint) is the same
object whichever strategy made it. They differ only in how the one step function is compiled:

- `jit` (default): `jax.jit` with `NamedSharding`s. The batch is one global array split along
  "data"; XLA inserts the reductions. The same code is multi-host ready: each process passes
  its own rows and `jax.make_array_from_process_local_data` assembles the global batch.
- `pmap`: `jax.pmap` of the same step with `axis_name="data"`; each device gets (B/n, ...) and
  the step `psum`s explicitly. The state goes in and out with `in_axes/out_axes=None`
  (replicated), which JAX 0.10's pmap (itself jit + shard_map) keeps as one global array.

Parameter sharding (`param_sharding="fsdp"`, jit only): instead of a replica on every device,
each array of params, optimizer state and model state larger than `fsdp_min_size` elements is
split along its largest dimension divisible by the device count, over the same "data" axis
(ZeRO-3 / FSDP style). The step is unchanged: XLA all-gathers a weight where it is used and
reduce-scatters its gradient, so the numbers equal plain data parallelism to float rounding
while params + optimizer state take about 1/n of the bytes per device. `fsdp_spec` is the rule.

XLA:CPU library fusions (`cpu_compiler_options`, config `train.xla_cpu_ynn_fusions`): XLA:CPU
hands some operations to the YNNPACK library. On jaxlib 0.10.2 its default is individual
convolutions, individual dots and reductions. YNNPACK's convolutions were slower than XLA's
own convolution emitter (fashion_mnist_cnn 25-28 vs 41 steps/s, fashion_mnist_resnet 4.5 vs
5.1, on 2 AMD EPYC cores; docs/performance.md), while its dots speed up the MLP, so dlkit's
default keeps the dots and reductions and leaves convolutions to XLA. The option goes to
`jax.jit` (train and eval steps of the `jit` strategy, CPU devices only); `jax.pmap` takes no
compiler options, so the `pmap` strategy compiles with XLA's defaults.

XLA:CPU vector width (`cpu_compiler_options`, config `train.xla_cpu_vector_width`): XLA's own
kernels (the elementwise fusions: the optimizer update, activations, the gradient norm) are
vectorised for 256-bit registers unless told otherwise. On AMD CPUs with AVX-512 dlkit asks for
512 (`auto_vector_width` has the measurements); elsewhere it leaves XLA's default.

CPU caveat: with several (simulated) CPU devices, queuing many programs that contain
collectives can deadlock XLA:CPU (seen within 20-100 dispatches on 2-core machines with JAX
0.10.2; XLA aborts later with a rendezvous timeout). `sync_every_step` waits for each step
before dispatching the next; "auto" turns it on exactly there (CPU platform, > 1 device), where
it costs little because CPU steps do not overlap with the host anyway.
"""

import collections
import functools
import os
import warnings

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dlkit import dispatch, steps
from dlkit import metrics as metrics_lib
from dlkit.data import prefetch as prefetch_batches

STRATEGIES = ("jit", "pmap")
PARAM_SHARDINGS = ("replicated", "fsdp")
DATA_AXIS = "data"
# XLA's LibraryFusionType values (DebugOptions.xla_cpu_experimental_ynn_fusion_type).
YNN_FUSION_TYPES = ("dot", "eltwise", "individual_convolution", "individual_dot", "reduce")
DEFAULT_YNN_FUSIONS = "individual_dot,reduce"


def cpu_compiler_options(
    ynn_fusions: str = DEFAULT_YNN_FUSIONS, vector_width: int = 0
) -> dict[str, str | int]:
    """XLA compiler options for CPU programs from `train.xla_cpu_ynn_fusions` and
    `train.xla_cpu_vector_width`.

    Args:
      ynn_fusions: which operations XLA:CPU may hand to YNNPACK: a comma list of
        `YNN_FUSION_TYPES`, "none" (no YNNPACK fusions), or "xla" (no option passed: XLA's own
        default, or whatever XLA_FLAGS sets).
      vector_width: the SIMD width in bits XLA:CPU's own kernels prefer: 128, 256 or 512;
        0 = auto (`auto_vector_width`); -1 = no option passed (XLA's default, 256, or
        XLA_FLAGS).
    Returns:
      The options for `jax.jit(..., compiler_options=...)` ({} for "xla" and -1).
    Raises:
      ValueError: an unknown value, naming the setting, what it accepts and what it got.
    """
    options: dict[str, str | int] = {}
    if isinstance(vector_width, bool) or vector_width not in VECTOR_WIDTHS:
        raise ValueError(
            "train.xla_cpu_vector_width: expected 0 (auto), -1 (XLA's default) or one of "
            f"128, 256, 512, got {vector_width!r}"
        )
    width = auto_vector_width() if vector_width == 0 else vector_width
    if width > 0:
        options["xla_cpu_prefer_vector_width"] = width
    spec = ynn_fusions.strip()
    if spec == "xla":
        return options
    if spec == "none":
        return {"xla_cpu_experimental_ynn_fusion_type": "", **options}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in YNN_FUSION_TYPES]
    if not names or unknown:
        raise ValueError(
            "train.xla_cpu_ynn_fusions: expected xla | none | a comma list of "
            f"{', '.join(YNN_FUSION_TYPES)}, got {ynn_fusions!r}"
        )
    value = ",".join(f"LIBRARY_FUSION_TYPE_{n.upper()}" for n in names)
    return {"xla_cpu_experimental_ynn_fusion_type": value, **options}


VECTOR_WIDTHS = (-1, 0, 128, 256, 512)


def auto_vector_width(cpuinfo: str | None = None) -> int:
    """`train.xla_cpu_vector_width=0`: 512 on an AMD CPU with AVX-512, else -1 (no option).

    XLA:CPU asks LLVM for 256-bit vectors by default even where AVX-512 exists, because 512-bit
    instructions lower the clock of some Intel parts. AMD's (Zen 4 and later) run them at full
    clock, and on an AMD EPYC with AVX-512 (2 cores) 512-bit kernels made the bench MLP's K=50
    step 2-5% faster (3410 vs 3275, 3532 vs 3362 and 3180 vs 3122 steps/s in three A/Bs of
    alternating rounds, medians), the MLP and CNN at K=1 1.5-2.5% (docs/performance.md).
    Not measured on Intel CPUs, so they keep XLA's default. XLA_FLAGS that set
    `--xla_cpu_prefer_vector_width` win (-1 here).

    Args:
      cpuinfo: the text of /proc/cpuinfo (read when None; no such file -> -1).
    """
    if "xla_cpu_prefer_vector_width" in os.environ.get("XLA_FLAGS", ""):
        return -1
    if cpuinfo is None:
        cpuinfo = _cpuinfo()
    fields = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    amd = fields.get("vendor_id") == "AuthenticAMD"
    return 512 if amd and "avx512f" in fields.get("flags", "").split() else -1


@functools.cache
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


@functools.cache
def _rejected_options(options: tuple[tuple[str, str], ...]) -> str | None:
    """Why this jaxlib's XLA:CPU rejects `options` (a tiny probe compile), or None if it
    accepts them. The YNNPACK option is experimental: a later jaxlib may rename or drop it."""
    try:
        x = jax.device_put(np.float32(0), jax.devices("cpu")[0])
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(x).compile()
    except Exception as e:  # noqa: BLE001 - XLA reports an unknown option as a runtime error
        return f"{type(e).__name__}: {e}"
    return None


def usable_compiler_options(options: dict[str, str] | None, platform: str) -> dict[str, str]:
    """`options` for programs on `platform`: {} unless it is "cpu" (they are XLA:CPU options);
    on CPU, `options` if this jaxlib accepts them, else {} and a warning, so that a jaxlib
    without an experimental option compiles with its defaults instead of failing."""
    if not options or platform != "cpu":
        return {}
    why = _rejected_options(tuple(sorted(options.items())))
    if why is None:
        return dict(options)
    warnings.warn(
        f"train.xla_cpu_ynn_fusions / train.xla_cpu_vector_width: this jaxlib "
        f"({jax.__version__}) does not accept the XLA options {options} "
        f"({why.splitlines()[0]}); compiling with XLA's defaults",
        stacklevel=2,
    )
    return {}


def fsdp_spec(shape: tuple[int, ...], axis_size: int, min_size: int) -> P:
    """The `PartitionSpec` FSDP gives an array of `shape` on an axis of `axis_size` devices.

    The largest dimension divisible by `axis_size` is split along "data" (the first one if
    several tie); arrays with fewer than `min_size` elements, or with no divisible dimension,
    stay replicated: splitting a bias saves nothing and costs a collective.

    Args:
      shape: the array's shape.
      axis_size: devices on the "data" axis.
      min_size: the smallest number of elements worth splitting.
    Returns:
      e.g. P(None, "data") for a (64, 512) kernel on 8 devices; P() for replicated.
    """
    if axis_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    divisible = [d for d in range(len(shape)) if shape[d] % axis_size == 0]
    if not divisible:
        return P()
    d = max(divisible, key=lambda i: (shape[i], -i))
    return P(*([None] * d + [DATA_AXIS]))


def bytes_per_device(tree) -> dict[str, int]:
    """Bytes each device holds for the arrays of `tree`: {"min": ..., "max": ...}.

    Counts the shards actually placed on each addressable device (a replicated array counts
    fully on every device, a split one by its shard).
    """
    per_device: collections.Counter = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            per_device[shard.device] += shard.data.nbytes
    values = list(per_device.values()) or [0]
    return {"min": int(min(values)), "max": int(max(values))}


def _resolve_sync(sync: str, platform: str, num_devices: int) -> bool:
    if isinstance(sync, bool):
        return sync
    value = str(sync).lower()
    if value == "auto":
        return platform == "cpu" and num_devices > 1
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"parallel.sync_every_step: expected auto | true | false, got {sync!r}")


class Strategy:
    """Common part of both strategies: the mesh, the state's placement, metric accumulators.

    Attributes:
      name: "jit" or "pmap".
      devices: the devices used, in mesh order.
      mesh: `Mesh(devices, ("data",))`.
      sync_every_step: whether the loop waits for each step (see the module docstring).
      compiler_options: XLA options of the train and eval steps: {} unless this is the `jit`
        strategy on CPU devices (see `cpu_compiler_options`).
      trace_counts: how many times each compiled function was traced ("train", "eval"); a
        count above 1 means a recompilation.
    """

    name = "base"

    def __init__(
        self,
        num_devices: int = 0,
        sync_every_step: str = "auto",
        param_sharding: str = "replicated",
        fsdp_min_size: int = 1024,
        compiler_options: dict[str, str] | None = None,
    ):
        if param_sharding not in PARAM_SHARDINGS:
            raise ValueError(
                f"parallel.param_sharding: expected one of {list(PARAM_SHARDINGS)}, "
                f"got {param_sharding!r}"
            )
        if fsdp_min_size < 0:
            raise ValueError(f"parallel.fsdp_min_size: expected an int >= 0, got {fsdp_min_size}")
        self.param_sharding = param_sharding
        self.fsdp_min_size = fsdp_min_size
        available = self._available_devices()
        if num_devices < 0 or num_devices > len(available):
            raise ValueError(
                f"parallel.num_devices: expected 0 (all) or 1..{len(available)}, got {num_devices}"
            )
        self.devices = available[: num_devices or len(available)]
        self.mesh = Mesh(np.array(self.devices), (DATA_AXIS,))
        self.replicated = NamedSharding(self.mesh, P())
        self.platform = self.devices[0].platform
        self.sync_every_step = _resolve_sync(sync_every_step, self.platform, len(self.devices))
        # XLA:CPU options (`cpu_compiler_options`); other platforms compile with their defaults,
        # and so does pmap, which takes no compiler options.
        self.compiler_options = (
            usable_compiler_options(compiler_options, self.platform) if self.name == "jit" else {}
        )
        local = [d for d in self.devices if d.process_index == jax.process_index()]
        if self.platform == "cpu" and jax.process_count() > 1 and len(local) > 1:
            if not self.sync_every_step:
                # Measured: 2 processes x 2 CPU devices hang before step 50 without it.
                raise ValueError(
                    "parallel.sync_every_step: expected auto or true with several processes "
                    f"and {len(local)} CPU devices per process (queued cross-process "
                    f"collectives deadlock XLA:CPU in that layout), got {sync_every_step!r}"
                )
        self.trace_counts: collections.Counter = collections.Counter()
        self._zeros_fns: dict = {}

    def _available_devices(self) -> list:
        raise NotImplementedError

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def process_index(self) -> int:
        return jax.process_index()

    @property
    def process_count(self) -> int:
        return jax.process_count()

    def state_shardings(self, abstract_state):
        """A sharding per leaf of the state: replicated over the mesh (data parallelism), or
        split by `fsdp_spec` when `param_sharding="fsdp"`."""
        if self.param_sharding == "replicated":
            return jax.tree.map(lambda _: self.replicated, abstract_state)
        n = self.num_devices
        return jax.tree.map(
            lambda x: NamedSharding(self.mesh, fsdp_spec(x.shape, n, self.fsdp_min_size)),
            abstract_state,
        )

    def check_batch_size(self, batch_size: int, what: str = "train.batch_size") -> None:
        """Raises unless the global batch splits evenly over devices and processes."""
        n = self.num_devices
        if batch_size <= 0 or batch_size % n or batch_size % self.process_count:
            raise ValueError(
                f"{what}: expected a positive multiple of the device count {n} "
                f"({self.name} strategy on {n} {self.platform} device(s)), got {batch_size}"
            )

    def zeros(self, abstract_metrics):
        """A fresh zero accumulator for metrics shaped like `abstract_metrics`, replicated.

        The zero-making program is compiled once per metric structure and reused: the loop
        asks for a fresh accumulator on every logging step, and a new `jax.jit` each time
        cost one compilation (~50-80 ms on 2 CPU cores) per logged row.
        """
        leaves, treedef = jax.tree.flatten(abstract_metrics)
        key = (treedef, tuple((tuple(x.shape), np.dtype(x.dtype)) for x in leaves))
        make = self._zeros_fns.get(key)
        if make is None:
            make = jax.jit(
                functools.partial(metrics_lib.zeros_like, abstract_metrics),
                out_shardings=self.replicated,
            )
            self._zeros_fns[key] = make
        return make()

    def _count(self, name: str):
        self.trace_counts[name] += 1

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        raise NotImplementedError

    def host_feed(self, stacked: bool = False):
        """The function the loop's prefetch thread applies to each host batch: `put_batch`
        (or `put_stacked` for K stacked batches), so the host-to-device copy overlaps the
        running step. `JitStrategy` skips it on CPU."""
        return self.put_stacked if stacked else self.put_batch

    def prefetch_depth(self, requested: int, stacked: bool = False) -> int:
        """How many batches the prefetch thread keeps ready (`data.prefetch`; 0 = no
        thread). -1 (auto) is 2: the thread's host-to-device copies overlap the step."""
        return 2 if requested == -1 else requested

    def batches(self, iterator, prefetch: int, stacked: bool = False):
        """`iterator`'s host batches fed to this strategy's steps (`host_feed`), with
        `prefetch_depth(prefetch)` of them prepared ahead; a `dlkit.data.Prefetcher` (close
        it)."""
        depth = self.prefetch_depth(prefetch, stacked)
        return prefetch_batches(iterator, self.host_feed(stacked), depth)

    def batch_spec(self, example: dict[str, np.ndarray], batch_size: int) -> dict:
        """`ShapeDtypeStruct`s of what `put_batch` makes from global batches of `batch_size`
        rows shaped like `example` (any leading size): for compiling ahead of time."""
        raise NotImplementedError

    def compile_train(
        self,
        loss_fn,
        state_shardings=None,
        steps_per_dispatch=1,
        scan_unroll=1,
        data_on_device=False,
        **step_options,
    ):
        """Options (e.g. loss_spike_factor) are passed to `steps.train_step` as static.

        `steps_per_dispatch` K > 1 compiles K steps over stacked batches (leaves (K, B, ...),
        from `put_stacked`) with `lax.scan`, `scan_unroll` per iteration (see `dlkit.dispatch`).
        `data_on_device` (jit only): `(state, acc, batch, data) -> (state, acc)`, where `batch`
        holds example indices and a mask ({"index", "mask"}, from a loader over a
        `data.IndexSource`) and `data` is the whole training set, replicated (`put_data`);
        the step gathers its rows from it (`steps.gather_batch`).
        """
        raise NotImplementedError

    def put_data(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The whole training set on every device of the mesh, for `data_on_device`."""
        raise NotImplementedError

    def put_stacked(self, batches: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """K stacked global batches (K, B, ...) -> device arrays, each batch split as
        `put_batch` splits one."""
        raise NotImplementedError

    def stacked_batch_spec(self, example, batch_size: int, k: int) -> dict:
        """`batch_spec` of what `put_stacked` makes from K stacked batches."""
        raise NotImplementedError

    def compile_eval(self, loss_fn, state_shardings=None):
        raise NotImplementedError


class JitStrategy(Strategy):
    """`jax.jit` on a Mesh: global arrays, batch split along "data", params replicated."""

    name = "jit"

    def _available_devices(self) -> list:
        return list(jax.devices())

    def host_feed(self, stacked: bool = False):
        """With one process on CPU devices the batch stays a dict of numpy arrays, and the
        compiled step's own argument handling places it by its input sharding.

        On CPU "device" memory is host memory, so there is no copy to overlap, and
        `jax.device_put` in Python costs ~120-140 us per batch against ~0-15 us inside the
        call (measured on the digits MLP, 2 CPU cores): 10-15% of a small model's step.
        (pmap keeps its `put_batch`: it reshapes the batch per device.)
        """
        if self.platform == "cpu" and self.process_count == 1:
            return _as_numpy
        return super().host_feed(stacked)

    def prefetch_depth(self, requested: int, stacked: bool = False) -> int:
        """Auto (-1) is 0 on CPU with one process and unstacked batches: nothing is copied to
        a device, so the thread has only the loader's ~7 us per batch to hide, and its
        hand-off cost more. The bench MLP (`benchmarks.mlp_breakdown`'s `fit`), 4 alternating
        rounds, medians: 2076 vs 1934 steps/s without checkpoints, 1886 vs 1796 with them.
        Stacked batches (K steps per call) keep the thread: the stacking is worth overlapping
        (2399 vs 2428 and 2098 vs 2221 steps/s without it, K=50). The CNN: 46.4 vs 45.8,
        within noise."""
        if requested == -1 and not stacked and self.host_feed() is _as_numpy:
            return 0
        return super().prefetch_depth(requested, stacked)

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(DATA_AXIS))

    def put_batch(self, batch):
        """This process's rows (b_local, ...) -> global arrays (B, ...) split along "data"."""
        sharding = self.batch_sharding
        if jax.process_count() == 1:
            # One process holds the whole batch: a single device_put of the dict is the same
            # global array at about half the per-step host cost (measured on 2 CPU cores).
            return jax.device_put({k: np.asarray(v) for k, v in batch.items()}, sharding)
        return {
            k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()
        }

    def batch_spec(self, example, batch_size):
        return {
            k: jax.ShapeDtypeStruct(
                (batch_size,) + np.shape(v)[1:], np.asarray(v).dtype, sharding=self.batch_sharding
            )
            for k, v in example.items()
        }

    @property
    def stacked_batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(None, DATA_AXIS))

    def put_stacked(self, batches):
        sharding = self.stacked_batch_sharding
        if jax.process_count() == 1:
            return jax.device_put({k: np.asarray(v) for k, v in batches.items()}, sharding)
        return {
            k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batches.items()
        }

    def stacked_batch_spec(self, example, batch_size, k):
        return {
            key: jax.ShapeDtypeStruct(
                (k, batch_size) + np.shape(v)[1:],
                np.asarray(v).dtype,
                sharding=self.stacked_batch_sharding,
            )
            for key, v in example.items()
        }

    def compile_train(
        self,
        loss_fn,
        state_shardings=None,
        steps_per_dispatch=1,
        scan_unroll=1,
        data_on_device=False,
        **step_options,
    ):
        """`(state, acc, batch) -> (state, acc)`: one program with the step and the metric sum.

        `state` and `acc` are donated: their buffers are reused for the outputs.
        `grad_accum_steps` is passed to `steps.train_step`. With `steps_per_dispatch` K > 1
        the batch is K stacked batches and the program runs K steps (`dispatch.scan_steps`).
        With `data_on_device`, `(state, acc, batch, data)`: see `Strategy.compile_train`.
        """

        def train_and_accumulate(state, acc, batch, data=None):
            self._count("train")
            if data is not None:
                batch = steps.gather_batch(data, batch)
            if steps_per_dispatch > 1:
                return dispatch.scan_steps(
                    state, acc, batch, loss_fn=loss_fn, unroll=scan_unroll, **step_options
                )
            state, metrics = steps.train_step(state, batch, loss_fn=loss_fn, **step_options)
            return state, metrics_lib.merge(acc, metrics)

        state_sh = self.replicated if state_shardings is None else state_shardings
        batch_sh = self.batch_sharding if steps_per_dispatch == 1 else self.stacked_batch_sharding
        in_shardings = (state_sh, self.replicated, batch_sh)
        if data_on_device:
            in_shardings += (self.replicated,)
        return jax.jit(
            train_and_accumulate,
            in_shardings=in_shardings,
            out_shardings=(state_sh, self.replicated),
            donate_argnums=(0, 1),
            compiler_options=self.compiler_options or None,
        )

    def put_data(self, arrays):
        """The arrays replicated on the mesh, one `device_put` (one process only)."""
        if self.process_count > 1:
            raise ValueError(
                "data.on_device: expected one process (each would need the whole training "
                f"set), got {self.process_count}"
            )
        return jax.device_put({k: np.asarray(v) for k, v in arrays.items()}, self.replicated)

    def compile_eval(self, loss_fn, state_shardings=None):
        """`(state, acc, batch) -> acc`; only `acc` is donated."""

        def eval_and_accumulate(state, acc, batch):
            self._count("eval")
            return metrics_lib.merge(acc, steps.eval_step(state, batch, loss_fn=loss_fn))

        state_sh = self.replicated if state_shardings is None else state_shardings
        return jax.jit(
            eval_and_accumulate,
            in_shardings=(state_sh, self.replicated, self.batch_sharding),
            out_shardings=self.replicated,
            donate_argnums=(1,),
            compiler_options=self.compiler_options or None,
        )


class PmapStrategy(Strategy):
    """`jax.pmap` over this process's devices with `axis_name="data"` and explicit psums."""

    name = "pmap"

    def __init__(self, num_devices: int = 0, sync_every_step: str = "auto", **kwargs):
        if kwargs.get("param_sharding", "replicated") != "replicated":
            raise ValueError(
                f"parallel.param_sharding={kwargs['param_sharding']}: pmap keeps a full replica "
                "of the state on every device; expected parallel.param_sharding=replicated with "
                "parallel.strategy=pmap, or use parallel.strategy=jit for fsdp"
            )
        if jax.process_count() > 1:
            # The mesh here is this process's devices only; a multi-host mesh needs jit.
            raise ValueError(
                "parallel.strategy: expected jit with several processes (pmap here maps over "
                f"one process's devices), got pmap with {jax.process_count()} processes"
            )
        super().__init__(num_devices, sync_every_step, **kwargs)

    def _available_devices(self) -> list:
        return list(jax.local_devices())

    def put_batch(self, batch):
        """This process's rows (b_local, ...) -> (n_devices, b_local / n_local, ...) arrays."""
        n = self.num_devices // self.process_count
        sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            v = v.reshape((n, v.shape[0] // n) + v.shape[1:])  # (n_local, B/n, ...)
            out[k] = jax.make_array_from_process_local_data(sharding, v)
        return out

    def batch_spec(self, example, batch_size):
        n = self.num_devices
        sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        return {
            k: jax.ShapeDtypeStruct(
                (n, batch_size // n) + np.shape(v)[1:], np.asarray(v).dtype, sharding=sharding
            )
            for k, v in example.items()
        }

    def _pmap(self, fun, donate_argnums):
        return jax.pmap(
            fun,
            axis_name=DATA_AXIS,
            in_axes=(None, None, 0),
            out_axes=None,
            devices=self.devices,
            donate_argnums=donate_argnums,
        )

    def put_stacked(self, batches):
        """(K, b_local, ...) -> (n_devices, K, b_local / n_local, ...) arrays."""
        n = self.num_devices // self.process_count
        sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        out = {}
        for key, v in batches.items():
            v = np.asarray(v)
            k, b = v.shape[:2]
            v = v.reshape((k, n, b // n) + v.shape[2:]).swapaxes(0, 1)  # (n, K, B/n, ...)
            out[key] = jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(v))
        return out

    def stacked_batch_spec(self, example, batch_size, k):
        n = self.num_devices
        sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        return {
            key: jax.ShapeDtypeStruct(
                (n, k, batch_size // n) + np.shape(v)[1:], np.asarray(v).dtype, sharding=sharding
            )
            for key, v in example.items()
        }

    def compile_train(
        self,
        loss_fn,
        state_shardings=None,
        steps_per_dispatch=1,
        scan_unroll=1,
        data_on_device=False,
        **step_options,
    ):
        """`(state, acc, batch) -> (state, acc)`, pmapped; `state` and `acc` are donated.

        With `steps_per_dispatch` K > 1 each device gets (K, B/n, ...) and scans K steps.
        `data_on_device` is not supported (a ValueError): use the jit strategy."""
        if data_on_device:
            raise ValueError(
                "data.on_device: expected parallel.strategy=jit (pmap feeds each device its "
                "rows from the host), got parallel.strategy=pmap"
            )
        if state_shardings is not None and any(
            s != self.replicated for s in jax.tree.leaves(state_shardings)
        ):
            raise ValueError("parallel.strategy=pmap: expected a replicated state")

        def train_and_accumulate(state, acc, batch):
            self._count("train")
            if steps_per_dispatch > 1:
                return dispatch.scan_steps(
                    state,
                    acc,
                    batch,
                    loss_fn=loss_fn,
                    axis_name=DATA_AXIS,
                    unroll=scan_unroll,
                    **step_options,
                )
            state, metrics = steps.train_step(
                state, batch, loss_fn=loss_fn, axis_name=DATA_AXIS, **step_options
            )
            return state, metrics_lib.merge(acc, metrics)

        return self._pmap(train_and_accumulate, donate_argnums=(0, 1))

    def compile_eval(self, loss_fn, state_shardings=None):
        def eval_and_accumulate(state, acc, batch):
            self._count("eval")
            metrics = steps.eval_step(state, batch, loss_fn=loss_fn, axis_name=DATA_AXIS)
            return metrics_lib.merge(acc, metrics)

        return self._pmap(eval_and_accumulate, donate_argnums=(1,))


def _as_numpy(batch: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in batch.items()}


def make_strategy(
    name: str = "jit",
    num_devices: int = 0,
    sync_every_step="auto",
    param_sharding: str = "replicated",
    fsdp_min_size: int = 1024,
    compiler_options: dict[str, str] | None = None,
) -> Strategy:
    """Builds the strategy `name` ("jit" or "pmap") over `num_devices` devices (0 = all).

    `param_sharding` ("replicated" or "fsdp", jit only) and `fsdp_min_size` choose how the
    state is placed; see `fsdp_spec`. `compiler_options` go to the `jit` strategy's train and
    eval steps on CPU devices (see `cpu_compiler_options`).
    """
    kwargs = {
        "param_sharding": param_sharding,
        "fsdp_min_size": fsdp_min_size,
        "compiler_options": compiler_options,
    }
    if name == "jit":
        return JitStrategy(num_devices, sync_every_step, **kwargs)
    if name == "pmap":
        return PmapStrategy(num_devices, sync_every_step, **kwargs)
    raise ValueError(f"parallel.strategy: expected one of {list(STRATEGIES)}, got {name!r}")
