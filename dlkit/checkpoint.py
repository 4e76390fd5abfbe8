"""Checkpoints with Orbax: the whole TrainState, the data loader's position and the config.

    ckpt = dlkit.checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=3)
    ckpt.save(step, state, data_position=step, config=cfg.to_dict())   # async by default
    state, data_position = ckpt.restore(abstract_state)                 # newest valid step
    ckpt.close()                                                         # waits for writes

One checkpoint is one Orbax step directory with one item, "state": the TrainState's arrays,
raw bytes written by dlkit's own Orbax handler (`arraystore.StateHandler`: faster than Orbax's
PyTree handler, and an async save is paced so that the training it overlaps keeps its speed;
the handler's docstring has the measurements), with the data loader's position
(`state/data.json`, {"position": int}) and the run's config (`state/config.json`) beside it.
They were separate Orbax items ("data", "config") until Orbax's cost per item showed: ~2-3 ms
of CPU per JSON item per save, in threads and event loops, on top of ~8-9 ms per save (a
1 MiB state saved every 500 steps of a 2,000 steps/s MLP paid ~20 ms of CPU per save).
Checkpoints written with those items still restore.

Who writes a step. With several processes, Orbax's CheckpointManager does (its async
machinery and the barriers between processes). With one process, the usual case of a notebook
or a one-host GPU script, dlkit writes the step itself on one persistent thread
(`Checkpointer._write_step`), in the same layout Orbax's manager writes: the item and
`_CHECKPOINT_METADATA` in `<step>.orbax-checkpoint-tmp`, then the manifest and the commit
marker, all fsynced, then one rename (an Orbax manager lists and restores such a step; tested).
Why: Orbax's machinery cost more than the write itself. Per async save of the bench MLP's
1 MiB state, the training loop blocked 5 ms (a new event loop, several threads started per
save) and the save took 12 ms of CPU; dlkit's thread blocks the loop 0.8 ms (the state's
bytes taken, a job queued) and takes 3-4 ms of CPU. `fit` with saves every 500 steps went from
0.91x to 0.94-0.96x of `fit` without saves (docs/performance.md). Restores still go through
Orbax's manager and dlkit's handler.
Restoring takes an abstract state whose leaves carry the *target* shardings, so a state saved
on 8 devices restores onto 1, or onto the CPU in a notebook: the layout is chosen at restore.

Commit rules. Orbax alone leaves several ways to lose a run (measured on Orbax 0.12: a kill
while an old step is being deleted leaves a half-deleted step that is still listed; a flipped
byte restores silently; an empty step directory breaks the manager; best-N retention can delete
the newest step). dlkit therefore keeps its own rules on top of Orbax:

- A step counts only when Orbax's commit marker (`commit_success.txt`) AND dlkit's manifest
  (`dlkit_manifest.json`: the size of every file and a CRC-32 of each 8 MiB of it) are both
  present. Both are written inside the temporary directory before the rename that publishes
  the step (by dlkit's writer; for Orbax's async saves, in its finalize callback), so the two
  appear together; for Orbax's sync saves (several processes) the manifest is written
  (atomically) right after.
- Restoring verifies every checksum first. A step that fails is reported (which step, which
  file, what is wrong), moved to `.quarantine/` (kept for inspection, never deleted), and the
  next older valid step is tried.
- Deletion is a rename into `.trash/` followed by removal: a step is either listed whole or not
  at all. The rename happens in the caller; the removal runs on a background thread, because
  unlinking a large step's files is slow (about 23 ms for a 100 MiB state on 2 CPU cores,
  measured) and retention runs inside `save`, i.e. in the training loop. `close()` waits for
  it. Leftovers of interrupted saves and deletions are cleaned when a Checkpointer opens.
- Retention is dlkit's, not Orbax's: keep the newest `max_to_keep` steps, plus the best
  `keep_best` by a metric, and never the newest step.

Every exit path waits for pending saves: `close()` (called by `fit` in a `finally`), and an
`atexit` hook for checkpointers a user forgot to close.
"""

import atexit
import json
import os
import pathlib
import shutil
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Mapping

# Importing the executor registers concurrent.futures' exit hook before ours (see below).
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import orbax.checkpoint as ocp

from dlkit import arraystore

