"""Stage 7, bases: basis distributions over the fine clusters, the m x k matrix P of distribution reweighting.

Families (bases.families):
- `importance`: histogram of the specialized set D_spe over the clusters: the docs per cluster of its domains
  manifest (the target stages routed it down the corpus's tree with the corpus's encoder), plus optional additive
  smoothing over non-empty clusters;
- `reference:<label>`: the same histogram for each group of a labelled reference set; by default the generic
  corpus itself grouped by its `source` column, so DGA can move mass between whole regions of the corpus;
- `natural` (proportional to cluster tokens), `uniform` (over non-empty clusters), `coarse:<id>` (one per
  top-level cluster of the tree that has tokens, natural within it; with a flat clustering, one per cluster).
A cluster with no tokens can never be drawn, so mass a histogram puts there is dropped and the row renormalized
(reported in the summary). A reference group whose documents all fall in clusters with no tokens (a small source
whose documents tokenize held out) has nothing to sample: its basis is left out, with a warning naming it and in the
summary's `dropped_bases`; any other basis with all its mass on empty clusters is an error. The stage also warns
when most fine clusters hold about one document (the clustering is too fine for the corpus) and when the bases make
exact DGA cost more than EXACT_DGA_MAX_PASSES backward passes per update.

Outputs (bases.output): the bases table (`dgamix.formats.bases`), `summary.json` (entropy of every basis, mass
dropped, the importance basis's coverage), `plots/` (bases.png, importance_top.png, entropy.csv); the DVC metrics
(bases, clusters the specialized set falls in) in bases.metrics.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ..core.atomic import atomic_path, write_json
from ..core.config import load
from ..core.errors import InputError
from ..core.sections import BasesConfig
from ..formats import bases as bases_format
from ..formats import clusters, domains, token_store

log = logging.getLogger(__name__)

# Exact DGA scores every basis with its own backward pass, plus one for the target: past this many passes per
# update the strategy costs more than tens of training steps each time it updates.
EXACT_DGA_MAX_PASSES = 50
# A cluster holding at most this many documents counts as "about one document": a basis over such clusters is a
# histogram of single documents, and held-out documents empty whole clusters.
SPARSE_CLUSTER_DOCS = 2


def histogram(clusters_: np.ndarray, n_clusters: int, weights: np.ndarray | None = None) -> np.ndarray:
    return np.bincount(clusters_, weights=weights, minlength=n_clusters).astype(np.float64)


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
    """Every row a probability vector over existing, non-empty clusters (`formats.bases.validate`)."""
    if matrix.ndim != 2:
        raise InputError(f"bases matrix has shape {matrix.shape}, expected (m, {len(available)})")
    bases_format.validate(matrix, names, available, error=InputError)


def entropy(row: np.ndarray) -> float:
    p = row[row > 0]
    return float(max(0.0, -(p * np.log(p)).sum()))


def build_bases(families: list[str], target_counts: np.ndarray, cluster_tokens: np.ndarray,
                reference: dict[str, np.ndarray], levels: list[int], smoothing: float
                ) -> tuple[list[str], np.ndarray, dict[str, float]]:
    """Pure: (names, the m x k matrix, mass each basis lost on empty clusters) of the requested families, in the
    families' fixed order."""
    k = len(cluster_tokens)
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
        add("importance", target_counts, smoothing)
    if "reference" in families:
        for label, counts in reference.items():
            add(f"reference:{label}", counts)
    if "natural" in families:
        add("natural", cluster_tokens.astype(np.float64))
    if "uniform" in families:
        add("uniform", available.astype(np.float64))
    if "coarse" in families:
        # Coarse = the top level of the tree; with a flat clustering every cluster is its own coarse cluster.
        per_coarse = k // levels[0]
        for coarse in range(levels[0]):
            counts = np.zeros(k)
            span = slice(coarse * per_coarse, (coarse + 1) * per_coarse)
            counts[span] = cluster_tokens[span]
            if counts.sum() > 0:
                add(f"coarse:{coarse}", counts)
    if not rows:
        raise InputError(f"bases.families = {families} built no basis (expected at least one non-empty family)")
    matrix = np.stack(rows)
    validate_bases(matrix, names, available)
    return names, matrix, dropped


