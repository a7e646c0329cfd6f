"""What `pip install dgamix` brings, read from pyproject.toml and checked against the code.

The base install is the mixer: `dgamix.mixer` with the `dgamix.formats` and `dgamix.core` it builds on. Its
dependencies are exactly the third-party packages those three import when they are imported (read with `ast`, at
the time the test runs); the offline stages and the plots come with the `pipeline` extra, and `dev` installs it.
Import names map to distributions through the installed environment's metadata (yaml -> PyYAML, faiss ->
faiss-cpu), so nothing here lists what the mixer imports.
"""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .test_layout import PACKAGE, ROOT

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

MIXER_SUBPACKAGES = ("core", "formats", "mixer")  # what the base install serves
COMMAND_CODE = ("pipeline", "trainer")  # what the CLI's commands run besides the mixer


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def names(requirements: list[str]) -> set[str]:
    """Canonical distribution names, extras of dgamix itself expanded (`dgamix[pipeline]` -> its packages)."""
    extras = project()["optional-dependencies"]
    found: set[str] = set()
    for text in requirements:
        req = Requirement(text)
        if canonicalize_name(req.name) == PACKAGE:
            for extra in req.extras:
                found |= names(extras[extra])
        else:
            found.add(canonicalize_name(req.name))
    return found


def module_files(*subpackages: str) -> list[Path]:
    return sorted(f for sub in subpackages for f in (ROOT / PACKAGE / sub).rglob("*.py"))


def imported_names(path: Path, module_level_only: bool) -> set[str]:
    """Top-level names of the absolute imports in a file: those that run when it is imported (module body, class
    bodies, if/try/with blocks; not function bodies, not `if TYPE_CHECKING:`), or with module_level_only=False
    every import anywhere in it."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if module_level_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return {n for n in found if n not in sys.stdlib_module_names and n != PACKAGE}


def distributions_of(import_names: set[str]) -> dict[str, set[str]]:
    """For each import name, the installed distributions that provide it (canonical names)."""
    provided = importlib.metadata.packages_distributions()
    missing = sorted(n for n in import_names if n not in provided)
    assert not missing, f"imported but not installed here, so no distribution to check against: {missing}"
    return {n: {canonicalize_name(d) for d in provided[n]} for n in import_names}


def uncovered(import_names: set[str], declared: set[str]) -> dict[str, list[str]]:
    return {n: sorted(dists) for n, dists in distributions_of(import_names).items() if not dists & declared}


def test_the_scan_reads_imports_where_they_run(tmp_path):
    source = ("from __future__ import annotations\nimport os\nimport numpy as np\nfrom scipy import sparse\n"
              "from . import sibling\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import polars\n"
              "try:\n    import yaml\nexcept ImportError:\n    yaml = None\n"
              "class A:\n    import pyarrow.parquet as pq\n    def f(self):\n        import faiss\n")
    (tmp_path / "m.py").write_text(source)
    assert imported_names(tmp_path / "m.py", True) == {"numpy", "scipy", "yaml", "pyarrow"}
    assert imported_names(tmp_path / "m.py", False) == {"numpy", "scipy", "yaml", "pyarrow", "polars", "faiss"}


def test_the_base_dependencies_are_exactly_what_the_mixer_imports():
    imports = set().union(*(imported_names(f, True) for f in module_files(*MIXER_SUBPACKAGES)))
    assert {"numpy", "torch"} <= imports  # the scan did read the mixer
    base = names(project()["dependencies"])
    missing = uncovered(imports, base)
    assert not missing, f"dgamix.{{{', '.join(MIXER_SUBPACKAGES)}}} import these, which no base dependency " \
                        f"provides (import name: distributions): {missing}"
    needed = set().union(*distributions_of(imports).values())
    unused = sorted(base - needed)
    assert not unused, f"base dependencies the mixer does not import (move them to an extra): {unused}"


def test_the_extra_the_cli_names_provides_what_its_commands_import():
    """Every third-party package the commands' code imports (anywhere) comes with the base install or with the
    extra that `dgamix` names when it is missing."""
    from dgamix import cli

    extras = project()["optional-dependencies"]
    base = names(project()["dependencies"])
    imports = set().union(*(imported_names(f, False) for f in module_files(*COMMAND_CODE)))
    assert {"faiss", "polars"} <= imports
    wrong = {}
    for name, dists in distributions_of(imports).items():
        extra = cli.EXTRAS.get(name, cli.DEFAULT_EXTRA)
        if not dists & (base | names(extras[extra])):
            wrong[name] = (extra, sorted(dists))
    assert not wrong, f"import name: (the extra the CLI names, the distributions that provide it): {wrong}"


def test_dev_installs_every_extra_but_bench():
    extras = project()["optional-dependencies"]
    dev = names(extras["dev"])
    for extra, requirements in extras.items():
        if extra not in ("dev", "bench"):
            assert names(requirements) <= dev, f"dev leaves out {sorted(names(requirements) - dev)} of {extra}"


def pipeline_only_modules() -> list[str]:
    """The import names that only the pipeline extra provides, as found in this environment."""
    project_ = project()
    pipeline = names(project_["optional-dependencies"]["pipeline"]) - names(project_["dependencies"])
    return sorted(name for name, dists in importlib.metadata.packages_distributions().items()
                  if {canonicalize_name(d) for d in dists} & pipeline and name.isidentifier())


def run_without_pipeline(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter where every module of the pipeline extra's packages fails to import, as in
    an environment that installed dgamix without the extra."""
    blocked = pipeline_only_modules()
    assert {"faiss", "polars", "sentence_transformers", "tokenizers"} <= set(blocked)
    prelude = f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_mixer_and_the_cli_import_without_the_pipeline_extra(tmp_path):
    modules = [".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for f in module_files(*MIXER_SUBPACKAGES)]
    code = ("import importlib, json\n"
            f"for name in {[*modules, 'dgamix.cli']!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('dgamix'))))\n")
    done = run_without_pipeline(tmp_path, code)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "dgamix.mixer.store" in loaded and not any(m.startswith("dgamix.pipeline") for m in loaded)


@pytest.mark.parametrize("command", [["ingest"], ["plot"]])
def test_a_command_of_the_pipeline_extra_names_it_when_missing(tmp_path, command):
    (tmp_path / "params.yaml").write_text("{}\n")
    done = run_without_pipeline(tmp_path, f"from dgamix.cli import main\nsys.exit(main({command!r}))\n")
    assert done.returncode == 2, done.stderr
    assert f"dgamix {command[0]}: error: this command needs '" in done.stderr
    assert done.stderr.strip().endswith("pip install 'dgamix[pipeline]'"), done.stderr
