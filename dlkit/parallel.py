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

CPU caveat: with several (simulated) CPU devices, queuing many programs that contain
collectives can deadlock XLA:CPU (seen within 20-100 dispatches on 2-core machines with JAX
0.10.2; XLA aborts later with a rendezvous timeout). `sync_every_step` waits for each step
before dispatching the next; "auto" turns it on exactly there (CPU platform, > 1 device), where
it costs little because CPU steps do not overlap with the host anyway.
"""

import collections
import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dlkit import metrics as metrics_lib
from dlkit import steps

STRATEGIES = ("jit", "pmap")
DATA_AXIS = "data"


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
      trace_counts: how many times each compiled function was traced ("train", "eval"); a
        count above 1 means a recompilation.
    """

    name = "base"

    def __init__(self, num_devices: int = 0, sync_every_step: str = "auto"):
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
        self.trace_counts: collections.Counter = collections.Counter()

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
        """A sharding per leaf of the state: replicated over the mesh (data parallelism)."""
        return jax.tree.map(lambda _: self.replicated, abstract_state)

    def check_batch_size(self, batch_size: int, what: str = "train.batch_size") -> None:
        """Raises unless the global batch splits evenly over devices and processes."""
        n = self.num_devices
        if batch_size <= 0 or batch_size % n or batch_size % self.process_count:
            raise ValueError(
                f"{what}: expected a positive multiple of the device count {n} "
                f"({self.name} strategy on {n} {self.platform} device(s)), got {batch_size}"
            )

    def zeros(self, abstract_metrics):
        """A fresh zero accumulator for metrics shaped like `abstract_metrics`, replicated."""
        return jax.jit(
            functools.partial(metrics_lib.zeros_like, abstract_metrics),
            out_shardings=self.replicated,
        )()

    def _count(self, name: str):
        self.trace_counts[name] += 1

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        raise NotImplementedError

    def compile_train(self, loss_fn, state_shardings=None, **step_options):
        """Options (e.g. loss_spike_factor) are passed to `steps.train_step` as static."""
        raise NotImplementedError

    def compile_eval(self, loss_fn, state_shardings=None):
        raise NotImplementedError


class JitStrategy(Strategy):
    """`jax.jit` on a Mesh: global arrays, batch split along "data", params replicated."""

    name = "jit"

    def _available_devices(self) -> list:
        return list(jax.devices())

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(DATA_AXIS))

    def put_batch(self, batch):
        """This process's rows (b_local, ...) -> global arrays (B, ...) split along "data"."""
        sharding = self.batch_sharding
        return {
            k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()
        }

    def compile_train(self, loss_fn, state_shardings=None, **step_options):
        """`(state, acc, batch) -> (state, acc)`: one program with the step and the metric sum.

        `state` and `acc` are donated: their buffers are reused for the outputs.
        """

        def train_and_accumulate(state, acc, batch):
            self._count("train")
            state, metrics = steps.train_step(state, batch, loss_fn=loss_fn, **step_options)
            return state, metrics_lib.merge(acc, metrics)

        state_sh = self.replicated if state_shardings is None else state_shardings
        return jax.jit(
            train_and_accumulate,
            in_shardings=(state_sh, self.replicated, self.batch_sharding),
            out_shardings=(state_sh, self.replicated),
            donate_argnums=(0, 1),
        )

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
        )


class PmapStrategy(Strategy):
    """`jax.pmap` over this process's devices with `axis_name="data"` and explicit psums."""

    name = "pmap"

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

    def _pmap(self, fun, donate_argnums):
        return jax.pmap(
            fun,
            axis_name=DATA_AXIS,
            in_axes=(None, None, 0),
            out_axes=None,
            devices=self.devices,
            donate_argnums=donate_argnums,
        )

    def compile_train(self, loss_fn, state_shardings=None, **step_options):
        """`(state, acc, batch) -> (state, acc)`, pmapped; `state` and `acc` are donated."""
        if state_shardings is not None and any(
            s != self.replicated for s in jax.tree.leaves(state_shardings)
        ):
            raise ValueError("parallel.strategy=pmap: expected a replicated state")

        def train_and_accumulate(state, acc, batch):
            self._count("train")
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


def make_strategy(name: str = "jit", num_devices: int = 0, sync_every_step="auto") -> Strategy:
    """Builds the strategy `name` ("jit" or "pmap") over `num_devices` devices (0 = all)."""
    if name == "jit":
        return JitStrategy(num_devices, sync_every_step)
    if name == "pmap":
        return PmapStrategy(num_devices, sync_every_step)
    raise ValueError(f"parallel.strategy: expected one of {list(STRATEGIES)}, got {name!r}")
