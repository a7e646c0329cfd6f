"""The package layout, checked from the source: imports run one way through the layers and never in a circle.

Layers, lowest first (a layer imports itself and anything below it, never above):
    core  <-  formats  <-  {pipeline, mixer}  <-  {trainer, integrations}  <-  cli (dgamix/cli.py)
pipeline and mixer sit side by side and never import each other, nor do trainer and integrations (the mixer in
other trainers); `dgamix/__init__.py` imports nothing.

Every import of every module under dgamix/ is read with `ast`: absolute and relative (`from ..core.params import
x`, `from . import y`), at module level or inside functions, and `importlib.import_module("dgamix....")` with a
literal (or f-string with a literal prefix) argument. Nothing is imported to find them.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dgamix"

# Rank of each layer: an edge A -> B is allowed when A == B or rank(B) < rank(A). pipeline and mixer share a rank,
# so neither may import the other; so do trainer and integrations.
LAYERS = {"core": 0, "formats": 1, "pipeline": 2, "mixer": 2, "trainer": 3, "integrations": 3, "cli": 4}
ROOT_LAYER = "dgamix/__init__"  # the package's own __init__: imports nothing, so anything may import it


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, e.g. dgamix.mixer.strategies
    target: str  # imported module, e.g. dgamix.mixer.stream
    path: str  # the importing file, relative to the scanned root
    line: int
    top_level: bool  # executed when the module is imported (not inside a function, not under TYPE_CHECKING)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.source} -> {self.target}"


# ---- the checker ------------------------------------------------------------------------------------------------
def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """(dotted module name, is a package __init__) of a file under root (root holds the `dgamix` folder)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _literal_module(arg: ast.expr) -> str | None:
    """The module named by import_module's argument: a string literal, or an f-string's literal prefix up to its
    last dot (f"dgamix.pipeline.{name}" -> dgamix.pipeline)."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        prefix = str(arg.values[0].value)
        return prefix.rsplit(".", 1)[0] if "." in prefix else None
    return None


def _resolve_relative(module: str | None, level: int, source: str, is_package: bool) -> str:
    package = source if is_package else source.rpartition(".")[0]
    parts = package.split(".") if package else []
    if level - 1 > len(parts) - 1:
        raise ValueError(f"relative import beyond the top-level package in {source}")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def find_edges(source_text: str, source: str, is_package: bool, path: str,
               known_modules: frozenset[str] = frozenset()) -> list[Edge]:
    """Every import of a `dgamix` module in one file. `from X import n` is an edge to X.n when X.n is a known
    module (a file), else to X. Imports of other packages are left out."""
    tree = ast.parse(source_text, filename=path)
    edges: list[Edge] = []

    def add(target: str, node: ast.AST, top_level: bool) -> None:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            edges.append(Edge(source, target, path, node.lineno, top_level))

    def visit(node: ast.AST, top_level: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, top_level)
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(node.module, node.level, source, is_package) if node.level
                    else node.module or "")
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                # `from dgamix import x`: the root imports nothing, so x can only be a subpackage or module
                add(candidate if candidate in known_modules or base == PACKAGE else base, node, top_level)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and node.args:
                target = _literal_module(node.args[0])
                if target:
                    add(target, node, top_level)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            top_level = False  # the body runs when called, not when the module is imported
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, top_level)
            visit(node.test, top_level)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, top_level)

    visit(tree, True)
    return edges


def scan(root: Path) -> tuple[list[Edge], dict[str, str]]:
    """All edges of the package under root, and each module's file (relative to root)."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_name(f, root)[0]: str(f.relative_to(root)) for f in files}
    known = frozenset(modules)
    edges = []
    for f in files:
        name, is_package = module_name(f, root)
        edges += find_edges(f.read_text(encoding="utf-8"), name, is_package, str(f.relative_to(root)), known)
    return edges, modules


def layer_of(module: str) -> str:
    """core / formats / pipeline / mixer / trainer / cli, the package root, or the unknown name."""
    parts = module.split(".")
    if parts == [PACKAGE]:
        return ROOT_LAYER
    if parts[1] in ("cli", "__main__"):  # a `python -m dgamix` entry point would dispatch like the CLI
        return "cli"
    return parts[1]


def layer_violations(edges: list[Edge]) -> list[str]:
    problems = []
    for edge in edges:
        source, target = layer_of(edge.source), layer_of(edge.target)
        if source == ROOT_LAYER:
            problems.append(f"{edge}: dgamix/__init__.py may import nothing")
        elif source not in LAYERS:
            problems.append(f"{edge}: '{source}' is in no layer (add it to LAYERS in tests/test_layout.py)")
        elif target == ROOT_LAYER or target == source:
            continue
        elif target not in LAYERS:
            problems.append(f"{edge}: imports '{target}', which is in no layer")
        elif LAYERS[target] >= LAYERS[source]:
            why = ("layers of one rank never import each other" if LAYERS[target] == LAYERS[source]
                   else f"{source} may import only {sorted(k for k, v in LAYERS.items() if v < LAYERS[source])}")
            problems.append(f"{edge}: forbidden edge {source} -> {target} ({why})")
    return problems


