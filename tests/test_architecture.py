"""The package's import graph keeps the layers docs/architecture.md draws: no circles, no upward import.

The layer table is read from docs/architecture.md (between the `layers` markers), so the map a newcomer
reads is the one this test enforces. Imports are read with ast, at module level and inside functions
(a lazy import is still a dependency), `if TYPE_CHECKING:` blocks included.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "loratool"
DOC = ROOT / "docs" / "architecture.md"
MAX_LINES = 900


def layer_table() -> list[tuple[str, list[str]]]:
    """[(layer, [module prefixes])], top layer first, from the doc's table."""
    text = DOC.read_text()
    m = re.search(r"<!-- layers -->(.*?)<!-- /layers -->", text, re.S)
    assert m, "docs/architecture.md has no <!-- layers --> table"
    rows = []
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0] or set(cells[0]) <= set("-: ") or cells[0] == "layer":
            continue
        mods = [s.strip(" `") for s in cells[1].split(",") if s.strip(" `")]
        rows.append((cells[0], mods))
    return rows


def modules() -> dict[str, Path]:
    found = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = f
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m:
                    edges[m].add(t)
    return edges


def layer_of(module: str, table: list[tuple[str, list[str]]]) -> int:
    """Index of the layer whose longest prefix names the module (0 = top)."""
    best, best_len = -1, -1
    for i, (_, prefixes) in enumerate(table):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_every_module_has_a_layer() -> None:
    table = layer_table()
    assert [m for m in modules() if layer_of(m, table) < 0] == []


def test_no_import_circles() -> None:
    assert circles(import_graph()) == []


def test_no_upward_imports() -> None:
    table = layer_table()
    upward = sorted(
        f"{a} ({table[layer_of(a, table)][0]}) -> {b} ({table[layer_of(b, table)][0]})"
        for a, targets in import_graph().items()
        for b in targets
        if layer_of(b, table) < layer_of(a, table)
    )
    assert upward == []


def test_no_room_too_big_to_read() -> None:
    lines = {str(f.relative_to(ROOT)): len(f.read_text().splitlines()) for f in modules().values()}
    big = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert big == {}


def test_the_checker_sees_a_circle_and_an_upward_arrow() -> None:
    """The checks themselves: a made-up graph with one circle and one upward import."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    table = [("top", ["pkg.top"]), ("bottom", ["pkg.bottom"])]
    assert layer_of("pkg.bottom.x", table) == 1 and layer_of("pkg.top", table) == 0
