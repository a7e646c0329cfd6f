"""Stage 3, cluster: fit hierarchical spherical k-means on a seeded sample of the embeddings.

Output: centroids per level (`centroids_level{l}.npy`), the parent table (`parents.parquet`) and `clusters.json`
(levels, seed, sample size). Fitting reads only the sampled rows of the memory-mapped embedding shards.
"""
from __future__ import annotations

import json
import logging
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..core.atomic import atomic_path, write_json, write_npy, write_parquet
from .embed import load_embeddings
from .kmeans import HierarchicalKMeans, resolve_backend
from .sampling import gather_rows, sample_rows
from ..core.params import ParamError, local_path, non_negative_int, positive_int, require, section

log = logging.getLogger(__name__)

# faiss warns below 39 points per centroid and subsamples above 256: the same guidance sizes our fit sample.
MIN_POINTS_PER_CENTROID = 39
# Caps the fit sample (and so the stage's memory, about 5 KB per sampled document at 384 dimensions) on large
# corpora: 64 points per fine cluster at [64, 64]. An explicit null in params.yaml removes the cap.
DEFAULT_MAX_FIT_DOCS = 262_144


def validate_levels(levels: Any, n_docs: int) -> list[int]:
    if not isinstance(levels, list) or not levels or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in levels):
        raise ParamError(f"cluster.levels = {levels!r}: expected a non-empty list of positive integers, e.g. [16, 16]")
    if prod(levels) > n_docs:
        raise ParamError(
            f"cluster.levels = {levels} asks for {prod(levels)} fine clusters but the corpus has only {n_docs} "
            f"documents (expected at most {n_docs} clusters)"
        )
    return levels


def run(params: dict[str, Any]) -> dict[str, Any]:
    cfg = section(params, "cluster")
    emb_dir = local_path(cfg, "cluster", "embeddings", "data/embeddings")
    docs_dir = local_path(cfg, "cluster", "docs", "data/docs")
    out_dir = local_path(cfg, "cluster", "output", "data/clusters")
    seed = non_negative_int(cfg, "cluster", "seed", 0)
    iterations = positive_int(cfg, "cluster", "iterations", 20)
    ppc = positive_int(cfg, "cluster", "points_per_centroid", 256)
    backend = require(cfg, "cluster", "backend", str, "auto")
    # A missing key takes the default cap; an explicit null removes it.
    max_fit_docs = require(cfg, "cluster", "max_fit_docs", int, None) if "max_fit_docs" in cfg else DEFAULT_MAX_FIT_DOCS
    if backend not in ("auto", "faiss", "torch"):
        raise ParamError(f"cluster.backend = '{backend}': expected auto, faiss or torch")
    if not emb_dir.is_dir():
        raise ParamError(f"cluster.embeddings = '{emb_dir}' does not exist (expected the embed stage's output)")

    arrays = load_embeddings(emb_dir, docs_dir, "cluster.embeddings")
    n_docs = sum(len(a) for a in arrays)
    levels = validate_levels(cfg.get("levels"), n_docs)
    if n_docs < MIN_POINTS_PER_CENTROID * levels[0]:
        log.warning("cluster: %d documents for %d top-level clusters is below faiss's guidance of %d points per "
                    "centroid; clusters will be noisy", n_docs, levels[0], MIN_POINTS_PER_CENTROID)
    # The fit sample, not the corpus, sets the stage's memory (about 4 float32 copies of it at the peak):
    # max_fit_docs caps it below faiss's guidance of points_per_centroid points per fine centroid.
    fit_docs = prod(levels) * ppc
    if max_fit_docs is not None:
        if max_fit_docs < prod(levels):
            raise ParamError(f"cluster.max_fit_docs = {max_fit_docs}: expected at least one document per fine "
                             f"cluster ({prod(levels)} for levels {levels}), or null")
        fit_docs = min(fit_docs, max_fit_docs)
    rows = sample_rows(n_docs, fit_docs, seed)
    x = gather_rows(arrays, rows)
    resolved = resolve_backend(backend)
    log.info("cluster: fitting levels %s on %d of %d documents (%s)", levels, len(rows), n_docs, resolved)
    model = HierarchicalKMeans(levels, iterations=iterations, seed=seed, points_per_centroid=ppc, backend=resolved)
    model.fit(x)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_model(model, tmp, {"fit_points": int(len(rows)), "documents": int(n_docs)})
    return {"levels": levels, "fit_points": int(len(rows)), "documents": int(n_docs)}


def save_model(model: HierarchicalKMeans, directory: Path, extra: dict[str, Any]) -> None:
    for depth, centroids in enumerate(model.centroids_):
        write_npy(centroids, directory / f"centroids_level{depth}.npy")
    write_parquet(pa.table(model.parent_table()), directory / "parents.parquet")
    used = [int(v.sum()) for v in model.valid_]
    write_json(
        {"levels": model.levels, "seed": model.seed, "iterations": model.iterations,
         "points_per_centroid": model.points_per_centroid, "dim": int(model.centroids_[0].shape[1]),
         "used_clusters_per_level": used, **extra},
        directory / "clusters.json",
    )


def load_model(directory: Path, param: str = "clusters") -> HierarchicalKMeans:
    import pyarrow.parquet as pq

    meta_path = Path(directory) / "clusters.json"
    if not meta_path.exists():
        raise ParamError(f"{param} = '{directory}' holds no clusters.json (expected the cluster stage's output)")
    meta = json.loads(meta_path.read_text())
    missing = [name for name in ["parents.parquet"] + [f"centroids_level{d}.npy" for d in range(len(meta["levels"]))]
               if not (Path(directory) / name).exists()]
    if missing:
        raise ParamError(f"{param} = '{directory}' lacks {', '.join(missing)} (an incomplete cluster output; "
                         "re-run cluster)")
    model = HierarchicalKMeans(meta["levels"], meta["iterations"], meta["seed"], meta["points_per_centroid"],
                               backend=resolve_backend("auto"))
    parents = pq.read_table(Path(directory) / "parents.parquet").to_pydict()
    level = np.asarray(parents["level"])
    valid = np.asarray(parents["valid"])
    for depth in range(len(model.levels)):
        model.centroids_.append(np.load(Path(directory) / f"centroids_level{depth}.npy"))
        model.valid_.append(valid[level == depth])
    return model
