"""The shape of the code: no import cycle among the modules of lb/, loader/
and lab/, whether the import sits at the top of a module or inside a
function (a cycle there still means two modules that need each other); each
layer imports only the layers below it; no function longer than 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("lb", "loader", "lab")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports (a name imported from a package
    counts as its submodule when there is one)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names
                       if f"{node.module}.{a.name}" in known)
    return out


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    known = {module_name(p) for p in files}
    graph = {module_name(p): imports_of(p, known) for p in files}
    # A package's __init__ importing its own submodules is no cycle.
    return {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "lb.agent.loop" in graph and "loader.build" in graph
    assert cycles(graph) == []


# The architecture, bottom up: the shared vocabulary and the loader; the
# sources of objects, and what service and policy state follows from them;
# access to a datapath instance; what looks into one, and the agent; the
# command line; the namespace lab (test bed and demo, never imported by the
# product). The top-level modules of lb/ are the vocabulary.
LAYERS = (
    ("lb", "loader"),
    ("lb.sources", "lb.service", "lb.policy"),
    ("lb.datapath",),
    ("lb.inspect", "lb.agent"),
    ("lb.cli",),
    ("lab",),
)


def layer_of(module: str) -> int:
    best = max((p for layer in LAYERS for p in layer
                if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def test_the_layer_of_a_module() -> None:
    assert layer_of("lb.model") == 0 and layer_of("loader.build") == 0
    assert layer_of("lb.service.desired") == 1 and layer_of("lb.datapath.userspace.maps") == 2
    assert layer_of("lb.cli.main") == 4 and layer_of("lab.demo") == 5


def test_each_layer_imports_only_the_layers_below() -> None:
    graph = import_graph()
    upward = sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps
                    if layer_of(d) > layer_of(m))
    assert upward == []


MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_80_lines() -> None:
    long = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{module_name(path)}.{node.name}: {lines} lines")
    assert long == []


def test_verdict_classes_are_the_datapaths() -> None:
    """lb/verdicts.py's classes name the reasons bpf/lib/verdict.h tests."""
    import re

    from lb import verdicts
    from loader.layout import CONSTS

    text = (REPO / "bpf" / "lib" / "verdict.h").read_text()
    classes = {"lb_rewrites": verdicts.REWRITES, "lb_policed": verdicts.POLICED,
               "lb_rejects": verdicts.REJECTS, "lb_drops": verdicts.DROPS}
    def members(fn: str) -> set[int]:
        body = re.search(rf"LB_INLINE int {fn}\(int reason\)\s*\{{(.*?)\}}", text, re.S)
        assert body is not None, fn
        # A class may include another by calling it.
        called = set(re.findall(r"(lb_[a-z]+)\(reason\)", body.group(1)))
        return ({CONSTS[n] for n in re.findall(r"LB_STAT_[A-Z_]+", body.group(1))}
                .union(*(members(c) for c in called)))

    for fn, python in classes.items():
        assert members(fn) == python, fn
