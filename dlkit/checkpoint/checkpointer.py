"""`Checkpointer`: saves and restores a run's steps under dlkit's commit rules.

    with dlkit.checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=3) as ckpt:
        ckpt.save(step, state, data_position=step, config=cfg.to_dict())   # async by default
        state, data_position = ckpt.restore(abstract_state)                 # newest valid step

Orbax writes every step, single- or multi-process, sync or async (`store`); the manifest goes in
before the step is published (`commit`); retention, deletion and quarantine are dlkit's
(`retention`). Restoring takes an abstract state whose leaves carry the *target* shardings, so a
state saved on 8 devices restores onto 1, or onto the CPU in a notebook.

A step another tool wrote (plain Orbax: no manifest, no dlkit mark) is never quarantined: it is
restored if it fits (its bytes cannot be verified, which is said), and otherwise `restore` raises
CheckpointError naming the step and what is missing, so a run never silently starts over.

Every exit path waits for pending saves: `close()` (called by `fit` in a `finally`), and a hook
for checkpointers a user forgot to close.
"""

import os
from typing import Any

import jax
from etils import epath

from dlkit import storage
from dlkit.checkpoint import commit, exit_hook, retention, store


class Checkpointer:
    """Saves and restores training checkpoints in one directory, under dlkit's commit rules.

    Args:
      directory: where step directories go (created if missing): a local or mounted path, or
        a `gs://bucket/path` URL (see `dlkit.storage`).
      max_to_keep: keep the newest N steps; None keeps all.
      keep_best: also keep the best N steps by `best_metric` (0 = off).
      best_metric: the metric (passed to `save`) that ranks steps, e.g. "eval/loss".
      best_mode: "min" or "max".
      async_save: Orbax writes in the background (`save` returns once the arrays are copied).
      read_only: only read (e.g. `dlkit eval` while a run is training in the same workdir):
        no cleaning, no retention, corrupt steps are skipped but not moved.
      log: where messages about cleaned, rejected or foreign steps go (default: print).
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
        read_only: bool = False,
        log=None,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"checkpoint.max_to_keep: expected an int >= 1, got {max_to_keep}")
        if keep_best < 0:
            raise ValueError(f"checkpoint.keep_best: expected an int >= 0, got {keep_best}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"checkpoint.best_mode: expected min | max, got {best_mode!r}")
        self.directory = storage.resolve(directory, "checkpoint directory")
        # A bucket has no rename: Orbax's commit marker alone publishes a step there.
        self._commit_file = storage.is_object_store(self.directory)
        self.max_to_keep = max_to_keep
        self.keep_best = keep_best
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.async_save = async_save and not read_only
        self.read_only = read_only
        self._log = log or (lambda text: print(text, flush=True))
        # One process (the primary) cleans, deletes and quarantines; a reader never does.
        self._primary = jax.process_index() == 0 and not read_only
        self._pending: tuple[int, dict] | None = None  # the save in flight: (step, metrics)
        self._verified: set[int] = set()  # steps whose checksums passed in this process
        self._warned_foreign: set[int] = set()
        self._reported: set[int] = set()  # uncommitted steps a reader has said it skips
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
        if self._primary:
            retention.clean_leftovers(self.directory, self._log, commit_file=self._commit_file)
        self._saver = None  # built on the first save: a reader never needs Orbax's threads
        self._saver_grain = False  # whether the saver writes the "grain" item
        self._trash = retention.Trash(self.directory, commit_file=self._commit_file)
        self._closed = False
        self.restored_step: int | None = None  # the step `restore` read last
        exit_hook.register(self)

    # ---- listing -----------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Every step that may be restored, oldest first: dlkit's committed steps (both markers
        present) and steps another tool wrote. Checksums are verified at restore, not here."""
        out = []
        for step, path in retention.step_dirs(self.directory).items():
            if self._commit_file and not (path / commit.COMMIT_MARKER).exists():
                continue  # a save in progress (Orbax writes steps in place in a bucket)
            if commit.is_foreign(path):
                if any(path.iterdir()):
                    out.append(step)
            elif (path / commit.COMMIT_MARKER).exists() and (path / commit.MANIFEST).exists():
                out.append(step)
        return sorted(out)

    def quarantined(self) -> list[tuple[str, str]]:
        """[(directory name, reason)] of the steps moved to `.quarantine/` (see `retention`)."""
        return retention.quarantined(self.directory)

    def latest_step(self) -> int | None:
        """The newest step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def resolve_step(self, step: int | None) -> int:
        """`step` if it is listed, the newest step if None; FileNotFoundError otherwise."""
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

    def valid_step(self, step: int | None = None) -> int:
        """The newest step whose checksums verify (or `step`, verified), after quarantining
        the newer dlkit steps that fail. A step another tool wrote has no checksums: it is
        returned as it is, and said so.

        Raises:
          FileNotFoundError: no valid step is left.
          CheckpointError: an explicitly requested step is corrupt.
        """
        candidates = [self.resolve_step(step)] if step is not None else self.all_steps()[::-1]
        if step is None:
            self._report_uncommitted(candidates[0] if candidates else None)
        if not candidates:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        for candidate in candidates:
            step_dir = self.directory / str(candidate)
            if candidate in self._verified:
                return candidate
            if commit.is_foreign(step_dir):
                if candidate not in self._warned_foreign:
                    self._warned_foreign.add(candidate)
                    self._log(
                        f"checkpoint: step {candidate} in {self.directory} was not written by "
                        f"dlkit (no {commit.MANIFEST}): its bytes cannot be verified"
                    )
                return candidate
            problems = commit.verify_step(step_dir)
            if not problems:
                self._verified.add(candidate)
                return candidate
            reason = "; ".join(problems)
            if step is not None:
                raise commit.CheckpointError(f"checkpoint step {candidate} is corrupt: {reason}")
            if self._primary:
                retention.quarantine(
                    self.directory, candidate, reason + "; falling back to an older step", self._log
                )
            else:
                self._log(f"checkpoint: skipping step {candidate}: {reason}")
        raise FileNotFoundError(f"no valid checkpoint in {self.directory}")

    def _report_uncommitted(self, newest: int | None) -> None:
        """Says which step directories newer than `newest` are passed over, and why. The
        primary cleaned them when it opened (and said so); a reader leaves them and tells."""
        if self._primary:
            return
        for candidate, path in sorted(retention.step_dirs(self.directory).items(), reverse=True):
            if (newest is not None and candidate <= newest) or candidate in self._reported:
                continue
            if not any(path.iterdir()):
                reason = "the step directory is empty"
            elif commit.is_foreign(path):
                continue
            else:
                missing = [
                    m for m in (commit.COMMIT_MARKER, commit.MANIFEST) if not (path / m).exists()
                ]
                reason = f"not committed ({', '.join(missing)} missing)"
            self._reported.add(candidate)
            self._log(f"checkpoint: skipping step {candidate} in {self.directory}: {reason}")

    # ---- save --------------------------------------------------------------------------------

    def _before_publish(self, tmp_dir: epath.Path, final_dir: epath.Path) -> None:
        """Writes the manifest inside Orbax's temporary directory (see `commit`)."""
        metrics = self._pending[1] if self._pending else {}
        commit.write_manifest(tmp_dir, int(final_dir.name), metrics, parallel=not self.async_save)

    def save(
        self,
        step: int,
        state,
        *,
        data_position: int,
        config: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        data_state: dict[str, Any] | None = None,
    ) -> None:
        """Starts saving `state` as `step` (returns before the write ends when async).

        Args:
          step: the step number (the directory's name).
          state: the TrainState (any pytree of arrays).
          data_position: the training loader's position (global batches consumed).
          config: the run's config as a JSON-ready dict.
          metrics: numbers recorded in the manifest; `best_metric` among them ranks steps.
          data_state: the Grain pipeline's state at `data_position` on this process
            (`GrainLoader.state_at`), saved as the "grain" item; None for other loaders.
        """
        if self.read_only:
            raise commit.CheckpointError(
                f"save: this Checkpointer on {self.directory} is read-only"
            )
        self.wait()
        step_dir = self.directory / str(step)
        if step_dir.exists() and not self._commit_file:
            raise commit.CheckpointError(
                f"step {step}: a checkpoint with this step already exists in {self.directory}"
            )
        if self._primary and not self._commit_file:  # a failed save left its temporary directory
            for path in self.directory.iterdir():
                if path.name.startswith(f"{step}{retention.ORBAX_TMP}"):
                    path.rmtree(missing_ok=True)
        if self._primary and self._commit_file and step_dir.exists():
            if (step_dir / commit.COMMIT_MARKER).exists():
                raise commit.CheckpointError(
                    f"step {step}: a checkpoint with this step already exists in {self.directory}"
                )
            step_dir.rmtree(missing_ok=True)  # left uncommitted by a failed save
        if self._saver is not None and data_state is not None and not self._saver_grain:
            self._saver.close()  # built without the "grain" item's handler
            self._saver = None
        if self._saver is None:
            self._saver_grain = data_state is not None
            self._saver = store.make_saver(
                async_save=self.async_save,
                on_commit=self._before_publish,
                commit_file=self._commit_file,
                grain=data_state is not None,
            )
        self._pending = (step, dict(metrics or {}))
        try:
            store.save(
                self._saver,
                step_dir,
                state,
                data_position=data_position,
                config=config or {},
                data_state=data_state,
            )
        except BaseException:
            self._pending = None
            raise
        if not self.async_save:
            self._pending = None
            self._apply_retention()

    def saving(self) -> bool:
        """True while an async save is being written (not yet committed)."""
        if self._pending is None:
            return False
        if (self.directory / str(self._pending[0]) / commit.COMMIT_MARKER).exists():
            return False
        try:
            self._saver.check_for_errors()
        except Exception:  # noqa: BLE001 - `wait` raises it
            return False
        return True

    def wait(self) -> None:
        """Blocks until every started save is written and committed, then applies retention.

        Raises:
          CheckpointError: the async save in flight failed (naming its step; the cause is
            chained). The steps saved before it are untouched.
        """
        if self._pending is not None and self.async_save:
            step = self._pending[0]
            try:
                self._saver.wait_until_finished()
            except Exception as e:
                raise commit.CheckpointError(
                    f"async save of step {step} to {self.directory} failed: {type(e).__name__}: {e}"
                ) from e
            finally:
                self._pending = None
        self._apply_retention()

    def _apply_retention(self) -> None:
        if not self._primary:
            return
        steps = self.all_steps()
        keep = retention.steps_to_keep(
            steps,
            self.directory,
            max_to_keep=self.max_to_keep,
            keep_best=self.keep_best,
            best_metric=self.best_metric,
            best_mode=self.best_mode,
        )
        for step in sorted(set(steps) - keep):
            self._trash.delete(step)

    # ---- restore -----------------------------------------------------------------------------

    def _state_path(self, step: int) -> epath.Path:
        step_dir = self.directory / str(step)
        path = store.state_path(step_dir)
        if path is None:
            found = sorted(p.name for p in step_dir.iterdir())
            raise commit.CheckpointError(
                f"restore: step {step} in {self.directory} holds no Orbax PyTree item "
                f"'{store.STATE}' (found: {found})"
            )
        return path

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
          CheckpointError: the step exists but does not fit `abstract_state` or lacks an item,
            or an explicit step is corrupt.
        """
        step = self.valid_step(step)
        path = self._state_path(step)
        store.check_fits(path, abstract_state, where=f"step {step} in {self.directory}")
        try:
            state = store.restore_state(path, abstract_state)
        except ValueError as e:
            raise commit.CheckpointError(
                f"restore: checkpoint step {step} in {self.directory} does not fit: {e}"
            ) from e
        self.restored_step = step
        return state, self._data_position(step, state)

    def data_state(self, step: int) -> dict[str, Any] | None:
        """The Grain pipeline's state saved with `step` for this process ({"start": int,
        "iterator": Grain's iterator state}), or None when the step holds none."""
        return store.read_data_state(self.directory / str(step))

    def _data_position(self, step: int, state) -> int:
        data = store.read_json_item(self.directory / str(step), store.DATA)
        if data is not None and isinstance(data.get("position"), int):
            return int(data["position"])
        saved_step = getattr(state, "step", None)
        if saved_step is None:
            raise commit.CheckpointError(
                f"restore: step {step} in {self.directory} has no '{store.DATA}' item "
                "(the data loader's position) and its state has no `step` to take it from"
            )
        position = int(jax.device_get(saved_step))
        self._log(
            f"checkpoint: step {step} has no '{store.DATA}' item (written without dlkit): the "
            f"data loader continues at position {position}, the state's step"
        )
        return position

    def restore_config(self, step: int | None = None) -> dict[str, Any]:
        """The config saved with `step` (default: the newest).

        Raises:
          CheckpointError: the step has no config item (another tool wrote it).
        """
        step = self.resolve_step(step)
        config = store.read_json_item(self.directory / str(step), store.CONFIG)
        if config is None:
            raise commit.CheckpointError(
                f"restore_config: step {step} in {self.directory} has no '{store.CONFIG}' item"
            )
        return config

    # ---- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Waits for pending saves and deletions and releases Orbax's checkpointer. Safe to
        call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._trash.wait()
            if self._saver is not None:
                self._saver.close()
            exit_hook.forget(self)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
