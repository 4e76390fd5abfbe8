"""What a run trained and evaluated on, kept in its workdir (run.json), so that later
evaluation uses the same data and model.

    {"train": {"kind": "dataset", "name": "fashion_mnist", "split": "train", ...},
     "eval": {"kind": "python", "type": "ArraySource", "examples": 10000},
     "model": {"kind": "nnx", "class": "__main__.CNN"}}

A dataset named by the config (with its arguments, and the size and SHA-256 of a file given as
`data.path`, or of each .npy file in a directory given as `data.path`) can be rebuilt from the
config, and is; evaluation refuses a recorded file that changed since. A file up to
`FULL_HASH_BYTES` is hashed whole. A larger one (memory-mapped arrays, checked by every `fit`
and every evaluation) is hashed by `SAMPLE_BLOCKS` blocks of 1 MiB spread evenly from its first
byte to its last, and recorded with "sha256_of": "sampled"; an edit between the blocks that
keeps the size is then not seen.

Python objects passed to `fit` cannot be rebuilt: then `dlkit.evaluate`, `dlkit.report` and the
explainers need an explicit `eval_source` (and the CLI, which has none, refuses), instead of
silently evaluating the config's default dataset. The same holds for a model passed as
`fit(model=...)`.
"""

import functools
import hashlib
import json
import pathlib
import sys
from typing import Any

from dlkit import config as config_lib

FILE = "run.json"


class RecordError(ValueError):
    """The workdir's data or model cannot be rebuilt from what is given."""


FULL_HASH_BYTES = 64 << 20
SAMPLE_BLOCKS = 16
_BLOCK = 1 << 20


