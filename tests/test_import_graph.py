"""The package's import graph: no circles, and no import from a lower room to a higher one.

Rooms, highest first: the front ends (cli, commands/, the YAML pipelines and the Python API over the commands),
the runner, engines/, stages/, then everything else (io/ and the leaf modules stages build on). Every import counts,
module level or inside a function, so a lazy import cannot hide a circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "curate"

ROOMS = {"cli": 4, "commands": 4, "api": 4, "pipeline": 4, "runner": 3, "engines": 2, "stages": 1}


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                # `from pkg import sub` imports the module pkg.sub (and runs pkg's __init__, which imports nothing
                # of curate's); `from mod import name` imports mod
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
                targets = subs + ([mod] if len(subs) < len(node.names) else [])
            else:
                continue
            graph[m] |= {t for t in targets if t in mods and t != m and not m.startswith(t + ".")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def room(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 4  # `curate` itself: the package's face (curate.Pipeline, curate.run_yaml, loaded on first use)
    return ROOMS.get(parts[1], 0)


def test_the_tarjan_helper_finds_a_circle_and_ignores_a_chain():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_package_has_no_import_circles():
    assert circles(import_graph()) == []


def test_no_subpackage_circles():
    """report/, search/, train_probe/ ... taken as one node each: no two import each other, directly or not."""
    graph: dict[str, set[str]] = {}
    for m, targets in import_graph().items():
        node = ".".join(m.split(".")[:2])
        graph.setdefault(node, set()).update(".".join(t.split(".")[:2]) for t in targets)
    for node, targets in graph.items():
        targets.discard(node)
    assert circles(graph) == []


def test_no_import_reaches_up_a_room():
    up = sorted(f"{m} -> {t}" for m, ts in import_graph().items() for t in ts if room(t) > room(m))
    assert up == []
