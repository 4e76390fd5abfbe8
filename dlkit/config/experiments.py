"""Finding and loading experiments: Python files `experiments/<name>.py` with a `config()`
function returning a `Config`.

    from dlkit import config as config_lib
    cfg = config_lib.load_config("digits_mlp", overrides=["train.steps=200"])
    config_lib.list_experiments()        # [(name, first line of its docstring), ...]
    config_lib.find_experiment("digits_mlp")   # the file's path

Names are looked up in `$DLKIT_EXPERIMENTS_DIR`, the repository's experiments/, then the
current directory's experiments/ (`experiment_dirs`).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import types
import typing

from dlkit import errors
from dlkit.config import overrides as overrides_lib
from dlkit.config import sections


def experiment_dirs() -> list[pathlib.Path]:
    """Where experiment names are looked up, in order."""
    dirs = []
    if os.environ.get("DLKIT_EXPERIMENTS_DIR"):
        dirs.append(pathlib.Path(os.environ["DLKIT_EXPERIMENTS_DIR"]))
    # The repository's experiments/ next to the package (an editable install), then the cwd's.
    dirs.append(pathlib.Path(__file__).resolve().parents[2] / "experiments")
    dirs.append(pathlib.Path.cwd() / "experiments")
    seen, out = set(), []
    for d in dirs:
        if d.resolve() not in seen and d.is_dir():
            seen.add(d.resolve())
            out.append(d)
    return out


def find_experiment(name_or_path: str) -> pathlib.Path:
    """Resolves an experiment name (`digits_mlp`) or a path to a .py file."""
    path = pathlib.Path(name_or_path)
    if path.suffix == ".py":
        if not path.is_file():
            raise errors.ConfigError(f"experiment: no such file {str(path)!r}")
        return path
    for d in experiment_dirs():
        candidate = d / f"{name_or_path}.py"
        if candidate.is_file():
            return candidate
    known = [n for n, _ in list_experiments()]
    raise errors.ConfigError(
        f"experiment: expected a name from {known} or a path to a .py file, got {name_or_path!r}"
    )


def _load_module(path: pathlib.Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"dlkit_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "config", None)):
        raise errors.ConfigError(
            f"experiment {str(path)!r}: expected a function config(), found none"
        )
    return module


def load_config(name_or_path: str, overrides: typing.Iterable[str] = ()) -> sections.Config:
    """Loads an experiment's `config()` and applies "key=value" overrides.

    Args:
      name_or_path: a name under experiments/ (see `dlkit list`) or a path to a .py file.
      overrides: "key=value" strings, applied in order.
    Returns:
      The `Config`; its `name` is the experiment's file name unless the experiment set one.
    """
    path = find_experiment(name_or_path)
    cfg = _load_module(path).config()
    if not isinstance(cfg, sections.Config):
        raise errors.ConfigError(
            f"experiment {str(path)!r}: config() must return dlkit.Config, got {type(cfg)}"
        )
    if cfg.name == "unnamed":
        cfg.name = path.stem
    return overrides_lib.apply_overrides(cfg, overrides)


def fit_arguments(name_or_path: str) -> dict[str, typing.Any]:
    """An experiment file's own `loss_fn` and `metrics` (module-level names, optional), as
    `dlkit.fit` keywords: `dlkit train` passes them, so a custom loss is usable from a file.

        def loss_fn(outputs, labels): ...          # -> (B,)
        metrics = {"top2": top2}                   # {name: fn(outputs, labels) -> (B,)}
    """
    module = _load_module(find_experiment(name_or_path))
    return {k: getattr(module, k) for k in ("loss_fn", "metrics") if hasattr(module, k)}


def list_experiments() -> list[tuple[str, str]]:
    """(name, first line of the docstring) for every experiment found."""
    found: dict[str, str] = {}
    for d in experiment_dirs():
        for path in sorted(d.glob("*.py")):
            if path.stem.startswith("_") or path.stem in found:
                continue
            found[path.stem] = _docstring_summary(path)
    return sorted(found.items())


def _docstring_summary(path: pathlib.Path) -> str:
    try:
        doc = ast.get_docstring(ast.parse(path.read_text()))
    except SyntaxError:
        return "(does not parse)"
    return doc.strip().splitlines()[0] if doc else ""