def usable_references(reference: dict[str, np.ndarray], cluster_tokens: np.ndarray, cluster_docs: np.ndarray
                      ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Pure: the reference histograms that put some mass on clusters with tokens, and, by basis name, why each other
    one was left out. A cluster that holds documents but no tokens had all its documents held out by tokenize: a
    small source can lose its only documents that way, and one missing source must not stop the stage."""
    available = cluster_tokens > 0
    kept: dict[str, np.ndarray] = {}
    dropped: dict[str, str] = {}
    for label, counts in reference.items():
        if counts[available].sum() > 0:
            kept[label] = counts
            continue
        documents = int(counts.sum())
        held_out = bool(documents) and bool((cluster_docs[counts > 0] > 0).all())
        dropped[f"reference:{label}"] = (
            f"its {documents} document(s) are all in clusters whose documents were all held out by tokenize "
            "(tokenize.holdout_fraction): no training token to sample" if held_out
            else f"its {documents} document(s) fall only in clusters with no tokens: nothing to sample")
    return kept, dropped


def clustering_warnings(n_bases: int, cluster_docs: np.ndarray) -> list[str]:
    """Pure: what the stage warns about a usable but doubtful setup: a clustering that leaves most fine clusters with
    about one document, and more bases than exact DGA can score at a reasonable cost."""
    warnings: list[str] = []
    k = len(cluster_docs)
    sparse = int((cluster_docs <= SPARSE_CLUSTER_DOCS).sum())
    if k and sparse > k / 2:
        warnings.append(
            f"{sparse} of the {k} fine clusters hold at most {SPARSE_CLUSTER_DOCS} documents "
            f"({int(cluster_docs.sum())} documents in all): the clustering is too fine for this corpus, so the bases "
            "are histograms of single documents and held-out documents leave clusters empty; use fewer clusters "
            "(cluster.levels)")
    if n_bases + 1 > EXACT_DGA_MAX_PASSES:
        warnings.append(
            f"{n_bases} bases: exact DGA (strategy.dga.estimator: exact) costs {n_bases + 1} backward passes per "
            f"update (one per basis and one for the target), more than {EXACT_DGA_MAX_PASSES}; use fewer bases "
            "(bases.families, bases.reference_column), a cheaper estimator, or the in-batch strategies")
    return warnings


def reference_histograms(domains_dir: Path, column: str, n_clusters: int) -> dict[str, np.ndarray]:
    """The corpus's histogram over the clusters for each value of `column`, by label."""
    shards = domains.list_shards(domains_dir)
    frame = pl.concat([pl.from_arrow(domains.read_shard(s, ["cluster", column])) for s in shards])
    return {str(label[0]): histogram(group["cluster"].to_numpy(), n_clusters)
            for label, group in sorted(frame.group_by(column), key=lambda g: str(g[0][0]))}


def summarize(names: list[str], matrix: np.ndarray, dropped: dict[str, float], target_counts: np.ndarray,
              available: np.ndarray) -> dict[str, Any]:
    """Pure: entropy of every basis, mass dropped, and how much of the corpus the importance basis covers."""
    summary: dict[str, Any] = {
        "bases": len(names),
        "target_documents": int(target_counts.sum()),
        "entropy": {n: entropy(r) for n, r in zip(names, matrix)},
        "mass_dropped_on_empty_clusters": {n: v for n, v in dropped.items() if v > 0},
    }
    if "importance" in names:
        order = np.sort(matrix[names.index("importance")])[::-1]
        summary["importance_clusters_covered"] = int(((target_counts > 0) & available).sum())
        summary["importance_clusters_for_90pct"] = int(np.searchsorted(np.cumsum(order), 0.9) + 1)
    return summary


def write_outputs(directory: Path, names: list[str], matrix: np.ndarray, summary: dict[str, Any]) -> None:
    from .plots import plot_bases

    (directory / "plots").mkdir(parents=True)
    bases_format.write(directory, names, matrix)
    write_json(summary, directory / "summary.json")
    pl.DataFrame({"basis": names, "entropy": [summary["entropy"][n] for n in names]}).write_csv(
        directory / "plots" / "entropy.csv")
    plot_bases(names, matrix, directory / "plots")


def run(params: dict[str, Any]) -> dict[str, Any]:
    cfg = load(BasesConfig, params.get("bases"), "bases")
    families, domains_dir = cfg.families, cfg.domains
    tree = clusters.read(cfg.clusters, "bases.clusters")
    cluster_tokens = token_store.read(cfg.tokens, "bases.tokens").cluster_tokens
    target_counts = domains.read_manifest(cfg.target, ["docs"], "bases.target") \
        .column("docs").to_numpy().astype(np.float64)
    # Read first: a missing corpus fails before any work; its counts say which clusters lost every document.
    cluster_docs = domains.read_manifest(domains_dir, ["docs"], "bases.domains").column("docs").to_numpy()
    for what, n in (("the token store (bases.tokens)", len(cluster_tokens)),
                    ("the target's domains (bases.target)", len(target_counts)),
                    ("the corpus's domains (bases.domains)", len(cluster_docs))):
        if n != tree.n_clusters:
            raise InputError(f"{what} has {n} clusters but the clustering has {tree.n_clusters}: build them from "
                             "the same clustering (re-run assign, tokenize and the target stages)")
    reference = (reference_histograms(domains_dir, cfg.reference_column, tree.n_clusters)
                 if "reference" in families else {})
    reference, left_out = usable_references(reference, cluster_tokens, cluster_docs)
    for name, why in left_out.items():
        log.warning("bases: leaving out basis '%s': %s", name, why)
    names, matrix, dropped = build_bases(families, target_counts, cluster_tokens, reference, tree.levels,
                                         cfg.smoothing)
    for warning in clustering_warnings(len(names), cluster_docs):
        log.warning("bases: %s", warning)
    summary = summarize(names, matrix, dropped, target_counts, cluster_tokens > 0)
    if left_out:
        summary["dropped_bases"] = left_out
    with atomic_path(cfg.output) as tmp:
        write_outputs(tmp, names, matrix, summary)
    # target_clusters: the clusters the specialized set falls in (the importance basis's support before smoothing).
    write_json({"bases": len(names), "target_clusters": int((target_counts > 0).sum())}, cfg.metrics)
    return summary
