"""Checkpoints with Orbax: the whole TrainState, the data loader's position and the config.

    ckpt = dlkit.checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=3)
    ckpt.save(step, state, data_position=step, config=cfg.to_dict())   # async by default
    state, data_position = ckpt.restore(abstract_state)                 # newest step
    ckpt.close()                                                         # waits for writes

One checkpoint is one Orbax step directory with three items: "state" (the TrainState's arrays,
via `StandardSave`), "data" ({"position": int}) and "config" (the run's config as JSON).
Restoring takes an abstract state whose leaves carry the *target* shardings, so a state saved
on 8 devices restores onto 1, or onto the CPU in a notebook: the layout is chosen at restore.

Saves are asynchronous by default: `save` returns once the arrays are copied off the devices,
and the write finishes in the background. Every exit path waits: `close()` (called by `fit`
in a `finally`), and an `atexit` hook for checkpointers a user forgot to close. Orbax writes
into a temporary directory and renames it when complete, so a process killed mid-save leaves
the previous steps intact and the partial one invisible.
"""

import atexit
import os
import pathlib
import weakref
from typing import Any

import jax
import orbax.checkpoint as ocp

_OPEN: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


@atexit.register
def _wait_for_open_checkpointers() -> None:
    for ckpt in list(_OPEN):
        ckpt.close()


class Checkpointer:
    """Saves and restores training checkpoints in one directory.

    Args:
      directory: where step directories go (created if missing).
      max_to_keep: keep the newest N steps; None keeps all.
      async_save: write in a background thread (`save` returns early).
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save=True
    ):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )
        self._closed = False
        _OPEN.add(self)

    def all_steps(self) -> list[int]:
        """Every complete (committed) step, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or None if there is none."""
        return self._manager.latest_step()

    def save(
        self, step: int, state, *, data_position: int, config: dict[str, Any] | None = None
    ) -> None:
        """Starts saving `state` as `step` (returns before the write ends when async).

        Args:
          step: the step number (the directory's name).
          state: the TrainState (any pytree of arrays).
          data_position: the training loader's position (global batches consumed).
          config: the run's config as a JSON-ready dict.
        """
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave({"position": int(data_position)}),
                config=ocp.args.JsonSave(config or {}),
            ),
            force=True,
        )

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, int]:
        """Restores the state and the loader position of `step` (default: the newest).

        Args:
          abstract_state: the state's structure with `jax.ShapeDtypeStruct` leaves carrying the
            target `sharding` (see `abstract_with_shardings`).
          step: which step; None = the newest.
        Returns:
          (state, data_position).
        """
        step = self.resolve_step(step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], int(restored["data"]["position"])

    def restore_config(self, step: int | None = None) -> dict[str, Any]:
        """The config saved with `step` (default: the newest)."""
        step = self.resolve_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored["config"]

    def resolve_step(self, step: int | None) -> int:
        """`step` if it is saved, the newest step if None; FileNotFoundError otherwise."""
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

    def wait(self) -> None:
        """Blocks until every started save is written and committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._manager.wait_until_finished()
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
