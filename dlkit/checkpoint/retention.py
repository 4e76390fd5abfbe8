"""Retention and housekeeping of a checkpoint directory: which steps stay, crash-safe deletion,
quarantine of unusable steps, and the cleaning of what interrupted saves and deletions left.

    keep = retention.steps_to_keep(steps, directory, max_to_keep=3, keep_best=1, ...)
    trash = retention.Trash(directory); trash.delete(step); trash.wait()
    retention.quarantine(directory, step, reason, log)

Deletion is a rename into `.trash/` followed by removal on a background thread: a step is either
listed whole or not at all, and a kill between the two leaves `.trash/`, which the next
Checkpointer empties (`clean_leftovers`). Retention runs inside `save`, in the training loop,
and unlinking a large step's files is slow, hence the thread.

In a bucket (no rename; Orbax publishes a step by writing its commit marker last) the marker
plays the rename's part: deleting a step removes its marker first, and a step directory without
one is what an interrupted save or deletion left, removed at the next start.

Retention is dlkit's, not Orbax's: keep the newest `max_to_keep` steps, plus the best
`keep_best` by a metric recorded in each step's manifest, and never delete the newest step nor
the newest good one (every metric in its manifest finite): a run whose latest evals diverged
keeps the last step it could go back to. A NaN metric never ranks as best.
"""

import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from etils import epath

from dlkit import finite_json, storage
from dlkit.checkpoint import commit

TRASH = ".trash"
QUARANTINE = ".quarantine"
ORBAX_TMP = ".orbax-checkpoint-tmp"
REASON = "dlkit_quarantine_reason.txt"  # inside a quarantined step: why it was moved there


def step_dirs(directory: epath.Path) -> dict[int, epath.Path]:
    """{step: path} of every directory named by a step number."""
    if not directory.exists():  # a bucket has no empty directories: nothing saved yet
        return {}
    return {int(p.name): p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()}


def steps_to_keep(
    steps: list[int],
    directory: epath.Path,
    *,
    max_to_keep: int | None,
    keep_best: int,
    best_metric: str,
    best_mode: str,
) -> set[int]:
    """The steps retention keeps.

    Args:
      steps: the committed steps, oldest first.
      directory: where they are (their manifests hold the metrics that rank them).
      max_to_keep: the newest N stay; None keeps all.
      keep_best: the best N by `best_metric` also stay.
      best_metric: the manifest metric that ranks steps.
      best_mode: "min" or "max".
    Returns:
      the steps to keep; the newest, and the newest whose metrics are all finite, are always
      among them.
    """
    keep = set(steps if max_to_keep is None else steps[-max_to_keep:])
    metrics = {s: step_metrics(directory / str(s)) for s in steps}
    if keep_best:
        keep.update(ranked(metrics, best_metric, best_mode)[:keep_best])
    if steps:
        keep.add(steps[-1])
    good = [s for s in steps if all(_finite(v) for v in metrics[s].values())]
    if good:
        keep.add(good[-1])
    return keep


def ranked(metrics: dict[int, dict], metric: str, mode: str) -> list[int]:
    """The steps whose recorded `metric` is finite, best first by `mode` ("min" or "max");
    ties go to the earlier step.

    Args:
      metrics: {step: the metrics its manifest records} (`step_metrics`).
    """
    scored = [
        (value if mode == "min" else -value, step)
        for step, recorded in metrics.items()
        if _finite(value := recorded.get(metric))
    ]
    return [step for _, step in sorted(scored)]


def step_metrics(step_dir: epath.Path) -> dict:
    """The metrics a step's manifest records ({} when none)."""
    value = finite_json.decode(commit.read_manifest(step_dir).get("metrics", {}))
    return value if isinstance(value, dict) else {}


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value) -> bool:
    return _is_number(value) and math.isfinite(value)


