"""Stage 7, bases: basis distributions over the fine clusters, the m x k matrix P of distribution reweighting.

Families (bases.families):
- `importance`: histogram of the specialized set D_spe over the clusters (embedded with the same model, routed
  down the same tree), plus optional additive smoothing over non-empty clusters;
- `reference:<label>`: the same histogram for each group of a labelled reference set; by default the generic
  corpus itself grouped by its `source` column, so DGA can move mass between whole regions of the corpus;
- `natural` (proportional to cluster tokens), `uniform` (over non-empty clusters), `coarse:<id>` (one per
  top-level cluster of the tree that has tokens, natural within it; with a flat clustering, one per cluster).
A cluster with no tokens can never be drawn, so mass a histogram puts there is dropped and the row renormalized
(reported in the metrics); a basis with all its mass on empty clusters is an error.

Outputs (bases.output): `bases.parquet` (basis, name, cluster, prob; sparse), `names.json`, the target's own token
store under `target/` (same layout as the tokenize stage's, one "cluster"), `target_clusters.parquet`, plots;
metrics in bases.metrics.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from .assign import MANIFEST
from ..core.atomic import atomic_path, write_json, write_parquet
from .cluster import load_model
from .embed import embed_texts, encoder_of
from .ingest import expand_inputs
from ..core.params import InputError, ParamError, local_path, require, section
from .readers import Reject, iter_records
from .tokens import load_tokenizer, tokenize_texts, write_token_store

log = logging.getLogger(__name__)

FAMILIES = ("importance", "reference", "natural", "uniform", "coarse")
SUM_TOLERANCE = 1e-6


def histogram(clusters: np.ndarray, n_clusters: int, weights: np.ndarray | None = None) -> np.ndarray:
    return np.bincount(clusters, weights=weights, minlength=n_clusters).astype(np.float64)


def to_distribution(counts: np.ndarray, available: np.ndarray, name: str, smoothing: float = 0.0) -> tuple[np.ndarray, float]:
    """Counts -> probabilities over available (non-empty) clusters. Returns (row, mass that fell on empty clusters)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    dropped = float(counts[~available].sum() / total) if total > 0 else 0.0
    kept = np.where(available, counts, 0.0) + np.where(available, smoothing, 0.0)
    if kept.sum() <= 0:
        raise InputError(f"basis '{name}' has all its mass on empty clusters (clusters with no tokens); "
                         "it cannot be sampled")
    return kept / kept.sum(), dropped


def validate_bases(matrix: np.ndarray, names: list[str], available: np.ndarray) -> None:
    """Every row a probability vector over existing, non-empty clusters."""
    if matrix.ndim != 2 or matrix.shape[1] != len(available):
        raise InputError(f"bases matrix has shape {matrix.shape}, expected (m, {len(available)}) for "
                         f"{len(available)} clusters")
    for row, name in zip(matrix, names):
        if (row < 0).any() or not np.isfinite(row).all():
            raise InputError(f"basis '{name}' has negative or non-finite probabilities")
        if abs(row.sum() - 1.0) > SUM_TOLERANCE:
            raise InputError(f"basis '{name}' sums to {row.sum():.9f}, expected 1")
        if row[~available].sum() > 0:
            raise InputError(f"basis '{name}' puts mass on clusters with no tokens")


def entropy(row: np.ndarray) -> float:
    p = row[row > 0]
    return float(max(0.0, -(p * np.log(p)).sum()))


def read_target(inputs: list[str], text_field: str, param: str = "bases.target") -> tuple[list[str], list[Reject], int]:
    texts, rejects, read = [], [], 0
    for url in expand_inputs(inputs, param=param):
        for item in iter_records(url, text_field, None):
            read += 1
            if isinstance(item, Reject):
                rejects.append(item)
            else:
                texts.append(item.text)
    if not texts:
        missing = sum(r.reason.startswith("missing text field") for r in rejects)
        if missing and missing == len(rejects):
            raise InputError(f"bases.text_field = '{text_field}': no record of {param} = {inputs} has it "
                             f"({read} records read; expected the field that holds each document's text)")
        raise InputError(f"empty target set: no valid document in {param} = {inputs} "
                         f"(read {read}, rejected {len(rejects)})")
    return texts, rejects, read


