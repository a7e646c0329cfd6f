"""The params.yaml sections of the offline stages, one frozen dataclass each: every field's type, default and
one-line doc. `dgamix.core.config.load(ClusterConfig, params.get("cluster"), "cluster")` reads a section (a key
left out takes its default here; see `dgamix.core.config` for the rules), and each class's `validate(section)`
checks the value ranges and the relations between fields, naming `section.key`. `dgamix.core.defaults` derives
params.yaml's defaults from these classes.

Pure data: nothing here imports the stages. The choices that a stage and its section share (`ENGINES`,
`CLUSTER_BACKENDS`, `ENCODER_BACKENDS`, `BASIS_FAMILIES`) are defined here, and the stages import them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from .config import setting

ENGINES = ("local", "ray")  # where a stage's per-shard work runs (dgamix.pipeline.engine)
CLUSTER_BACKENDS = ("auto", "faiss", "torch")  # k-means and nearest-centroid search (dgamix.pipeline.kmeans)
ENCODER_BACKENDS = ("torch", "openvino", "openvino-int8")  # embedding encoders (dgamix.pipeline.encoders)
BASIS_FAMILIES = ["importance", "reference", "natural", "uniform", "coarse"]  # dgamix.pipeline.bases
SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a target set's name: a folder name and a DVC foreach key


def _positive(section: str, config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{section}.{name} = {value}: expected a positive integer")


def _non_negative(section: str, config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 0:
            raise ValueError(f"{section}.{name} = {value}: expected a non-negative integer")


def _engine(section: str, engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"{section}.engine = '{engine}': expected local or ray")


def _cluster_backend(section: str, backend: str) -> None:
    if backend not in CLUSTER_BACKENDS:
        choices = f"{', '.join(CLUSTER_BACKENDS[:-1])} or {CLUSTER_BACKENDS[-1]}"
        raise ValueError(f"{section}.backend = '{backend}': expected {choices}")


def positive_levels(levels: Any) -> bool:
    """Whether `levels` is a non-empty list of positive ints (bools excluded): a k-means branching per level."""
    return (isinstance(levels, list) and bool(levels)
            and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in levels))


@dataclass(frozen=True)
class IngestConfig:
    """`ingest`: RedPajama-layout files -> normalized Parquet docs shards."""

    inputs: list[Any] | str = setting(["data/sample/generic/*.jsonl.zst"],
                                      "files to read: a list of paths, globs or URLs (or one of them)")
    text_field: str = setting("text", "dotted path of each record's text")
    source_field: str = setting("meta.source", "dotted path of each record's source label (used for stats)")
    strict: bool = setting(False, "the first bad record is an error (otherwise it is rejected and counted)")
    output: Path = setting(Path("data/docs"), "the docs shards")
    rejects: Path = setting(Path("data/ingest/rejects.parquet"), "the rejected records, with file, line and reason")
    report: Path = setting(Path("data/ingest/report.json"), "counts per input file and per reject reason")
    metrics: Path = setting(Path("metrics/ingest.json"), "the DVC metrics: read, kept, rejected, duplicates")
    engine: str = setting("local", "where the per-file work runs: local or ray")

    def validate(self, section: str) -> None:
        inputs = [self.inputs] if isinstance(self.inputs, str) else self.inputs
        if not all(isinstance(item, str) for item in inputs):
            raise ValueError(f"{section}.inputs = {self.inputs!r}: expected a list of paths, globs or URLs (strings)")
        _engine(section, self.engine)


@dataclass(frozen=True)
class EmbedConfig:
    """`embed`: every docs shard -> a float16 embedding matrix, row-aligned with it."""

    docs: Path = setting(Path("data/docs"), "the docs shards to embed (ingest's output)")
    output: Path = setting(Path("data/embeddings"), "the embedding matrices and their sidecars")
    model: str = setting("all-MiniLM-L6-v2", "sentence-transformers model name or path")
    max_tokens: int = setting(128, "tokens embedded per document (the rest is cut)")
    batch_size: int = setting(64, "documents per encoder batch")
    device: str = setting("auto", "torch device: auto (CUDA when there is one), cpu, cuda, cuda:N")
    backend: str = setting("torch", "the encoder: torch, openvino or openvino-int8 (CPU encoders exported here)")
    encoder_from: Path | None = setting(None, "an embeddings folder: embed with the encoder that made it, or null")
    verify: bool = setting(False, "check a faster backend against the torch fp32 reference before embedding")
    verify_docs: int = setting(2000, "documents sampled for the fidelity check")
    verify_levels: list[int] = setting([8, 8], "the clustering whose fine-cluster agreement the check measures")
    verify_min_cosine: float = setting(0.99, "the least mean cosine to the reference the backend must reach")
    verify_min_agreement: float = setting(0.95, "the least fine-cluster agreement with the reference")
    calibration_docs: int = setting(512, "documents sampled to calibrate the int8 encoder")
    seed: int = setting(0, "seed of the verify and calibration samples")
    engine: str = setting("local", "where the per-shard work runs: local or ray")

    def validate(self, section: str) -> None:
        _positive(section, self, "max_tokens", "batch_size", "verify_docs", "calibration_docs")
        _non_negative(section, self, "seed")
        if self.backend not in ENCODER_BACKENDS:
            raise ValueError(f"{section}.backend = '{self.backend}': expected one of {', '.join(ENCODER_BACKENDS)}")
        # With encoder_from the backend is the one that made those embeddings, not this section's.
        if self.encoder_from is None and self.backend != "torch" and self.device.startswith("cuda"):
            raise ValueError(f"{section}.backend = '{self.backend}' runs on the CPU only; with {section}.device = "
                             f"'{self.device}' use backend torch (fp16 on CUDA)")
        if not positive_levels(self.verify_levels):
            raise ValueError(f"{section}.verify_levels = {self.verify_levels}: expected a list of positive "
                             "integers, e.g. [8, 8]")
        if self.verify and prod(self.verify_levels) > self.verify_docs:
            raise ValueError(f"{section}.verify_levels = {self.verify_levels} ask for more clusters than "
                             f"{section}.verify_docs = {self.verify_docs} documents")
        _engine(section, self.engine)


@dataclass(frozen=True)
class ClusterConfig:
    """`cluster`: hierarchical spherical k-means fitted on a seeded sample of the embeddings."""

    embeddings: Path = setting(Path("data/embeddings"), "the embeddings to fit on (embed's output)")
    docs: Path = setting(Path("data/docs"), "the docs shards the embeddings are row-aligned with")
    output: Path = setting(Path("data/clusters"), "the fitted tree")
    levels: list[int] = setting([16, 16], "branching per level; the fine clusters are their product")
    points_per_centroid: int = setting(256, "fit sample size per fine cluster")
    max_fit_docs: int | None = setting(262144, "cap on the fit sample, which sets the stage's memory; null: none")
    iterations: int = setting(20, "Lloyd iterations per k-means")
    seed: int = setting(0, "seed of the fit sample and of k-means")
    backend: str = setting("auto", "k-means implementation: auto, faiss or torch")

    def validate(self, section: str) -> None:
        _positive(section, self, "points_per_centroid", "iterations")
        _non_negative(section, self, "seed")
        _cluster_backend(section, self.backend)
        if not positive_levels(self.levels):
            raise ValueError(f"{section}.levels = {self.levels!r}: expected a non-empty list of positive integers, "
                             "e.g. [16, 16]")
        if self.max_fit_docs is not None and self.max_fit_docs < prod(self.levels):
            raise ValueError(f"{section}.max_fit_docs = {self.max_fit_docs}: expected at least one document per "
                             f"fine cluster ({prod(self.levels)} for levels {self.levels}), or null")


@dataclass(frozen=True)
class AssignConfig:
    """`assign`: every document -> its fine cluster; documents written grouped by cluster."""

    docs: Path = setting(Path("data/docs"), "the docs shards to assign")
    embeddings: Path = setting(Path("data/embeddings"), "their embeddings")
    clusters: Path = setting(Path("data/clusters"), "the fitted tree (cluster's output)")
    output: Path = setting(Path("data/domains"), "the domains shards and their manifest")
    backend: str = setting("auto", "nearest-centroid search: auto, faiss or torch")
    engine: str = setting("local", "where the per-shard work runs: local or ray")

    def validate(self, section: str) -> None:
        _cluster_backend(section, self.backend)
        _engine(section, self.engine)


@dataclass(frozen=True)
class StatsConfig:
    """`stats`: per-cluster statistics, clustering metrics and plots."""

    domains: Path = setting(Path("data/domains"), "the domains to describe (assign's output)")
    output: Path = setting(Path("data/stats"), "the tables, summary and plots")
    metrics: Path = setting(Path("metrics/stats.json"), "the DVC metrics: clusters and NMI against the source label")
    keywords: int = setting(8, "keywords listed per cluster")
    keyword_sample_docs: int = setting(20000, "documents sampled to build the keyword vocabulary")
    keyword_terms: int = setting(30000, "terms in the keyword vocabulary")
    seed: int = setting(0, "seed of the keyword sample")

    def validate(self, section: str) -> None:
        _positive(section, self, "keywords", "keyword_sample_docs", "keyword_terms")
        _non_negative(section, self, "seed")


@dataclass(frozen=True)
class TokenizeConfig:
    """`tokenize`: every cluster's documents -> one memory-mappable token store with a per-cluster index."""

    domains: Path = setting(Path("data/domains"), "the domains to tokenize (assign's output)")
    docs: Path | None = setting(None, "a docs folder to tokenize as one cluster in its order instead, or null")
    output: Path = setting(Path("data/tokens"), "the token store, its tokenizer.json and heldout/")
    tokenizer: str | None = setting(None, "a tokenizer.json to use, or null to train a byte-level BPE")
    vocab_size: int = setting(8192, "vocabulary of the BPE trained here")
    train_docs: int = setting(20000, "documents sampled to train the BPE")
    eos_token: str | None = setting(None, "the end-of-document token, or null for the tokenizer's usual one")
    holdout_fraction: float = setting(0.02, "share of documents kept out of training for the generic eval loss")
    seed: int = setting(0, "seed of the held-out choice and of the BPE sample")
    engine: str = setting("local", "where the per-shard work runs: local or ray")

    def validate(self, section: str) -> None:
        _positive(section, self, "vocab_size", "train_docs")
        _non_negative(section, self, "seed")
        if not self.tokenizer and self.vocab_size < 257:
            raise ValueError(f"{section}.vocab_size = {self.vocab_size}: expected at least 257 (256 bytes + EOS)")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"{section}.holdout_fraction = {self.holdout_fraction}: expected 0 <= fraction < 1 "
                             "(share of documents kept out of training for the generic eval loss)")
        _engine(section, self.engine)


