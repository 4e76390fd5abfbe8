"""Fine-tuning: a fresh run's params (and model_state) taken from another run or tool.

    state = init_from.apply(state, "runs/pretrained", "^params/Dense_2/=;", log=print)
    # or: dlkit train my_exp --set checkpoint.init_from=runs/pretrained \
    #         --set 'checkpoint.init_from_map=^params/head/.*='

The source is a dlkit workdir (its newest valid step), a dlkit step directory (verified first),
or any Orbax PyTree directory (a TrainState-like tree with "params", or a bare tree of params).
Saved leaves are named by their path ("params/Dense_0/kernel", "model_state/batch_stats/...");
`init_from_map` renames them with regular expressions, in order, before they are matched to the
model's leaves by name. Matching leaves are loaded (a different shape is an error naming the
leaf), the model's other leaves keep their fresh initialisation, saved leaves nothing matches
are reported as unused. The optimizer state, the step and the RNG start fresh.
"""

import re
from typing import Any

import jax
import numpy as np
from etils import epath

from dlkit.checkpoint import checkpointer as checkpointer_lib
from dlkit.checkpoint import commit, retention, store

_LOADED = ("params", "model_state")


def parse_map(rename_map: str | list | tuple | dict) -> list[tuple[re.Pattern, str]]:
    """Renames as (compiled regex, replacement) pairs, in order.

    Args:
      rename_map: "REGEX=REPLACEMENT;REGEX=REPLACEMENT" (split at each ";", then at the last
        "="), a sequence of "REGEX=REPLACEMENT" strings, or a {regex: replacement} dict.
    Returns:
      the pairs; an empty replacement drops the leaves it matches.
    """
    if isinstance(rename_map, dict):
        items = list(rename_map.items())
    else:
        entries = rename_map.split(";") if isinstance(rename_map, str) else list(rename_map)
        items = []
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            if "=" not in entry:
                raise ValueError(
                    f"checkpoint.init_from_map: expected REGEX=REPLACEMENT entries separated "
                    f"by ';', got {entry!r}"
                )
            pattern, _, replacement = entry.rpartition("=")
            items.append((pattern, replacement))
    pairs = []
    for pattern, replacement in items:
        try:
            pairs.append((re.compile(pattern), replacement))
        except re.error as e:
            raise ValueError(f"checkpoint.init_from_map: bad regex {pattern!r}: {e}") from e
    return pairs


def source_item(source: str) -> epath.Path:
    """The Orbax PyTree directory that `source` names (see the module docstring).

    Raises:
      FileNotFoundError: `source` does not exist or holds no step.
      CheckpointError: a dlkit step that fails verification, or a directory with no PyTree.
    """
    path = epath.Path(source)
    if not path.exists():
        raise FileNotFoundError(
            "checkpoint.init_from: expected a dlkit workdir, a dlkit step directory or an "
            f"Orbax PyTree directory, got {source!r}, which does not exist"
        )
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if store.state_path(path) is None and retention.step_dirs(path):
        with checkpointer_lib.Checkpointer(path, max_to_keep=None, read_only=True) as ckpt:
            path = path / str(ckpt.valid_step())
    if (path / commit.MANIFEST).exists():
        problems = commit.verify_step(path)
        if problems:
            raise commit.CheckpointError(
                f"checkpoint.init_from: {path} is corrupt: {'; '.join(problems)}"
            )
    item = store.state_path(path)
    if item is None:
        raise commit.CheckpointError(
            f"checkpoint.init_from: {source!r} holds no Orbax PyTree (no _METADATA in it, in "
            "its state/ item or in a step of it)"
        )
    return item


def _saved_leaves(item: epath.Path) -> dict[str, np.ndarray]:
    """{path: array} of the saved params and model_state ("params/..." for a bare tree)."""
    flat = store.flat_leaves(store.restore_numpy(item))
    if not any(key.split("/")[0] in _LOADED for key in flat):
        return {f"params/{key}": value for key, value in flat.items()}
    return {k: v for k, v in flat.items() if k.split("/")[0] in _LOADED}


def apply(state, source: str, rename_map: Any = "", *, log=print):
    """Returns `state` with its params (and model_state) loaded from `source`.

    Args:
      state: a freshly initialised TrainState (its leaves give the target shapes, dtypes and
        shardings).
      source: a dlkit workdir, a dlkit step directory, or an Orbax PyTree directory.
      rename_map: renames of the saved leaves' paths (`parse_map`).
      log: where the report of loaded / newly initialised / unused leaves goes.
    Returns:
      the TrainState; its `ema_params` (if kept) start at the loaded params.
    Raises:
      ValueError: a leaf has another shape in `source` (named), or no leaf matched.
    """
    renames = parse_map(rename_map)
    item = source_item(source)
    mapped: dict[str, tuple[str, np.ndarray]] = {}
    for key, value in _saved_leaves(item).items():
        new = key
        for pattern, replacement in renames:
            new = pattern.sub(replacement, new)
        if new:
            mapped[new] = (key, value)
    target = {"params": state.params, "model_state": state.model_state}
    paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    leaves, loaded, fresh, misfits = [], [], [], []
    for path, leaf in paths:
        key = "/".join(store.key_name(e) for e in path)
        if key not in mapped:
            fresh.append(key)
            leaves.append(leaf)
            continue
        saved_key, value = mapped[key]
        if tuple(value.shape) != tuple(leaf.shape):
            misfits.append(
                f"{key}: this model expects shape {tuple(leaf.shape)}, {source} has "
                f"{tuple(value.shape)} (saved as {saved_key})"
            )
            leaves.append(leaf)
            continue
        loaded.append(key)
        leaves.append(jax.device_put(value.astype(leaf.dtype), leaf.sharding))
    if misfits:
        raise ValueError(
            "checkpoint.init_from: leaves of another shape (rename or drop them with "
            "checkpoint.init_from_map):\n  " + "\n  ".join(misfits)
        )
    if not loaded:
        raise ValueError(
            f"checkpoint.init_from: no leaf of {source} matches this model's; saved (after "
            f"init_from_map): {sorted(mapped)[:8]}, expected e.g. {fresh[:8]}"
        )
    unused = sorted(set(mapped) - set(loaded))
    log(
        f"init_from {source} ({item}): loaded {len(loaded)} leaves, newly initialised "
        f"{len(fresh)}{_listed(fresh)}, unused {len(unused)}{_listed(unused)}; the optimizer "
        "state starts fresh"
    )
    new = jax.tree_util.tree_unflatten(treedef, leaves)
    replace = {"params": new["params"], "model_state": new["model_state"]}
    if getattr(state, "ema_params", None) is not None:
        replace["ema_params"] = jax.tree.map(lambda x: x.copy(), new["params"])
    return state.replace(**replace)


def _listed(keys: list[str]) -> str:
    return f" {keys}" if keys else ""
