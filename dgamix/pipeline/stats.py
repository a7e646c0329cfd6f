"""Stage 6, stats: a polars-friendly table of cluster statistics, clustering metrics, and plots for `dvc plots`.

Reads the domains (stats.domains) and the corpus's token store (tokenize.output, so it runs after tokenize):
users first ask how many tokens each cluster has.
Outputs (stats.output): `clusters.parquet` (one row per fine cluster: `tokens` counts the cluster's tokens in the
token store, i.e. training tokens only, the held-out documents excluded), `sources.parquet` (cluster x source
counts and shares), `summary.json` (cluster sizes, purity and NMI at both levels, mean distance),
`plots/cluster_sizes.csv` + `.png`, `plots/source_by_coarse.png`; the DVC metrics (clusters, NMI of the fine
clustering against the source label) go to stats.metrics.
Keywords are class-based TF-IDF: each cluster is one "document" made of all its texts' term counts.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer
from tqdm.auto import tqdm

from ..core.atomic import atomic_path, write_json
from ..core.errors import InputError
from ..core.config import load
from ..core.sections import StatsConfig, TokenizeConfig
from ..formats import domains, token_store
from .sampling import sample_texts

log = logging.getLogger(__name__)

KEYWORD_CHARS = 5000  # characters of each text counted for keywords: enough for topic words, bounded cost


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
    texts = sample_texts(shards, sample_docs, seed, KEYWORD_CHARS, domains.read_shard)
    vectorizer = CountVectorizer(
        lowercase=True, stop_words="english", token_pattern=r"(?u)\b[^\W\d_][^\W\d_]{2,}\b",
        max_features=max_terms, min_df=2 if len(texts) > 50 else 1, dtype=np.float32,
    )
    try:
        vectorizer.fit(texts)
    except ValueError:  # no term survived (tiny or non-text corpus): keywords stay empty
        vectorizer.fit(["placeholder"])
    return vectorizer


def contingency_scores(counts: np.ndarray) -> tuple[float, float]:
    """Purity and NMI (arithmetic normalisation, as scikit-learn's default) from a clusters x labels count table."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return float("nan"), float("nan")
    purity_value = counts.max(axis=1).sum() / total
    p = counts / total
    pc, pl_ = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pc, pl_)[nz])).sum())
    entropy = lambda q: float(-(q[q > 0] * np.log(q[q > 0])).sum())  # noqa: E731
    h_c, h_l = entropy(pc), entropy(pl_)
    if h_c == 0 and h_l == 0:
        return float(purity_value), 1.0
    denominator = (h_c + h_l) / 2
    return float(purity_value), float(max(mi, 0.0) / denominator) if denominator > 0 else 0.0


def shard_aggregates(table: pa.Table, vectorizer: CountVectorizer, n_clusters: int) -> tuple[pl.DataFrame, sp.csr_matrix]:
    """Pure per-shard step: (cluster, source) -> docs and summed cosine distance, and cluster x term counts."""
    frame = pl.from_arrow(table.select(["cluster", "source", "similarity"]))
    counts = frame.group_by("cluster", "source").agg(
        pl.len().alias("docs"), (1 - pl.col("similarity")).cast(pl.Float64).sum().alias("distance_sum"))
    clusters = table.column("cluster").to_numpy()
    x = vectorizer.transform([t[:KEYWORD_CHARS] for t in table.column("text").to_pylist()])
    membership = sp.csr_matrix((np.ones(len(clusters), np.float32), (clusters, np.arange(len(clusters)))),
                               shape=(n_clusters, len(clusters)))
    return counts, sp.csr_matrix(membership @ x)


