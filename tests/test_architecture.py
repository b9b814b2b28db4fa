"""The structure of the library: no import cycles between its modules, no private names used across modules.

The layers themselves (core below m2c below the factory ... below the command line) are import-linter contracts in
pyproject.toml (`lint-imports`, run by .ci/run); these two checks run with the tests. Imports inside functions count:
a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "fti4cir"


def _module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    for root in edges:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                child = edges[node][i]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return components


def test_no_import_cycles():
    graph = grimp.build_graph(PACKAGE, cache_dir=None)
    problems = []
    for component in _cycles(graph):
        links = []
        for a in component:
            for b in sorted(graph.find_modules_directly_imported_by(a) & set(component)):
                lines = ", ".join(str(d["line_number"]) for d in graph.get_import_details(importer=a, imported=b))
                links.append(f"{a} -> {b} (l.{lines})")
        problems.append(" <-> ".join(component) + ":\n    " + "\n    ".join(links))
    assert not problems, "import cycles:\n  " + "\n  ".join(problems)


def _private_names_across_modules(path: Path, modules: set[str], root: Path = REPO) -> list[str]:
    """`from .x import _name`, and `x._name` where x names one of our modules, in the file at `path`."""
    current = _module_name(path, root)
    package = current if path.name == "__init__.py" else current.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            if source != PACKAGE and not source.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
                elif alias.name.startswith("_") and not alias.name.startswith("__") and source != current:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: from {source} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    aliases[alias.asname or PACKAGE] = alias.name if alias.asname else PACKAGE
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in aliases:
                owner = ".".join([aliases[value.id], *reversed(chain)])
                if owner in modules and owner != current:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {owner}.{node.attr}")
    return found


def test_no_private_names_used_across_modules():
    files = sorted((REPO / PACKAGE).rglob("*.py")) + [REPO / "app.py"]
    modules = {_module_name(f) for f in files}
    found = [line for f in files for line in _private_names_across_modules(f, modules)]
    assert not found, "private names used outside their module (give them a public name):\n  " + "\n  ".join(found)


def test_the_checks_see_what_they_look_for(tmp_path):
    """The private-name check finds both forms, and the cycle finder finds a cycle (so a pass means something)."""
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import _hidden\n\ndef f():\n    from . import b\n    return b._other\n")
    (package / "b.py").write_text("from . import a\n_hidden = _other = 1\n")
    modules = {f"{PACKAGE}", f"{PACKAGE}.a", f"{PACKAGE}.b"}
    found = _private_names_across_modules(package / "a.py", modules, tmp_path)
    assert [line.split(": ", 1)[1] for line in found] == [f"from {PACKAGE}.b import _hidden", f"{PACKAGE}.b._other"]
    assert _private_names_across_modules(package / "b.py", modules, tmp_path) == []

    graph = grimp.ImportGraph()
    for name in ("p.a", "p.b", "p.c", "p.d"):
        graph.add_module(name)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    graph.add_import(importer="p.c", imported="p.a")
    graph.add_import(importer="p.c", imported="p.d")
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]
