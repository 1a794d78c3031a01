"""No import cycle between megatron_sv's modules.

The graph is read from the source (the AST), not by importing anything: an edge A -> B for every import
that runs when A is imported (module level, including ``try``/``if`` blocks there, but not imports inside
functions, which run later, nor ``if TYPE_CHECKING:`` blocks). Importing ``pkg.mod`` also runs ``pkg``'s
``__init__``, so an import reaches every package on the way (except the importer's own packages, which
Python imported first; importing a name from one of them is an edge). A cycle means the result depends on which
module is imported first (a partially initialized module), the kind of bug that appears only in some
entry points."""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Optional, Set

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _modules(root: str, package: str) -> Dict[str, str]:
    """{dotted module name: file} of every module of ``package`` under ``root``."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(root, package)):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)[: -len(".py")].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = os.path.join(dirpath, name)
    return out


def _every_import(body: List[ast.stmt]):
    """Every import statement, also inside functions (a lazy import defers a cycle, it does not remove it)."""
    for node in body:
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Import, ast.ImportFrom)):
                yield sub


def _import_time_nodes(body: List[ast.stmt]):
    """Import statements that run when the module body runs (not in functions, classes' methods, or
    ``if TYPE_CHECKING:``)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
            ):
                yield from _import_time_nodes(node.orelse)
                continue
            yield from _import_time_nodes(node.body)
            yield from _import_time_nodes(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _import_time_nodes(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _import_time_nodes(node.body)


def _with_packages(name: str, modules: Dict[str, str]) -> List[str]:
    """``name`` and every package above it that is one of ``modules`` (importing a.b.c runs a and a.b)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules]


def import_graph(root: str, package: str, lazy: bool = False) -> Dict[str, Set[str]]:
    """{module: modules it imports}; ``lazy``: count imports inside functions too."""
    modules = _modules(root, package)
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in (_every_import if lazy else _import_time_nodes)(tree.body):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:  # "from pkg import mod" imports the submodule pkg.mod
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                for reached in _with_packages(target, modules):
                    # a package above the importer is already being imported (Python imports parents
                    # first): reaching it on the way is no edge; importing a name from it is one
                    if reached == module or (reached != target and module.startswith(reached + ".")):
                        continue
                    graph[module].add(reached)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle as [a, b, ..., a], or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_megatron_sv_has_no_import_cycle():
    graph = import_graph(ROOT, "megatron_sv")
    assert len(graph) > 50 and graph["megatron_sv.training.loop"], "the graph was not read"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_through_lazy_imports_either():
    """Two modules that import each other only inside functions still depend on each other both ways (the
    lazy import merely hides the cycle from the interpreter)."""
    graph = import_graph(ROOT, "megatron_sv", lazy=True)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle through a function-local import: " + " -> ".join(cycle)


# docs/architecture.md's layers, bottom first: a module imports only from its own layer or below.
LAYERS = [
    (
        "megatron_sv._lazy",
        "megatron_sv.config_fields",
        "megatron_sv.models.gpt.shape",
        "megatron_sv.scale_vectors.config",
    ),
    ("megatron_sv.platform",),
    ("megatron_sv.data",),
    ("megatron_sv.scale_vectors", "megatron_sv.fp8"),
    ("megatron_sv.models",),
    ("megatron_sv.checkpointing",),
    ("megatron_sv.conversion",),
    ("megatron_sv.training",),
    ("megatron_sv.launch", "megatron_sv.study"),
]


def _layer(module: str) -> int:
    """The layer of the most specific prefix that names ``module`` (package __init__ files: layer 0)."""
    best = (0, -1)  # (prefix length, layer)
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), rank)
    return best[1] if best[1] >= 0 else 0


def test_imports_point_down_the_layers():
    graph = import_graph(ROOT, "megatron_sv", lazy=True)
    upward = [f"{a} -> {b}" for a, targets in sorted(graph.items()) for b in sorted(targets) if _layer(a) < _layer(b)]
    assert not upward, "imports from a higher layer (docs/architecture.md):\n" + "\n".join(upward)
    assert _layer("megatron_sv.models.gpt.shape") == 0 and _layer("megatron_sv.models.gpt.model") == 4


def test_a_planted_cycle_is_found(tmp_path):
    """The check itself: a cycle through a relative import and a package __init__ is reported, a lazy
    import inside a function and a TYPE_CHECKING import are not edges."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import b\n")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\ndef f():\n    from pkg import a\n"
    )
    assert find_cycle(import_graph(str(tmp_path), "pkg")) is None
    assert find_cycle(import_graph(str(tmp_path), "pkg", lazy=True)) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"]
    (pkg / "sub" / "b.py").write_text("try:\n    from ..a import x\nexcept ImportError:\n    pass\n")
    assert find_cycle(import_graph(str(tmp_path), "pkg")) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"]
