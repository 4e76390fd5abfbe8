"""Where arrays live and how the step is compiled: the `jit` and `pmap` strategies.

    strategy = dlkit.parallel.make_strategy("jit")          # all devices, data parallel
    state = create_train_state(..., shardings=strategy.state_shardings)
    step = step_wrappers.make_train_step(loss_fn, axis_name=strategy.axis_name)
    train = strategy.compile_train(step_wrappers.accumulating(step))
    state, acc = train(state, acc, strategy.put_batch(numpy_batch))   # (state, acc) out

The strategy never builds a step: it is given one, and decides only where the arguments live
and how the function is compiled.

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

XLA:CPU options (`dlkit.xla_cpu`): the `jit` strategy compiles its train and eval steps with
the options the config asks for (`train.xla_cpu_ynn_fusions`) on CPU devices only; `jax.pmap`
takes no compiler options, so the `pmap` strategy compiles with XLA's defaults.

CPU caveat: with several (simulated) CPU devices, queuing many programs that contain
collectives can deadlock XLA:CPU (XLA aborts later with a rendezvous timeout; see
docs/performance.md). `sync_every_step` waits for each step before dispatching the next;
"auto" turns it on exactly there (CPU platform, > 1 device), where it costs little because CPU
steps do not overlap with the host anyway.
"""

import collections
import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dlkit import metrics as metrics_lib
from dlkit import xla_cpu
from dlkit.data import prefetch as prefetch_batches

STRATEGIES = ("jit", "pmap")
PARAM_SHARDINGS = ("replicated", "fsdp")
DATA_AXIS = "data"


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
      axis_name: the mapped axis the step must reduce over ("data" under pmap), or None
        (jit: global arrays).
      compiler_options: XLA options of the train and eval steps: {} unless this is the `jit`
        strategy on CPU devices (see `dlkit.xla_cpu`).
      trace_counts: how many times each compiled function was traced ("train", "eval"); a
        count above 1 means a recompilation.
    """

    name = "base"
    axis_name: str | None = None

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
        # XLA:CPU options (`dlkit.xla_cpu`); other platforms compile with their defaults,
        # and so does pmap, which takes no compiler options.
        self.compiler_options = (
            xla_cpu.usable_compiler_options(compiler_options, self.platform)
            if self.name == "jit"
            else {}
        )
        local = [d for d in self.devices if d.process_index == jax.process_index()]
        if self.platform == "cpu" and jax.process_count() > 1 and len(local) > 1:
            if not self.sync_every_step:
                # Queued cross-process collectives deadlock in this layout (docs/performance.md).
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
        would cost one compilation per logged row.
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

    def compile_train(self, step_and_sum, state_shardings=None, stacked: bool = False):
        """Compiles `step_and_sum(state, acc, batch) -> (state, acc)` for this strategy.

        The function is given (see `dlkit.step_wrappers`): the strategy only decides where its
        arguments live and how it is compiled. `state` and `acc` are donated. `stacked` means
        the batch holds K stacked batches (leaves (K, B, ...), from `put_stacked`).
        """
        raise NotImplementedError

    def put_stacked(self, batches: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """K stacked global batches (K, B, ...) -> device arrays, each batch split as
        `put_batch` splits one."""
        raise NotImplementedError

    def stacked_batch_spec(self, example, batch_size: int, k: int) -> dict:
        """`batch_spec` of what `put_stacked` makes from K stacked batches."""
        raise NotImplementedError

    def compile_eval(self, eval_and_sum, state_shardings=None):
        """Compiles `eval_and_sum(state, acc, batch) -> acc`; only `acc` is donated."""
        raise NotImplementedError

    def _counted(self, fn, name: str):
        """`fn` that counts its traces under `name` in `trace_counts`."""

        @functools.wraps(fn)
        def counted(*args):
            self.trace_counts[name] += 1
            return fn(*args)

        return counted


class JitStrategy(Strategy):
    """`jax.jit` on a Mesh: global arrays, batch split along "data", params replicated."""

    name = "jit"
    axis_name = None  # global arrays: XLA inserts the reductions

    def _available_devices(self) -> list:
        return list(jax.devices())

    def host_feed(self, stacked: bool = False):
        """With one process on CPU devices the batch stays a dict of numpy arrays, and the
        compiled step's own argument handling places it by its input sharding.

        On CPU "device" memory is host memory, so there is no copy to overlap, and a
        `jax.device_put` from Python costs more per batch than the compiled call's own argument
        handling (docs/performance.md, "Feeding batches on CPU"). pmap keeps its `put_batch`:
        it reshapes the batch per device.
        """
        if self.platform == "cpu" and self.process_count == 1:
            return _as_numpy
        return super().host_feed(stacked)

    def prefetch_depth(self, requested: int, stacked: bool = False) -> int:
        """Auto (-1) is 0 on CPU with one process and unstacked batches: nothing is copied to
        a device, so a thread would hide only the loader's row gather, and its hand-off costs
        more than that. Stacked batches (K steps per call) keep the thread: stacking K batches
        is worth overlapping (docs/performance.md, "Prefetching on CPU")."""
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
            # global array at a fraction of the per-leaf host cost.
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

    def compile_train(self, step_and_sum, state_shardings=None, stacked=False):
        """`jax.jit` with the state's shardings, the batch split along "data" and the metric
        sums replicated; `state` and `acc` donated (their buffers hold the outputs)."""
        state_sh = self.replicated if state_shardings is None else state_shardings
        batch_sh = self.stacked_batch_sharding if stacked else self.batch_sharding
        return jax.jit(
            self._counted(step_and_sum, "train"),
            in_shardings=(state_sh, self.replicated, batch_sh),
            out_shardings=(state_sh, self.replicated),
            donate_argnums=(0, 1),
            compiler_options=self.compiler_options or None,
        )

    def compile_eval(self, eval_and_sum, state_shardings=None):
        state_sh = self.replicated if state_shardings is None else state_shardings
        return jax.jit(
            self._counted(eval_and_sum, "eval"),
            in_shardings=(state_sh, self.replicated, self.batch_sharding),
            out_shardings=self.replicated,
            donate_argnums=(1,),
            compiler_options=self.compiler_options or None,
        )


class PmapStrategy(Strategy):
    """`jax.pmap` over this process's devices with `axis_name="data"` and explicit psums."""

    name = "pmap"
    axis_name = DATA_AXIS  # the step reduces over the mapped axis explicitly

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

    def compile_train(self, step_and_sum, state_shardings=None, stacked=False):
        """`jax.pmap` over "data": each device gets its (B/n, ...) rows, or (K, B/n, ...) when
        `stacked`; the function must reduce over the axis itself (build it with
        `axis_name=strategy.axis_name`). `state` and `acc` are donated."""
        if state_shardings is not None and any(
            s != self.replicated for s in jax.tree.leaves(state_shardings)
        ):
            raise ValueError("parallel.strategy=pmap: expected a replicated state")
        return self._pmap(self._counted(step_and_sum, "train"), donate_argnums=(0, 1))

    def compile_eval(self, eval_and_sum, state_shardings=None):
        return self._pmap(self._counted(eval_and_sum, "eval"), donate_argnums=(1,))


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
    eval steps on CPU devices (see `dlkit.xla_cpu`).
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
