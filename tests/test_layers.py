"""The layer order, checked on the source (AST, imports inside functions included):

math (losses, attacks, bounds, models, data, config, safe_yaml, stopping, toy, robustness) -> engine -> tracking ->
trainables -> drivers (scoretune.drivers, scoretune.search, launch) -> commands / cli.
No import cycle; no Ray, MLflow or Optuna in the math or the engine; nothing but cli/commands imports
scoretune.commands; platform/ is not a package."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = {"scoretune": REPO / "platform" / "scoretune", "trainables": REPO / "trainables"}
MATH = {"losses", "attacks", "bounds", "models", "data", "config", "stopping", "toy", "robustness", "autoattack_checks", "errors",
        "names", "threads", "thread_governor", "safe_yaml"}
FRAMEWORKS = {"ray", "mlflow", "optuna"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, root in ROOTS.items():
        for f in root.rglob("*.py"):
            parts = [p for p in f.relative_to(root).with_suffix("").parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def imported_names(mod: str, path: Path) -> set[str]:
    names = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{a.name}" for a in node.names)
    return names


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    mods = modules()
    edges, external = {}, {}
    for m, f in mods.items():
        for name in imported_names(m, f):
            external.setdefault(m, set()).add(name.split(".")[0])
            parts = name.split(".")
            for k in range(len(parts), 0, -1):
                cand = ".".join(parts[:k])
                if cand in mods and cand != m:
                    edges.setdefault(m, set()).add(cand)
                    break
    return edges, external


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
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

    for v in list(edges):
        if v not in index:
            strong(v)
    return out


def test_platform_is_not_a_package():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_no_import_cycle():
    assert cycles(graph()[0]) == []


def test_the_math_and_the_engine_import_no_framework():
    _, external = graph()
    core = [m for m in external if m.split(".")[0] == "scoretune" and len(m.split(".")) >= 2
            and m.split(".")[1] in MATH | {"engine", "floor_estimate"}]
    assert len(core) >= 8
    assert {m: sorted(external[m] & FRAMEWORKS) for m in core if external[m] & FRAMEWORKS} == {}


def test_only_the_cli_imports_commands():
    edges, _ = graph()
    bad = {m: sorted(t for t in targets if t.startswith("scoretune.commands"))
           for m, targets in edges.items()
           if not (m.startswith("scoretune.commands") or m == "scoretune.cli")}
    assert {m: t for m, t in bad.items() if t} == {}


def test_lower_layers_do_not_import_upper_ones():
    """math -> engine -> tracking -> trainables -> drivers -> commands: an import goes to the same layer or below."""
    def layer(m: str) -> int:
        parts = m.split(".")
        if parts[0] == "trainables":
            return 3
        sub = parts[1] if len(parts) > 1 else ""
        if sub in MATH or not sub:  # the package itself holds __version__ and lazy re-exports (no imports)
            return 0
        if sub in ("engine", "export", "floor_estimate"):
            return 1
        if sub == "tracking":
            return 2
        if sub in ("drivers", "search", "launch", "evaluate"):
            return 4
        if sub in ("commands", "cli"):
            return 5
        raise AssertionError(f"{m}: no layer assigned; add it to this test")

    edges, _ = graph()
    up = sorted((m, t) for m, targets in edges.items() for t in targets if layer(t) > layer(m))
    assert up == []
