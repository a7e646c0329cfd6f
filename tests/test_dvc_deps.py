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
