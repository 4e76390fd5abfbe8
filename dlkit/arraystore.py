"""The "state" item of a checkpoint: an Orbax handler that writes raw array bytes, paced.

This is the handler of the one item that holds the arrays, in place of Orbax's PyTree handler.
Orbax's CheckpointManager runs it for multi-process saves and for every restore; a
single-process save calls `take` and `write` from dlkit's own save thread (see
`dlkit.checkpoint`). Why (measured on 2 CPU cores, 100 MiB state; docs/performance.md):

- A synchronous save through Orbax's PyTree handler (OCDBT + tensorstore) took 67-74 ms
  against 42-63 ms for `np.save` + fsync of the same bytes, before dlkit's manifest read every
  file back for its checksums (17-18 ms more). This handler writes each process's shards into
  one file, preallocated with `fallocate`, its 8 MiB chunks on a thread per core with
  `os.pwrite`; it computes the manifest's CRC-32 of each chunk from memory as it writes it,
  so nothing is read back; and it fsyncs.
- An async save slowed the training steps it overlapped to 0.46-0.66x of their rate, and so
  did a separate process at nice 19 that only ran `np.save` + fsync of 100 MiB: writing at
  full speed takes the CPU and memory bandwidth a 2-core machine's steps need, whoever writes.
  What worked was writing less at a time: in 1 MiB pieces, sleeping after each so the writer
  is busy a share `s` of the time, the steps ran at 0.83x (s=0.2), 0.90x (0.1) and 0.93-0.94x
  (0.05). So an async save is *paced* (`write_share`); the save takes about 1/s times longer,
  in the background. Whoever needs the save finished (`Checkpointer.wait`, the next save,
  `close`, a preemption) calls `hurry()`, and the rest is written flat out.

Layout of the item directory (one pair per process, each written by that process alone):

    data.p<k>.bin     the bytes of the shards process k owns (replica 0 of each), C order
    index.p<k>.json   {"version": 1, "leaves": [{"key", "shape", "dtype"}...],
                       "pieces": [{"key", "index": [[start, stop], ...], "offset", "nbytes"}]}
    <name>.json       small JSON documents saved with the state by process 0 (`StateSave`'s
                      `extras`: dlkit's data position and config)

Restoring reads the index files of every process and builds each array with
`jax.make_array_from_callback` for the target sharding of the abstract state, reading only the
pieces each addressable shard overlaps: a state saved on 8 devices restores onto 1, and the
other way round. Item directories written by Orbax's PyTree handler (dlkit <= 0.1) have no
index file and are restored by that handler.
"""

import dataclasses
import json
import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import future as ocp_future

VERSION = 1
PIECE_BYTES = 1 << 20  # written (and paced) 1 MiB at a time
INDEX = "index.p{}.json"
DATA = "data.p{}.bin"


def _key_name(entry) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaf_key(path) -> tuple[str, ...]:
    return tuple(_key_name(e) for e in path)


@dataclasses.dataclass
class _Piece:
    key: tuple[str, ...]
    index: tuple[tuple[int, int], ...]  # [start, stop) per dimension, in the global array
    data: Any  # numpy (a CPU view, or a host copy) or, for sync saves on accelerators, a jax.Array


def _bounds(index: tuple, shape: tuple) -> tuple[tuple[int, int], ...]:
    return tuple(
        (0 if s.start is None else s.start, n if s.stop is None else s.stop)
        for s, n in zip(index, shape, strict=True)
    )


def _is_cpu(arr: jax.Array) -> bool:
    return all(d.platform == "cpu" for d in arr.sharding.device_set)