def root_init_violations(root: Path) -> list[str]:
    """dgamix/__init__.py imports nothing at all (only `from __future__`)."""
    init = root / PACKAGE / "__init__.py"
    if not init.exists():
        return []
    return [f"{PACKAGE}/__init__.py:{node.lineno}: dgamix/__init__.py may import nothing"
            for node in ast.walk(ast.parse(init.read_text(encoding="utf-8")))
            if isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and node.module != "__future__")]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (or a self-loop), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan's algorithm; the graphs here are a few dozen nodes deep at most
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def describe_cycle(component: list[str], edges: list[Edge], key) -> str:
    members = set(component)
    inside = [e for e in edges if key(e.source) in members and key(e.target) in members
              and key(e.source) != key(e.target)]
    return f"cycle among {component}:\n    " + "\n    ".join(str(e) for e in inside)


def layer_cycles(edges: list[Edge]) -> list[str]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        a, b = layer_of(e.source), layer_of(e.target)
        if a != b:
            graph.setdefault(a, set()).add(b)
    return [describe_cycle(c, edges, layer_of) for c in cycles(graph)]


def module_cycles(edges: list[Edge], modules: dict[str, str]) -> list[str]:
    """Cycles among individual modules through imports that run at import time."""
    graph: dict[str, set[str]] = {}
    top = [e for e in edges if e.top_level and e.target in modules and e.source != e.target]
    for e in top:
        graph.setdefault(e.source, set()).add(e.target)
    return [describe_cycle(c, top, lambda m: m) for c in cycles(graph)]


# ---- the tests ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scanned() -> tuple[list[Edge], dict[str, str]]:
    return scan(ROOT)


def test_the_scan_sees_the_packages_that_exist(scanned):
    edges, modules = scanned
    present = {p.name for p in (ROOT / PACKAGE).iterdir() if (p / "__init__.py").exists()}
    assert present <= set(LAYERS), f"subpackages in no layer: {sorted(present - set(LAYERS))}"
    assert {"core", "pipeline", "mixer", "trainer", "integrations"} <= present
    seen = {layer_of(e.source) for e in edges}
    # the scan did read imports, relative ones included
    assert {"pipeline", "mixer", "trainer", "integrations", "cli"} <= seen
    assert any(e.source == "dgamix.mixer.strategies.dga" and e.target == "dgamix.mixer.stream" for e in edges)


def test_no_import_goes_up_or_across_the_layers(scanned):
    edges, _ = scanned
    problems = root_init_violations(ROOT) + layer_violations(edges)
    assert not problems, "layering violations:\n" + "\n".join(problems)


def test_no_cycle_between_subpackages(scanned):
    edges, _ = scanned
    found = layer_cycles(edges)
    assert not found, "\n".join(found)


def test_no_import_time_cycle_between_modules(scanned):
    edges, modules = scanned
    found = module_cycles(edges, modules)
    assert not found, "\n".join(found)


# ---- the checker checks itself: planted violations are found -----------------------------------------------
def test_the_checker_finds_a_planted_forbidden_edge_inside_a_function():
    source = "import numpy\n\ndef build():\n    from ..mixer.stream import MixtureStream\n    return MixtureStream\n"
    edges = find_edges(source, "dgamix.pipeline.planted", False, "dgamix/pipeline/planted.py",
                       frozenset({"dgamix.mixer.stream"}))
    assert [(e.target, e.line, e.top_level) for e in edges] == [("dgamix.mixer.stream", 4, False)]
    [problem] = layer_violations(edges)
    assert problem.startswith("dgamix/pipeline/planted.py:4: dgamix.pipeline.planted -> dgamix.mixer.stream")
    assert "forbidden edge pipeline -> mixer" in problem