def _sha256(path: pathlib.Path, size: int, sampled: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if not sampled:
            for block in iter(lambda: f.read(_BLOCK), b""):
                digest.update(block)
        else:
            # Evenly spaced offsets, the first at 0 and the last ending at the file's last byte:
            # a rewrite of memory-mapped arrays changes the bytes almost everywhere, a changed
            # header or appended examples change the ends (and the size).
            last = max(size - _BLOCK, 0)
            for k in range(SAMPLE_BLOCKS):
                f.seek(last * k // (SAMPLE_BLOCKS - 1))
                digest.update(f.read(_BLOCK))
    return digest.hexdigest()


def _file_facts(path: str | pathlib.Path, sampled: bool | None = None) -> dict[str, Any]:
    """{"path", "bytes", "sha256"} of a file, plus "sha256_of": "sampled" when it was hashed by
    samples; `sampled`: None = by its size (above FULL_HASH_BYTES), else as a record says."""
    p = pathlib.Path(path)
    size = p.stat().st_size
    if sampled is None:
        sampled = size > FULL_HASH_BYTES
    facts = {"path": str(p.resolve()), "bytes": size, "sha256": _sha256(p, size, sampled)}
    if sampled:
        facts["sha256_of"] = "sampled"
    return facts


def _directory_facts(path: str | pathlib.Path) -> dict[str, Any]:
    """{"path", "files": {name: {"bytes", "sha256"[, "sha256_of"]}}} of the data files in a
    directory: the .npy files `data.name=arrays` reads, the .array_record files
    `data.name=arrayrecord` reads (other files there, e.g. notes, are not data)."""
    p = pathlib.Path(path)
    files = {}
    for f in sorted([*p.glob("*.npy"), *p.glob("*.array_record")]):
        facts = _file_facts(f)
        del facts["path"]
        files[f.name] = facts
    return {"path": str(p.resolve()), "files": files}


def _path_facts(path: str) -> dict[str, Any]:
    return _directory_facts(path) if pathlib.Path(path).is_dir() else _file_facts(path)


def _changes(entry: dict[str, Any]) -> list[str]:
    """How the file or directory recorded in `entry` differs from what is there now."""
    root = pathlib.Path(entry["path"])
    if "files" not in entry:
        recorded = {root.name: entry}
        root = root.parent
    elif root.is_dir():
        recorded = entry["files"]
    else:
        return [f"{root} is no longer a directory"]
    out = []
    for name, was in recorded.items():
        f = root / name
        if not f.is_file():
            out.append(f"{f}: was {was['bytes']} bytes, sha256 {was['sha256']}; now missing")
            continue
        size = f.stat().st_size
        now = {"bytes": size, "sha256": "not hashed (another size)"}
        if size == was["bytes"]:
            now = _file_facts(f, sampled=was.get("sha256_of") == "sampled")
        if now["bytes"] != was["bytes"] or now["sha256"] != was["sha256"]:
            out.append(
                f"{f}: was {was['bytes']} bytes, sha256 {was['sha256']}; now {now['bytes']} "
                f"bytes, sha256 {now['sha256']}"
            )
    return out


def _dataset(cfg: config_lib.Config, split: str, path_facts=_path_facts) -> dict[str, Any]:
    d = cfg.data
    out: dict[str, Any] = {"kind": "dataset", "name": d.name, "split": split}
    if split == "validation":
        out["held_out_train_examples"] = d.validation_examples
    if d.name in ("text", "kjv"):
        out["seq_len"] = d.seq_len
    if d.path:
        out.update(path_facts(d.path))
    return out


def _python(source) -> dict[str, Any]:
    return {"kind": "python", "type": type(source).__name__, "examples": len(source)}


def qualname(fn) -> str:
    """ "module.qualname" of a function (a `functools.partial` or other callable: its type's)."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}.{target.__qualname__}"


def describe(
    cfg: config_lib.Config, model, train_source, eval_source, loss_fn=None, metrics=None
) -> dict[str, Any]:
    """The record of a run given `fit`'s own arguments (None = the config's choice)."""
    # The train and eval records name the same data.path: hash it once, not once per split.
    path_facts = functools.cache(_path_facts)
    train_record = (
        _dataset(cfg, "train", path_facts) if train_source is None else _python(train_source)
    )
    if train_source is not None and eval_source is None:
        held_out = cfg.data.validation_examples or len(train_source) // 10
        eval_record = {**_python(train_source), "held_out_last": held_out}
    else:
        eval_record = (
            _dataset(cfg, cfg.data.eval_split, path_facts)
            if eval_source is None
            else _python(eval_source)
        )
    if model is None:
        model_record = {"kind": "config", "name": cfg.model.name}
    else:
        # A model can only be an nnx.Module if flax.nnx is imported; importing it here would
        # cost every run with a config model the start-up time of flax.nnx (and IPython).
        nnx = sys.modules.get("flax.nnx")
        kind = "nnx" if nnx is not None and isinstance(model, nnx.Module) else "linen"
        cls = type(model)
        model_record = {"kind": kind, "class": f"{cls.__module__}.{cls.__qualname__}"}
    return {
        "train": train_record,
        "eval": eval_record,
        "model": model_record,
        "loss": (
            {"kind": "config", "name": cfg.loss.name}
            if loss_fn is None
            else {"kind": "python", "function": qualname(loss_fn)}
        ),
        # Only your own metrics: the config's are rebuilt from it.
        "metrics": {name: qualname(fn) for name, fn in (metrics or {}).items()},
    }


def write(workdir: pathlib.Path, record: dict[str, Any]) -> None:
    (workdir / FILE).write_text(json.dumps(record, indent=2) + "\n")


def read(workdir: pathlib.Path) -> dict[str, Any] | None:
    """The workdir's record; None for runs written before run.json existed."""
    path = pathlib.Path(workdir) / FILE
    return json.loads(path.read_text()) if path.is_file() else None


def summary(entry: dict[str, Any]) -> str:
    """One line for a log: "dataset fashion_mnist (test)" or "Python objects (ArraySource, …)"."""
    if entry["kind"] == "dataset":
        where = f", {entry['path']}" if "path" in entry else ""
        return f"dataset {entry['name']} ({entry['split']}{where})"
    held = entry.get("held_out_last")
    if held:
        return f"the last {held} examples of train_source ({entry['type']}), held out"
    return f"Python objects ({entry['type']}, {entry['examples']} examples)"


def check_loss(workdir, loss_fn=None, metrics=None) -> None:
    """Raises RecordError when `workdir` was trained with your own loss or metrics
    (`fit(loss_fn=..., metrics=...)`) and they are not given: the config's loss would give
    another number under the same name."""
    record = read(workdir) or {}
    loss = record.get("loss", {})
    if loss.get("kind") == "python" and loss_fn is None:
        raise RecordError(
            f"loss_fn: {workdir} was trained with your own loss {loss['function']} "
            "(fit(loss_fn=...)), not the config's loss.name; evaluating with the config's loss "
            "would report another number as eval loss. Pass loss_fn= (the same function) to "
            "dlkit.evaluate from Python, or --loss MODULE:FUNCTION to dlkit eval"
        )
    missing = sorted(set(record.get("metrics") or {}) - set(metrics or {}))
    if missing:
        names = ", ".join(f"{k} ({record['metrics'][k]})" for k in missing)
        raise RecordError(
            f"metrics: {workdir} was trained with your own metrics {names} "
            "(fit(metrics=...)), not given here. Pass metrics={name: function} to "
            "dlkit.evaluate from Python, or --metric NAME=MODULE:FUNCTION to dlkit eval"
        )


def check(workdir, *, eval_source=None, model=None, need_data: bool = True) -> None:
    """Raises RecordError when evaluating `workdir` would use other data or another model than
    the run: data given to `fit` as Python objects and no `eval_source`, a recorded file that
    changed since, or a model given to `fit` and no `model`."""
    record = read(workdir)
    if record is None:
        return
    entry, m = record["eval"], record["model"]
    if m["kind"] != "config" and model is None:
        raise RecordError(
            f"model: {workdir} was trained with your own {m['kind']} model {m['class']} "
            "(fit(model=...)); it cannot be rebuilt from the workdir. Pass model= (an "
            "instance of that class) to dlkit.evaluate / dlkit.load_checkpoint from Python, "
            "or --model MODULE:FUNCTION (a function returning one) to dlkit eval"
        )
    if not need_data or eval_source is not None:
        return
    if entry["kind"] == "python":
        raise RecordError(
            f"eval_source: {workdir} was evaluated on {summary(entry)} passed to fit; they "
            "cannot be rebuilt from the workdir, and the config's dataset is other data. Pass "
            "eval_source= to dlkit.evaluate / dlkit.report.report from Python (the command "
            "line cannot), or train with data.name=arrays and data.path=FILE"
        )
    if "sha256" in entry or "files" in entry:
        changes = _changes(entry)
        if changes:
            raise RecordError(
                f"data.path: {workdir} was trained on {entry['path']}, which changed since; "
                "evaluating it would report numbers on other data than the run's. "
                + "; ".join(changes)
            )
