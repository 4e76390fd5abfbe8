"""Where a run's files live: a local (or mounted) directory, or a `gs://` bucket.

    workdir = storage.resolve("gs://bucket/runs/digits", "workdir")   # an etils.epath.Path
    storage.write_text_atomic(workdir / "config.json", text)
    storage.append_text(workdir / "metrics.jsonl", line)

Every file of a run goes through `etils.epath` (which reaches `gs://` through gcsfs) and its
arrays through Orbax and TensorStore (whose `gcs` driver reads and writes the bucket itself), so
the same code serves a disk and a bucket. A URL that neither can serve is refused here, before
anything runs, instead of becoming a local directory named `gs:`.

`s3://` is refused: Orbax's PyTree handler (orbax-checkpoint 0.12) builds TensorStore specs for
local paths and `gs://` only, so the arrays of a checkpoint cannot be written there.
"""

import importlib.util
import os
import re
import uuid

import fsspec
from etils import epath

# "gs://bucket/run", or the "gs:/bucket/run" that pathlib makes of it.
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):(?P<slashes>/+)(?P<rest>.*)$")
# scheme -> the fsspec package etils.epath needs for it.
_OBJECT_STORES = {"gs": "gcsfs"}

# TensorStore writes a checkpoint's arrays, and other processes write steps and files, behind
# gcsfs's back: a cached listing would hide a committed step from `dlkit eval` or a restart.
# (A default only: a user's own fsspec configuration wins.)
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def _url_parts(text: str) -> tuple[str, str] | None:
    match = _URL.match(text)
    if match is None or len(match["scheme"]) < 2:  # "C:/..." is a Windows drive, not a URL
        return None
    rest = match["rest"] if len(match["slashes"]) <= 2 else "/" + match["rest"]  # gs:///x
    return match["scheme"].lower(), rest


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve(path: str | os.PathLike, what: str = "workdir") -> epath.Path:
    """`path` as an `epath.Path`: absolute when local, `gs://bucket/...` for a bucket.

    Args:
      path: a local path or a `gs://bucket/prefix` URL (also as pathlib made it: `gs:/b/p`).
      what: the argument's name, for the error message.
    Returns:
      the path; nothing is created.
    Raises:
      ValueError: a URL scheme dlkit cannot store a run in, a bucket URL without a bucket, or
        `gs://` without gcsfs installed (`pip install 'dlkit[gcs]'`).
    """
    if isinstance(path, epath.Path) and is_object_store(path):
        return path
    if not isinstance(path, str | os.PathLike):
        # A Config passed where the workdir goes (evaluate(cfg, ...)) would otherwise fail
        # inside os.fspath with a message that names neither.
        hint = (
            "; the run's config is read from its workdir, so pass the workdir alone"
            if type(path).__name__ == "Config"
            else ""
        )
        raise TypeError(
            f"{what}: expected a local path or a gs://bucket/path URL (str or os.PathLike), "
            f"got {type(path).__name__}{hint}"
        )
    text = os.fspath(path)
    parts = _url_parts(text)
    if parts is None:
        # "~/runs/x" from Python is not expanded by a shell; taken as is, it would make a
        # directory named "~" under the current one.
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    scheme, rest = parts
    if scheme not in _OBJECT_STORES:
        raise ValueError(
            f"{what}: expected a local path or a gs://bucket/path URL, got {text!r} (dlkit "
            f"cannot store a run under {scheme}://"
            + (
                "; Orbax's array writer reaches local paths and gs:// only)"
                if scheme == "s3"
                else ")"
            )
        )
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise ValueError(f"{what}: expected {scheme}://BUCKET/path, got {text!r} (no bucket)")
    if not _valid_bucket(bucket):
        # TensorStore refuses such a name only when the first checkpoint is written, after
        # compiling and training up to it; GCS itself never accepts it.
        raise ValueError(
            f"{what}: expected a GCS bucket name (3-63 characters of a-z, 0-9, '-', '_' and '.', "
            f"starting and ending with a letter or digit), got {bucket!r} in {text!r}"
        )
    package = _OBJECT_STORES[scheme]
    if not _installed(package):
        raise ValueError(
            f"{what}: {text!r} needs the {package} package, which is not installed: "
            f"pip install 'dlkit[{scheme if scheme != 'gs' else 'gcs'}]'"
        )
    return epath.Path(f"{scheme}://{rest.rstrip('/')}")


def _valid_bucket(name: str) -> bool:
    """GCS's bucket naming rules (dotted names: up to 222 characters, 63 per component)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*[a-z0-9]", name) or ".." in name:
        return False
    if "." in name:
        return len(name) <= 222 and all(1 <= len(part) <= 63 for part in name.split("."))
    return 3 <= len(name) <= 63


def is_object_store(path: str | os.PathLike) -> bool:
    """True when `path` is in a bucket (no directories, no rename, no append)."""
    parts = _url_parts(os.fspath(path))
    return parts is not None and parts[0] in _OBJECT_STORES


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Writes `path` whole or not at all: a local file is written beside it and renamed over
    it; an object in a bucket is replaced whole by one upload already."""
    if is_object_store(path):
        path.write_text(text)
        return
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def append_text(path: epath.Path, text: str) -> None:
    """Appends `text` to `path`. Objects cannot be appended to: a bucket's object is read and
    written again whole (metric logs are small, and a row is never half-written)."""
    if is_object_store(path):
        old = path.read_text() if path.exists() else ""
        path.write_text(old + text)
        return
    with path.open("a") as f:
        f.write(text)