def quarantine(directory: epath.Path, step: int, reason: str, log) -> epath.Path:
    """Moves step `step` out of the listing into `.quarantine/` (kept, never deleted) and
    says so through `log`."""
    dst_dir = directory / QUARANTINE
    dst_dir.mkdir(exist_ok=True)
    dst = dst_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if storage.is_object_store(directory):
        # A bucket has no empty directories, and the move needs `.quarantine/` to exist: the
        # reason, kept beside the step, makes it exist.
        (dst_dir / f"{dst.name}.reason.txt").write_text(reason + "\n")
    (directory / str(step)).rename(dst)
    try:
        (dst / REASON).write_text(reason + "\n")
    except OSError:
        pass  # the move is what matters; the reason is also in the log
    log(f"checkpoint: step {step} is unusable: {reason}; moved to {dst}")
    return dst


def quarantined(directory: epath.Path) -> list[tuple[str, str]]:
    """[(name, reason)] of the steps in `.quarantine/`, oldest step first."""
    root = directory / QUARANTINE
    if not root.is_dir():
        return []
    out = []
    for path in root.iterdir():
        if not path.is_dir():  # in a bucket, the reasons kept beside the steps
            continue
        try:
            reason = (path / REASON).read_text().strip()
        except OSError:
            reason = "reason not recorded"
        out.append((path.name, reason))
    return sorted(out, key=lambda item: (int(item[0].split("-")[0]), item[0]))


def clean_leftovers(directory: epath.Path, log, *, commit_file: bool = False) -> None:
    """Finishes interrupted deletions, removes what interrupted saves left, removes empty step
    directories, and quarantines dlkit steps that were never committed. Steps another tool
    wrote (`commit.is_foreign`) are left alone. With `commit_file` (a bucket) a step without
    Orbax's commit marker is an unfinished save or deletion, by any writer, and is removed."""
    if not directory.exists():  # a bucket has no empty directories: nothing saved yet
        return
    trash = directory / TRASH
    if trash.exists():
        trash.rmtree(missing_ok=True)
    for path in directory.iterdir():
        if ORBAX_TMP in path.name:
            log(f"checkpoint: removing {path.name}, left by an interrupted save")
            path.rmtree(missing_ok=True)
    for step, path in sorted(step_dirs(directory).items()):
        if commit_file and not (path / commit.COMMIT_MARKER).exists():
            log(f"checkpoint: removing step {step}, left uncommitted by an interrupted save")
            path.rmtree(missing_ok=True)
            continue
        if not any(path.iterdir()):
            log(f"checkpoint: removing empty step directory {path}")
            path.rmdir()
            continue
        if commit.is_foreign(path):
            continue
        missing = [m for m in (commit.COMMIT_MARKER, commit.MANIFEST) if not (path / m).exists()]
        if missing:
            quarantine(directory, step, f"not committed ({', '.join(missing)} missing)", log)


class Trash:
    """Crash-safe deletion of steps: an atomic rename now, the removal on a background thread.

    Args:
      directory: the checkpoint directory.
      commit_file: a bucket, where a rename copies every object: the step's commit marker is
        deleted now instead, which unlists it as the rename would.
    """

    def __init__(self, directory: epath.Path, *, commit_file: bool = False):
        self.directory = directory
        self.commit_file = commit_file
        self._lock = threading.Lock()  # the thread's rmdir of `.trash/` vs the next rename
        self._deleter: ThreadPoolExecutor | None = None

    def delete(self, step: int) -> None:
        """Takes `step` out of the listing now and queues the removal of its files."""
        if self.commit_file:
            dst = self.directory / str(step)
            (dst / commit.COMMIT_MARKER).unlink()
            self._submit(dst)
            return
        with self._lock:
            trash = self.directory / TRASH
            trash.mkdir(exist_ok=True)
            dst = trash / f"{step}-{uuid.uuid4().hex}"
            (self.directory / str(step)).rename(dst)
        self._submit(dst)

    def _submit(self, dst: epath.Path) -> None:
        if self._deleter is None:
            self._deleter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlkit-delete")
        self._deleter.submit(self._remove, dst)

    def _remove(self, path: epath.Path) -> None:
        path.rmtree(missing_ok=True)
        if self.commit_file:
            return
        with self._lock:
            try:
                path.parent.rmdir()  # leave no trace once empty
            except OSError:
                pass

    def wait(self) -> None:
        """Blocks until every queued step is removed from disk."""
        if self._deleter is not None:
            self._deleter.shutdown(wait=True)
            self._deleter = None