def collect(item, *, copy: bool) -> tuple[list[dict], list[_Piece]]:
    """What this process writes: every leaf's shape and dtype, and its replica-0 shards.

    The bytes of each shard are taken here, in the caller, because the training step that
    runs next donates the state's buffers. On CPU a shard's bytes are a zero-copy numpy view
    (`np.asarray`), which waits only for the step that computes them: while a view holds a
    buffer, XLA does not reuse it for a donated output (it allocates a new one; tested in
    tests/test_arraystore.py). A device-side copy instead took 12-21 ms for 100 MiB in the
    caller (`jax.device_put(may_alias=False)` or a jitted copy; measured). With `copy=True`
    (async saves) an accelerator's shards are copied to host memory here (transfers started
    together, then awaited); without it they are read by the writer.
    """
    leaves = []
    pieces = []
    to_host = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(item)[0]:
        key = _leaf_key(path)
        if isinstance(leaf, jax.Array):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                raise TypeError(
                    f"state: {'/'.join(key)} is a typed PRNG key array; save "
                    "`jax.random.key_data(key)` instead (TrainState.rng does)"
                )
            leaves.append({"key": key, "shape": list(leaf.shape), "dtype": str(leaf.dtype)})
            for shard in leaf.addressable_shards:
                if shard.replica_id != 0:
                    continue
                data = shard.data
                if _is_cpu(leaf):
                    data = np.asarray(data)
                elif copy:
                    data.copy_to_host_async()
                    to_host.append(len(pieces))
                pieces.append(_Piece(key, _bounds(shard.index, leaf.shape), data))
        else:
            arr = np.array(leaf) if copy else np.asarray(leaf)
            leaves.append({"key": key, "shape": list(arr.shape), "dtype": str(arr.dtype)})
            if jax.process_index() == 0:
                pieces.append(_Piece(key, tuple((0, n) for n in arr.shape), arr))
    for i in to_host:
        pieces[i].data = np.asarray(pieces[i].data)
    return leaves, pieces


def _as_bytes(data) -> memoryview:
    arr = np.ascontiguousarray(np.asarray(data))
    return memoryview(arr.reshape(-1).view(np.uint8))


def _chunk_tasks(bufs: list[memoryview], chunk: int) -> list[list[tuple[int, memoryview]]]:
    """The file's bytes (`bufs` back to back) cut at every `chunk` bytes of the file: one task
    per manifest chunk, each a list of (file offset, bytes) segments in order. Tasks are
    independent, so they can be written (and checksummed) on several threads at once."""
    tasks, current, room, offset = [], [], chunk, 0
    for buf in bufs:
        pos = 0
        while pos < len(buf):
            n = min(room, len(buf) - pos)
            current.append((offset, buf[pos : pos + n]))
            offset, pos, room = offset + n, pos + n, room - n
            if room == 0:
                tasks.append(current)
                current, room = [], chunk
    if current:
        tasks.append(current)
    return tasks


def _write_task(fd: int, task, piece_bytes: int, pace=None) -> int:
    """Writes one task's segments with `os.pwrite`, `piece_bytes` at a time; returns the
    CRC-32 of its bytes. `pace(cpu_seconds)` is called after each piece (paced saves)."""
    crc = 0
    for offset, seg in task:
        pos = 0
        while pos < len(seg):
            part = seg[pos : pos + piece_bytes]
            t = time.thread_time()
            done = 0
            while done < len(part):
                done += os.pwrite(fd, part[done:], offset + pos + done)
            crc = zlib.crc32(part, crc)
            pos += len(part)
            if pace is not None:
                pace(time.thread_time() - t)
    return crc


_FALLOCATE = None


def _preallocate(fd: int, size: int) -> None:
    """Reserves the file's blocks before writing it (Linux `fallocate`, mode 0), as NumPy's
    `tofile` does: writing 100 MiB into a preallocated file took 12 ms against 19 ms growing
    it write by write (ext4, 2 cores, 5 repeats). Skipped where the call or the filesystem
    does not support it. Not `os.posix_fallocate`: where the filesystem lacks the call,
    glibc emulates it by writing every block, which would cost more than it saves."""
    global _FALLOCATE
    if size <= 0 or _FALLOCATE is False:
        return
    if _FALLOCATE is None:
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _FALLOCATE = libc.fallocate
            _FALLOCATE.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            _FALLOCATE.restype = ctypes.c_int
        except (OSError, AttributeError):
            _FALLOCATE = False
            return
    _FALLOCATE(fd, 0, 0, size)  # a failure (e.g. EOPNOTSUPP) just leaves the file to grow