def aggregate_shards(shards: list[Path], vectorizer: CountVectorizer, n_clusters: int
                     ) -> tuple[pl.DataFrame, sp.csr_matrix]:
    """(cluster, source) -> docs and summed cosine distance, and cluster x term counts, over every shard. Memory
    stays flat: only these aggregates are kept across shards."""
    term_counts = sp.csr_matrix((n_clusters, len(vectorizer.get_feature_names_out())), dtype=np.float32)
    partials = []
    for shard in tqdm(shards, desc="stats", unit="shard"):
        counts, terms = shard_aggregates(domains.read_shard(shard), vectorizer, n_clusters)
        partials.append(counts)
        term_counts = term_counts + terms
    by_source = pl.concat(partials).group_by("cluster", "source").agg(pl.col("docs").sum(),
                                                                       pl.col("distance_sum").sum())
    return by_source, term_counts


def training_tokens(store: token_store.TokenStoreFiles, manifest: pl.DataFrame, param: str = "tokenize.output"
                    ) -> np.ndarray:
    """Tokens per fine cluster in the training store (held-out documents live in its heldout/ store and are not
    counted), checked against the domains it must have been tokenized from: a stale store is an error, not a
    silently wrong column."""
    tokens = store.cluster_tokens.astype(np.int64)
    docs = manifest["docs"].to_numpy()
    train_docs = np.diff(store.cluster_offsets)
    heldout = int(store.meta.get("heldout_documents", 0))
    if len(tokens) != manifest.height or (train_docs > docs).any() or int(train_docs.sum()) + heldout != docs.sum():
        raise InputError(f"{param}: the token store ({len(tokens)} clusters, {int(train_docs.sum())} + {heldout} "
                         f"held-out documents) was not tokenized from these domains ({manifest.height} clusters, "
                         f"{int(docs.sum())} documents): re-run tokenize")
    return tokens


