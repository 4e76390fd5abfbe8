"""What a run trained and evaluated on, kept in its workdir (run.json), so that later
evaluation uses the same data and model.

    {"train": {"kind": "dataset", "name": "fashion_mnist", "split": "train", ...},
     "eval": {"kind": "python", "type": "ArraySource", "examples": 10000},
     "model": {"kind": "nnx", "class": "__main__.CNN"}}

A dataset named by the config (with its arguments, and the size and SHA-256 of a file given as
`data.path`) can be rebuilt from the config, and is. Python objects passed to `fit` cannot: then
`dlkit.evaluate`, `dlkit.report` and the explainers need an explicit `eval_source` (and the CLI,
which has none, refuses), instead of silently evaluating the config's default dataset. The same
holds for a model passed as `fit(model=...)`.
"""

import hashlib
import json
import pathlib
from typing import Any

from dlkit import config as config_lib

FILE = "run.json"


class RecordError(ValueError):
    """The workdir's data or model cannot be rebuilt from what is given."""


def _file_facts(path: str) -> dict[str, Any]:
    p = pathlib.Path(path)
    if p.is_dir():
        # A directory of .npy or ArrayRecord files may be larger than memory: recorded by its
        # files' names and sizes; hashing it would read all of it before every run.
        files = sorted(f for f in p.iterdir() if f.is_file())
        sizes = {f.name: f.stat().st_size for f in files}
        return {"path": str(p.resolve()), "bytes": sum(sizes.values()), "files": sizes}
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": digest.hexdigest()}


def _dataset(cfg: config_lib.Config, split: str) -> dict[str, Any]:
    d = cfg.data
    out: dict[str, Any] = {"kind": "dataset", "name": d.name, "split": split}
    if split == "validation":
        out["held_out_train_examples"] = d.validation_examples
    if d.name in ("text", "kjv"):
        out["seq_len"] = d.seq_len
    if d.path:
        out.update(_file_facts(d.path))
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
    import flax.nnx as nnx

    if train_source is not None and eval_source is None:
        held_out = cfg.data.validation_examples or len(train_source) // 10
        eval_record = {**_python(train_source), "held_out_last": held_out}
    else:
        eval_record = (
            _dataset(cfg, cfg.data.eval_split) if eval_source is None else _python(eval_source)
        )
    if model is None:
        model_record = {"kind": "config", "name": cfg.model.name}
    else:
        kind = "nnx" if isinstance(model, nnx.Module) else "linen"
        cls = type(model)
        model_record = {"kind": kind, "class": f"{cls.__module__}.{cls.__qualname__}"}
    return {
        "train": _dataset(cfg, "train") if train_source is None else _python(train_source),
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
    if "sha256" in entry:
        now = _file_facts(entry["path"]) if pathlib.Path(entry["path"]).is_file() else None
        if now is None or now["sha256"] != entry["sha256"]:
            got = "missing" if now is None else f"{now['bytes']} bytes, sha256 {now['sha256']}"
            raise RecordError(
                f"data.path: {workdir} was trained on {entry['path']} ({entry['bytes']} bytes, "
                f"sha256 {entry['sha256']}); that file is now {got}"
            )
