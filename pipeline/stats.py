"""Stage 5, stats: a polars-friendly table of cluster statistics, clustering metrics, and plots for `dvc plots`.

Outputs (stats.output): `clusters.parquet` (one row per fine cluster), `sources.parquet` (cluster x source
counts and shares), `plots/cluster_sizes.csv` + `.png`, `plots/source_by_coarse.png`; metrics go to stats.metrics.
Keywords are class-based TF-IDF: each cluster is one "document" made of all its texts' term counts.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.metrics import normalized_mutual_info_score
from tqdm.auto import tqdm

from .assign import MANIFEST, parent_columns
from .atomic import atomic_path, write_json
from .params import ParamError, positive_int, require, section

log = logging.getLogger(__name__)

KEYWORD_CHARS = 5000  # characters of each text counted for keywords: enough for topic words, bounded cost


def purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Share of documents whose label is their cluster's most common label."""
    if not len(clusters):
        return float("nan")
    frame = pl.DataFrame({"c": clusters, "l": labels})
    top = frame.group_by("c", "l").len().group_by("c").agg(pl.col("len").max())
    return float(top["len"].sum() / len(clusters))


def class_tfidf_keywords(counts: sp.csr_matrix, vocabulary: np.ndarray, top: int) -> list[list[str]]:
    """Top terms per row of a (clusters x terms) count matrix by class-based TF-IDF; empty rows get []."""
    counts = sp.csr_matrix(counts, dtype=np.float64)
    row_sums = np.asarray(counts.sum(axis=1)).ravel()
    nonempty = row_sums > 0
    df = np.asarray((counts[nonempty] > 0).sum(axis=0)).ravel()
    idf = np.log((1 + nonempty.sum()) / (1 + df)) + 1.0
    tf = sp.diags(1.0 / np.maximum(row_sums, 1)) @ counts
    scores = sp.csr_matrix(tf.multiply(idf))
    keywords = []
    for i in range(scores.shape[0]):
        row = scores.getrow(i)
        if row.nnz == 0:
            keywords.append([])
            continue
        best = row.indices[np.argsort(-row.data, kind="stable")[:top]]
        keywords.append([str(vocabulary[j]) for j in best])
    return keywords


def fit_vocabulary(shards: list[Path], sample_docs: int, seed: int, max_terms: int) -> CountVectorizer:
    """Fit the keyword vocabulary on a seeded sample of texts, read shard by shard."""
    sizes = [pq.ParquetFile(s).metadata.num_rows for s in shards]
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(sample_docs, total), replace=False))
    texts: list[str] = []
    offset = 0
    for shard, size in zip(shards, sizes):
        local = chosen[(chosen >= offset) & (chosen < offset + size)] - offset
        if len(local):
            column = pq.read_table(shard, columns=["text"]).column("text")
            texts += [t[:KEYWORD_CHARS] for t in column.take(local).to_pylist()]
        offset += size
    vectorizer = CountVectorizer(
        lowercase=True, stop_words="english", token_pattern=r"(?u)\b[^\W\d_][^\W\d_]{2,}\b",
        max_features=max_terms, min_df=2 if len(texts) > 50 else 1, dtype=np.float32,
    )
    try:
        vectorizer.fit(texts)
    except ValueError:  # no term survived (tiny or non-text corpus): keywords stay empty
        vectorizer.fit(["placeholder"])
    return vectorizer


