"""Stage 4, assign: every document -> its fine cluster; documents written grouped by cluster.

Each docs shard becomes one domains shard sorted by fine cluster, with exactly one Parquet row group per
(shard, cluster). The manifest lists, for every cluster (empty ones included, with zero counts), the files and
row groups that hold it, so reading one cluster touches only that cluster's data (`read_cluster`).
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.atomic import atomic_path, write_parquet
from .cluster import load_model
from .engine import Engine
from .embed import docs_shards, load_embeddings
from .kmeans import HierarchicalKMeans, resolve_backend
from ..core.params import ParamError, local_path, require, section

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"


def parent_columns(levels: list[int]) -> list[str]:
    """Names of the ancestor id columns, from the top level down (none for a flat clustering)."""
    return [f"parent_l{depth}" for depth in range(len(levels) - 1)]


def assign_shard(docs: pa.Table, embeddings: np.ndarray, model: HierarchicalKMeans) -> pa.Table:
    """Pure per-shard step: the docs table with cluster, ancestor ids and similarity, sorted by cluster."""
    ids, sims = model.predict(np.asarray(embeddings))
    table = docs.append_column("cluster", pa.array(ids[:, -1].astype(np.int32)))
    for depth, name in enumerate(parent_columns(model.levels)):
        table = table.append_column(name, pa.array(ids[:, depth].astype(np.int32)))
    table = table.append_column("similarity", pa.array(sims.astype(np.float32)))
    # Stable sort keeps the ingest order within a cluster, so output bytes are deterministic.
    order = np.argsort(ids[:, -1], kind="stable")
    return table.take(pa.array(order))


def write_grouped(table: pa.Table, path: Path) -> list[dict[str, Any]]:
    """Write a cluster-sorted table with one row group per cluster; return its (cluster, row_group, docs, chars)."""
    clusters = table.column("cluster").to_numpy()
    chars = table.column("n_chars").to_numpy()
    starts = np.flatnonzero(np.r_[True, clusters[1:] != clusters[:-1]]) if len(clusters) else np.array([], int)
    ends = np.r_[starts[1:], len(clusters)]
    groups = []
    with atomic_path(path) as tmp:
        # No min/max statistics for the text: kilobytes per row group that nobody filters on, and with one row
        # group per cluster they made every shard's footer (read by tokenize, polars, ...) several times larger.
        statistics = [name for name in table.schema.names if name != "text"]
        with pq.ParquetWriter(tmp, table.schema, compression="zstd", write_statistics=statistics) as writer:
            for rg, (start, end) in enumerate(zip(starts, ends)):
                writer.write_table(table.slice(start, end - start), row_group_size=end - start)
                groups.append({"cluster": int(clusters[start]), "row_group": rg, "docs": int(end - start),
                               "chars": int(chars[start:end].sum())})
    return groups


def assign_file(model: HierarchicalKMeans, task: tuple[str, str, str]) -> list[dict[str, Any]]:
    """The per-shard step of either engine: docs shard + its embeddings -> the cluster-grouped domains shard."""
    docs, embeddings, out = task
    table = assign_shard(pq.read_table(docs), np.load(embeddings, mmap_mode="r"), model)
    return write_grouped(table, Path(out))


def build_manifest(locations: list[tuple[str, dict[str, Any]]], n_clusters: int, levels: list[int]) -> pa.Table:
    """One row per fine cluster: ancestors, docs, chars, and the (file, row_group) pairs that hold it."""
    files: list[list[str]] = [[] for _ in range(n_clusters)]
    row_groups: list[list[int]] = [[] for _ in range(n_clusters)]
    docs = np.zeros(n_clusters, dtype=np.int64)
    chars = np.zeros(n_clusters, dtype=np.int64)
    for file, group in locations:
        c = group["cluster"]
        files[c].append(file)
        row_groups[c].append(group["row_group"])
        docs[c] += group["docs"]
        chars[c] += group["chars"]
    cluster = np.arange(n_clusters)
    columns: dict[str, Any] = {"cluster": cluster.astype(np.int32)}
    # Ancestor at depth d of fine id c: c // prod(levels[d+1:]).
    for depth, name in enumerate(parent_columns(levels)):
        columns[name] = (cluster // int(np.prod(levels[depth + 1 :]))).astype(np.int32)
    columns.update({"docs": docs, "chars": chars, "files": files, "row_groups": row_groups})
    return pa.table(columns)


def iter_clusters(domains_dir: str | Path, columns: list[str] | None = None, clusters: range | None = None):
    """Yield (cluster id, table) for every fine cluster (or those in `clusters`) in id order, empty ones included;
    one cluster in memory."""
    domains_dir = Path(domains_dir)
    manifest = pq.read_table(domains_dir / MANIFEST, columns=["cluster", "files", "row_groups"]).to_pylist()
    if clusters is not None:
        manifest = manifest[clusters.start : clusters.stop]
    files: dict[str, pq.ParquetFile] = {}
    empty = None
    for row in manifest:
        parts = []
        for file, rg in zip(row["files"], row["row_groups"]):
            if file not in files:
                files[file] = pq.ParquetFile(domains_dir / file)
            parts.append(files[file].read_row_group(rg, columns=columns))
        if parts:
            yield row["cluster"], pa.concat_tables(parts)
        else:
            empty = empty if empty is not None else _empty_cluster_table(domains_dir, columns)
            yield row["cluster"], empty


def read_cluster(domains_dir: str | Path, cluster: int, columns: list[str] | None = None) -> pa.Table:
    """All documents of one fine cluster, reading only its row groups."""
    domains_dir = Path(domains_dir)
    manifest = pq.read_table(domains_dir / MANIFEST, filters=[("cluster", "=", cluster)]).to_pylist()
    if not manifest:
        raise ValueError(f"cluster {cluster} is not in {domains_dir / MANIFEST}")
    row = manifest[0]
    parts = [pq.ParquetFile(domains_dir / f).read_row_group(rg, columns=columns)
             for f, rg in zip(row["files"], row["row_groups"])]
    if not parts:
        return _empty_cluster_table(domains_dir, columns)
    return pa.concat_tables(parts)


def _empty_cluster_table(domains_dir: Path, columns: list[str] | None) -> pa.Table:
    shards = sorted(domains_dir.glob("part-*.parquet"))
    schema = pq.read_schema(shards[0])
    if columns:
        schema = pa.schema([schema.field(c) for c in columns])
    return schema.empty_table()


def run(params: dict[str, Any]) -> dict[str, Any]:
    cfg = section(params, "assign")
    docs_dir = local_path(cfg, "assign", "docs", "data/docs")
    emb_dir = local_path(cfg, "assign", "embeddings", "data/embeddings")
    clusters_dir = local_path(cfg, "assign", "clusters", "data/clusters")
    out_dir = local_path(cfg, "assign", "output", "data/domains")
    backend = require(cfg, "assign", "backend", str, "auto")
    if backend not in ("auto", "faiss", "torch"):
        raise ParamError(f"assign.backend = '{backend}': expected auto, faiss or torch")
    if not emb_dir.is_dir():
        raise ParamError(f"assign.embeddings = '{emb_dir}' does not exist (expected the embed stage's output)")

    model = load_model(clusters_dir, "assign.clusters")
    model.backend = resolve_backend(backend)
    arrays = load_embeddings(emb_dir, docs_dir, "assign.embeddings")
    dim = model.centroids_[0].shape[1]
    if arrays[0].shape[1] != dim:
        raise ParamError(f"assign.embeddings have dimension {arrays[0].shape[1]} but the centroids in "
                         f"{clusters_dir} have {dim}: embed and cluster with the same model")
    shards = docs_shards(docs_dir, "assign.docs")
    engine = Engine.for_stage(params, "assign")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        # Absolute paths: a Ray worker's working directory is not ours.
        tasks = [(str(shard.resolve()), str((emb_dir / f"{shard.stem}.npy").resolve()),
                  str((tmp / shard.name).resolve())) for shard in shards]
        groups = engine.map(partial(assign_file, model), tasks, "assign", weights=[len(a) for a in arrays],
                            unit="doc")
        locations = [(shard.name, g) for shard, shard_groups in zip(shards, groups) for g in shard_groups]
        manifest = build_manifest(locations, model.n_clusters, model.levels)
        write_parquet(manifest, tmp / MANIFEST)
    docs = manifest.column("docs").to_numpy()
    return {"documents": int(docs.sum()), "clusters": model.n_clusters, "empty_clusters": int((docs == 0).sum())}
