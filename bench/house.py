"""The shape of the house, drawn from its imports: ``python bench/house.py [--json]``.

Counts, for the ``pipeline`` package of the working tree:

- **rooms**: the direct children of ``pipeline/`` (a package or a loose module); ``__init__`` is not a room;
- **arrows**: distinct room → room imports (any import, at module level or inside a function);
- **floors**: the longest chain of arrows after merging rooms that import each other (a room's floor = 1 + the
  highest floor it imports);
- **arrows against the declared layers**: room → room imports that point up the import-linter ``layers`` contract of
  pyproject.toml (rooms on one floor may import each other); only where a contract exists;
- **arrows running up**: arrows inside a knot of rooms that import each other (a strongly connected set of
  rooms): the smallest number of arrows whose removal leaves the rooms layered, found by brute force over
  the knot's arrows (knots are small) — each one is an import against the floors;
- **circles**: module-level import cycles (strongly connected sets of ``pipeline`` modules, counting imports at
  module level and inside functions alike: an import hidden in a function still ties the two modules);
- **imports inside functions**: ``import pipeline…``/``from pipeline… import`` statements inside a function body,
  out of all such statements (imports between project modules);
- **the longest function** (name and lines) and the longest stage function (a function decorated ``@stage``);
- **README lines**.

Baseline: the same script on an older commit (``git worktree add /tmp/before <commit>`` then
``python bench/house.py --root /tmp/before``); the two are printed side by side in docs/design.md.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
from pathlib import Path


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted((root / "pipeline").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, module: str, level: int, is_package: bool) -> str:
    if level == 0:
        return name
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(module: str, path: Path, known: set[str]):
    """(target module, inside a function?) for each project import of ``module``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                targets = [_longest_known(a.name, known) for a in child.names if a.name.split(".")[0] == "pipeline"]
                if targets:
                    found.append((targets, in_function))
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(child.module or "", module, child.level, is_package)
                if base.split(".")[0] != "pipeline":
                    continue
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in known else _longest_known(base, known)
                    for a in child.names
                ]
                found.append((targets, in_function))
            visit(child, inner)

    visit(tree, False)
    return [([t for t in ts if t and t != module], f) for ts, f in found]


def _longest_known(name: str, known: set[str]) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return None


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


# Where each module of the house before the reorganisation (e913d45) lives now: with --as-today an older tree is
# measured against today's declared floors, module by module.
TODAY = {
    **{m: "run" for m in ("runner", "resume", "reproduce")},
    **{m: "record" for m in ("tracking", "report", "sweep_summary", "compare", "naming")},
    **{m: "core" for m in ("context", "registry", "progress", "distributed", "threads", "escape", "metric_keys")},
    **{m: "modes" for m in ("attention", "schedule", "latent")},
    "generation": "models",
}


def _room_today(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    if parts[1] == "metrics" and len(parts) > 2 and parts[2] in ("stage", "mode", "plots"):
        return "modes"
    return TODAY.get(parts[1], parts[1])


def _sccs(nodes, edges):
    """Tarjan's strongly connected components."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    succ = {n: sorted({b for a, b in edges if a == n}) for n in nodes}

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    import sys

    sys.setrecursionlimit(10000)
    for n in nodes:
        if n not in index:
            strong(n)
    return out


def _acyclic(nodes, edges) -> bool:
    return all(len(c) == 1 for c in _sccs(nodes, edges))


def _min_feedback(nodes, edges) -> list:
    """The fewest arrows whose removal breaks every circle among ``nodes`` (brute force: knots are small)."""
    edges = sorted(edges)
    for k in range(len(edges) + 1):
        for cut in itertools.combinations(edges, k):
            rest = [e for e in edges if e not in cut]
            if _acyclic(nodes, rest):
                return list(cut)
            if k > 4:  # a large knot: report every arrow in it rather than search forever
                return edges
    return edges


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _declared_floors(root: Path) -> dict[str, int]:
    """room -> index of its layer in pyproject's import-linter ``layers`` contract (0 = top); {} without one."""
    import tomllib

    pyproject = root / "pyproject.toml"
    config = tomllib.loads(pyproject.read_text()) if pyproject.exists() else {}
    for contract in config.get("tool", {}).get("importlinter", {}).get("contracts", []):
        if contract.get("type") == "layers":
            return {
                name.strip().split(".")[1]: i
                for i, layer in enumerate(contract["layers"])
                for name in layer.replace("|", ":").split(":")
            }
    return {}


def measure(root: Path, as_today: bool = False) -> dict:
    modules = _modules(root)
    room_of = _room_today if as_today else _room
    known = set(modules)
    module_edges, room_edges = set(), set()
    inside = total = 0
    for module, path in modules.items():
        for targets, in_function in _imports(module, path, known):
            total += 1  # one import statement
            inside += in_function
            for target in targets:
                module_edges.add((module, target))
                a, b = room_of(module), room_of(target)
                if a and b and a != b:
                    room_edges.add((a, b))
    rooms = sorted({r for m in modules if (r := room_of(m))})
    circles = [sorted(c) for c in _sccs(sorted(modules), module_edges) if len(c) > 1]
    knots = [c for c in _sccs(rooms, room_edges) if len(c) > 1]
    upward = []
    for knot in knots:
        upward += _min_feedback(sorted(knot), [e for e in room_edges if e[0] in knot and e[1] in knot])
    layered = room_edges - set(upward)
    floor: dict[str, int] = {}

    def floor_of(room, seen=()):
        if room not in floor:
            below = [b for a, b in layered if a == room and b not in seen]
            floor[room] = 1 + max((floor_of(b, (*seen, room)) for b in below), default=0)
        return floor[room]

    for r in rooms:
        floor_of(r)
    longest, longest_stage = ("", 0), ("", 0)
    for module, path in modules.items():
        for fn in _functions(ast.parse(path.read_text())):
            n = fn.end_lineno - fn.lineno + 1
            where = f"{module}.{fn.name}"
            if n > longest[1]:
                longest = (where, n)
            decorated = any(
                (isinstance(d, ast.Call) and getattr(d.func, "id", getattr(d.func, "attr", "")) == "stage")
                or getattr(d, "id", "") == "stage"
                for d in fn.decorator_list
            )
            if (decorated or fn.name == "run_pipeline") and n > longest_stage[1]:
                longest_stage = (where, n)
    readme = root / "README.md"
    declared = _declared_floors(Path(__file__).resolve().parents[1] if as_today else root)
    against = sorted(
        f"{a} -> {b}" for a, b in room_edges if a in declared and b in declared and declared[b] < declared[a]
    )
    return {
        "rooms": len(rooms),
        "loose_modules": sorted(r for r in rooms if (root / "pipeline" / f"{r}.py").exists()),
        "arrows": len(room_edges),
        "floors": max(floor.values(), default=0),
        "arrows_up": sorted(f"{a} -> {b}" for a, b in upward),
        "arrows_against_declared_layers": against,
        "circles": [" <-> ".join(c) for c in circles],
        "imports_inside_functions": inside,
        "imports_between_modules": total,
        "longest_function": f"{longest[0]} ({longest[1]} lines)",
        "longest_stage_function": f"{longest_stage[0]} ({longest_stage[1]} lines)",
        "readme_lines": len(readme.read_text().splitlines()) if readme.exists() else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--as-today", action="store_true", help="group an older tree's modules into today's rooms")
    args = parser.parse_args()
    result = measure(args.root, args.as_today)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        if isinstance(value, list):
            print(f"{key}: {len(value)}")
            for v in value:
                print(f"    {v}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
