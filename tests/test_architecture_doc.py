"""
The house as docs/ARCHITECTURE.md draws it, checked against the code so the
drawing cannot drift: every module the document names exists, every package
is in it, and the imports point the way its arrows do (runtime -> sites ->
pipeline -> rooms -> store), with no circle anywhere.  Read with C{ast}
only: nothing is imported, so a module that cannot load still gets judged.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterator
from functools import cache

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "cllama_tx")
DOC = os.path.join(ROOT, "docs", "ARCHITECTURE.md")

# cllama_tx/pipeline/proxy.py, cllama_tx/sites/ (a package), and
# cllama_tx.pipeline.proxy or cllama_tx.pipeline.proxy.Proxy (dotted).
_PATH = re.compile(r"(?<![\w./-])cllama_tx/(?:[A-Za-z_]\w*/)*(?:[A-Za-z_]\w*\.py)?")
_DOTTED = re.compile(r"(?<![\w./-])cllama_tx(?:\.[A-Za-z_]\w*)+")

# The rooms: the request's pure stages, between the pipeline and the store.
ROOMS = frozenset({"identity", "providers", "surfaces", "governance", "accounting", "discovery"})

# What each part of the package may import (besides itself, the top-level
# package, and anything outside cllama_tx).  Arrows point one way:
# runtime -> sites -> pipeline -> rooms -> store.  The demo is wired in by
# the runtime (twistd cllama --demo) and reuses the sites' listen backlog;
# the test kit (testing) is the demo's provider with hostile extras, for
# tests and the bench only.
ALLOWED: dict[str, frozenset[str]] = {
    "runtime": frozenset({"sites", "pipeline", "store", "interfaces", "demo", *ROOMS}),
    "demo": frozenset({"sites", "pipeline", "store", "interfaces", *ROOMS}),
    "testing": frozenset({"demo", "store", "interfaces", *ROOMS}),
    "sites": frozenset({"pipeline", "store", "interfaces", *ROOMS}),
    "pipeline": frozenset({"store", "interfaces", *ROOMS}),
    **{room: frozenset({"store", "interfaces", *ROOMS}) for room in ROOMS},
    "store": frozenset({"interfaces"}),
    "interfaces": frozenset(),
}


def _modules() -> dict[str, str]:
    """Every module of the package: dotted name -> file path."""
    found = {}
    for directory, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


@cache
def _parsed(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def _top_level_names(path: str) -> set[str]:
    """The names a module defines or imports at its top level."""
    names = set()
    for node in _parsed(path).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _imports(path: str, modules: dict[str, str], top_level_only: bool) -> Iterator[tuple[int, str]]:
    """
    C{(line, module)} for each cllama_tx module imported by C{path}.  A name
    imported from a package is the submodule when there is one.  With
    C{top_level_only}, imports inside functions (deferred on purpose) are
    left out: those cannot make an import-time circle.
    """
    tree = _parsed(path)
    nodes = ast.walk(tree) if not top_level_only else _module_level(tree.body)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "cllama_tx":
                    yield node.lineno, _known(alias.name, modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cllama_tx":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield node.lineno, sub if sub in modules else _known(node.module, modules)


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements run at import time (not those under C{if TYPE_CHECKING:})."""
    for node in body:
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _module_level(node.orelse)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            yield from _module_level(node.body)
            yield from _module_level(getattr(node, "orelse", []))
            for handler in getattr(node, "handlers", []):
                yield from _module_level(handler.body)
            yield from _module_level(getattr(node, "finalbody", []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _known(dotted: str, modules: dict[str, str]) -> str:
    while dotted not in modules and "." in dotted:
        dotted = dotted.rpartition(".")[0]
    return dotted


def _part(module: str) -> str:
    """The part of the package a module belongs to: 'pipeline', 'interfaces', '' for the top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


class ArchitectureDocTests(SynchronousTestCase):
    """docs/ARCHITECTURE.md names only what exists, and every package."""

    def setUp(self) -> None:
        with open(DOC, encoding="utf-8") as f:
            self.text = f.read()
        self.modules = _modules()

    def test_every_path_exists(self) -> None:
        paths = set(_PATH.findall(self.text))
        self.assertGreater(len(paths), 15, "the document names the modules a request passes through")
        missing = sorted(p for p in paths if not os.path.exists(os.path.join(ROOT, p)))
        self.assertEqual(missing, [], "docs/ARCHITECTURE.md names files that do not exist")

    def test_every_dotted_name_exists(self) -> None:
        names = set(_DOTTED.findall(self.text))
        self.assertGreater(len(names), 3)
        missing = []
        for name in sorted(names):
            module = _known(name, self.modules)
            rest = name[len(module) + 1 :].split(".") if name != module else []
            if module not in self.modules:
                missing.append(name)
            elif rest and rest[0] not in _top_level_names(self.modules[module]):
                missing.append(name)
        self.assertEqual(missing, [], "docs/ARCHITECTURE.md names modules or objects that do not exist")

    def test_every_package_is_described(self) -> None:
        packages = sorted(
            os.path.relpath(os.path.dirname(path), ROOT) + "/"
            for module, path in self.modules.items()
            if path.endswith("__init__.py") and module != "cllama_tx"
        )
        named = set(_PATH.findall(self.text))
        self.assertEqual([p for p in packages if p not in named], [], "a package the document does not describe")

    def test_the_request_path_is_in_order(self) -> None:
        """The walk through one request names its modules in the order they run."""
        section = self.text.split("## The path of one request", 1)[1].split("\n## ", 1)[0]
        order = [
            "cllama_tx/sites/guard.py",
            "cllama_tx/sites/header_gate.py",
            "cllama_tx/sites/api.py",
            "cllama_tx/pipeline/proxy.py",
            "cllama_tx/identity/",
            "cllama_tx/governance/resolution.py",
            "cllama_tx/governance/engine.py",
            "cllama_tx/providers/registry.py",
            "cllama_tx/providers/keys.py",
            "cllama_tx/pipeline/relay.py",
            "cllama_tx/pipeline/metering.py",
            "cllama_tx/store/ledger.py",
            "cllama_tx/runtime/audit.py",
        ]
        position = 0
        for name in order:
            found = section.find(name, position)
            self.assertNotEqual(found, -1, f"{name} is not named after the stage before it")
            position = found + len(name)


class ArrowTests(SynchronousTestCase):
    """The imports point the way the document's arrows do."""

    def setUp(self) -> None:
        self.modules = _modules()

    def test_every_part_is_placed(self) -> None:
        parts = {_part(m) for m in self.modules} - {""}
        self.assertEqual(sorted(parts - set(ALLOWED)), [], "a new package needs its place in ALLOWED")

    def test_imports_point_one_way(self) -> None:
        wrong = []
        for module, path in sorted(self.modules.items()):
            source = _part(module)
            for line, target in _imports(path, self.modules, top_level_only=False):
                to = _part(target)
                if to in ("", source) or source == "":
                    continue
                if to not in ALLOWED[source]:
                    wrong.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target}")
        self.assertEqual(wrong, [], "imports against the arrows (runtime -> sites -> pipeline -> rooms -> store)")

    def test_imports_are_absolute(self) -> None:
        relative = [
            f"{os.path.relpath(path, ROOT)}:{node.lineno}"
            for path in self.modules.values()
            for node in ast.walk(_parsed(path))
            if isinstance(node, ast.ImportFrom) and node.level
        ]
        self.assertEqual(relative, [])

    def test_rooms_form_no_circle(self) -> None:
        """Between the rooms, arrows are allowed both ways by ALLOWED: but never round."""
        edges: dict[str, set[str]] = {room: set() for room in ROOMS}
        for module, path in self.modules.items():
            if _part(module) in ROOMS:
                for _, target in _imports(path, self.modules, top_level_only=False):
                    if _part(target) in ROOMS and _part(target) != _part(module):
                        edges[_part(module)].add(_part(target))
        self.assertEqual(_circles(edges), [])

    def test_modules_form_no_import_circle(self) -> None:
        """No module needs, at import time, a module that needs it."""
        edges: dict[str, set[str]] = {}
        for module, path in self.modules.items():
            ancestors = {module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)}
            edges[module] = {
                target
                for _, target in _imports(path, self.modules, top_level_only=True)
                if target != module and target not in ancestors
            }
        self.assertEqual(_circles(edges), [])

    def test_the_checks_see_a_violation(self) -> None:
        """The import reader finds an arrow the wrong way (guards the checks themselves)."""
        path = self.mktemp() + ".py"
        with open(path, "w", encoding="utf-8") as f:
            f.write("from cllama_tx.runtime.daemon import makeService\n")
            f.write("def later():\n    from cllama_tx.sites import api\n")
            f.write("from cllama_tx.surfaces import matrix\n")
            f.write("if TYPE_CHECKING:\n    from cllama_tx.pipeline.proxy import Proxy\n")
        found = list(_imports(path, self.modules, top_level_only=False))
        self.assertEqual(
            sorted(found),
            [
                (1, "cllama_tx.runtime.daemon"),
                (3, "cllama_tx.sites.api"),
                (4, "cllama_tx.surfaces.matrix"),
                (6, "cllama_tx.pipeline.proxy"),
            ],
        )
        self.assertEqual(
            sorted(_imports(path, self.modules, top_level_only=True)),
            [(1, "cllama_tx.runtime.daemon"), (4, "cllama_tx.surfaces.matrix")],
        )
        self.assertNotIn("runtime", ALLOWED["store"])
        self.assertEqual(_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}), [["a", "b", "c"]])


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected parts of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                part.append(top)
                if top == node:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)