@dataclass(frozen=True)
class TargetsConfig:
    """`targets`: the specialized sets, run through the corpus's own stages."""

    sets: dict[str, list[str] | str] = setting(
        {"spec": ["data/sample/target/spec.jsonl.zst"], "eval": ["data/sample/target/eval.jsonl.zst"]},
        "set name -> its input paths, globs or URLs: spec (D_spe) and eval (held out)")
    text_field: str = setting("text", "dotted path of each record's text in the sets")
    output: Path = setting(Path("data/targets"), "where the sets' stages write, one folder per set")
    metrics: Path = setting(Path("metrics/targets"), "the sets' ingest metrics, one file per set")

    def validate(self, section: str) -> None:
        for name, inputs in self.sets.items():
            if not isinstance(name, str) or not SET_NAME.match(name):
                raise ValueError(f"{section}.sets: set name {name!r} must be a plain folder name "
                                 "(letters, digits, _ . -)")
            if isinstance(inputs, str):
                continue
            if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
                raise ValueError(f"{section}.sets.{name} = {inputs!r}: expected a non-empty list of paths, globs "
                                 "or URLs")


@dataclass(frozen=True)
class BasesConfig:
    """`bases`: the basis distributions over the fine clusters."""

    target: Path = setting(Path("data/targets/spec/domains"), "the specialized set's domains (its histogram)")
    families: list[str] = setting(list(BASIS_FAMILIES), "which bases to build, a subset of the families")
    smoothing: float = setting(0.0, "additive pseudo-count of the importance basis over non-empty clusters")
    reference_column: str = setting("source", "the domains column that groups the reference bases")
    domains: Path = setting(Path("data/domains"), "the corpus's domains")
    clusters: Path = setting(Path("data/clusters"), "the fitted tree")
    tokens: Path = setting(Path("data/tokens"), "the corpus's token store (tokens per cluster)")
    output: Path = setting(Path("data/bases"), "the bases table, summary and plots")
    metrics: Path = setting(Path("metrics/bases.json"), "the DVC metrics: bases and clusters the target falls in")

    def validate(self, section: str) -> None:
        if not self.families or any(f not in BASIS_FAMILIES for f in self.families):
            raise ValueError(f"{section}.families = {self.families}: expected a non-empty subset of {BASIS_FAMILIES}")
        if self.smoothing < 0:
            raise ValueError(f"{section}.smoothing = {self.smoothing}: expected a non-negative pseudo-count")


@dataclass(frozen=True)
class RayConfig:
    """`ray`: the Ray cluster that stages with `engine: ray` run on."""

    address: str | None = setting(None, "the cluster to join, or null for RAY_ADDRESS, else a new local Ray")
    num_cpus: int | None = setting(None, "CPUs of a local Ray, or null for all of this machine's")
    max_retries: int = setting(3, "retries of a task whose worker died")
    concurrency: int | None = setting(None, "workers per stage, or null for one per CPU (per GPU for GPU work)")
    runtime_env: dict[str, Any] | None = setting(None, "Ray runtime environment of the workers, or null")

    def validate(self, section: str) -> None:
        _non_negative(section, self, "max_retries")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"{section}.concurrency = {self.concurrency}: expected a positive integer or null")


# params.yaml section -> its dataclass (the `train` section is read by dgamix.trainer).
SECTIONS: dict[str, type] = {"ingest": IngestConfig, "embed": EmbedConfig, "cluster": ClusterConfig,
                             "assign": AssignConfig, "stats": StatsConfig, "tokenize": TokenizeConfig,
                             "targets": TargetsConfig, "bases": BasesConfig, "ray": RayConfig}
