"""The house has one way down: no module in ouvert/ imports, at any depth, a module that imports it
back. Read from the source with `ast` (nothing is imported), every import statement counts, the
ones inside functions too: a lazy import that dodges a cycle at run time is still a cycle in the
design.

An edge is what the code writes: `import a.b`, `from a import b` (to the module a.b when there is
one, else to a's __init__), relative imports resolved. Python loading a package's __init__ before
one of its modules is not an edge the code wrote, so it is not counted; a package's __init__ that
imports its own rooms is an ordinary edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "ouvert"


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every .py file under the package `root`."""
    out = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(root.parent).parts)
        parts[-1] = parts[-1].split(".")[0]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def names_bound(init: Path) -> set[str]:
    """The names a package's __init__ defines or imports at its top level."""
    out = set()
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out |= {t.id for t in targets if isinstance(t, ast.Name)}
    return out


def import_edges(root: Path) -> dict[str, list[tuple[str, int]]]:
    """module -> [(module it imports, line)], within the package."""
    mods = modules(root)
    bound = {name: names_bound(path) for name, path in mods.items() if path.name == "__init__.py"}

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, list[tuple[str, int]]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        out = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_pkg else name.split(".")[:-1]
                    here = here[: len(here) - (node.level - 1)]
                    base = ".".join(here + ([base] if base else []))
                # a.name is a module, or a name the package's __init__ binds; anything else (a compiled
                # extension, ouvert._kernels) is a module with no source here, a leaf
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else
                           known(base) if base not in bound or a.name in bound[base] else None for a in node.names]
            else:
                continue
            out += [(t, node.lineno) for t in targets if t is not None and t != name]
        edges[name] = out
    return edges


def cycles(edges: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules, as 'a:line -> b' steps."""
    graph = {m: sorted({t for t, _ in e}) for m, e in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for group in groups:  # walk from the group's first module back to itself, inside the group
        members, start = set(group), min(group)
        path, seen, v = [], set(), start
        while True:
            seen.add(v)
            nxt, line = next((t, ln) for t, ln in sorted(edges[v]) if t in members and (t == start or t not in seen))
            path.append(f"{v}:{line} -> {nxt}")
            if nxt == start:
                break
            v = nxt
        out.append(path)
    return out


def test_no_module_in_ouvert_imports_a_module_that_imports_it_back():
    edges = import_edges(ROOT)
    assert sum(map(len, edges.values())) > 100, "the import graph came out nearly empty: the walk is broken"
    assert "ouvert.checkpoint.gguf.load" in edges and "ouvert.serve.engine" in edges
    found = cycles(edges)
    assert not found, "import cycles in ouvert/:\n" + "\n".join("  " + "; ".join(c) for c in found)


def test_the_walk_finds_a_cycle_made_by_a_lazy_relative_import(tmp_path):
    """The check above can fail: a package whose b.py imports c at the top while c.py imports b
    inside a function, and whose __init__ re-exports a name from b, is caught."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.sub.b import f\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from . import c\n\ndef f():\n    return c.g()\n")
    (pkg / "sub" / "c.py").write_text("def g():\n    from pkg.sub.b import f\n    return f\n")
    (pkg / "d.py").write_text("from pkg import f\nfrom pkg import _ext\n")  # __init__'s name; an extension
    edges = import_edges(pkg)
    assert ("pkg.sub.c", 1) in edges["pkg.sub.b"] and ("pkg.sub.b", 2) in edges["pkg.sub.c"]
    assert edges["pkg.d"] == [("pkg", 1)]  # an edge to the __init__, none to the extension: no cycle
    assert cycles(edges) == [["pkg.sub.b:1 -> pkg.sub.c", "pkg.sub.c:2 -> pkg.sub.b"]]
