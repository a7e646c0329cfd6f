"""Every DVC stage lists, among its deps, all the code it runs: the stage module, everything it imports (at module
level or inside functions, read with ast), their packages' __init__ files, and what `dgamix <stage>` loads first.
A change to any of it must make `dvc repro` re-run the stage."""
from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest
import yaml

from .test_layout import ROOT, scan

STAGE_MODULES = {
    "ingest": ["dgamix.pipeline.ingest"], "embed": ["dgamix.pipeline.embed"], "cluster": ["dgamix.pipeline.cluster"],
    "assign": ["dgamix.pipeline.assign"], "stats": ["dgamix.pipeline.stats"], "tokenize": ["dgamix.pipeline.tokens"],
    "bases": ["dgamix.pipeline.bases"], "train": ["dgamix.trainer.train"], "plot": ["dgamix.trainer.plot"],
    **{f"target_{s}": [f"dgamix.pipeline.{'tokens' if s == 'tokenize' else s}", "dgamix.pipeline.targets"]
       for s in ("ingest", "embed", "assign", "tokenize")},
}


def code_run_by(modules: list[str]) -> set[str]:
    """Files of the modules, of everything they import (transitively), of the CLI's module-level imports, and of
    every enclosing package's __init__."""
    edges, files = scan(ROOT)
    cli_top_level = {e.target for e in edges if e.source == "dgamix.cli" and e.top_level}
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    seen, todo = set(), [*modules, "dgamix.cli", *cli_top_level]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b first
        todo += [t for t in graph.get(module, ()) if not (module == "dgamix.cli" and t not in cli_top_level)]
    return {files[m] for m in seen if m in files}


def covered(path: str, deps: list[str]) -> bool:
    return any(PurePosixPath(path) == PurePosixPath(d) or PurePosixPath(d) in PurePosixPath(path).parents
               for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_stage_deps_list_all_the_code_it_runs(stage):
    definition = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    deps = [str(d) for d in (definition.get("do") or definition)["deps"]]
    needed = code_run_by(STAGE_MODULES[stage])
    assert "dgamix/cli.py" in needed and any(f.startswith("dgamix/core/") for f in needed)
    missing = sorted(f for f in needed if not covered(f, deps))
    assert missing == [], f"dvc.yaml stage {stage} runs {missing} but does not list them in deps"


def test_every_stage_of_dvc_yaml_is_checked():
    assert set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]) == set(STAGE_MODULES)


