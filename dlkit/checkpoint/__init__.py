"""Checkpoints in Orbax's standard format: the whole TrainState, the data position, the config.

    ckpt = dlkit.checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=3)
    ckpt.save(step, state, data_position=step, config=cfg.to_dict())   # async by default
    state, data_position = ckpt.restore(abstract_state)                 # newest valid step
    ckpt.close()                                                         # waits for writes

A plain Orbax user opens a dlkit step without dlkit:

    import orbax.checkpoint as ocp
    items = ocp.CheckpointManager("run/checkpoints").restore(12)
    items["state"], items["data"]["position"], items["config"]

Parts:
- `commit`: when a step counts, the checksum manifest, verification (CheckpointError).
- `retention`: which steps stay, crash-safe deletion, quarantine, cleaning leftovers.
- `store`: writing and reading the Orbax items.
- `checkpointer`: `Checkpointer`, which ties them together.
- `init_from`: initialising a new run's params from another run or tool (fine-tuning).
- `exit_hook`: closes checkpointers left open when the interpreter exits, so no save is lost.
"""

from dlkit.checkpoint import commit, init_from, retention, store
from dlkit.checkpoint.checkpointer import Checkpointer
from dlkit.checkpoint.commit import (
    CHUNK_BYTES,
    COMMIT_MARKER,
    MANIFEST,
    STEP_METADATA,
    CheckpointError,
    verify_step,
    write_manifest,
)
from dlkit.checkpoint.retention import QUARANTINE, TRASH
from dlkit.checkpoint.store import abstract_with_shardings

__all__ = [
    "CHUNK_BYTES",
    "COMMIT_MARKER",
    "MANIFEST",
    "QUARANTINE",
    "STEP_METADATA",
    "TRASH",
    "CheckpointError",
    "Checkpointer",
    "abstract_with_shardings",
    "commit",
    "init_from",
    "retention",
    "store",
    "verify_step",
    "write_manifest",
]
