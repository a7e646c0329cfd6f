"""Stage 4, assign: every document -> its fine cluster; documents written grouped by cluster.

Each docs shard becomes one domains shard sorted by fine cluster, with exactly one Parquet row group per
(shard, cluster), and a manifest of where every cluster lives (`dgamix.formats.domains`), so reading one cluster
touches only that cluster's data (`dgamix.formats.domains.read_cluster`).
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from ..core.atomic import atomic_path
from ..core.errors import ParamError
from ..core.config import load
from ..core.sections import AssignConfig
from ..formats import docs, domains, embeddings
from .cluster import load_model
from .engine import Engine
from .kmeans import HierarchicalKMeans, resolve_backend

log = logging.getLogger(__name__)

def assign_shard(table: pa.Table, vectors: np.ndarray, model: HierarchicalKMeans) -> pa.Table:
    """Pure per-shard step: the docs table with cluster, ancestor ids and similarity, sorted by cluster."""
    ids, sims = model.predict(np.asarray(vectors))
    table = table.append_column("cluster", pa.array(ids[:, -1].astype(np.int32)))
    for depth, name in enumerate(domains.parent_columns(model.levels)):
        table = table.append_column(name, pa.array(ids[:, depth].astype(np.int32)))
    table = table.append_column("similarity", pa.array(sims.astype(np.float32)))
    # Stable sort keeps the ingest order within a cluster, so output bytes are deterministic.
    order = np.argsort(ids[:, -1], kind="stable")
    return table.take(pa.array(order))


class AssignTask(NamedTuple):
    """One engine item of assign (absolute paths: a Ray worker's working directory is not ours)."""

    docs_shard: str  # the docs shard read
    matrix: str  # its embeddings (.npy)
    out: str  # the domains shard written


def assign_file(model: HierarchicalKMeans, task: AssignTask) -> list[dict[str, Any]]:
    """The per-shard step of either engine: docs shard + its embeddings -> the cluster-grouped domains shard."""
    table = assign_shard(docs.read_shard(task.docs_shard), np.load(task.matrix, mmap_mode="r"), model)
    return domains.write_shard(table, Path(task.out))


def run(params: dict[str, Any]) -> dict[str, Any]:
    cfg = load(AssignConfig, params.get("assign"), "assign")
    docs_dir, emb_dir, clusters_dir = cfg.docs, cfg.embeddings, cfg.clusters
    if not emb_dir.is_dir():
        raise ParamError(f"assign.embeddings = '{emb_dir}' does not exist (expected the embed stage's output)")

    model = load_model(clusters_dir, "assign.clusters")
    model.backend = resolve_backend(cfg.backend)
    arrays = embeddings.load(emb_dir, docs_dir, "assign.embeddings")
    dim = model.centroids_[0].shape[1]
    if arrays[0].shape[1] != dim:
        raise ParamError(f"assign.embeddings have dimension {arrays[0].shape[1]} but the centroids in "
                         f"{clusters_dir} have {dim}: embed and cluster with the same model")
    shards = docs.list_shards(docs_dir, "assign.docs")
    engine = Engine.for_stage(params, "assign", cfg.engine)
    with atomic_path(cfg.output) as tmp:
        tmp.mkdir(parents=True)
        tasks = [AssignTask(docs_shard=str(shard.resolve()),
                            matrix=str(embeddings.matrix_path(emb_dir, shard).resolve()),
                            out=str((tmp / shard.name).resolve())) for shard in shards]
        groups = engine.map(partial(assign_file, model), tasks, "assign", weights=[len(a) for a in arrays],
                            unit="doc")
        locations = [(shard.name, g) for shard, shard_groups in zip(shards, groups) for g in shard_groups]
        manifest = domains.build_manifest(locations, model.n_clusters, model.levels)
        domains.write_manifest(manifest, tmp)
    per_cluster = manifest.column("docs").to_numpy()
    return {"documents": int(per_cluster.sum()), "clusters": model.n_clusters,
            "empty_clusters": int((per_cluster == 0).sum())}