def test_no_dvc_output_is_tracked_by_git():
    """DVC refuses to write a cached output that git tracks ("already tracked by SCM"): `dvc repro` on a fresh clone
    would stop at that stage. Every cached output in dvc.lock, and everything under it, stays out of git (outputs
    declared `cache: false`, the small metrics and summaries, are meant to be committed)."""
    import fnmatch
    import re
    import subprocess

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())

    def resolve(template: str) -> str:  # ${stage.key} from params.yaml; ${item} / ${key} of a foreach: any name
        def value(match: re.Match) -> str:
            node: object = params
            for part in match.group(1).split("."):
                if not isinstance(node, dict) or part not in node:
                    return "*"
                node = node[part]
            return str(node)
        return re.sub(r"\$\{([^}]+)\}", value, template)

    uncached = []

    def collect(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, dict) and value.get("cache") is False:
                    uncached.append(resolve(key))
                collect(value)
        elif isinstance(node, list):
            for item in node:
                collect(item)

    collect(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    outs = {out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])}
    cached = sorted(o for o in outs if not any(fnmatch.fnmatch(o, pattern) for pattern in uncached))
    assert cached, "dvc.lock lists no cached outputs"
    tracked = subprocess.run(["git", "ls-files", "--", *cached], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked == [], f"cached DVC outputs tracked by git (git rm --cached them): {tracked}"


DEP_HASHES = """
import json, sys
from dvc.repo import Repo

with Repo(sys.argv[1]) as repo:
    found = {}
    for stage in repo.index.stages:
        for dep in stage.deps:
            if dep.def_path.startswith("dgamix/") and dep.isdir():
                found[dep.def_path] = dep.get_hash().value
print(json.dumps(found))
"""


def test_bytecode_in_a_dependency_folder_changes_no_stage(tmp_path):
    """Importing the package writes __pycache__ into the folders dvc.yaml lists as dependencies (dgamix/core, ...):
    the project's .dvcignore keeps it out of their hashes, so a test run does not make `dvc repro` redo every
    stage. The hashes are DVC's own, on a copy of the project."""
    import json
    import shutil
    import subprocess
    import sys

    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "dgamix", project / "dgamix", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dvc = [str(Path(sys.executable).parent / "dvc")]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=project, check=True, capture_output=True)
    shutil.copy(ROOT / ".dvcignore", project / ".dvcignore")  # after init, which writes its own

    def hashes() -> dict[str, str]:
        run = subprocess.run([sys.executable, "-c", DEP_HASHES, str(project)], cwd=project, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.strip().splitlines()[-1])

    before = hashes()
    assert "dgamix/core" in before and "dgamix/mixer" in before
    for folder in [*before, "dgamix/mixer/strategies"]:
        (project / folder / "__pycache__").mkdir(exist_ok=True)
        (project / folder / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\xa7\r\r\n bytecode")
    (project / "dgamix/core/stray.pyc").write_bytes(b"bytecode beside its source")
    assert hashes() == before
    (project / "dgamix/core/new_module.py").write_text("X = 1\n")  # code still counts
    assert hashes()["dgamix/core"] != before["dgamix/core"]


WRITES_INTO_THE_CHECKOUT = '''
from .conftest import ROOT


def test_clean(tmp_path):
    (tmp_path / "x").write_text("under tmp_path: fine")


def test_rewrites_a_tracked_file():
    (ROOT / "README.md").write_text("overwritten")


def test_creates_a_dvc_output():
    (ROOT / "data/ingest").mkdir(parents=True)
    (ROOT / "data/ingest/report.json").write_text("{}")


def test_adds_to_an_output_folder():
    (ROOT / "data/docs/part-00001.parquet").write_bytes(b"new shard")
'''


def test_the_suite_fails_when_a_test_writes_into_the_checkout(tmp_path):
    """tests/conftest.py's session guard, on a throwaway repository: a run whose tests rewrite a tracked file, create
    a DVC output of dvc.lock or add a file to an output folder fails, naming each; a run that writes under
    tmp_path only passes."""
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "data/docs").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", repo / "tests" / "conftest.py")
    (repo / "tests" / "__init__.py").write_text("")
    (repo / "README.md").write_text("tracked\n")
    (repo / "data/docs/part-00000.parquet").write_bytes(b"an existing shard")
    lock = {"schema": "2.0", "stages": {"ingest": {"cmd": "dgamix ingest", "outs": [
        {"path": "data/docs"}, {"path": "data/ingest/report.json"}]}}}
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "README.md", "dvc.lock", "tests"], cwd=repo, check=True)
    env = {k: v for k, v in os.environ.items() if k != "DGAMIX_CHECKOUT_GUARD"}

    def pytest_run(test_file: str) -> subprocess.CompletedProcess:
        for old in (repo / "tests").glob("test_*.py"):
            old.unlink()
        (repo / "tests" / "test_writes.py").write_text(test_file)
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=repo,
                              env=env, capture_output=True, text=True, timeout=300)

    dirty = pytest_run(WRITES_INTO_THE_CHECKOUT)
    assert dirty.returncode != 0, dirty.stdout[-3000:]
    assert "4 passed, 1 error" in dirty.stdout, dirty.stdout[-3000:]
    message = next(line for line in dirty.stdout.splitlines() if "changed files of the checkout" in line)
    for path in ("README.md", "data/ingest/report.json", "data/docs/part-00001.parquet"):
        assert path in message, message
    assert "part-00000" not in message and "tests/" not in message

    clean = pytest_run(WRITES_INTO_THE_CHECKOUT.split("def test_rewrites")[0])
    assert clean.returncode == 0, clean.stdout[-3000:]