MANIFEST = "dlkit_manifest.json"
COMMIT_MARKER = "commit_success.txt"
# Orbax rewrites this file while committing (timestamps), after the manifest is written, so it
# is checked for being present and well-formed rather than by checksum.
STEP_METADATA = "_CHECKPOINT_METADATA"
TRASH = ".trash"
QUARANTINE = ".quarantine"
_ORBAX_TMP = ".orbax-checkpoint-tmp"
_READ_BYTES = 1 << 22  # checksums read files 4 MiB at a time
CHUNK_BYTES = 1 << 23  # a version-2 manifest has one CRC-32 per 8 MiB of each file
DEFAULT_WRITE_SHARE = 0.05  # `async_write_share`: see Checkpointer

_OPEN: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


def _wait_for_open_checkpointers() -> None:
    for ckpt in list(_OPEN):
        ckpt.close()


# Orbax finishes async saves on concurrent.futures threads, and concurrent.futures refuses new
# work once the interpreter starts shutting down threads, which happens *before* ordinary
# `atexit` hooks run: an atexit hook is too late and the save is lost (Orbax 0.12, measured).
# `threading._register_atexit` hooks run at that earlier point, last registered first, so this
# one (registered after concurrent.futures') runs while the executors still accept work.
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_wait_for_open_checkpointers)
else:  # pragma: no cover - other Python implementations
    atexit.register(_wait_for_open_checkpointers)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: corrupt, incomplete, or not this run's."""


