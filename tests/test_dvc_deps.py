"""Every DVC stage lists, among its deps, all the code it runs: the stage module, everything it imports (at module
level or inside functions, read with ast), their packages' __init__ files, and what `dgamix <stage>` loads first.
A change to any of it must make `dvc repro` re-run the stage."""
from __future__ import annotations

from pathlib import PurePosixPath

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