def cluster_table(manifest: pl.DataFrame, by_source: pl.DataFrame, keywords: list[list[str]], tokens: np.ndarray
                  ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Pure: one row per fine cluster (sizes, training tokens, dominant source, source shares, mean distance,
    keywords), and the (cluster, source) table of counts and shares. `tokens[c]` is fine cluster c's count."""
    parents = [c for c in manifest.columns if c.startswith("parent_l")]
    per_source = (
        by_source.select("cluster", "source", "docs")
        .with_columns((pl.col("docs") / pl.col("docs").sum().over("cluster")).alias("share"))
        .sort("cluster", "docs", "source", descending=[False, True, False])
    )
    dominant = per_source.group_by("cluster", maintain_order=True).first().select(
        "cluster", pl.col("source").alias("dominant_source"), pl.col("share").alias("purity"))
    shares = per_source.group_by("cluster", maintain_order=True).agg(
        pl.struct("source", "share").alias("source_shares"))
    distance = by_source.group_by("cluster").agg(
        (pl.col("distance_sum").sum() / pl.col("docs").sum()).alias("mean_distance"))
    table = (
        manifest.select("cluster", *parents, "docs", "chars")
        .with_columns(pl.Series("tokens", np.asarray(tokens, dtype=np.int64)[manifest["cluster"].to_numpy()]))
        .join(dominant, on="cluster", how="left").join(shares, on="cluster", how="left")
        .join(distance, on="cluster", how="left")
        .with_columns(pl.Series("keywords", keywords, dtype=pl.List(pl.String)))
        .sort("cluster")
    )
    return table, per_source


def clustering_summary(manifest: pl.DataFrame, table: pl.DataFrame, per_source: pl.DataFrame,
                       by_source: pl.DataFrame) -> dict[str, Any]:
    """Pure: cluster sizes, mean distance, and purity / NMI of the fine and coarse clusterings against the source
    label (when the corpus has one)."""
    coarse_col = _coarse_column(manifest)
    n_docs = int(by_source["docs"].sum())
    sources = sorted(by_source["source"].unique().to_list())
    summary: dict[str, Any] = {
        "documents": n_docs,
        "clusters": manifest.height,
        "empty_clusters": int((table["docs"] == 0).sum()),
        "largest_cluster_docs": int(table["docs"].max()),
        "median_nonempty_cluster_docs": float(table.filter(pl.col("docs") > 0)["docs"].median()),
        "mean_distance": float(by_source["distance_sum"].sum() / max(n_docs, 1)),
    }
    if sources != ["unknown"]:  # a source label exists: score the clustering against it
        summary["sources"] = len(sources)
        summary["purity_fine"], summary["nmi_fine"] = contingency_scores(_contingency(per_source, "cluster", sources))
        if coarse_col != "cluster":
            with_coarse = per_source.join(manifest.select("cluster", pl.col(coarse_col).alias("coarse")),
                                          on="cluster")
            summary["purity_coarse"], summary["nmi_coarse"] = contingency_scores(
                _contingency(with_coarse, "coarse", sources))
    return summary


def dvc_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The few numbers `dvc metrics show` puts in its one wide table: the rest is in summary.json."""
    return {k: round(summary[k], 4) if isinstance(summary[k], float) else summary[k]
            for k in ("clusters", "nmi_fine") if k in summary}


def write_outputs(directory: Path, table: pl.DataFrame, per_source: pl.DataFrame, manifest: pl.DataFrame,
                  summary: dict[str, Any]) -> None:
    from .plots import plot_cluster_sizes, plot_source_heatmap

    (directory / "plots").mkdir(parents=True)
    table.write_parquet(directory / "clusters.parquet", compression="zstd")
    per_source.write_parquet(directory / "sources.parquet", compression="zstd")
    write_json(summary, directory / "summary.json")
    sizes = table.select("docs").sort("docs", descending=True).with_row_index("rank")
    sizes.write_csv(directory / "plots" / "cluster_sizes.csv")
    plot_cluster_sizes(sizes["docs"].to_numpy(), directory / "plots" / "cluster_sizes.png")
    coarse_col = _coarse_column(manifest)
    heat = per_source.join(manifest.select("cluster", coarse_col) if coarse_col != "cluster"
                           else manifest.select("cluster"), on="cluster").group_by(coarse_col, "source").agg(
        pl.col("docs").sum())
    plot_source_heatmap(heat, coarse_col, directory / "plots" / "source_by_coarse.png")


def run(params: dict[str, Any]) -> dict[str, Any]:
    cfg = load(StatsConfig, params.get("stats"), "stats")
    manifest = pl.from_arrow(domains.read_manifest(cfg.domains, param="stats.domains"))
    # The corpus's store (the one tokenize wrote), read before any work so a missing or stale one fails fast.
    store_dir = load(TokenizeConfig, params.get("tokenize"), "tokenize").output
    tokens = training_tokens(token_store.read(store_dir, "tokenize.output"), manifest)
    shards = domains.list_shards(cfg.domains)
    vectorizer = fit_vocabulary(shards, cfg.keyword_sample_docs, cfg.seed, cfg.keyword_terms)
    by_source, term_counts = aggregate_shards(shards, vectorizer, manifest.height)
    keywords = class_tfidf_keywords(term_counts, vectorizer.get_feature_names_out(), cfg.keywords)
    table, per_source = cluster_table(manifest, by_source, keywords, tokens)
    summary = clustering_summary(manifest, table, per_source, by_source)
    with atomic_path(cfg.output) as tmp:
        write_outputs(tmp, table, per_source, manifest, summary)
    write_json(dvc_metrics(summary), cfg.metrics)
    return summary


def _coarse_column(manifest: pl.DataFrame) -> str:
    """The top level's id column; with a flat clustering every cluster is its own coarse cluster."""
    parents = [c for c in manifest.columns if c.startswith("parent_l")]
    return parents[0] if parents else "cluster"


def _contingency(frame: pl.DataFrame, group: str, sources: list[str]) -> np.ndarray:
    wide = frame.group_by(group, "source").agg(pl.col("docs").sum())
    index = {s: i for i, s in enumerate(sources)}
    groups = wide[group].to_numpy()
    _, rows = np.unique(groups, return_inverse=True)
    out = np.zeros((rows.max() + 1, len(sources)))
    np.add.at(out, (rows, [index[s] for s in wide["source"].to_list()]), wide["docs"].to_numpy())
    return out
