"""Stage 3, cluster: fit hierarchical spherical k-means on a seeded sample of the embeddings.

Output: the tree in the clusters format (`dgamix.formats.clusters`). Fitting reads only the sampled rows of the
memory-mapped embedding shards.
"""
from __future__ import annotations

import logging
from math import prod
from pathlib import Path
from typing import Any

from ..core.atomic import atomic_path
from ..core.config import load
from ..core.errors import ParamError
from ..core.sections import ClusterConfig, positive_levels
from ..formats import clusters, embeddings
from .kmeans import HierarchicalKMeans, resolve_backend
from .sampling import gather_rows, sample_rows

log = logging.getLogger(__name__)

# faiss warns below 39 points per centroid and subsamples above 256: the same guidance sizes our fit sample.
MIN_POINTS_PER_CENTROID = 39


def validate_levels(levels: Any, n_docs: int) -> list[int]:
    if not positive_levels(levels):
        raise ParamError(f"cluster.levels = {levels!r}: expected a non-empty list of positive integers, e.g. [16, 16]")
    if prod(levels) > n_docs:
        raise ParamError(
            f"cluster.levels = {levels} asks for {prod(levels)} fine clusters but the corpus has only {n_docs} "
            f"documents (expected at most {n_docs} clusters)"
        )
    return levels


def fit_sample_size(levels: list[int], points_per_centroid: int, max_fit_docs: int | None) -> int:
    """Pure: documents to fit on. The fit sample, not the corpus, sets the stage's memory (about 4 float32 copies
    of it at the peak): max_fit_docs caps it below faiss's guidance of points_per_centroid per fine centroid
    (`ClusterConfig.validate` keeps the cap at one document per fine cluster or more)."""
    size = prod(levels) * points_per_centroid
    return size if max_fit_docs is None else min(size, max_fit_docs)


def run(params: dict[str, Any]) -> dict[str, Any]:
    cfg = load(ClusterConfig, params.get("cluster"), "cluster")
    emb_dir, seed, ppc = cfg.embeddings, cfg.seed, cfg.points_per_centroid
    if not emb_dir.is_dir():
        raise ParamError(f"cluster.embeddings = '{emb_dir}' does not exist (expected the embed stage's output)")

    arrays = embeddings.load(emb_dir, cfg.docs, "cluster.embeddings")
    n_docs = sum(len(a) for a in arrays)
    levels = validate_levels(cfg.levels, n_docs)
    if n_docs < MIN_POINTS_PER_CENTROID * levels[0]:
        log.warning("cluster: %d documents for %d top-level clusters is below faiss's guidance of %d points per "
                    "centroid; clusters will be noisy", n_docs, levels[0], MIN_POINTS_PER_CENTROID)
    rows = sample_rows(n_docs, fit_sample_size(levels, ppc, cfg.max_fit_docs), seed)
    x = gather_rows(arrays, rows)
    resolved = resolve_backend(cfg.backend)
    log.info("cluster: fitting levels %s on %d of %d documents (%s)", levels, len(rows), n_docs, resolved)
    model = HierarchicalKMeans(levels, iterations=cfg.iterations, seed=seed, points_per_centroid=ppc, backend=resolved)
    model.fit(x)
    with atomic_path(cfg.output) as tmp:
        tmp.mkdir(parents=True)
        save_model(model, tmp, {"fit_points": int(len(rows)), "documents": int(n_docs)})
    return {"levels": levels, "fit_points": int(len(rows)), "documents": int(n_docs)}


def save_model(model: HierarchicalKMeans, directory: Path, extra: dict[str, Any]) -> None:
    clusters.write(directory, model.centroids_, model.parent_table(),
                   {"levels": model.levels, "seed": model.seed, "iterations": model.iterations,
                    "points_per_centroid": model.points_per_centroid, "dim": int(model.centroids_[0].shape[1]),
                    "used_clusters_per_level": [int(v.sum()) for v in model.valid_], **extra})


def load_model(directory: Path, param: str = "clusters") -> HierarchicalKMeans:
    """The fitted tree of a cluster output, ready to route documents."""
    tree = clusters.read(directory, param)
    model = HierarchicalKMeans(tree.levels, tree.meta["iterations"], tree.meta["seed"],
                               tree.meta["points_per_centroid"], backend=resolve_backend("auto"))
    model.centroids_, model.valid_ = list(tree.centroids), list(tree.valid)
    return model
