"""Async saves written by Orbax in a helper process (CPU backend, one process).

    if writer.usable(directory):
        w = writer.ProcessWriter()
        payload = writer.encode(state)          # None: this state needs the in-process path
        w.save(step_dir, payload, data_position=12, config=cfg, data_state=None, metrics={})
        w.wait_until_finished()                 # raises the save's error, once
        w.close()

Why a process: an async Orbax save is mostly Python (event loops, threads, futures and
metadata, see docs/performance.md "Async saves in a writer process"), and in the training
process that Python holds the GIL that the loop needs to dispatch the next step. On an
accelerator the device computes while the host does that work; on the CPU backend the host *is*
the device, and a save every few hundred steps of a small model costs a large share of the
steps. A thread does not help (it shares the GIL); a second process does.

What stays the same: the child runs the very code of the in-process path (`store.make_saver`
and `store.save`, sync), with dlkit's manifest hook, on `jax.Array`s rebuilt with the shardings
the parent's leaves had, so the step directory holds the same files with the same metadata
(tests/test_checkpoint_writer.py compares them). Orbax's `serialize_tree` turns the state into
plain dicts and lists first: the form Orbax itself saves, which pickles whatever the user's
pytree classes are.

What the parent does per save: waits for the state (`np.asarray` of each leaf, zero-copy on
the CPU backend) and queues the job; a thread sends it down a pipe (the write releases the GIL).
The arrays handed over are views of the state's buffers: the next step donates those buffers,
and XLA then writes its outputs elsewhere while a view holds them, so the saved values stay
intact until the child has read them.

The child is one per training process, started at the first save that uses it and reused by
every Checkpointer after that. It dies with its parent (Linux `PR_SET_PDEATHSIG`, and end of
input otherwise): a SIGKILLed run leaves at most an uncommitted temporary directory, exactly as
an in-process async save does, which the next Checkpointer cleans.
"""

from __future__ import annotations

import os
import pickle
import queue
import shutil
import signal
import struct
import subprocess
import sys
import threading
import traceback
from typing import Any

import jax
import numpy as np

_HEADER = struct.Struct("<QI")  # pickle bytes, number of out-of-band buffers
_LENGTH = struct.Struct("<Q")
_PARENT_ENV = "DLKIT_CHECKPOINT_WRITER_PARENT"


def usable(directory) -> bool:
    """Whether async saves to `directory` go to the writer process: the CPU backend, one JAX
    process, and a local or mounted directory (object stores keep Orbax's in-process path)."""
    from dlkit import storage

    return (
        jax.default_backend() == "cpu"
        and jax.process_count() == 1
        and not storage.is_object_store(directory)
        and sys.platform.startswith("linux")
    )


# ---- the state, as the child rebuilds it -----------------------------------------------------


class _ArrayLeaf:
    """A `jax.Array` leaf in transit: its values (the whole array, a numpy view where the
    backend allows) and how to rebuild its sharding in the child."""

    __slots__ = ("sharding", "value")

    def __init__(self, value: np.ndarray, sharding: tuple):
        self.value = value
        self.sharding = sharding


def _describe_sharding(sharding) -> tuple | None:
    """A picklable description of a sharding the child can rebuild exactly, or None."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        mesh = sharding.mesh
        if not isinstance(mesh, jax.sharding.Mesh):
            return None
        ids = np.vectorize(lambda d: d.id, otypes=[np.int64])(mesh.devices)
        axis_types = tuple(getattr(mesh, "axis_types", ()) or ())
        names = tuple(mesh.axis_names)
        return ("named", ids, names, axis_types, sharding.spec, sharding.memory_kind)
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        (device,) = sharding.device_set
        return ("single", device.id, sharding.memory_kind)
    return None


def encode(state) -> Any | None:
    """`state` in the form the child saves: Orbax's `serialize_tree` of it (dicts and lists,
    empty nodes kept), with each `jax.Array` as an `_ArrayLeaf`. Blocks until the state is
    computed. None when a leaf cannot be rebuilt exactly in the child (a sharding it cannot
    describe, a typed PRNG key, an array not fully on this process): that save takes Orbax's
    in-process path instead."""
    from orbax.checkpoint._src.tree import utils as tree_utils

    tree = tree_utils.serialize_tree(state, keep_empty_nodes=True)
    leaves, treedef = jax.tree.flatten(tree, is_leaf=tree_utils.is_empty_or_leaf)
    out = []
    for leaf in leaves:
        if isinstance(leaf, jax.Array):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                return None
            if not leaf.is_fully_addressable:
                return None
            sharding = _describe_sharding(leaf.sharding)
            if sharding is None:
                return None
            out.append(_ArrayLeaf(np.asarray(leaf), sharding))
        else:
            out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def _rebuild_sharding(desc: tuple):
    by_id = {d.id: d for d in jax.devices()}
    if desc[0] == "named":
        _, ids, axis_names, axis_types, spec, memory_kind = desc
        devices = np.vectorize(lambda i: by_id[int(i)], otypes=[object])(ids)
        kwargs = {"axis_types": axis_types} if axis_types else {}
        mesh = jax.sharding.Mesh(devices, axis_names, **kwargs)
        return jax.sharding.NamedSharding(mesh, spec, memory_kind=memory_kind)
    _, device_id, memory_kind = desc
    return jax.sharding.SingleDeviceSharding(by_id[device_id], memory_kind=memory_kind)


def _decode(tree):
    def rebuild(leaf):
        if not isinstance(leaf, _ArrayLeaf):
            return leaf
        value = leaf.value
        sharding = _rebuild_sharding(leaf.sharding)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(rebuild, tree, is_leaf=lambda x: isinstance(x, _ArrayLeaf))


# ---- framing: pickle protocol 5, arrays sent out of band --------------------------------------


def _frame(obj) -> list:
    """`obj` as the pieces `_write_frame` sends: a header, the pickle, the raw arrays."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    views = [b.raw() for b in buffers]
    header = _HEADER.pack(len(data), len(views)) + b"".join(_LENGTH.pack(v.nbytes) for v in views)
    return [header, data, *views]


