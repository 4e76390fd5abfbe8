"""Multi-host start-up on JAX's own runtime (`jax.distributed`), and barriers with timeouts.

    import dlkit
    dlkit.distributed.initialize("10.0.0.1:1234", num_processes=4, process_id=rank)  # explicit
    dlkit.distributed.initialize()      # SLURM, Open MPI, Kubernetes (JobSet), Cloud TPU: detected
    dlkit.distributed.barrier("after_init", timeout_s=300)

dlkit has no launcher of its own: every process runs the same `dlkit train ...` and
`jax.distributed.initialize` connects them (process 0 hosts the coordination service). It must
run before anything touches devices, because the first device query fixes the set of devices
JAX sees; `initialize` checks this and says so instead of silently training on one host.

`barrier(name, timeout_s)` waits for every process at a named point. On timeout it raises
`BarrierTimeoutError` naming the processes that did not arrive: each process records its
arrival in the coordination service's key-value store before waiting, so the ones that timed
out can read who came.
"""

import collections
import logging
import os

import jax
import jax._src.clusters as jax_clusters  # ClusterEnv: the environments JAX detects
import jax._src.distributed as jax_distributed  # global_state.client: barriers, key-value store
from jax._src.lib import _jax

DEFAULT_BARRIER_TIMEOUT_S = 600.0

_barrier_uses: collections.Counter = collections.Counter()
_log = logging.getLogger(__name__)


class BarrierTimeoutError(RuntimeError):
    """Some process did not reach a barrier in time; `missing` lists their process ids."""

    def __init__(self, message: str, missing: list[int]):
        super().__init__(message)
        self.missing = missing


def detected_cluster() -> str | None:
    """The name of the cluster environment `jax.distributed.initialize()` would detect, or None.

    E.g. "SlurmCluster" inside an `srun` step, "OmpiCluster" under `mpirun`, "GkeTpuCluster" or
    "GceTpuCluster" on a Cloud TPU VM slice, "K8sCluster" in a Kubernetes JobSet pod.
    """
    for env in jax_clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method:
            continue  # mpi4py detection is opt-in in JAX too
        try:
            if env.is_env_present():
                return env.__name__
        except Exception:  # a detector probing an absent metadata server, etc.
            continue
    return None


def is_initialized() -> bool:
    """Whether `jax.distributed` is running in this process."""
    return jax_distributed.global_state.client is not None


def is_main_process() -> bool:
    """True in process 0, the one that writes logs, metrics and progress."""
    return jax.process_index() == 0


def _devices_already_used() -> bool:
    # jax.distributed must start before the backends exist; after that it cannot join them.
    from jax._src import xla_bridge

    return bool(xla_bridge._backends)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout_s: int = 300,
) -> bool:
    """Starts the multi-controller runtime, if this is a multi-process job.

    With `coordinator_address`, `num_processes` and `process_id` all given, connects to
    that job. With none given, calls `jax.distributed.initialize()` only where JAX detects a
    cluster (see `detected_cluster`); on a laptop or a single machine it does nothing.

    Args:
      coordinator_address: "HOST:PORT" of process 0, reachable by every process.
      num_processes: the number of processes in the job.
      process_id: this process's id in [0, num_processes).
      initialization_timeout_s: how long to wait for every process to connect.
    Returns:
      True if the distributed runtime is running (now or already), False if not started.
    Raises:
      ValueError: only some of the three arguments given, or inconsistent values.
      RuntimeError: devices were already used in this process (too late to start).
    """
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if is_initialized():
        return True
    if any(v is not None for v in given.values()) and any(v is None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        raise ValueError(
            f"distributed: expected coordinator_address, num_processes and process_id together "
            f"(or none, to detect the cluster), got none for {missing}"
        )
    explicit = coordinator_address is not None
    if explicit:
        if ":" not in coordinator_address:
            raise ValueError(
                f"coordinator_address: expected HOST:PORT, got {coordinator_address!r}"
            )
        if num_processes < 1:
            raise ValueError(f"num_processes: expected an int >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"process_id: expected an int in [0, {num_processes}), got {process_id}"
            )
    cluster = None if explicit else detected_cluster()
    if not explicit and cluster is None:
        return False
    if _devices_already_used():
        raise RuntimeError(
            "distributed: jax.distributed must start before anything uses the devices, but "
            "this process already created its JAX backends. Call dlkit.distributed.initialize() "
            "first (the `dlkit train` command does)."
        )
    _log.info("starting jax.distributed (%s)", cluster or coordinator_address)
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        initialization_timeout=initialization_timeout_s,
    )
    return True


def barrier(name: str, timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S) -> None:
    """Waits until every process reaches the barrier `name` (a no-op in one process).

    Args:
      name: the barrier's name; every process must use the same sequence of names.
      timeout_s: seconds to wait for the others.
    Raises:
      BarrierTimeoutError: a process did not arrive within `timeout_s`; the message and
        `.missing` name it (them).
    """
    client = jax_distributed.global_state.client
    if client is None or jax.process_count() == 1:
        return
    _barrier_uses[name] += 1
    barrier_id = f"dlkit/{name}/{_barrier_uses[name]}"
    me, n = jax.process_index(), jax.process_count()
    client.key_value_set(f"{barrier_id}/arrived/{me}", "1", allow_overwrite=True)
    try:
        client.wait_at_barrier(barrier_id, int(timeout_s * 1000))
    except _jax.JaxRuntimeError as e:
        try:
            arrived = {
                int(key.rsplit("/", 1)[1])
                for key, _ in client.key_value_dir_get(f"{barrier_id}/arrived/")
            }
        except _jax.JaxRuntimeError:
            arrived = {me}
        missing = sorted(set(range(n)) - arrived)
        raise BarrierTimeoutError(
            f"barrier {name!r}: process(es) {missing} of {n} did not arrive within "
            f"{timeout_s:g} s (this is process {me}; arrived: {sorted(arrived)}). "
            f"Look at the log of process {missing[0] if missing else '?'} for its error.",
            missing,
        ) from e


def env_process_info() -> dict[str, int | str]:
    """This process's place in the job: {"process_index", "process_count", "local_devices",
    "global_devices", "host"} (for logs and run reports)."""
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "host": os.uname().nodename,
    }
