"""The package's import graph: cycles between its modules and private names imported across modules.

    python tools/import_graph.py [PACKAGE_DIR]     # default: fusedres

Reads the sources (nothing is imported or run). An edge A -> B is any ``import`` of B in A, at module level or inside
a function (a deferred import still couples the two modules); ``from P import name`` is an edge to ``P.name`` when
that is a module, else to ``P``. A parent package's ``__init__`` that Python runs on the way is not an edge: it is
not a choice the importing module made. Cycles are the strongly connected components of more than one module (and
modules importing themselves). A private use is ``from M import _name`` or ``M._name`` where M is another module of
the package (``__dunder__`` names aside). Exits 1 when there is a cycle or a private use, so it can gate a check.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file of every module under the package directory ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(module: str, level: int, importer: str, is_package: bool) -> str:
    if level == 0:
        return module
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """(edges between the package's modules, private uses as 'importer: what')."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private: list[str] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        aliases: dict[str, str] = {}  # local name -> module of the package it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        edges[name].add(alias.name)
                        if alias.asname:
                            aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(node.module or "", node.level, name, is_package)
                if source not in modules:
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in modules:
                        edges[name].add(sub)
                        aliases[alias.asname or alias.name] = sub
                    else:
                        edges[name].add(source)
                        if _is_private(alias.name) and source != name:
                            private.append(f"{name}: from {source} import {alias.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                target = aliases.get(node.value.id)
                if target and target != name and _is_private(node.attr) and f"{target}.{node.attr}" not in modules:
                    private.append(f"{name}: {target}.{node.attr}")
    return {k: v - {k} for k, v in edges.items()}, sorted(set(private))


def _is_private(attr: str) -> bool:
    return attr.startswith("_") and not attr.startswith("__")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "fusedres").resolve()
    modules = module_names(root)
    edges, private = imports(modules)
    found = cycles(edges)
    print(f"{len(modules)} modules, {sum(map(len, edges.values()))} import edges")
    print(f"import cycles: {len(found)}")
    for component in found:
        print("  " + " <-> ".join(component))
    print(f"private names used across modules: {len(private)}")
    for use in private:
        print("  " + use)
    return 1 if found or private else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
