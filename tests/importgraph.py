"""The package's import graph read from its source (function-level and relative imports
included), and the layer table of docs/architecture.md (tests/test_layers.py checks one against
the other)."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "platform" / "debiaslab"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted, relative to debiaslab ("training.loop")
    target: str  # the package module it imports
    file: str  # path of the importing file, relative to the repository
    line: int


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """{dotted name relative to debiaslab ("__init__" for the package itself): file}."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(dotted: str, known: dict[str, Path]) -> str | None:
    """The package module an absolute import name refers to (longest known prefix)."""
    if dotted == "debiaslab":
        return "__init__"
    if not dotted.startswith("debiaslab."):
        return None
    name = dotted[len("debiaslab."):]
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def edges(package: Path = PACKAGE) -> list[Edge]:
    """Every import of a package module by a package module; importing ``a.b.c`` also runs the
    package ``a`` and ``a.b`` inits, which are edges too, except the importer's own ancestors
    (Python has started those before it runs the importer)."""
    known = modules(package)
    out = []
    for name, path in known.items():
        is_pkg = path.name == "__init__.py"
        pkg = name if is_pkg else name.rpartition(".")[0]
        pkg_parts = [] if pkg in ("", "__init__") else pkg.split(".")
        rel = str(path.relative_to(package.parents[1] if package == PACKAGE else package.parent))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg_parts[: len(pkg_parts) - node.level + 1]
                    mod = ".".join(["debiaslab", *base, *([node.module] if node.module else [])])
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            for dotted in targets:
                parts = dotted.split(".")
                for i in range(2, len(parts) + 1):  # the package inits on the way
                    target = _resolve(".".join(parts[:i]), known)
                    implicit = i < len(parts)
                    if target is None or target == name or (
                            implicit and (name.startswith(target + ".") or target == "__init__")):
                        continue
                    out.append(Edge(name, target, rel, node.lineno))
    return sorted(set(out), key=lambda e: (e.source, e.line, e.target))


def cycles(all_edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    adj: dict[str, set[str]] = {}
    for e in all_edges:
        adj.setdefault(e.source, set()).add(e.target)
        adj.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(adj[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(adj):
        if v not in index:
            visit(v)
    return found


@dataclass(frozen=True)
class Layer:
    number: int
    name: str
    modules: tuple[str, ...]


def layer_table(path: Path = ARCHITECTURE) -> list[Layer]:
    """The rows between ``<!-- layers:begin -->`` and ``<!-- layers:end -->``."""
    text = path.read_text()
    body = text.split("<!-- layers:begin -->", 1)[1].split("<!-- layers:end -->", 1)[0]
    rows = []
    for line in body.strip().splitlines()[2:]:  # header and separator
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.append(Layer(int(cells[0]), cells[1], tuple(re.findall(r"`([^`]+)`", cells[2]))))
    return rows


def layer_of(module: str, table: list[Layer]) -> Layer | None:
    """The row whose module name is the longest match of ``module`` (itself or a parent)."""
    best: tuple[int, Layer] | None = None
    for row in table:
        for m in row.modules:
            if (module == m or module.startswith(m + ".")) and (best is None or len(m) > best[0]):
                best = (len(m), row)
    return None if best is None else best[1]


def upward(all_edges: list[Edge], table: list[Layer]) -> list[str]:
    """One line per import that runs up a layer: file, line and both layers."""
    out = []
    for e in all_edges:
        src, dst = layer_of(e.source, table), layer_of(e.target, table)
        if src is not None and dst is not None and dst.number > src.number:
            out.append(f"{e.file}:{e.line}: {e.source} (layer {src.number}, {src.name}) imports "
                       f"{e.target} (layer {dst.number}, {dst.name})")
    return out
