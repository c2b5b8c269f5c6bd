"""The package's shape, read from its own source (imports inside functions count): the floors of
ARCHITECTURE.md hold. No import cycle; the recipe schema reaches no deep-learning library; the
commands that read a finished run never reach training; functions and modules stay readable in
one sitting; importing a module changes nothing in the process.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "qlora_kit"
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "accelerate")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


MODULES = modules()


def _resolve(name: str, package: str, node: ast.ImportFrom | None = None) -> list[str]:
    """Internal modules an import statement names (a `from pkg import mod` names pkg.mod when
    that is a module, else pkg)."""
    if node is None:
        return [name]
    base = package.split(".")
    if node.level:
        base = base[: len(base) - node.level + 1]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    out = []
    for alias in node.names:
        full = f"{mod}.{alias.name}"
        out.append(full if full in MODULES else mod)
    return out


def imports_of(name: str, source: str | None = None, is_package: bool = False) -> tuple[set[str], set[str]]:
    """(internal modules, external top-level packages) that module `name` imports anywhere in it."""
    if source is None:
        path = MODULES[name]
        source, is_package = path.read_text(encoding="utf-8"), path.name == "__init__.py"
    package = name if is_package else name.rsplit(".", 1)[0]
    internal, external = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = _resolve("", package, node)
        else:
            continue
        for t in targets:
            if t == "qlora_kit" or t.startswith("qlora_kit."):
                if t != name:
                    internal.add(t)
            elif t:
                external.add(t.split(".")[0])
    return internal, external


GRAPH = {m: imports_of(m) for m in MODULES}


def _parents(m: str) -> list[str]:
    parts = m.split(".")
    return [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in MODULES]


def reach(start: str) -> set[str]:
    """Every module that importing `start` can run: its imports, theirs, and the packages above
    each (importing a.b.c runs a/__init__ and a/b/__init__ first)."""
    seen, todo = set(), [start, *_parents(start)]
    while todo:
        m = todo.pop()
        for n in [*GRAPH.get(m, (set(),))[0], *_parents(m)]:
            if n not in seen and n in GRAPH:
                seen.add(n)
                todo.append(n)
    return seen


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan) over the imports written in
    the code (a package above a module is not an arrow of its own: a package __init__ that names
    its submodules is one room with them)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v][0]:
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    sys.setrecursionlimit(10_000)
    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    found = cycles()
    assert not found, "import cycles (imports inside functions count):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_recipe_schema_reaches_no_deep_learning_library():
    for mod in ("qlora_kit.recipe",):
        reached = {mod} | reach(mod)
        heavy = {(m, e) for m in reached for e in GRAPH[m][1] if e in HEAVY}
        assert not heavy, f"{mod} reaches {sorted(heavy)}"


TRAINING = ("qlora_kit.train",)  # the package holds fastpath, resilience and progress too
READ_SIDE = ("merge", "export", "eval", "serve")


def _is_training(m: str) -> bool:
    return any(m == t or m.startswith(t + ".") for t in TRAINING)


def _read_side() -> list[str]:
    return [m for m in MODULES if len(m.split(".")) > 1 and m.split(".")[1] in READ_SIDE]


def test_commands_that_read_a_finished_run_never_reach_training():
    assert _read_side(), "no read-side modules found: the names in READ_SIDE are out of date"
    bad = {m: sorted(t for t in reach(m) if _is_training(t)) for m in _read_side()}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"read-side modules reaching training: {bad}"


def _long_functions() -> list[tuple[int, str]]:
    out = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append((n, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


def test_no_function_longer_than_80_lines():
    long = _long_functions()
    assert not long, "\n".join(f"{n} lines: {where}" for n, where in long)


def test_no_module_longer_than_600_lines():
    long = sorted((len(p.read_text(encoding="utf-8").splitlines()), str(p.relative_to(ROOT)))
                  for p in MODULES.values())
    long = [(n, p) for n, p in long if n > MAX_MODULE_LINES]
    assert not long, "\n".join(f"{n} lines: {p}" for n, p in long)


def test_importing_any_module_changes_nothing_in_the_process(tmp_path):
    """No os.environ writes, umask, working directory or signal handlers changed by an import."""
    names = sorted(MODULES)
    libraries = sorted({e for _, ext in GRAPH.values() for e in ext})
    code = f"""
import importlib, os, signal, sys
names = {names!r}
for lib in {libraries!r}:  # what the libraries themselves do at import is theirs (torch sets TORCHINDUCTOR_CACHE_DIR)
    try:
        importlib.import_module(lib)
    except Exception:
        pass
env, cwd = dict(os.environ), os.getcwd()
mask = os.umask(0o022); os.umask(mask)
handlers = {{s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}}
for n in names:
    importlib.import_module(n)
changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))
now = os.umask(0o022); os.umask(now)
assert not changed, f"environment variables changed by import: {{changed}}"
assert now == mask, f"umask changed by import: {{oct(mask)}} -> {{oct(now)}}"
assert os.getcwd() == cwd, "working directory changed by import"
assert {{s: signal.getsignal(s) for s in handlers}} == handlers, "signal handlers changed by import"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_run_json_has_one_reader_and_writer():
    """run.json is read and written by one typed module; every other module goes through it."""
    users = sorted(str(p.relative_to(ROOT)) for p in MODULES.values()
                   if '"run.json"' in p.read_text(encoding="utf-8") or "'run.json'" in p.read_text(encoding="utf-8"))
    assert len(users) <= 1, f"modules that name run.json themselves: {users}"


def test_the_checker_sees_imports_inside_functions_and_finds_a_cycle(monkeypatch):
    """Not vacuous: a relative import inside a function is an arrow, and two modules that import
    each other that way are a cycle."""
    src = "def f():\n    from . import recipe\n    from .errors import UserError\n    import torch.nn\n"
    internal, external = imports_of("qlora_kit._fake_a", src)
    assert internal == {"qlora_kit.recipe", "qlora_kit.errors"} and external == {"torch"}
    a, b = "qlora_kit._fake_a", "qlora_kit._fake_b"
    monkeypatch.setitem(GRAPH, a, ({b}, set()))
    monkeypatch.setitem(GRAPH, b, ({a}, set()))
    assert [a, b] in cycles()


# ARCHITECTURE.md's floors: a module may import its own floor and the floors below, never above.
FLOOR = {"cli": 9, "ui": 8, "eval": 7, "export": 7, "train": 6, "merge": 6, "serve": 6, "model": 5,
         "data": 4, "template": 4, "plan": 4, "distributed": 4, "tiny": 3, "run": 3, "recipe": 2, "rundir": 2,
         "attention": 2, "net": 2, "domains": 1, "devices": 1, "errors": 1, "quiet": 1, "terminal": 1,
         "rowtemplate": 1}


def _floor(m: str) -> int | None:
    parts = m.split(".")
    return FLOOR.get(parts[1]) if len(parts) > 1 else None


def test_each_floor_imports_only_from_its_floor_or_below():
    unplaced = sorted({m.split(".")[1] for m in MODULES if len(m.split(".")) > 1} - set(FLOOR))
    assert not unplaced, f"modules on no floor of ARCHITECTURE.md: {unplaced}"
    up = sorted((m, n) for m in GRAPH for n in GRAPH[m][0]
                if n in GRAPH and _floor(m) is not None and _floor(n) is not None and _floor(n) > _floor(m))
    assert not up, "imports that run up a floor: " + ", ".join(f"{m} -> {n}" for m, n in up)
