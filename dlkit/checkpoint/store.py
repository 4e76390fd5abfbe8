"""Writing and reading step directories with Orbax, in its standard format.

    saver = store.make_saver(async_save=True, on_commit=write_manifest_hook)
    store.save(saver, directory / "12", state, data_position=12, config=cfg_dict)
    state = store.restore_state(store.state_path(step_dir), abstract_state)

A step holds three Orbax items: "state" (the TrainState, Orbax's PyTree format: one zarr3 array
per leaf, TensorStore underneath), "data" ({"position": int}, JSON) and "config" (JSON); a run
fed by the Grain pipeline adds "grain": each process's Grain iterator state, written by Grain's
own Orbax handler (`grain/process_I-of-N.json`), and "data" then also holds "grain_start" (see
`dlkit.data.grain_pipeline`). Any Orbax user restores it without dlkit:

    import orbax.checkpoint as ocp
    items = ocp.CheckpointManager("run/checkpoints").restore(12)   # items["state"], ["data"]

Options of the "state" item (`STATE_OPTIONS`) were chosen by measurement
(benchmarks/checkpoint_speed.py; figures and the alternatives tried in docs/performance.md):
no OCDBT (one plain zarr3 directory per leaf, no merge of per-process databases at commit), and
no compression (Orbax's default zstd costs more time than the few percent it saves on float
weights). Integrity does not rely on TensorStore: dlkit's manifest covers every file
(`dlkit.checkpoint.commit`).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from etils import epath

from dlkit.checkpoint import commit

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

STATE, DATA, CONFIG, GRAIN = "state", "data", "config", "grain"
STATE_OPTIONS = {"use_ocdbt": False, "use_zarr3": True, "use_compression": False}
_PYTREE_METADATA = "_METADATA"  # the file that makes a directory an Orbax PyTree item


class _QuietEmptyMerge(logging.Filter):
    """Drops Orbax's "Skipping merge of OCDBT checkpoints" warning for the steps dlkit writes.

    Orbax's PyTree handler tries to merge per-process OCDBT files at the end of every save,
    whatever its `use_ocdbt`, and warns when it finds none. dlkit writes the state item without
    OCDBT (`STATE_OPTIONS`), so under its checkpoint directories that warning would come with
    every save and mean nothing; elsewhere (a user's own Orbax saves) it still reaches them."""

    def __init__(self):
        super().__init__()
        self.directories: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if "Skipping merge of OCDBT checkpoints" not in str(record.msg) or not record.args:
            return True
        # tuple() copies the set in one step: a save on another thread may add to it.
        return not str(record.args[-1]).startswith(tuple(self.directories))


_QUIET_EMPTY_MERGE = _QuietEmptyMerge()


def orbax():
    """`orbax.checkpoint`, imported at the first save or restore rather than with dlkit: the
    import is a large share of a short run's start-up, and a run that only trains before
    its first save never needs it earlier."""
    import orbax.checkpoint

    return orbax.checkpoint


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    return orbax().PyTreeCheckpointHandler(**STATE_OPTIONS)


class _IteratorState:
    """A saved Grain iterator state in the form Grain's checkpoint handler saves: an object whose
    `get_state()` returns the state as JSON bytes. The file it writes holds the same JSON as for
    a live Grain `DatasetIterator`, so Grain restores it into an iterator without dlkit."""

    def __init__(self, state):
        self._state = state

    def get_state(self) -> bytes:
        return json.dumps(self._state, indent=4).encode()


def make_saver(
    *, async_save: bool, on_commit, commit_file: bool = False, grain: bool = False
) -> ocp.AsyncCheckpointer | ocp.Checkpointer:
    """An Orbax checkpointer that writes dlkit's items and calls `on_commit(tmp, final)`
    inside the temporary directory, before the rename that publishes the step.

    Args:
      async_save: an AsyncCheckpointer (the write continues in the background) or not.
      on_commit, commit_file: see `commit.temporary_path_class`.
      grain: also write the "grain" item (Grain's handler; imports Grain).
    Returns:
      the checkpointer; its `save(step_dir, args=...)` is called by `save` below.
    """
    ocp = orbax()
    handlers = {
        STATE: _state_handler(),
        DATA: ocp.JsonCheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
    }
    if grain:
        from dlkit.data import grain_pipeline

        handlers[GRAIN] = grain_pipeline.import_grain().checkpoint.CheckpointHandler()
    handler = ocp.CompositeCheckpointHandler(**handlers)
    tmp_class = commit.temporary_path_class(on_commit, commit_file=commit_file)
    if async_save:
        return ocp.AsyncCheckpointer(handler, temporary_path_class=tmp_class)
    return ocp.Checkpointer(handler, temporary_path_class=tmp_class)


def save(
    saver, step_dir: epath.Path, state, *, data_position: int, config: dict, data_state=None
) -> None:
    """Starts writing one step (returns when written, for a sync saver).

    Args:
      saver: from `make_saver` (with `grain=True` when `data_state` is given).
      step_dir: the step's final directory (must not exist).
      state: the TrainState (a pytree of arrays).
      data_position: the training loader's position.
      config: the run's config, JSON-ready.
      data_state: None, or the Grain pipeline's {"start": int, "iterator": state} of this
        process (`GrainLoader.state_at`).
    """
    ocp = orbax()
    data = {"position": int(data_position)}
    items = {STATE: ocp.args.PyTreeSave(state), CONFIG: ocp.args.JsonSave(config)}
    if data_state is not None:
        from dlkit.data import grain_pipeline

        data["grain_start"] = int(data_state["start"])
        iterator = _IteratorState(data_state["iterator"])
        items[GRAIN] = grain_pipeline.import_grain().checkpoint.CheckpointSave(iterator)
    items[DATA] = ocp.args.JsonSave(data)
    args = ocp.args.Composite(**items)
    if not STATE_OPTIONS["use_ocdbt"]:
        _QUIET_EMPTY_MERGE.directories.add(str(step_dir.parent).rstrip("/") + "/")
        logging.getLogger("absl").addFilter(_QUIET_EMPTY_MERGE)  # once: same object
    saver.save(step_dir, args=args, custom_metadata={commit.WRITER_KEY: {"version": 1}})


def state_path(step_dir: epath.Path) -> epath.Path | None:
    """Where a step's state item is: `state/` (dlkit, or Orbax with an item of that name), the
    step directory itself (a bare PyTree), or its only PyTree item (e.g. Orbax's `default/`).
    None if none of these holds an Orbax PyTree."""
    if (step_dir / STATE / _PYTREE_METADATA).exists():
        return step_dir / STATE
    if (step_dir / _PYTREE_METADATA).exists():
        return step_dir
    items = [p for p in step_dir.iterdir() if p.is_dir() and (p / _PYTREE_METADATA).exists()]
    return items[0] if len(items) == 1 else None


def saved_tree(path: epath.Path):
    """The saved pytree's structure, with Orbax `ArrayMetadata` (`.shape`, `.dtype`) leaves."""
    return _state_handler().metadata(path).tree


def misfits(path: epath.Path, abstract_state) -> list[str]:
    """How a saved state item and a restore target differ, compared by the names Orbax stores
    leaves under ("params.Dense_0.kernel"), shown as paths ("params/Dense_0/kernel").

    Args:
      path: the item directory (`state_path`).
      abstract_state: the restore target (leaves with `.shape`).
    Returns:
      one line per leaf missing on either side or of another shape; [] when it fits.
    """
    saved = {m.name: m for m in jax.tree.leaves(saved_tree(path)) if hasattr(m, "name")}
    flat = flat_leaves(abstract_state)
    want = {key.replace("/", "."): leaf for key, leaf in flat.items()}
    label = {key.replace("/", "."): key for key in flat}
    problems = [
        f"{label[name]}: in this model, not in the checkpoint"
        for name in sorted(want.keys() - saved.keys())
    ]
    problems += [
        f"{name.replace('.', '/')}: in the checkpoint, not in this model"
        for name in sorted(saved.keys() - want.keys())
    ]
    for name in sorted(want.keys() & saved.keys()):
        if tuple(want[name].shape) != tuple(saved[name].shape):
            problems.append(
                f"{label[name]}: this model expects shape {tuple(want[name].shape)}, "
                f"the checkpoint has {tuple(saved[name].shape)}"
            )
    # The params first: they name the layer that differs; optimizer leaves only mirror them.
    return sorted(problems, key=lambda line: not line.startswith("params/"))


def check_fits(path: epath.Path, abstract_state, *, where: str) -> None:
    """Raises CheckpointError naming the leaves missing on either side or of another shape.

    Args:
      path: the item directory (`state_path`).
      abstract_state: the restore target.
      where: the step, as the error names it ("step 12 in run/checkpoints").
    """
    try:
        problems = misfits(path, abstract_state)
    except Exception as e:  # noqa: BLE001 - an unreadable item is reported, not raised raw
        raise commit.CheckpointError(
            f"restore: {where}: its state metadata is unreadable: {e}"
        ) from e
    if problems:
        listed = "\n  ".join(problems[:8])
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise commit.CheckpointError(
            f"restore: checkpoint {where} does not fit this model:\n  {listed}{more}"
        )


def restore_state(path: epath.Path, abstract_state):
    """Reads a state item onto the shardings of `abstract_state`'s leaves.

    Args:
      path: the item directory (`state_path`).
      abstract_state: the target structure; `jax.ShapeDtypeStruct` leaves with `sharding`.
    Returns:
      the state, `abstract_state`'s structure, jax.Arrays on the target shardings.
    """
    ocp = orbax()
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    args = ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args)
    return _state_handler().restore(path, args=args)