def run(params: dict[str, Any]) -> dict[str, Any]:
    cfg = section(params, "stats")
    domains_dir = Path(require(cfg, "stats", "domains", str, "data/domains"))
    out_dir = Path(require(cfg, "stats", "output", str, "data/stats"))
    metrics_path = Path(require(cfg, "stats", "metrics", str, "metrics/stats.json"))
    top_keywords = positive_int(cfg, "stats", "keywords", 8)
    vocab_docs = positive_int(cfg, "stats", "keyword_sample_docs", 20000)
    max_terms = positive_int(cfg, "stats", "keyword_terms", 30000)
    seed = require(cfg, "stats", "seed", int, 0)
    if not (domains_dir / MANIFEST).exists():
        raise ParamError(f"stats.domains = '{domains_dir}' holds no {MANIFEST} (expected the assign stage's output)")

    manifest = pl.read_parquet(domains_dir / MANIFEST)
    n_clusters = manifest.height
    parents = [c for c in manifest.columns if c.startswith("parent_l")]
    coarse_col = parents[0] if parents else "cluster"
    shards = sorted(domains_dir.glob("part-*.parquet"))
    vectorizer = fit_vocabulary(shards, vocab_docs, seed, max_terms)
    vocabulary = vectorizer.get_feature_names_out()

    term_counts = sp.csr_matrix((n_clusters, len(vocabulary)), dtype=np.float32)
    frames = []
    for shard in tqdm(shards, desc="stats", unit="shard"):
        table = pq.read_table(shard)
        clusters = table.column("cluster").to_numpy()
        x = vectorizer.transform([t[:KEYWORD_CHARS] for t in table.column("text").to_pylist()])
        membership = sp.csr_matrix((np.ones(len(clusters), np.float32), (clusters, np.arange(len(clusters)))),
                                   shape=(n_clusters, len(clusters)))
        term_counts = term_counts + membership @ x
        frames.append(pl.from_arrow(table.drop_columns(["text"])))
    docs = pl.concat(frames)

    per_source = (
        docs.group_by("cluster", "source").agg(pl.len().alias("docs"))
        .with_columns((pl.col("docs") / pl.col("docs").sum().over("cluster")).alias("share"))
        .sort("cluster", "docs", "source", descending=[False, True, False])
    )
    dominant = per_source.group_by("cluster", maintain_order=True).first().select(
        "cluster", pl.col("source").alias("dominant_source"), pl.col("share").alias("purity"))
    shares = per_source.group_by("cluster", maintain_order=True).agg(
        pl.struct("source", "share").alias("source_shares"))
    distance = docs.group_by("cluster").agg((1 - pl.col("similarity")).mean().alias("mean_distance"))
    table = (
        manifest.select("cluster", *parents, "docs", "chars")
        .join(dominant, on="cluster", how="left").join(shares, on="cluster", how="left")
        .join(distance, on="cluster", how="left")
        .with_columns(pl.Series("keywords", class_tfidf_keywords(term_counts, vocabulary, top_keywords),
                                dtype=pl.List(pl.String)))
        .sort("cluster")
    )

    labels = docs["source"].to_numpy()
    has_labels = docs["source"].n_unique() > 1 or docs["source"][0] != "unknown"
    metrics: dict[str, Any] = {
        "documents": docs.height,
        "clusters": n_clusters,
        "empty_clusters": int((table["docs"] == 0).sum()),
        "largest_cluster_docs": int(table["docs"].max()),
        "median_nonempty_cluster_docs": float(table.filter(pl.col("docs") > 0)["docs"].median()),
        "mean_distance": float((1 - docs["similarity"]).mean()),
    }
    if has_labels:
        fine = docs["cluster"].to_numpy()
        metrics.update({
            "sources": docs["source"].n_unique(),
            "purity_fine": purity(fine, labels),
            "nmi_fine": float(normalized_mutual_info_score(labels, fine)),
        })
        if parents:
            coarse = docs[coarse_col].to_numpy()
            metrics.update({"purity_coarse": purity(coarse, labels),
                            "nmi_coarse": float(normalized_mutual_info_score(labels, coarse))})

    with atomic_path(out_dir) as tmp:
        (tmp / "plots").mkdir(parents=True)
        table.write_parquet(tmp / "clusters.parquet", compression="zstd")
        per_source.write_parquet(tmp / "sources.parquet", compression="zstd")
        sizes = table.select("docs").sort("docs", descending=True).with_row_index("rank")
        sizes.write_csv(tmp / "plots" / "cluster_sizes.csv")
        from .plots import plot_cluster_sizes, plot_source_heatmap

        plot_cluster_sizes(sizes["docs"].to_numpy(), tmp / "plots" / "cluster_sizes.png")
        heat = docs.group_by(coarse_col, "source").agg(pl.len().alias("docs"))
        plot_source_heatmap(heat, coarse_col, tmp / "plots" / "source_by_coarse.png")
    write_json(metrics, metrics_path)
    return metrics