def write_bytes(path, data: bytes) -> tuple[int, list[int]]:
    """Writes `data` to `path` and fsyncs it; returns (size, [its CRC-32]) for the manifest
    (one chunk: these are small files)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data), ([zlib.crc32(data)] if data else [])


def write_json(path, payload) -> tuple[int, list[int]]:
    """`write_bytes` of `payload` as JSON."""
    # `json.dumps` encodes in C; `json.dump` streams through Python: 39 vs 4 ms of encoding
    # over 50 saves of a run's config and index (cProfile), CPU the save thread would take
    # from the training steps it overlaps.
    return write_bytes(path, json.dumps(payload).encode())


def fsync_dir(path: os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateHandler(ocp.AsyncCheckpointHandler):
    """Orbax handler of the "state" item (see the module docstring).

    Args:
      background: the saves are async (the caller goes on training while the writer runs):
        the state is copied first (see `collect`) and the write is paced. Orbax's sync saves
        run through `async_save` too, then wait; with `background=False` they neither copy
        nor pace.
      write_share: for background saves, the share of wall time the writer thread spends
        writing (it sleeps the rest) until `hurry()`; 1.0 writes flat out.
      chunk_bytes: the manifest's chunk size; the CRC-32 of each chunk of the data file is
        computed while writing and kept in `written` for the manifest.
    """

    def __init__(
        self, *, background: bool = False, write_share: float = 1.0, chunk_bytes: int = 1 << 23
    ):
        if isinstance(write_share, bool) or not (
            isinstance(write_share, int | float) and 0 < write_share <= 1
        ):
            raise ValueError(
                f"checkpoint.async_write_share: expected a number in (0, 1], got {write_share!r}"
            )
        self.background = background
        self.write_share = write_share if background else 1.0
        self.chunk_bytes = chunk_bytes
        self._hurry = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._legacy = ocp.PyTreeCheckpointHandler(use_compression=False)
        # {file name in the item directory: (size, [chunk CRC-32s])} of what the last save
        # wrote: the manifest takes them instead of reading the files back.
        self.written: dict[str, tuple[int, list[int]]] = {}

    def hurry(self) -> None:
        """Lifts the pacing of the save being written (it finishes flat out)."""
        self._hurry.set()

    # ---- save --------------------------------------------------------------------------------

    def take(self, item) -> tuple[list[dict], list[_Piece]]:
        """Starts a save of `item`: its leaves and the bytes to write (`collect`, copying for
        background saves), with the pacing re-armed. The caller writes them with `write`."""
        leaves, pieces = collect(item, copy=self.background)
        self._hurry.clear()
        self.written = {}
        return leaves, pieces

    def write(self, directory, leaves, pieces, extras=None) -> None:
        """Writes what `take` returned into the item directory `directory` (which exists),
        paced for background saves, and fsyncs it."""
        self._write(directory, leaves, pieces, self.write_share, extras)

    def _write(self, directory, leaves, pieces, share: float, extras=None) -> None:
        pid = jax.process_index()
        directory = epath.Path(directory)
        data_path = os.fspath(directory / DATA.format(pid))
        entries, bufs, size = [], [], 0
        for piece in pieces:
            buf = _as_bytes(piece.data)
            entries.append(
                {
                    "key": list(piece.key),
                    "index": [list(b) for b in piece.index],
                    "offset": size,
                    "nbytes": len(buf),
                }
            )
            bufs.append(buf)
            size += len(buf)
        tasks = _chunk_tasks(bufs, self.chunk_bytes)
        fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _preallocate(fd, size)
            if share >= 1:
                # Flat out: the chunks are written and checksummed on a thread per core, up
                # to 8 (`os.pwrite` and `zlib.crc32` release the GIL; writes to one file
                # share its lock, so more threads would only add checksums in parallel).
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        min(os.cpu_count() or 1, 8), thread_name_prefix="dlkit-state-write"
                    )
                crcs = list(self._pool.map(lambda t: _write_task(fd, t, self.chunk_bytes), tasks))
            else:
                crcs = [_write_task(fd, t, PIECE_BYTES, self._pace(share)) for t in tasks]
            os.fsync(fd)
        finally:
            os.close(fd)
        written = {DATA.format(pid): (size, crcs)}
        if pid == 0:
            for name, payload in (extras or {}).items():
                written[f"{name}.json"] = write_json(directory / f"{name}.json", payload)
        index = {"version": VERSION, "process": pid, "leaves": leaves, "pieces": entries}
        written[INDEX.format(pid)] = write_json(directory / INDEX.format(pid), index)
        fsync_dir(directory)
        self.written = written

    def _pace(self, share: float):
        """After each piece, sleep (1/share - 1) times the CPU time it took, until `hurry()`."""

        def pace(cpu_seconds: float) -> None:
            if not self._hurry.is_set():
                self._hurry.wait(cpu_seconds * (1 / share - 1))

        return pace

    async def _write_async(self, directory, leaves, pieces, share, extras) -> None:
        self._write(directory, leaves, pieces, share, extras)

    async def async_save(self, directory: epath.Path, args: "StateSave"):
        leaves, pieces = self.take(args.item)
        return [
            ocp_future.CommitFutureAwaitingContractedSignals(
                self._write_async(directory, leaves, pieces, self.write_share, args.extras),
                name="dlkit_state_save",
            )
        ]

    def save(self, directory: epath.Path, args: "StateSave") -> None:
        leaves, pieces = collect(args.item, copy=False)
        self._write(directory, leaves, pieces, 1.0, args.extras)

    # ---- restore -----------------------------------------------------------------------------

    @staticmethod
    def read_extra(directory, name: str):
        """The JSON document `name` saved with the state, or None (not saved with it)."""
        path = epath.Path(directory) / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    @staticmethod
    def is_legacy(directory) -> bool:
        """True for an item written by Orbax's PyTree handler (no dlkit index file)."""
        return not any(epath.Path(directory).glob("index.p*.json"))

    @staticmethod
    def _read_index(path) -> dict:
        index = json.loads(path.read_text())
        if index.get("version") != VERSION:
            raise ValueError(f"{path}: index version {index.get('version')!r}, expected 1")
        return index

    @classmethod
    def _indexes(cls, directory) -> list[tuple[epath.Path, dict]]:
        """(data file, index) of every process that saved the item."""
        out = []
        for path in sorted(epath.Path(directory).glob("index.p*.json")):
            index = cls._read_index(path)
            out.append((epath.Path(directory) / DATA.format(index["process"]), index))
        return out

    def metadata(self, directory: epath.Path):
        """The saved tree as nested dicts of `jax.ShapeDtypeStruct` (shapes, dtypes)."""
        if self.is_legacy(directory):
            return self._legacy.metadata(directory)
        tree: dict = {}
        # Every process's index lists all the leaves: one index is enough.
        first = min(epath.Path(directory).glob("index.p*.json"))
        for leaf in self._read_index(first)["leaves"]:
            node = tree
            for name in leaf["key"][:-1]:
                node = node.setdefault(name, {})
            node[leaf["key"][-1]] = jax.ShapeDtypeStruct(
                tuple(leaf["shape"]), jnp.dtype(leaf["dtype"])
            )
        return tree

    def restore(self, directory: epath.Path, args: "StateRestore"):
        abstract = args.item
        if self.is_legacy(directory):
            return self._legacy.restore(
                directory,
                args=ocp.args.PyTreeRestore(
                    abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                ),
            )
        saved: dict[tuple, dict] = {}
        pieces: dict[tuple, list] = {}
        for data_path, index in self._indexes(directory):
            for leaf in index["leaves"]:
                saved.setdefault(tuple(leaf["key"]), leaf)
            for p in index["pieces"]:
                bounds = tuple(tuple(b) for b in p["index"])
                pieces.setdefault(tuple(p["key"]), []).append((data_path, bounds, p))
        files: dict[str, Any] = {}
        try:
            leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
            out = []
            for path, want in leaves:
                key = _leaf_key(path)
                name = "/".join(key)
                if key not in saved:
                    raise ValueError(f"state: {name} is not in the checkpoint")
                have = saved[key]
                if tuple(have["shape"]) != tuple(want.shape):
                    raise ValueError(
                        f"state: {name}: this run expects shape {tuple(want.shape)}, "
                        f"the checkpoint has {tuple(have['shape'])}"
                    )
                dtype = jnp.dtype(have["dtype"])
                reader = _Reader(key, tuple(want.shape), dtype, pieces.get(key, []), files)
                sharding = getattr(want, "sharding", None)
                if sharding is None:
                    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
                arr = jax.make_array_from_callback(tuple(want.shape), sharding, reader.read)
                if arr.dtype != want.dtype:
                    arr = arr.astype(want.dtype)
                out.append(arr)
            return jax.tree_util.tree_unflatten(treedef, out)
        finally:
            for f in files.values():
                f.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._legacy.close()


