"""Commit rules: when a step directory counts, its checksum manifest, and its verification.

    commit.write_manifest(tmp_dir, step, metrics)     # inside the temporary directory
    problems = commit.verify_step(step_dir)           # [] = the step may be restored
    commit.is_foreign(step_dir)                        # written by plain Orbax, not dlkit

A step written by dlkit counts only when Orbax's commit marker (`commit_success.txt`) AND
dlkit's manifest (`dlkit_manifest.json`: the size of every file and a CRC-32 of each
CHUNK_BYTES of it) are both present. On a disk both are written inside Orbax's temporary
directory before the one rename that publishes the step, so they appear together. A bucket has
no rename: Orbax writes the step in place and its commit marker last (`CommitFileTemporaryPath`),
and dlkit's manifest goes in just before that marker, so there the marker alone publishes the
step, and a step directory without it is an unfinished save (`temporary_path_class` below).

Why a manifest of our own: without compression, TensorStore's zarr3 files carry a CRC-32C of
the shard index only, not of the array bytes, and Orbax has no public option that adds one to
the data; a flipped byte in an array file would restore silently. The manifest is checked before
any value is read.

Every path operation goes through `etils.epath`, as Orbax's own do.
"""

import json
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import fsspec
from etils import epath

from dlkit import finite_json, storage

