"""A run's directory: config.json, metrics.jsonl, checkpoints/, and who owns them.

    workdir.claim(path, cfg, archive_mismatched=False, log=print)   # before anything is written

A workdir belongs to one experiment. Resuming is the point of a workdir, so a run whose
experiment or model differs from the one that wrote the checkpoints is refused (its
checkpoints would not fit, or worse, would silently continue another run) unless
`checkpoint.archive_mismatched` is set, in which case the old checkpoints and metrics are moved
to `*.archived-<time>` — nothing is deleted.
"""

import json
import time
from typing import Any

from etils import epath

from dlkit import config as config_lib
from dlkit import storage

# Config sections that decide what a checkpoint contains; a change there cannot resume.
_IDENTITY = ("name", "model", "loss")


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
