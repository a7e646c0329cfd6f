"""The specialized sets go through the corpus's own stages.

`targets.sets` names each set: `spec` is D_spe, the set DGA aligns to and the importance histogram counts;
`eval` is held out, for the reported specialized loss only. Each set is ingested, embedded, assigned and tokenized
by the same code as the corpus (`dgamix <stage> --target <name>`, the `target_*` stages of dvc.yaml), with the
corpus's encoder (`embed.encoder_from`), the corpus's tree (`cluster.output`) and the corpus's tokenizer, into
`<targets.output>/<name>/{docs,embeddings,domains,tokens}`. The bases stage then only turns the spec set's
histogram (its domains manifest) into a basis row.

This module derives, for one set and one stage, the stage section the stage's own `run(params)` reads
(`stage_params`), and runs the stage with it (`run_stage`).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from ..core.errors import ParamError
from ..core.params import local_path, require, section
from ..formats import token_store

STAGES = ("ingest", "embed", "assign", "tokenize")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a folder name and a DVC foreach key


def target_sets(params: dict[str, Any]) -> dict[str, list[str]]:
    """targets.sets, validated: a mapping of set name -> list of input paths, globs or URLs."""
    sets = require(section(params, "targets"), "targets", "sets", dict)
    for name, inputs in sets.items():
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ParamError(f"targets.sets: set name {name!r} must be a plain folder name (letters, digits, _ . -)")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            raise ParamError(f"targets.sets.{name} = {inputs!r}: expected a non-empty list of paths, globs or URLs")
        sets[name] = inputs
    return sets


def target_dir(params: dict[str, Any], name: str) -> Path:
    return local_path(section(params, "targets"), "targets", "output") / name


def stage_params(params: dict[str, Any], name: str, stage: str) -> dict[str, Any]:
    """A copy of `params` whose `stage` section runs that stage on target set `name`, the corpus's way."""
    sets = target_sets(params)
    if name not in sets:
        raise ParamError(f"--target {name}: not in targets.sets (expected one of {sorted(sets)})")
    if stage not in STAGES:
        raise ParamError(f"--target works with the stages {', '.join(STAGES)}, not '{stage}'")
    targets = section(params, "targets")
    out = target_dir(params, name)
    corpus = {key: dict(params.get(key) or {}) for key in ("ingest", "embed", "cluster", "assign", "tokenize")}

    def corpus_value(stage_: str, key: str, kind: type | tuple[type, ...]) -> Any:
        return require(corpus[stage_], stage_, key, kind)

    derived = {
        "ingest": {"inputs": sets[name], "text_field": require(targets, "targets", "text_field", str),
                   "source_field": corpus_value("ingest", "source_field", str),
                   "strict": corpus_value("ingest", "strict", bool),
                   "output": str(out / "docs"), "rejects": str(out / "rejects.parquet"),
                   "report": str(out / "report.json"),
                   "metrics": str(local_path(targets, "targets", "metrics") / f"{name}.json"), "engine": "local"},
        # The corpus's encoder, read from its embeddings: same model, max_tokens, backend and export.
        "embed": {"docs": str(out / "docs"), "output": str(out / "embeddings"),
                  "encoder_from": str(local_path(corpus["embed"], "embed", "output")),
                  "device": corpus_value("embed", "device", str),
                  "batch_size": corpus_value("embed", "batch_size", int), "engine": "local"},
        "assign": {"docs": str(out / "docs"), "embeddings": str(out / "embeddings"),
                   "clusters": str(local_path(corpus["cluster"], "cluster", "output")), "output": str(out / "domains"),
                   "backend": corpus_value("assign", "backend", str), "engine": "local"},
        # The corpus's tokenizer; the set is one cluster, in its order, nothing held out.
        "tokenize": {"docs": str(out / "docs"), "output": str(out / "tokens"),
                     "tokenizer": str(local_path(corpus["tokenize"], "tokenize", "output") / token_store.TOKENIZER),
                     "eos_token": corpus_value("tokenize", "eos_token", str), "holdout_fraction": 0.0,
                     "engine": "local"},
    }[stage]
    result = copy.deepcopy(params)
    result[stage] = derived
    return result


def run_stage(params: dict[str, Any], name: str, stage: str, module: Any) -> dict[str, Any]:
    """`dgamix <stage> --target <name>`: the stage module's own run() on the derived section (the caller passes the
    module, so that each target stage runs, and depends on, its own stage's code only); errors about the inputs
    name `targets.sets.<name>`."""
    derived = stage_params(params, name, stage)
    if stage == "ingest":
        return module.run(derived, inputs_param=f"targets.sets.{name}")
    return module.run(derived)