def run(params: dict[str, Any]) -> dict[str, Any]:
    cfg = section(params, "bases")
    target = require(cfg, "bases", "target", (list, str))
    target = [target] if isinstance(target, str) else target
    text_field = require(cfg, "bases", "text_field", str, "text")
    families = require(cfg, "bases", "families", list, list(FAMILIES))
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ParamError(f"bases.families = {families}: expected a non-empty subset of {list(FAMILIES)}")
    smoothing = require(cfg, "bases", "smoothing", (int, float), 0.0)
    if smoothing < 0:
        raise ParamError(f"bases.smoothing = {smoothing}: expected a non-negative pseudo-count")
    reference_column = require(cfg, "bases", "reference_column", str, "source")
    domains_dir = local_path(cfg, "bases", "domains", "data/domains")
    clusters_dir = local_path(cfg, "bases", "clusters", "data/clusters")
    tokens_dir = local_path(cfg, "bases", "tokens", "data/tokens")
    emb_dir = local_path(cfg, "bases", "embeddings", "data/embeddings")
    out_dir = local_path(cfg, "bases", "output", "data/bases")
    metrics_path = local_path(cfg, "bases", "metrics", "metrics/bases.json")
    for key, path in (("domains", domains_dir / MANIFEST), ("tokens", tokens_dir / "store.json")):
        if not path.exists():
            raise ParamError(f"bases.{key}: {path} does not exist (run the {key} stage first)")

    eval_inputs = require(cfg, "bases", "eval", (list, str), [])
    eval_inputs = [eval_inputs] if isinstance(eval_inputs, str) else eval_inputs
    texts, rejects, read = read_target(target, text_field)
    # The target must be embedded exactly as the corpus was: same model, same max_tokens, same backend.
    sidecars = sorted(emb_dir.glob("part-*.json"))
    if not sidecars:
        raise ParamError(f"bases.embeddings = '{emb_dir}' holds no embedding shards (run embed first)")
    embed_meta = json.loads(sidecars[0].read_text())
    encoder = encoder_of(emb_dir, embed_meta, require(cfg, "bases", "device", str, "auto"))
    model = load_model(clusters_dir, "bases.clusters")
    target_ids, target_sims = model.predict(embed_texts(encoder, texts, embed_meta["max_tokens"]))
    target_clusters = target_ids[:, -1]

    store = json.loads((tokens_dir / "store.json").read_text())
    doc_offsets = np.load(tokens_dir / "doc_offsets.npy")
    cluster_offsets = np.load(tokens_dir / "cluster_offsets.npy")
    k = model.n_clusters
    if len(cluster_offsets) != k + 1:
        raise InputError(f"bases.tokens: the token store has {len(cluster_offsets) - 1} clusters but the clustering "
                         f"has {k}; re-run tokenize")
    cluster_tokens = (doc_offsets[cluster_offsets[1:]] - doc_offsets[cluster_offsets[:-1]]).astype(np.float64)
    available = cluster_tokens > 0

    names: list[str] = []
    rows: list[np.ndarray] = []
    dropped: dict[str, float] = {}

    def add(name: str, counts: np.ndarray, smooth: float = 0.0) -> None:
        row, lost = to_distribution(counts, available, name, smooth)
        names.append(name)
        rows.append(row)
        dropped[name] = lost

    if "importance" in families:
        add("importance", histogram(target_clusters, k), smoothing)
    if "reference" in families:
        frame = pl.read_parquet(domains_dir / "part-*.parquet", columns=["cluster", reference_column])
        for label, group in sorted(frame.group_by(reference_column), key=lambda g: str(g[0][0])):
            add(f"reference:{label[0]}", histogram(group["cluster"].to_numpy(), k))
    if "natural" in families:
        add("natural", cluster_tokens)
    if "uniform" in families:
        add("uniform", available.astype(np.float64))
    if "coarse" in families:
        # Coarse = the top level of the tree; with a flat clustering every cluster is its own coarse cluster.
        per_coarse = k // model.levels[0]
        for coarse in range(model.levels[0]):
            counts = np.zeros(k)
            counts[coarse * per_coarse : (coarse + 1) * per_coarse] = cluster_tokens[coarse * per_coarse : (coarse + 1) * per_coarse]
            if counts.sum() > 0:
                add(f"coarse:{coarse}", counts)
    if not rows:
        raise InputError(f"bases.families = {families} built no basis (expected at least one non-empty family)")
    matrix = np.stack(rows)
    validate_bases(matrix, names, available)

    tokenizer = load_tokenizer(tokens_dir / "tokenizer.json")
    target_chunk = tokenize_texts(tokenizer, texts, store["eos_id"], np.dtype(store["dtype"]))
    target_tokens = target_chunk[0]
    eval_chunk = None
    if eval_inputs:  # the held-out specialized set, for reporting only: tokenized, never embedded or counted
        eval_texts, _, _ = read_target(eval_inputs, text_field, "bases.eval")
        eval_chunk = tokenize_texts(tokenizer, eval_texts, store["eos_id"], np.dtype(store["dtype"]))

    importance = matrix[names.index("importance")] if "importance" in names else None
    metrics: dict[str, Any] = {
        "bases": len(names),
        "target_read": read, "target_documents": len(texts), "target_rejected": len(rejects),
        "target_tokens": int(target_tokens.size),
        "entropy": {n: entropy(r) for n, r in zip(names, rows)},
        "mass_dropped_on_empty_clusters": {n: v for n, v in dropped.items() if v > 0},
    }
    if importance is not None:
        raw = histogram(target_clusters, k)
        order = np.sort(importance)[::-1]
        metrics["importance_clusters_covered"] = int(((raw > 0) & available).sum())
        metrics["importance_clusters_for_90pct"] = int(np.searchsorted(np.cumsum(order), 0.9) + 1)

    basis_idx, cluster_idx = np.nonzero(matrix)
    table = pa.table({
        "basis": basis_idx.astype(np.int32),
        "name": [names[i] for i in basis_idx],
        "cluster": cluster_idx.astype(np.int32),
        "prob": matrix[basis_idx, cluster_idx],
    }).replace_schema_metadata({"clusters": str(k)})  # the table is sparse: k is not implied by its rows
    with atomic_path(out_dir) as tmp:
        (tmp / "target").mkdir(parents=True)
        (tmp / "plots").mkdir()
        write_parquet(table, tmp / "bases.parquet")
        write_json(names, tmp / "names.json")
        write_parquet(pa.table({"cluster": target_clusters.astype(np.int32), "similarity": target_sims}),
                      tmp / "target_clusters.parquet")
        write_token_store(tmp / "target", [target_chunk], np.array([len(texts)]),
                          {"vocab_size": store["vocab_size"], "eos_id": store["eos_id"]})
        if eval_chunk is not None:
            (tmp / "target_eval").mkdir()
            write_token_store(tmp / "target_eval", [eval_chunk], np.array([len(eval_chunk[1])]),
                              {"vocab_size": store["vocab_size"], "eos_id": store["eos_id"]})
        from .plots import plot_bases

        plot_bases(names, matrix, tmp / "plots")
    write_json(metrics, metrics_path)
    return metrics
