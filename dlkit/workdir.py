"""A run's directory: config.json, metrics.jsonl, checkpoints/, and who owns them.

    workdir.check_writable(path)                                    # a clear error, not a traceback
    with workdir.lock(path, log=print):                             # one writer at a time
        workdir.claim(path, cfg, archive_mismatched=False, log=print)   # before anything is written

A workdir belongs to one experiment. Resuming is the point of a workdir, so a run whose
experiment or model differs from the one that wrote the checkpoints is refused (its
checkpoints would not fit, or worse, would silently continue another run) unless
`checkpoint.archive_mismatched` is set, in which case the old checkpoints and metrics are moved
to `*.archived-<time>` — nothing is deleted.

A workdir has one writer. `lock` creates `dlkit.lock` (the holder's host, pid and command)
with O_CREAT | O_EXCL, which is atomic on local filesystems and on NFS v3+; a second run fails at
once naming the holder. A lock whose holder is a dead process on this host is stale and is
taken over; a holder on another host cannot be checked from here, so the error says how to
remove it. Readers (`dlkit eval`, `dlkit report`, `load_checkpoint`) take no lock. Object
storage (gs://, s3://) has no exclusive create that this module can use, so a URL workdir is not
locked: the caller is told, and one writer per URL is the user's to ensure.
"""

import contextlib
import errno
import json
import os
import pathlib
import re
import socket
import sys
import time
import uuid
from typing import Any

from etils import epath

from dlkit import config as config_lib
from dlkit import storage

# Config sections that decide what a checkpoint contains; a change there cannot resume.
_IDENTITY = ("name", "model", "loss")

LOCK = "dlkit.lock"

# "gs://bucket/run", or the "gs:/bucket/run" that pathlib makes of it.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


class WorkdirError(ValueError):
    """A workdir that a run cannot write to, or that another run holds."""


def is_url(path: str | os.PathLike) -> bool:
    """True for object storage locations such as gs://bucket/run or s3://bucket/run."""
    return bool(_URL.match(os.fspath(path)))


def check_writable(path: str | os.PathLike) -> None:
    """Raises WorkdirError unless `path` is (or can be made) a directory this process writes.

    Checked by creating and removing a probe file, in the workdir and in its checkpoints/ (a
    read-only mount, an immutable directory and missing permissions fail the same way);
    creates `path` if it is missing, and nothing else. URLs are left to the storage layer.

    Raises:
      WorkdirError: names the path and the problem (a regular file, a path under a file, read
        only, no permission).
    """
    if is_url(path):
        return
    path = pathlib.Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            what = "is a regular file" if parent == path else f"is under {parent}, a regular file"
            raise WorkdirError(
                f"workdir: expected a directory, got {str(path)!r}, which {what}; choose "
                "another --workdir"
            )
        if parent.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"workdir: cannot create {str(path)!r}: {_reason(e)}") from e
    for directory in (path, path / "checkpoints"):
        if not directory.is_dir():
            continue
        probe = directory / f".dlkit-write-probe-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise WorkdirError(
                f"workdir: expected a directory this run can write, got {str(directory)!r}: "
                f"{_reason(e)}; `dlkit eval` and `dlkit report` can still read it"
            ) from e


def _reason(e: OSError) -> str:
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (read-only or immutable)"
    return e.strerror or str(e)


def _holder_text(holder: dict) -> str:
    if not holder:
        return "an unknown run (its lock file is being written or is unreadable)"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')!r} (started "
        f"{holder.get('started', '?')}: {holder.get('command', '?')})"
    )


def _read_holder(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or torn by a crash: treated as held


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@contextlib.contextmanager
def lock(path: str | os.PathLike, *, log=print):
    """Holds the workdir's lock file for the duration of the `with` block.

    Args:
      path: the workdir (it must exist).
      log: where notes go (a stale lock taken over, a URL that cannot be locked).
    Raises:
      WorkdirError: another live process holds it (naming its host, pid and command), or the
        lock file cannot be created.
    """
    if is_url(path):
        log(
            f"workdir: {os.fspath(path)} is object storage and is not locked; make sure only "
            "one run writes to it"
        )
        yield
        return
    lock_path = pathlib.Path(path) / LOCK
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:300],
    }
    for _ in range(3):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(lock_path)
            if holder is None:
                continue  # released in between: try again
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
                if not _alive(holder["pid"]):
                    log(
                        f"workdir: removing the stale lock of {_holder_text(holder)}, which is "
                        "no longer running"
                    )
                    _remove_if_same(lock_path, holder)
                    continue
            raise WorkdirError(
                f"workdir: {str(path)!r} is in use by another run: {_holder_text(holder)}. "
                f"Wait for it, use another --workdir, or, if that run is gone (e.g. its host "
                f"died), delete {lock_path}. `dlkit eval` and `dlkit report` can read it now."
            ) from None
        except OSError as e:
            raise WorkdirError(
                f"workdir: cannot create the lock file {lock_path}: {_reason(e)}"
            ) from e
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        break
    else:
        raise WorkdirError(f"workdir: could not take the lock {lock_path}; try again")
    try:
        yield
    finally:
        _remove_if_same(lock_path, me)


def _remove_if_same(lock_path: pathlib.Path, holder: dict) -> None:
    """Removes the lock file if it still names `holder` (never a lock another run took since)."""
    current = _read_holder(lock_path)
    if (
        current is not None
        and current.get("pid") == holder.get("pid")
        and (current.get("host") == holder.get("host"))
    ):
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _has_checkpoints(path: epath.Path) -> bool:
    ckpts = path / "checkpoints"
    return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())


def claim(path: epath.Path, cfg: config_lib.Config, *, archive_mismatched: bool, log) -> None:
    """Refuses (or archives) a workdir whose checkpoints belong to a different experiment.

    Raises:
      config.ConfigError: the workdir holds checkpoints of another experiment or model.
    """
    saved_path = path / "config.json"
    if not (saved_path.exists() and _has_checkpoints(path)):
        return
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, json.JSONDecodeError):
        return  # an unreadable config.json: the checkpoints' own shapes are checked at restore
    old, new = flatten(saved), flatten(cfg.to_dict())
    differing = sorted(
        k
        for k in old.keys() | new.keys()
        if k.split(".")[0] in _IDENTITY and old.get(k) != new.get(k)
    )
    if not differing:
        return
    details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differing[:6])
    if not archive_mismatched:
        raise config_lib.ConfigError(
            f"workdir {path} holds checkpoints of experiment {saved.get('name')!r} that this run "
            f"({cfg.name!r}) cannot resume ({details}). Use another --workdir, or "
            "--set checkpoint.archive_mismatched=true to move them aside and start over."
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in ("checkpoints", "metrics.jsonl", "config.json"):
        src = path / name
        if src.exists():
            dst = path / f"{src.stem}.archived-{stamp}{src.suffix}"
            src.rename(dst)
            log(f"workdir: moved {src.name} of experiment {saved.get('name')!r} to {dst.name}")


def write_config(path: epath.Path, cfg: config_lib.Config, log) -> None:
    """Writes config.json (atomically), noting which keys differ from the one already there."""
    target = path / "config.json"
    new = cfg.to_dict()
    if target.exists():
        try:
            old = flatten(json.loads(target.read_text()))
        except (OSError, json.JSONDecodeError):
            old = {}
        flat_new = flatten(new)
        changed = sorted(k for k in old.keys() | flat_new.keys() if old.get(k) != flat_new.get(k))
        if changed:
            log(f"note: config differs from {target} in: {', '.join(changed)}")
    storage.write_text_atomic(target, json.dumps(new, indent=2) + "\n")