def _write_frame(stream, pieces: list) -> None:
    for piece in pieces:
        stream.write(piece)
    stream.flush()


def _send(stream, obj) -> None:
    _write_frame(stream, _frame(obj))


def _read_exactly(stream, n: int) -> bytearray:
    out = bytearray(n)
    view = memoryview(out)
    got = 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            raise EOFError("the checkpoint writer's pipe closed")
        got += k
    return out


def _recv(stream):
    size, count = _HEADER.unpack(_read_exactly(stream, _HEADER.size))
    lengths = [_LENGTH.unpack_from(_read_exactly(stream, _LENGTH.size))[0] for _ in range(count)]
    data = _read_exactly(stream, size)
    buffers = [_read_exactly(stream, n) for n in lengths]
    return pickle.loads(data, buffers=buffers)


# ---- the parent's side ------------------------------------------------------------------------


class _Job:
    __slots__ = ("done", "error", "request")

    def __init__(self, request: dict):
        self.request = request
        self.done = threading.Event()
        self.error: str | None = None


class _Child:
    """The writer process and the thread that feeds it, one per training process. The thread
    starts the process, so that Linux ties the child's life to a thread that lives as long as
    the parent (`PR_SET_PDEATHSIG` fires when the thread that forked it exits)."""

    def __init__(self):
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="dlkit-ckpt-writer", daemon=True)
        self._thread.start()

    def submit(self, request: dict) -> _Job:
        job = _Job(request)
        self._jobs.put(job)
        return job

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        env[_PARENT_ENV] = str(os.getpid())
        env["JAX_PLATFORMS"] = "cpu"
        env["JAX_ENABLE_X64"] = "1" if jax.config.jax_enable_x64 else "0"
        # A session of its own: Ctrl-C in a terminal (SIGINT to the foreground group) or a
        # notebook's interrupt must reach only the training process, which then saves.
        return subprocess.Popen(
            [sys.executable, "-c", "from dlkit.checkpoint import writer; writer._serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )

    def _run(self) -> None:
        proc = None
        while True:
            job = self._jobs.get()
            if job is None:
                break
            try:
                message = _frame(job.request)
            except Exception as e:  # noqa: BLE001 - e.g. a config value that does not pickle
                job.error = f"{type(e).__name__}: {e} (sending the save to the writer process)"
            else:
                try:
                    if proc is None or proc.poll() is not None:
                        proc = self._start()
                    _write_frame(proc.stdin, message)
                    job.error = _recv(proc.stdout).get("error")
                except Exception as e:  # noqa: BLE001 - the pipe broke, or a garbled reply:
                    # this child is done for, and the next save starts a new one
                    code = proc.poll() if proc is not None else None
                    state = f"exited with code {code}" if code is not None else "stopped answering"
                    job.error = f"{type(e).__name__}: {e} (the checkpoint writer process {state})"
                    if proc is not None and proc.poll() is None:
                        proc.kill()
                    proc = None
            job.request = None  # frees the arrays
            job.done.set()
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()
                proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=60)


_CHILD: _Child | None = None
_CHILD_LOCK = threading.Lock()


def _child() -> _Child:
    global _CHILD
    with _CHILD_LOCK:
        if _CHILD is None:
            _CHILD = _Child()
        return _CHILD


class ProcessWriter:
    """One Checkpointer's async saves through the shared writer process: the same calls as
    Orbax's AsyncCheckpointer where the Checkpointer uses them."""

    def __init__(self):
        self._job: _Job | None = None
        self._removals: list[_Job] = []

    def save(
        self,
        step_dir,
        payload,
        *,
        data_position: int,
        config: dict,
        data_state,
        metrics: dict,
        parallel_manifest: bool = False,
    ) -> None:
        """Queues one step (`payload` from `encode`); returns at once."""
        self._job = _child().submit(
            {
                "step_dir": os.fspath(step_dir),
                "state": payload,
                "data_position": int(data_position),
                "config": config,
                "data_state": data_state,
                "metrics": metrics,
                "parallel_manifest": parallel_manifest,
            }
        )

    def remove(self, path) -> None:
        """Queues the removal of a directory (a step retention took out of the listing)."""
        self._removals = [job for job in self._removals if not job.done.is_set()]
        self._removals.append(_child().submit({"rmtree": os.fspath(path)}))

    def wait_removed(self) -> None:
        """Blocks until every queued removal is done (a failed one leaves files in `.trash/`,
        which the next Checkpointer on the directory removes)."""
        for job in self._removals:
            job.done.wait()
        self._removals = []

    def check_for_errors(self) -> None:
        """Raises the finished save's error, if any: a RuntimeError whose message starts with
        the type and message of the error in the writer (e.g. "OSError: [Errno 28] ...")."""
        job = self._job
        if job is not None and job.done.is_set() and job.error is not None:
            self._job = None
            raise RuntimeError(job.error)

    def wait_until_finished(self) -> None:
        """Blocks until the queued save is committed; raises its error once."""
        if self._job is None:
            return
        self._job.done.wait()
        self.check_for_errors()
        self._job = None

    def close(self) -> None:
        self.wait_until_finished()


def stop() -> None:
    """Lets the writer process finish the saves queued and end (`exit_hook` calls it after
    closing every Checkpointer). A later save starts a new one."""
    global _CHILD
    with _CHILD_LOCK:
        child, _CHILD = _CHILD, None
    if child is not None:
        child.stop()


def _forget_after_fork() -> None:
    # A forked child inherits `_CHILD` but not its thread: it would queue saves nobody sends.
    global _CHILD, _CHILD_LOCK
    _CHILD, _CHILD_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere `usable` is False anyway
    os.register_at_fork(after_in_child=_forget_after_fork)


# ---- the child's side -------------------------------------------------------------------------


def _die_with_parent() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != int(os.environ.get(_PARENT_ENV, os.getppid())):
        os._exit(0)  # the parent died before the line above took effect


def _serve() -> None:
    """The writer process: reads save requests from stdin, answers on the original stdout."""
    # The training process decides when to stop (it saves on SIGINT and SIGTERM, and a
    # scheduler may signal every process of a job): the writer ends when its input does, or
    # with its parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    # The lowest priority short of SCHED_IDLE (which an unprivileged process cannot leave):
    # the write takes the cores only while training leaves them idle, and a save the loop
    # waits for still runs at once, since the waiting loop leaves them idle.
    os.nice(19)
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints (Orbax, absl) go to stderr, not into the replies

    from etils import epath

    from dlkit.checkpoint import commit, store

    savers: dict[bool, Any] = {}
    current: dict[str, Any] = {}

    def before_publish(tmp_dir, final_dir) -> None:
        commit.write_manifest(
            tmp_dir, int(final_dir.name), current["metrics"], parallel=current["parallel"]
        )

    while True:
        try:
            request = _recv(requests)
        except EOFError:
            break
        if "rmtree" in request:
            shutil.rmtree(request["rmtree"], ignore_errors=True)
            _send(replies, {"error": None})
            continue
        try:
            grain = request["data_state"] is not None
            if grain not in savers:
                savers[grain] = store.make_saver(
                    async_save=False, on_commit=before_publish, grain=grain
                )
            current["metrics"] = request["metrics"]
            current["parallel"] = request["parallel_manifest"]
            store.save(
                savers[grain],
                epath.Path(request["step_dir"]),
                _decode(request["state"]),
                data_position=request["data_position"],
                config=request["config"],
                data_state=request["data_state"],
            )
            reply = {"error": None}
        except Exception as e:  # noqa: BLE001 - every failure goes back to the parent's wait()
            reply = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        del request
        _send(replies, reply)
    for saver in savers.values():
        saver.close()
