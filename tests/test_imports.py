"""The package's import graph has no circle (walked from the source, lazy imports too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import rankcut

ROOT = Path(rankcut.__file__).parent


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package (a package is its
    ``__init__.py``)."""
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Import nodes anywhere in ``tree`` (inside functions too: a lazy import is still a
    dependency), except under ``if TYPE_CHECKING:`` (never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: modules it imports}`` within the package.

    Importing ``a.b.c`` runs the packages ``a`` and ``a.b`` first, so they count too,
    except the importer's own ancestors (already running when it is imported).
    """
    modules = module_names(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
            stem = ".".join(base + ([node.module] if node.module else []))
            if not node.level:
                stem = node.module or ""
            targets.add(stem)
            targets.update(f"{stem}.{alias.name}" for alias in node.names)
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        if path.name == "__init__.py":
            ancestors.add(name)
        edges = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the module and the packages it lies in
                dotted = ".".join(parts[:i])
                if dotted in modules and dotted not in ancestors:
                    edges.add(dotted)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]], through: str | None = None) -> list[str] | None:
    """One import circle ``[a, b, ..., a]`` of ``graph`` (one that passes through the
    module ``through``, when given), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1 and (through is None or nxt == through):
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        # Searching for one module's circle, a node is done only for this start.
        state[node] = 2
        return None

    for node in [through] if through else sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walker_sees_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle(graph, through="c") == ["c", "a", "b", "c"]
    assert find_cycle(graph, through="d") is None
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_walker_resolves_relative_and_lazy_imports():
    graph = import_graph()
    assert "rankcut.data.windows" in graph["rankcut.data.sampling"]  # from .windows import
    assert "rankcut.models.kind" in graph["rankcut.data.sampling"]  # from ..models.kind import
    assert "rankcut.models" in graph["rankcut.data.sampling"]  # ... runs rankcut/models first
    assert "rankcut.data.corpora" in graph["rankcut.data.spec"]  # inside a function
    assert "rankcut.data" not in graph["rankcut.data.spec"]  # its own package is running


@pytest.mark.parametrize("package", ["rankcut.data", "rankcut.models", "rankcut.calibrate"])
def test_no_import_circle_through(package):
    graph = import_graph()
    for module in sorted(m for m in graph if m == package or m.startswith(package + ".")):
        assert find_cycle(graph, through=module) is None, module


def test_no_import_circle():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize(
    ("statement", "heavy"),
    [
        # `import rankcut` is cheap: nothing heavy until a verb is used
        ("import rankcut", ("transformers", "datasets", "matplotlib", "peft", "torch")),
        # the CLI builds its flags from the recipe before anything is loaded
        (
            "from rankcut.recipe import CompressRecipe; "
            "CompressRecipe.from_dict({'ratio': 0.3, 'method': 'svd'}).to_json()",
            ("transformers",),
        ),
    ],
)
def test_import_is_lean(statement, heavy):
    code = f"import sys; {statement}; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