MANIFEST = "dlkit_manifest.json"
COMMIT_MARKER = "commit_success.txt"
# Orbax rewrites this file while committing (timestamps), after the manifest is written, so it
# is checked for being present and well-formed rather than by checksum.
STEP_METADATA = "_CHECKPOINT_METADATA"
# The key of the step metadata's `custom_metadata` that marks a step dlkit wrote: a step
# without it and without a manifest is another tool's (`is_foreign`), not a damaged one.
WRITER_KEY = "dlkit"
CHUNK_BYTES = 1 << 23  # the manifest has one CRC-32 per 8 MiB of each file
_READ_BYTES = 1 << 22  # checksums read files 4 MiB at a time
_UNCHECKED = (MANIFEST, COMMIT_MARKER, STEP_METADATA)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: corrupt, incomplete, or not this run's."""


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """Threads for checksums: reading and `zlib.crc32` release the GIL, so the chunks of a
    step are checksummed on all cores at once."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="crc")
        return _POOL


def _chunk_crc32(path: epath.Path, offset: int, length: int) -> int:
    """CRC-32 of `length` bytes of `path` from `offset`."""
    crc, done = 0, 0
    with path.open("rb") as f:
        f.seek(offset)
        while done < length:
            data = f.read(min(length - done, _READ_BYTES))
            if not data:
                break  # the file shrank: the caller's size check reports it
            crc = zlib.crc32(data, crc)
            done += len(data)
    return crc


def chunk_crcs(
    paths: dict[str, tuple[epath.Path, int]], chunk: int = CHUNK_BYTES, parallel: bool = True
) -> dict[str, list[int]]:
    """The CRC-32 of each `chunk`-byte piece of files.

    Args:
      paths: {name: (path, size in bytes)}, all on one disk or all in one bucket.
      chunk: bytes per piece; an empty file has no pieces.
      parallel: checksum all pieces on a thread per core, or one after another here. In a
        bucket the pieces are always fetched concurrently (the time is the network's).
    Returns:
      {name: [CRC-32 of each piece, in order]}.
    """
    pieces = [
        (name, path, off, min(chunk, size - off))
        for name, (path, size) in paths.items()
        for off in range(0, size, chunk)
    ]
    out: dict[str, list[int]] = {name: [] for name in paths}
    if pieces and storage.is_object_store(pieces[0][1]):
        crcs = _bucket_crcs(pieces)
    elif parallel:
        futures = [_pool().submit(_chunk_crc32, path, off, n) for _, path, off, n in pieces]
        crcs = [f.result() for f in futures]
    else:
        crcs = [_chunk_crc32(path, off, n) for _, path, off, n in pieces]
    for (name, *_), crc in zip(pieces, crcs, strict=True):
        out[name].append(crc)
    return out


# Bytes a bucket checksum holds in memory at once: the pieces of one batch of range requests.
_BUCKET_BATCH_BYTES = 1 << 28


def _bucket_crcs(pieces) -> list[int]:
    """The CRC-32 of each (name, path, offset, length) piece of objects in one bucket, read
    with one ranged GET per piece, concurrently (`cat_ranges`). Opening each object through
    a file handle costs a metadata request first; a step has a hundred-odd small objects,
    so that doubled a save's requests."""
    fs, _ = fsspec.core.url_to_fs(os.fspath(pieces[0][1]))
    crcs, batch, held = [], [], 0
    for piece in [*pieces, None]:
        if piece is None or (batch and held + piece[3] > _BUCKET_BATCH_BYTES):
            paths = [_without_scheme(p) for _, p, _, _ in batch]
            starts = [off for _, _, off, _ in batch]
            ends = [off + n for _, _, off, n in batch]
            for data in fs.cat_ranges(paths, starts, ends, on_error="raise"):
                crcs.append(zlib.crc32(data))
            batch, held = [], 0
        if piece is not None:
            batch.append(piece)
            held += piece[3]
    return crcs


def _without_scheme(path) -> str:
    return os.fspath(path).split("://", 1)[-1].rstrip("/")


def _sizes(step_dir: epath.Path) -> dict[str, int]:
    """{relative path: size in bytes} of every file under `step_dir` ({} when it is missing).
    In a bucket this is one listing, not a metadata request per object."""
    if storage.is_object_store(step_dir):
        fs, root = fsspec.core.url_to_fs(os.fspath(step_dir))
        root = root.rstrip("/")
        listing = fs.find(root, detail=True)
        return {
            key[len(root) :].strip("/"): int(info["size"])
            for key, info in listing.items()
            if info.get("type") != "directory" and not key.endswith("/") and key != root
        }
    out = {}
    # Compared as text without the scheme: fsspec's walk (under epath) may yield paths in
    # another spelling than the step directory's.
    top = _without_scheme(step_dir)
    for root, _, names in step_dir.walk():
        sub = _without_scheme(root)[len(top) :].strip("/")
        for name in names:
            rel = f"{sub}/{name}" if sub else name
            out[rel] = (step_dir / rel).stat().length
    return out


def _files(step_dir: epath.Path) -> dict[str, tuple[epath.Path, int]]:
    """{relative path: (path, size)} of every file the manifest covers."""
    return {
        rel: (step_dir / rel, size)
        for rel, size in sorted(_sizes(step_dir).items())
        if rel.split("/")[-1] not in _UNCHECKED and not rel.endswith(".tmp")
    }


def write_json_atomic(path: epath.Path, payload: dict) -> None:
    """Writes `payload` to `path` whole or not at all (see `storage.write_text_atomic`)."""
    storage.write_text_atomic(path, finite_json.dumps(payload))


def write_manifest(
    step_dir, step: int, metrics: dict | None = None, *, parallel: bool = True
) -> None:
    """Records the size and the chunk CRC-32s of every file under `step_dir` in its manifest.

    Args:
      step_dir: a step directory (or Orbax's temporary directory of one).
      step: the step number, recorded for the reader.
      metrics: numbers that rank steps for retention (`keep_best`).
      parallel: checksum on a thread per core. An async save passes False: its checksums
        then share the cores with the training steps it overlaps instead of taking them all.
    """
    step_dir = epath.Path(step_dir)
    paths = _files(step_dir)
    crcs = chunk_crcs(paths, parallel=parallel)
    payload = {
        "version": 2,
        "step": step,
        "chunk_bytes": CHUNK_BYTES,
        "files": {rel: {"size": size, "crc32": crcs[rel]} for rel, (_, size) in paths.items()},
        "metrics": metrics or {},
    }
    write_json_atomic(step_dir / MANIFEST, payload)


def read_json(path: epath.Path) -> dict | None:
    """The JSON object at `path`, or None when it is missing or unreadable."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_manifest(step_dir: epath.Path) -> dict:
    return read_json(step_dir / MANIFEST) or {}


def is_foreign(step_dir) -> bool:
    """True when another tool (plain Orbax) wrote the step: no manifest and no dlkit mark in
    its step metadata. A dlkit step that lost its manifest is damaged, not foreign."""
    step_dir = epath.Path(step_dir)
    if (step_dir / MANIFEST).exists():
        return False
    meta = read_json(step_dir / STEP_METADATA) or {}
    return WRITER_KEY not in (meta.get("custom_metadata") or {})


def verify_step(step_dir) -> list[str]:
    """Problems that make the dlkit step `step_dir` unusable ([] = valid): markers, then
    every checksum.

    Args:
      step_dir: the step's directory.
    Returns:
      one line per problem, naming the file and what is wrong.
    """
    step_dir = epath.Path(step_dir)
    sizes = _sizes(step_dir)  # one listing: in a bucket each existence check is a request
    if not sizes:
        return ["the step directory is empty"]
    problems = []
    if COMMIT_MARKER not in sizes:
        problems.append(f"{COMMIT_MARKER} is missing (Orbax never committed this step)")
    if MANIFEST not in sizes:
        return problems + [f"{MANIFEST} is missing (dlkit never committed this step)"]
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return problems + [f"{MANIFEST} is unreadable: {e}"]
    if STEP_METADATA not in sizes:
        problems.append(f"{STEP_METADATA}: missing")
    elif read_json(step_dir / STEP_METADATA) is None:
        problems.append(f"{STEP_METADATA}: not valid JSON")
    to_check = {}
    for rel, expected in manifest["files"].items():
        path = step_dir / rel
        if rel not in sizes:
            problems.append(f"{rel}: missing")
        elif sizes[rel] != expected["size"]:
            problems.append(f"{rel}: size {sizes[rel]} bytes, expected {expected['size']}")
        elif isinstance(expected["crc32"], int):  # version 1: one CRC of the whole file
            if chunk_crcs({rel: (path, expected["size"])}, max(expected["size"], 1))[rel] != (
                [expected["crc32"]] if expected["size"] else []
            ):
                problems.append(f"{rel}: CRC-32 mismatch (the bytes changed after saving)")
        else:
            to_check[rel] = (path, expected["size"])
    chunk = manifest.get("chunk_bytes", CHUNK_BYTES)
    if to_check and (not isinstance(chunk, int) or chunk < 1):
        return problems + [f"{MANIFEST}: chunk_bytes is {chunk!r}, not a positive int"]
    for rel, got in chunk_crcs(to_check, chunk).items():
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


def temporary_path_class(on_commit, *, commit_file: bool = False):
    """An Orbax temporary-path class that calls `on_commit(tmp_dir, final_dir)` just before
    Orbax publishes the step: before the rename into place on a disk, before the commit marker
    is written in a bucket (`commit_file`, where the temporary and final directory are one).

    Orbax's async post-finalization callback runs at that point for async saves only; a
    temporary-path class is honoured by sync and async saves alike, so the manifest is inside
    the step before it is published in both.

    Args:
      on_commit: called with (directory written to, the step's final directory).
      commit_file: the storage has no rename (a bucket): Orbax's commit-file protocol, the one
        Orbax itself picks for `gs://`.
    """
    from orbax.checkpoint import path as ocp_path  # see store.orbax: imported when first used

    atomicity = ocp_path.atomicity
    base = atomicity.CommitFileTemporaryPath if commit_file else atomicity.AtomicRenameTemporaryPath

    class DlkitTemporaryPath(base):
        async def finalize(self, *args, **kwargs):
            on_commit(self.get(), self.get_final())
            return await super().finalize(*args, **kwargs)

    return DlkitTemporaryPath
