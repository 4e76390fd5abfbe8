"""dlkit's modules import each other without cycles.

The graph is read from the source with `ast`, not by importing: every `import` and
`from ... import` naming a dlkit module, at module level, inside functions and under
`if TYPE_CHECKING:` alike, since each says that one module needs the other. An import inside a
function still ties the two modules together; it only hides the cycle from Python.
Importing `dlkit.a.b` also runs `dlkit/a/__init__.py`; those implicit edges are left out, or
every package's `__init__` would close a cycle with its own submodules.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "dlkit"


def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Module name -> file, for every .py under `root` (a package's name for its __init__)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _owner(name: str, modules) -> str | None:
    """The module that importing `name` loads: `name` itself, or its nearest enclosing one
    (`dlkit.data.Loader` is a name in the module `dlkit.data`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    """Module -> the dlkit modules it imports anywhere in its source."""
    modules = _modules(root)
    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(_owner(alias.name, modules) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: `from . import x`, `from ..a import b`
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:  # `from dlkit import loop` imports a module
                    targets.add(_owner(f"{source}.{alias.name}", modules))
        targets.discard(None)
        targets.discard(module)
        graph[module] = {t for t in targets if t.split(".")[0] == root.name}
    return graph


def _cycle(path: list[str]) -> tuple[str, ...]:
    """A cycle, rotated to start at its smallest module name (one spelling per cycle)."""
    start = path.index(min(path))
    return tuple(path[start:] + path[:start])


def find_cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Every elementary cycle of `graph` (each module at most once per cycle), sorted."""
    found = set()

    def walk(start, node, path, on_path):
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                found.add(_cycle(path))
            elif nxt not in on_path and nxt > start:  # a cycle is found from its smallest node
                walk(start, nxt, path + [nxt], on_path | {nxt})

    for start in sorted(graph):
        walk(start, start, [start], {start})
    return sorted(found)


def test_the_graph_reader_sees_every_kind_of_import(tmp_path):
    """A cycle hidden in a function, a relative import and a TYPE_CHECKING import all count."""
    pkg = tmp_path / "dlkit"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from dlkit import b\n")
    (pkg / "b.py").write_text("def f():\n    from dlkit.a import thing\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import C\n")
    (pkg / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import sub\nC = 1\n"
    )
    graph = import_graph(pkg)
    assert graph["dlkit.a"] == {"dlkit.b"} and graph["dlkit.b"] == {"dlkit.a"}
    assert graph["dlkit.sub"] == {"dlkit.sub.c"} and graph["dlkit.sub.c"] == {"dlkit.sub"}
    assert find_cycles(graph) == [("dlkit.a", "dlkit.b"), ("dlkit.sub", "dlkit.sub.c")]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    message = "\n  ".join(" -> ".join(c + c[:1]) for c in cycles)
    assert not cycles, f"import cycles:\n  {message}"