@pytest.mark.parametrize("source, module, is_package, target, allowed", [
    ("from . import y", "dgamix.core.params", False, "dgamix.core", True),  # a name of the package's __init__
    ("from . import atomic", "dgamix.core.params", False, "dgamix.core.atomic", True),
    ("from ..mixer import stream", "dgamix.core.params", False, "dgamix.mixer.stream", False),
    ("from .. import formats", "dgamix.core", True, "dgamix.formats", False),
    ("from dgamix import trainer", "dgamix.mixer.dga", False, "dgamix.trainer", False),
    ("from ..formats.docs import read", "dgamix.core.params", False, "dgamix.formats.docs", False),
    ("from ..formats.docs import read", "dgamix.mixer.store", False, "dgamix.formats.docs", True),
    ("import dgamix.trainer.train as t", "dgamix.core.atomic", False, "dgamix.trainer.train", False),
    ("import importlib\nimportlib.import_module(f'dgamix.cli.{x}')", "dgamix.core.params", False, "dgamix.cli",
     False),
    ("if TYPE_CHECKING:\n    from ..pipeline import embed", "dgamix.mixer.store", False, "dgamix.pipeline.embed",
     False),  # forbidden all the same, though it never runs
])
def test_the_checker_resolves_every_import_form(source, module, is_package, target, allowed):
    known = frozenset({"dgamix.core", "dgamix.core.atomic", "dgamix.formats", "dgamix.formats.docs",
                       "dgamix.mixer.stream", "dgamix.pipeline.embed", "dgamix.trainer"})
    edges = find_edges(source, module, is_package, "planted.py", known)
    assert [e.target for e in edges] == [target]
    assert bool(layer_violations(edges)) != allowed, layer_violations(edges)


def test_the_checker_finds_planted_cycles_in_a_tree(tmp_path):
    files = {
        "dgamix/__init__.py": "import os\n",
        "dgamix/core/__init__.py": "",
        "dgamix/core/a.py": "from ..pipeline.b import B\nA = 1\n",
        "dgamix/pipeline/__init__.py": "",
        "dgamix/pipeline/b.py": "from dgamix.core import a\nB = 2\n",
        "dgamix/mixer/__init__.py": "",
        "dgamix/mixer/c.py": "def f():\n    from . import d\n",  # inside a function: no import-time cycle
        "dgamix/mixer/d.py": "from .c import f\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges, modules = scan(tmp_path)
    assert root_init_violations(tmp_path) == ["dgamix/__init__.py:1: dgamix/__init__.py may import nothing"]
    assert layer_violations(edges) == [
        "dgamix/core/a.py:1: dgamix.core.a -> dgamix.pipeline.b: forbidden edge core -> pipeline "
        "(core may import only [])"]
    [layer_cycle] = layer_cycles(edges)
    assert "['core', 'pipeline']" in layer_cycle and "dgamix/pipeline/b.py:1" in layer_cycle
    [module_cycle] = module_cycles(edges, modules)
    assert "['dgamix.core.a', 'dgamix.pipeline.b']" in module_cycle
    assert "dgamix/core/a.py:1: dgamix.core.a -> dgamix.pipeline.b" in module_cycle


# ---- one import namespace -----------------------------------------------------------------------------------
def test_only_dgamix_is_importable_from_outside_the_repository(tmp_path):
    """From a directory that is not the repository, with the environment's own site-packages only (-I: no
    PYTHONPATH, no cwd on sys.path), generic top-level names do not import; the dgamix namespace does."""
    probe = ("import importlib, json\n"
             "out = {}\n"
             "for name in ('pipeline', 'mixer', 'trainer', 'core', 'formats', 'dgamix.mixer'):\n"
             "    try:\n"
             "        importlib.import_module(name)\n"
             "        out[name] = 'ok'\n"
             "    except ModuleNotFoundError as err:\n"
             "        out[name] = f'missing: {err.name}'\n"
             "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result.pop("dgamix.mixer") == "ok"
    assert all(v.startswith("missing") for v in result.values()), result


def test_package_discovery_includes_only_dgamix():
    from setuptools import find_namespace_packages, find_packages

    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools_cfg = config.get("tool", {}).get("setuptools", {})
    assert "py-modules" not in setuptools_cfg, "no top-level modules besides the dgamix package"
    packages = setuptools_cfg.get("packages")
    if isinstance(packages, list):  # an explicit list
        found = packages
    else:
        find = (packages or {}).get("find", {})
        include = find.get("include", ["*"])
        assert all(p == PACKAGE or p.startswith(PACKAGE + ".") for p in include), include
        where = find.get("where", ["."])
        finder = find_namespace_packages if find.get("namespaces", True) else find_packages
        found = [p for w in where for p in finder(str(ROOT / w), include=include, exclude=find.get("exclude", ()))]
    assert found and all(p == PACKAGE or p.startswith(PACKAGE + ".") for p in found), found
    subpackages = {f"{PACKAGE}.{p.name}" for p in (ROOT / PACKAGE).iterdir() if (p / "__init__.py").exists()}
    assert subpackages <= set(found), f"subpackages the build would leave out: {sorted(subpackages - set(found))}"


def test_no_caller_of_the_strategies_asks_which_strategy_it_has():
    """The trainer and the integrations drive every strategy through its protocol (`needs`, `training_step`,
    `observe`, `on_step`), never by testing its class."""
    offenders = []
    for folder in ("trainer", "integrations"):
        for path in sorted((ROOT / PACKAGE / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if "isinstance(" in line and "Strategy" in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders

