"""The one way the experiment harness drives the project's pipeline: build_corpus(params, stages).

Each stage is the project's own `run(params)` (dgamix.pipeline), called on the sections of `params` as dvc.yaml's
stages call it; the target sets go through the corpus's own stages with `run_stage`, as dvc.yaml's target_* stages
do. experiments.py (`prepare`) and gpu_suite.py (which times each stage) both build their corpora through it, so
the same params give the same outputs whichever script ran them.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dgamix.pipeline import assign, bases, cluster, embed, ingest, tokens
from dgamix.pipeline.targets import STAGES as TARGET_STAGES
from dgamix.pipeline.targets import run_stage, target_sets

# In dvc.yaml's order. ingest and embed make the embedded corpus (once per corpus copy); cluster, assign and
# tokenize one clustering of it (shared by every target); `targets` runs each set of targets.sets through the
# corpus's stages, and bases turns the spec set's histogram into the basis rows.
STAGES = ("ingest", "embed", "cluster", "assign", "tokenize", "targets", "bases")
CORPUS_STAGES = ("ingest", "embed")
PREPARE_STAGES = ("cluster", "assign", "tokenize", "targets", "bases")

MODULES = {"ingest": ingest, "embed": embed, "cluster": cluster, "assign": assign, "tokenize": tokens,
           "bases": bases}
# Stages whose output folder, once it exists, is reused as it is when resuming. The others always run: embed
# resumes shard by shard itself; the target stages and bases are quick and follow the clustering they read.
REUSED = {"ingest": "output", "cluster": "output", "assign": "output", "tokenize": "output"}


def run_targets(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every set of targets.sets (spec, then eval) through ingest, embed, assign and tokenize, the corpus's way."""
    return {name: {stage: run_stage(params, name, stage, MODULES[stage]) for stage in TARGET_STAGES}
            for name in target_sets(params)}


def build_corpus(params: dict[str, Any], stages: Iterable[str] = PREPARE_STAGES,
                 resume: bool = True) -> dict[str, Any]:
    """Run `stages` (names from STAGES, run in STAGES' order) on `params`; returns each run stage's result by name.
    resume: a stage of REUSED whose output folder exists is skipped (absent from the result); False runs it again."""
    wanted = set(stages)
    unknown = wanted - set(STAGES)
    if unknown:
        raise ValueError(f"build_corpus: unknown stages {sorted(unknown)} (expected some of {STAGES})")
    done: dict[str, Any] = {}
    for name in (s for s in STAGES if s in wanted):
        if resume and name in REUSED and Path(params[name][REUSED[name]]).exists():
            continue
        done[name] = run_targets(params) if name == "targets" else MODULES[name].run(params)
    return done