def restore_numpy(path: epath.Path) -> Any:
    """Reads a whole state item into host memory, in its saved structure (numpy leaves)."""
    ocp = orbax()
    meta = saved_tree(path)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    return _state_handler().restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def read_json_item(step_dir: epath.Path, name: str) -> dict | None:
    """The JSON item `name` ("data" or "config") of a step, or None if it has none."""
    ocp = orbax()
    path = step_dir / name
    if not path.is_dir():
        return None
    return ocp.JsonCheckpointHandler().restore(path, args=ocp.args.JsonRestore())


def read_data_state(step_dir: epath.Path) -> dict | None:
    """This process's Grain pipeline state saved with a step, {"start": int, "iterator":
    state}, or None when the step has no "grain" item (a run without Grain, another tool)."""
    data = read_json_item(step_dir, DATA) or {}
    path = step_dir / GRAIN / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if "grain_start" not in data or not path.exists():
        return None
    return {"start": int(data["grain_start"]), "iterator": json.loads(path.read_text())}


def key_name(entry) -> str:
    """One path entry of a pytree key path as text (a field, a dict key, a list index)."""
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flat_leaves(tree) -> dict[str, Any]:
    """{"a/b/c": leaf} of a pytree: TrainState fields, dict keys and indices joined by "/"."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(key_name(e) for e in path): leaf for path, leaf in flat}


def abstract_with_shardings(abstract_state, shardings):
    """Attaches a sharding to each `ShapeDtypeStruct` leaf (a restore target).

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct`.
      shardings: the same structure, of `jax.sharding.Sharding`.
    Returns:
      the pytree of `ShapeDtypeStruct` with `sharding` set.
    """
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )
