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
from pathlib import Path
from typing import Any

from ..core.config import load
from ..core.errors import ParamError
from ..core.sections import AssignConfig, ClusterConfig, EmbedConfig, IngestConfig, TargetsConfig, TokenizeConfig
from ..formats import token_store

STAGES = ("ingest", "embed", "assign", "tokenize")


def target_sets(params: dict[str, Any]) -> dict[str, list[str]]:
    """targets.sets, validated (`TargetsConfig.validate`): set name -> list of input paths, globs or URLs (one
    given as a plain string becomes a list of one)."""
    return _input_lists(load(TargetsConfig, params.get("targets"), "targets"))


def _input_lists(targets: TargetsConfig) -> dict[str, list[str]]:
    return {name: [inputs] if isinstance(inputs, str) else list(inputs) for name, inputs in targets.sets.items()}


def target_dir(params: dict[str, Any], name: str) -> Path:
    return load(TargetsConfig, params.get("targets"), "targets").output / name


def stage_params(params: dict[str, Any], name: str, stage: str) -> dict[str, Any]:
    """A copy of `params` whose `stage` section runs that stage on target set `name`, the corpus's way: the
    section is built from `targets` and the corpus sections that dvc.yaml's target_<stage> lists."""
    targets = load(TargetsConfig, params.get("targets"), "targets")
    sets = _input_lists(targets)
    if name not in sets:
        raise ParamError(f"--target {name}: not in targets.sets (expected one of {sorted(sets)})")
    if stage not in STAGES:
        raise ParamError(f"--target works with the stages {', '.join(STAGES)}, not '{stage}'")
    out = targets.output / name
    if stage == "ingest":
        ingest = load(IngestConfig, params.get("ingest"), "ingest")
        derived = {"inputs": sets[name], "text_field": targets.text_field, "source_field": ingest.source_field,
                   "strict": ingest.strict, "output": str(out / "docs"), "rejects": str(out / "rejects.parquet"),
                   "report": str(out / "report.json"), "metrics": str(targets.metrics / f"{name}.json"),
                   "engine": "local"}
    elif stage == "embed":
        # The corpus's encoder, read from its embeddings: same model, max_tokens, backend and export.
        embed = load(EmbedConfig, params.get("embed"), "embed")
        derived = {"docs": str(out / "docs"), "output": str(out / "embeddings"), "encoder_from": str(embed.output),
                   "device": embed.device, "batch_size": embed.batch_size, "engine": "local"}
    elif stage == "assign":
        corpus_clusters = load(ClusterConfig, params.get("cluster"), "cluster").output
        derived = {"docs": str(out / "docs"), "embeddings": str(out / "embeddings"),
                   "clusters": str(corpus_clusters), "output": str(out / "domains"),
                   "backend": load(AssignConfig, params.get("assign"), "assign").backend, "engine": "local"}
    else:
        # The corpus's tokenizer; the set is one cluster, in its order, nothing held out.
        tokenize = load(TokenizeConfig, params.get("tokenize"), "tokenize")
        derived = {"docs": str(out / "docs"), "output": str(out / "tokens"),
                   "tokenizer": str(tokenize.output / token_store.TOKENIZER), "eos_token": tokenize.eos_token,
                   "holdout_fraction": 0.0, "engine": "local"}
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