@ocp.args.register_with_handler(StateHandler, for_save=True)
@dataclasses.dataclass
class StateSave(ocp.args.CheckpointArgs):
    """Save args of `StateHandler`: the state pytree, and small JSON documents written beside
    it by process 0 as `<name>.json` (dlkit's data position and config: see
    `Checkpointer.save`)."""

    item: Any
    extras: dict[str, Any] | None = None


@ocp.args.register_with_handler(StateHandler, for_restore=True)
@dataclasses.dataclass
class StateRestore(ocp.args.CheckpointArgs):
    """Restore args of `StateHandler`: the abstract state whose leaves carry target shardings."""

    item: Any


def _slices(lo, hi, origin) -> tuple[slice, ...]:
    """[lo, hi) in global coordinates as slices of a block whose corner is `origin`'s starts."""
    return tuple(slice(a - o[0], b - o[0]) for a, b, o in zip(lo, hi, origin, strict=True))


class _Reader:
    """Reads the region of one array that a device shard needs from the saved pieces."""

    def __init__(self, key, shape, dtype, pieces, files):
        self.key, self.shape, self.dtype, self.pieces, self.files = key, shape, dtype, pieces, files
        self._cache: dict[tuple, np.ndarray] = {}  # replicated shards read the region once

    def _file(self, path):
        name = os.fspath(path)
        if name not in self.files:
            self.files[name] = open(name, "rb", buffering=0)  # noqa: SIM115 - closed by restore
        return self.files[name]

    def _piece(self, path, bounds, entry) -> np.ndarray:
        shape = tuple(b - a for a, b in bounds)
        arr = np.empty(shape, self.dtype)
        buf = memoryview(arr.reshape(-1).view(np.uint8))
        if len(buf) != entry["nbytes"]:
            raise ValueError(
                f"state: {'/'.join(self.key)}: a piece of {entry['nbytes']} bytes, expected "
                f"{len(buf)} for shape {shape} {self.dtype}"
            )
        f = self._file(path)
        f.seek(entry["offset"])
        got = f.readinto(buf) if len(buf) else 0
        if got != len(buf):
            raise ValueError(f"state: {'/'.join(self.key)}: {path} is truncated")
        return arr

    def read(self, index: tuple) -> np.ndarray:
        want = _bounds(index, self.shape)
        if want in self._cache:
            return self._cache[want]
        exact = [piece for piece in self.pieces if piece[1] == want]
        if exact:
            out = self._piece(*exact[0])
        else:
            out = np.empty(tuple(b - a for a, b in want), self.dtype)
            covered = 0
            for path, have, entry in self.pieces:
                lo = [max(a, c) for (a, _), (c, _) in zip(want, have, strict=True)]
                hi = [min(b, d) for (_, b), (_, d) in zip(want, have, strict=True)]
                if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
                    continue
                piece = self._piece(path, have, entry)
                src = _slices(lo, hi, have)
                dst = _slices(lo, hi, want)
                out[dst] = piece[src]
                covered += int(np.prod([h - lo_ for lo_, h in zip(lo, hi, strict=True)]))
            if covered != out.size:
                raise ValueError(
                    f"state: {'/'.join(self.key)}: the saved pieces cover {covered} of the "
                    f"{out.size} elements a shard needs (a process's files are missing?)"
                )
        self._cache[want] = out
        return out