def _crc32(path: pathlib.Path) -> int:
    """CRC-32 of a whole file (manifest version 1)."""
    return _chunk_crc32(path, 0, path.stat().st_size)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """Threads for checksums: `os.pread` and `zlib.crc32` release the GIL, so the chunks of a
    file are checksummed on all cores at once (36 -> 17-18 ms for 100 MiB on 2 cores, measured:
    docs/performance.md)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1, thread_name_prefix="dlkit-crc"
            )
        return _POOL


def _chunk_crc32(path: pathlib.Path, offset: int, length: int) -> int:
    """CRC-32 of `length` bytes of `path` from `offset`, read _READ_BYTES at a time."""
    fd = os.open(path, os.O_RDONLY)
    try:
        crc, done = 0, 0
        while done < length:
            data = os.pread(fd, min(length - done, _READ_BYTES), offset + done)
            if not data:
                break  # the file shrank: the caller's size check reports it
            crc = zlib.crc32(data, crc)
            done += len(data)
        return crc
    finally:
        os.close(fd)


def _chunk_crcs(
    paths: dict[str, tuple[pathlib.Path, int]], chunk: int = CHUNK_BYTES, parallel: bool = True
) -> dict[str, list[int]]:
    """{name: [CRC-32 of each `chunk`-byte piece]} for {name: (path, size)}, the chunks of all
    files checksummed in parallel (or one after another in this thread). An empty file has
    no chunks."""
    pieces = {
        name: [(path, off, min(chunk, size - off)) for off in range(0, size, chunk)]
        for name, (path, size) in paths.items()
    }
    if not parallel:
        return {name: [_chunk_crc32(*p) for p in ps] for name, ps in pieces.items()}
    futures = {name: [_pool().submit(_chunk_crc32, *p) for p in ps] for name, ps in pieces.items()}
    return {name: [f.result() for f in fs] for name, fs in futures.items()}


def _write_json_atomic(path: pathlib.Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    arraystore.write_json(tmp, payload)
    os.replace(tmp, path)


def _handler_name(handler) -> str:
    """How Orbax names a handler in `_CHECKPOINT_METADATA` (module.class)."""
    return f"{type(handler).__module__}.{type(handler).__qualname__}"


def write_manifest(
    step_dir: pathlib.Path,
    step: int,
    metrics: dict | None = None,
    *,
    parallel: bool = True,
    known: dict[str, tuple[int, list[int]]] | None = None,
) -> None:
    """Records the size and the chunk CRC-32s of every file under `step_dir` in its manifest.

    Version 2 of the manifest: one CRC-32 per CHUNK_BYTES of each file (so the chunks are
    checksummed in parallel, and a mismatch names the byte range). Version 1 manifests (one
    CRC-32 per file, written by dlkit <= 0.1) are still verified.

    `parallel=False` checksums in the calling thread: an async save's background thread
    uses it, because checksum threads on every core slowed the training steps the save
    overlaps (0.47-0.61x of their rate alone, against 0.57-0.66x with one thread; 4
    alternating rounds of benchmarks/checkpoint_speed.py, 2 cores).

    `known` holds {relative path: (size, chunk CRC-32s)} computed from memory while the file
    was written (the "state" item's data file: `arraystore`); a file of that size is not read
    back.
    """
    known = known or {}
    paths = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(step_dir).as_posix()
        if path.name in (MANIFEST, COMMIT_MARKER, STEP_METADATA) or rel.endswith(".tmp"):
            continue
        paths[rel] = (path, path.stat().st_size)
    reuse = {rel for rel, (_, size) in paths.items() if rel in known and known[rel][0] == size}
    crcs = _chunk_crcs({k: v for k, v in paths.items() if k not in reuse}, parallel=parallel)
    crcs.update({rel: list(known[rel][1]) for rel in reuse})
    files = {rel: {"size": size, "crc32": crcs[rel]} for rel, (_, size) in paths.items()}
    payload = {
        "version": 2,
        "step": step,
        "chunk_bytes": CHUNK_BYTES,
        "files": files,
        "metrics": metrics or {},
    }
    _write_json_atomic(step_dir / MANIFEST, payload)


def verify_step(step_dir: pathlib.Path) -> list[str]:
    """Problems that make `step_dir` unusable ([] = valid): markers, then every checksum."""
    problems = []
    if not step_dir.is_dir() or not any(step_dir.iterdir()):
        return ["the step directory is empty"]
    if not (step_dir / COMMIT_MARKER).exists():
        problems.append(f"{COMMIT_MARKER} is missing (Orbax never committed this step)")
    manifest_path = step_dir / MANIFEST
    if not manifest_path.exists():
        return problems + [f"{MANIFEST} is missing (dlkit never committed this step)"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return problems + [f"{MANIFEST} is unreadable: {e}"]
    try:
        json.loads((step_dir / STEP_METADATA).read_text())
    except FileNotFoundError:
        problems.append(f"{STEP_METADATA}: missing")
    except (OSError, ValueError):
        problems.append(f"{STEP_METADATA}: not valid JSON")
    to_check = {}
    for rel, expected in manifest["files"].items():
        path = step_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{rel}: size {path.stat().st_size} bytes, expected {expected['size']}")
        elif isinstance(expected["crc32"], int):  # version 1: one CRC of the whole file
            if _crc32(path) != expected["crc32"]:
                problems.append(f"{rel}: CRC-32 mismatch (the bytes changed after saving)")
        else:
            to_check[rel] = (path, expected["size"])
    chunk = manifest.get("chunk_bytes", CHUNK_BYTES)
    if to_check and (not isinstance(chunk, int) or chunk < 1):
        return problems + [f"{MANIFEST}: chunk_bytes is {chunk!r}, not a positive int"]
    for rel, got in _chunk_crcs(to_check, chunk).items():
        want = manifest["files"][rel]["crc32"]
        if len(want) != len(got):  # the sizes matched: the manifest itself is damaged
            problems.append(f"{rel}: {len(want)} chunk CRCs in {MANIFEST}, expected {len(got)}")
            continue
        bad = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
        if bad:
            end = min((bad[0] + 1) * chunk, to_check[rel][1])
            problems.append(
                f"{rel}: CRC-32 mismatch at bytes {bad[0] * chunk}-{end} "
                "(the bytes changed after saving)"
            )
    return problems


def _read_manifest(step_dir: pathlib.Path) -> dict:
    try:
        return json.loads((step_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class Checkpointer:
    """Saves and restores training checkpoints in one directory, under dlkit's commit rules.

    Args:
      directory: where step directories go (created if missing).
      max_to_keep: keep the newest N steps; None keeps all.
      keep_best: also keep the best N steps by `best_metric` (0 = off).
      best_metric: the metric (passed to `save`) that ranks steps, e.g. "eval/loss".
      best_mode: "min" or "max".
      async_save: write in a background thread (`save` returns early).
      async_write_share: an async save writes 1 MiB at a time and after each piece sleeps
        (1/share - 1) times the CPU time it took, so that the training steps it overlaps keep
        their speed on a machine whose cores they use (0.05: ~0.9x of their rate alone,
        against ~0.5x flat out; 2 cores, docs/performance.md). A save then takes ~1/share
        times as long in the background; `wait()`, the next `save` and `close()` lift the
        pacing. 1.0 = flat out.
      read_only: only read (e.g. `dlkit eval` while a run is training in the same workdir):
        no cleaning, no retention, corrupt steps are skipped but not moved.
      log: where messages about cleaned or rejected steps go (default: print).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        keep_best: int = 0,
        best_metric: str = "eval/loss",
        best_mode: str = "min",
        async_save: bool = True,
        async_write_share: float = DEFAULT_WRITE_SHARE,
        read_only: bool = False,
        log=None,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"checkpoint.max_to_keep: expected an int >= 1, got {max_to_keep}")
        if keep_best < 0:
            raise ValueError(f"checkpoint.keep_best: expected an int >= 0, got {keep_best}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"checkpoint.best_mode: expected min | max, got {best_mode!r}")
        # Built before anything touches the disk: it checks async_write_share.
        self._state_handler = arraystore.StateHandler(
            background=async_save and not read_only,
            write_share=async_write_share,
            chunk_bytes=CHUNK_BYTES,
        )
        self.directory = pathlib.Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self.keep_best = keep_best
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.async_save = async_save
        self._log = log or (lambda text: print(text, flush=True))
        self.read_only = read_only
        # One process (the primary) cleans, deletes and quarantines; a reader never does.
        self._primary = jax.process_index() == 0 and not read_only
        # One process: dlkit writes the step itself (`_write_step`); several: Orbax's manager
        # does, with its barriers. See the module docstring.
        self._direct = jax.process_count() == 1
        self._saver: ThreadPoolExecutor | None = None  # the thread of direct async saves
        self._inflight: Future | None = None  # the direct async save being written
        self._pending: tuple[int, dict] | None = None
        self._verified: set[int] = set()  # steps whose checksums passed in this process
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
        if self._primary:
            self._clean_leftovers()
        async_save = async_save and not read_only
        # The manager saves only for multi-process runs; it restores and reads metadata always.
        orbax_async = async_save and not self._direct
        async_options = (
            ocp.AsyncOptions(post_finalization_callback=self._finalize_pending)
            if orbax_async
            else None
        )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention is ours: see `_apply_retention`
            enable_async_checkpointing=orbax_async,
            async_options=async_options,
            create=not read_only,
        )
        # Handlers are named up front so that metadata (saved shapes) is readable before any
        # save or restore has registered them.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": self._state_handler,
                "data": ocp.JsonCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )
        # Steps deleted by retention that Orbax's in-memory list still holds (see `_delete`).
        self._deleted_unlisted: set[int] = set()
        self._deleter: ThreadPoolExecutor | None = None  # removes renamed steps (`_delete`)
        self._trash_lock = threading.Lock()
        self._closed = False
        _OPEN.add(self)

    # ---- listing -----------------------------------------------------------------------------

    def _step_dirs(self) -> dict[int, pathlib.Path]:
        return {int(p.name): p for p in self.directory.iterdir() if p.name.isdigit()}

    def all_steps(self) -> list[int]:
        """Every committed step (both markers present), oldest first. Checksums are verified
        at restore, not here."""
        return sorted(
            step
            for step, path in self._step_dirs().items()
            if (path / COMMIT_MARKER).exists() and (path / MANIFEST).exists()
        )

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def resolve_step(self, step: int | None) -> int:
        """`step` if it is committed, the newest step if None; FileNotFoundError otherwise."""
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"step: expected one of the saved steps {steps} in {self.directory}, got {step}"
            )
        return step

    # ---- housekeeping ------------------------------------------------------------------------

    def _clean_leftovers(self) -> None:
        """Finishes interrupted deletions and removes what interrupted saves left behind."""
        trash = self.directory / TRASH
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        for path in self.directory.iterdir():
            if _ORBAX_TMP in path.name:
                self._log(f"checkpoint: removing {path.name}, left by an interrupted save")
                shutil.rmtree(path, ignore_errors=True)
        for step, path in sorted(self._step_dirs().items()):
            if not any(path.iterdir()):
                self._log(f"checkpoint: removing empty step directory {path}")
                path.rmdir()
                continue
            missing = [m for m in (COMMIT_MARKER, MANIFEST) if not (path / m).exists()]
            if missing:
                self._quarantine(step, f"not committed ({', '.join(missing)} missing)")

    def _quarantine(self, step: int, reason: str) -> pathlib.Path:
        """Moves step `step` out of the listing, into .quarantine/, and says so."""
        src = self.directory / str(step)
        dst_dir = self.directory / QUARANTINE
        dst_dir.mkdir(exist_ok=True)
        dst = dst_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        os.replace(src, dst)
        self._log(f"checkpoint: step {step} is unusable: {reason}; moved to {dst}")
        return dst

    def _delete(self, step: int) -> None:
        """Removes a step crash-safely: one atomic rename out of the listing, then the files.

        Only the rename happens here: from then on the step is neither listed nor restorable.
        Removing the files is queued on a background thread (see the module docstring); a kill
        before it finishes leaves `.trash/`, which the next Checkpointer removes on opening.
        """
        with self._trash_lock:
            trash = self.directory / TRASH
            trash.mkdir(exist_ok=True)
            dst = trash / f"{step}-{uuid.uuid4().hex}"
            os.replace(self.directory / str(step), dst)
        if self._deleter is None:
            self._deleter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlkit-delete")
        self._deleter.submit(self._remove_trashed, dst)

    def _remove_trashed(self, path: pathlib.Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
        with self._trash_lock:  # `_delete` may be about to rename into it
            try:
                path.parent.rmdir()  # leave no trace once empty
            except OSError:
                pass

    def _wait_for_deletions(self) -> None:
        """Blocks until every step `_delete` queued is removed from disk."""
        if self._deleter is not None:
            self._deleter.shutdown(wait=True)
            self._deleter = None

    def _finalize_pending(self) -> None:
        """Writes the manifest of the save in flight (Orbax calls this before committing)."""
        if self._pending is None or not self._primary:
            return
        step, metrics = self._pending
        tmp_dirs = [p for p in self.directory.iterdir() if p.name.startswith(f"{step}{_ORBAX_TMP}")]
        for tmp in tmp_dirs:
            write_manifest(tmp, step, metrics, parallel=False, known=self._written())

    def _written(self) -> dict[str, tuple[int, list[int]]]:
        """The sizes and chunk CRC-32s of the state files this process just wrote."""
        return {f"state/{name}": v for name, v in self._state_handler.written.items()}

    def _steps_to_keep(self, steps: list[int]) -> set[int]:
        keep = set(steps if self.max_to_keep is None else steps[-self.max_to_keep :])
        if self.keep_best:
            scored = []
            for step in steps:
                value = _read_manifest(self.directory / str(step)).get("metrics", {})
                value = value.get(self.best_metric)
                if isinstance(value, int | float):
                    scored.append((value if self.best_mode == "min" else -value, step))
            keep.update(step for _, step in sorted(scored)[: self.keep_best])
        if steps:
            keep.add(steps[-1])  # never delete the newest step
        return keep

    def _apply_retention(self) -> None:
        if not self._primary:
            return
        steps = self.all_steps()
        doomed = sorted(set(steps) - self._steps_to_keep(steps))
        for step in doomed:
            self._delete(step)
        # Orbax's own list of steps still holds the deleted ones. Re-listing the directory
        # (`reload`, ~6 ms, measured) after every save would cost the loop for nothing: with
        # retention ours, Orbax reads that list only to refuse saving a step it holds, so
        # `save` re-lists just before reusing a deleted step's number.
        self._deleted_unlisted.update(doomed)

    # ---- save / restore ----------------------------------------------------------------------

    def save(
        self,
        step: int,
        state,
        *,
        data_position: int,
        config: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Starts saving `state` as `step` (returns before the write ends when async).

        Args:
          step: the step number (the directory's name).
          state: the TrainState (any pytree of arrays).
          data_position: the training loader's position (global batches consumed).
          config: the run's config as a JSON-ready dict.
          metrics: numbers recorded in the manifest; `best_metric` among them ranks steps.
        """
        if self.read_only:
            raise CheckpointError(f"save: this Checkpointer on {self.directory} is read-only")
        self.wait()  # Orbax would wait here anyway
        if (self.directory / str(step)).exists():
            raise CheckpointError(
                f"step {step}: a checkpoint with this step already exists in {self.directory}"
            )
        if step in self._deleted_unlisted:  # Orbax would refuse a step it still lists
            self._manager.reload()
            self._deleted_unlisted.clear()
        self._pending = (step, dict(metrics or {}))
        extras = {"data": {"position": int(data_position)}, "config": config or {}}
        if self._direct:
            leaves, pieces = self._state_handler.take(state)
            job = (step, leaves, pieces, extras, self._pending[1])
            if self.async_save:
                if self._saver is None:
                    self._saver = ThreadPoolExecutor(1, thread_name_prefix="dlkit-save")
                self._inflight = self._saver.submit(self._write_step, *job)
            else:
                try:
                    self._write_step(*job)
                finally:
                    self._pending = None
                self._apply_retention()
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(state=arraystore.StateSave(state, extras=extras)),
            force=True,
        )
        if not self.async_save and self._primary:
            write_manifest(
                self.directory / str(step), step, self._pending[1], known=self._written()
            )
            self._pending = None
            self._apply_retention()

    def _write_step(
        self, step: int, leaves: list, pieces: list, extras: dict, metrics: dict
    ) -> None:
        """Writes and commits step `step` of a single-process run, in the layout Orbax's
        CheckpointManager writes (an Orbax manager lists and restores it; tested): the item
        and the step's metadata go into `<step>.orbax-checkpoint-tmp`, then the manifest and
        the commit markers, everything is fsynced, and one rename publishes the step.

        Runs on the save thread for async saves, in the caller for sync ones. A failure
        leaves only the temporary directory, which the next save of this step or the next
        Checkpointer removes; committed steps are never touched.
        """
        started = time.time_ns()
        final = self.directory / str(step)
        tmp = self.directory / f"{step}{_ORBAX_TMP}"
        if tmp.exists():
            shutil.rmtree(tmp)
        item = tmp / "state"
        item.mkdir(parents=True)
        self._state_handler.write(item, leaves, pieces, extras)
        write_manifest(tmp, step, metrics, parallel=False, known=self._written())
        meta = {
            "item_handlers": {"state": _handler_name(self._state_handler)},
            "metrics": {},
            "performance_metrics": {},
            "init_timestamp_nsecs": started,
            "commit_timestamp_nsecs": time.time_ns(),
            "custom_metadata": {},
        }
        arraystore.write_json(tmp / STEP_METADATA, meta)
        marker = f"Checkpoint commit was successful to {final}"
        arraystore.write_bytes(tmp / COMMIT_MARKER, marker.encode())
        arraystore.fsync_dir(tmp)
        os.rename(tmp, final)
        arraystore.fsync_dir(self.directory)

    def saving(self) -> bool:
        """True while an async save is being written (not yet committed)."""
        if self._inflight is not None:
            return not self._inflight.done()
        return self._manager.is_saving_in_progress()

    def _check_fits(self, step: int, abstract_state) -> None:
        """Raises CheckpointError naming the first params whose saved shape differs."""
        import flax.traverse_util

        try:
            saved = self._manager.item_metadata(step)["state"]
            saved_params = saved["params"]
        except Exception:  # noqa: BLE001 - metadata problems surface in the restore itself
            return
        # A TrainState has `.params`; a plain dict state may have a "params" entry.
        if isinstance(abstract_state, Mapping):
            want_params = abstract_state.get("params")
        else:
            want_params = getattr(abstract_state, "params", None)
        if not isinstance(want_params, Mapping) or not isinstance(saved_params, Mapping):
            return  # nothing to compare by name: the restore checks every leaf's shape
        want = flax.traverse_util.flatten_dict(dict(want_params), sep="/")
        have = flax.traverse_util.flatten_dict(dict(saved_params), sep="/")
        problems = []
        for key in sorted(want.keys() | have.keys()):
            if key not in have:
                problems.append(f"params/{key}: in this model, not in the checkpoint")
            elif key not in want:
                problems.append(f"params/{key}: in the checkpoint, not in this model")
            elif tuple(want[key].shape) != tuple(have[key].shape):
                problems.append(
                    f"params/{key}: this model expects shape {tuple(want[key].shape)}, "
                    f"the checkpoint has {tuple(have[key].shape)}"
                )
        if problems:
            shown = "\n  ".join(problems[:8])
            more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
            raise CheckpointError(
                f"restore: checkpoint step {step} in {self.directory} does not fit this "
                f"model:\n  {shown}{more}"
            )

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, int]:
        """Restores the state and the loader position of the newest valid step.

        Each candidate's checksums are verified first; a corrupt step is reported, moved to
        .quarantine/ and the next older step is tried. With an explicit `step`, no fallback.

        Args:
          abstract_state: the state's structure with `jax.ShapeDtypeStruct` leaves carrying the
            target `sharding` (see `abstract_with_shardings`).
          step: which step; None = the newest valid one.
        Returns:
          (state, data_position).
        Raises:
          FileNotFoundError: no valid step is left.
          CheckpointError: the step exists but does not fit `abstract_state`, or an explicit
            step is corrupt.
        """
        step = self.valid_step(step)
        self._check_fits(step, abstract_state)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=arraystore.StateRestore(abstract_state))
            )
        except ValueError as e:  # arraystore: a leaf missing, of another shape, or truncated
            raise CheckpointError(
                f"restore: checkpoint step {step} in {self.directory} does not fit: {e}"
            ) from e
        return restored["state"], int(self._extra(step, "data")["position"])

    def _extra(self, step: int, name: str) -> dict[str, Any]:
        """The JSON document `name` ("data" or "config") of `step`: beside the state, or, in
        checkpoints written before it moved there, Orbax's item of that name."""
        found = arraystore.StateHandler.read_extra(self.directory / str(step) / "state", name)
        if found is not None:
            return found
        args = ocp.args.Composite(**{name: ocp.args.JsonRestore()})
        return self._manager.restore(step, args=args)[name]

    def valid_step(self, step: int | None = None) -> int:
        """The newest step whose checksums verify (or `step`, verified), after quarantining
        the newer ones that fail.

        Raises:
          FileNotFoundError: no valid step is left.
          CheckpointError: an explicitly requested step is corrupt.
        """
        candidates = [self.resolve_step(step)] if step is not None else self.all_steps()[::-1]
        if not candidates:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        for candidate in candidates:
            if candidate in self._verified:
                return candidate
            problems = verify_step(self.directory / str(candidate))
            if not problems:
                self._verified.add(candidate)
                return candidate
            reason = "; ".join(problems)
            if step is not None:
                raise CheckpointError(f"checkpoint step {candidate} is corrupt: {reason}")
            if self._primary:
                self._quarantine(candidate, reason + "; falling back to an older step")
                self._manager.reload()
                self._deleted_unlisted.clear()
            else:
                self._log(f"checkpoint: skipping step {candidate}: {reason}")
        raise FileNotFoundError(f"no valid checkpoint in {self.directory}")

    def restore_config(self, step: int | None = None) -> dict[str, Any]:
        """The config saved with `step` (default: the newest)."""
        return self._extra(self.resolve_step(step), "config")

    def wait(self) -> None:
        """Blocks until every started save is written and committed, then applies retention.

        Raises:
          CheckpointError: the async save in flight failed (naming its step; the cause is
            chained). The steps saved before it are untouched.
        """
        self._state_handler.hurry()  # whoever waits wants it written now: no more pacing
        try:
            if self._inflight is not None:
                inflight, self._inflight = self._inflight, None
                inflight.result()
            else:
                self._manager.wait_until_finished()  # runs `_finalize_pending` for the last save
        except Exception as e:
            step = self._pending[0] if self._pending else "?"
            raise CheckpointError(
                f"async save of step {step} to {self.directory} failed: {type(e).__name__}: {e}"
            ) from e
        finally:
            self._pending = None
        self._apply_retention()

    def close(self) -> None:
        """Waits for pending saves and releases the manager. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            if self._saver is not None:
                self._saver.shutdown(wait=True)
                self._saver = None
            self._wait_for_deletions()
            self._manager.close()
            _OPEN.discard(self)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def abstract_with_shardings(abstract_state, shardings):
    """Attaches a sharding to each `ShapeDtypeStruct` leaf (a restore target)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )
