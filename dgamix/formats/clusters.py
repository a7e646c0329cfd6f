"""Clusters: the hierarchical k-means tree (written by cluster; read by assign, bases and the target stages).

Layout of `<cluster.output>/`:
- `centroids_level{d}.npy`: float32 (clusters at depth d, dim), L2-normalized; depth 0 is the top (coarse) level.
  Fine cluster ids are mixed-radix: id at depth d = parent id × levels[d] + child index.
- `parents.parquet`: one row per (level, cluster): `level`, `cluster`, `parent` (id at the level above, −1 at the
  top) and `valid` (false for ids a small parent could not fill; never assigned).
- `clusters.json`: `format_version` (1), `levels`, `seed`, `iterations`, `points_per_centroid`, `dim`,
  `used_clusters_per_level`, `fit_points`, `documents`.
A document is routed down the tree: the nearest valid centroid (inner product) at the top, then the nearest valid
child of that one, and so on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.atomic import write_json, write_npy, write_parquet
from ..core.errors import ParamError
from . import JSON_VERSION_KEY, check_json

NAME = "clusters"
VERSION = 1
SUPPORTED = {1}
META = "clusters.json"
PARENTS = "parents.parquet"


def centroids_file(depth: int) -> str:
    return f"centroids_level{depth}.npy"


@dataclass
class ClusterTree:
    """The tree as stored: metadata, centroids and valid flags per level (top first)."""

    meta: dict[str, Any]
    centroids: list[np.ndarray]
    valid: list[np.ndarray]

    @property
    def levels(self) -> list[int]:
        return list(self.meta["levels"])

    @property
    def n_clusters(self) -> int:
        return int(np.prod(self.levels))


def write(directory: Path, centroids: list[np.ndarray], parents: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write the tree into `directory` (which the caller renames into place when complete)."""
    for depth, array in enumerate(centroids):
        write_npy(array, directory / centroids_file(depth))
    write_parquet(pa.table(parents), directory / PARENTS)
    write_json({JSON_VERSION_KEY: VERSION, **meta}, directory / META)


def read(directory: Path, param: str = "clusters") -> ClusterTree:
    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.exists():
        raise ParamError(f"{param} = '{directory}' holds no {META} (expected the cluster stage's output)")
    meta = json.loads(meta_path.read_text())
    check_json(meta_path, meta, NAME, SUPPORTED, "cluster")
    missing = [name for name in [PARENTS] + [centroids_file(d) for d in range(len(meta["levels"]))]
               if not (directory / name).exists()]
    if missing:
        raise ParamError(f"{param} = '{directory}' lacks {', '.join(missing)} (an incomplete cluster output; "
                         "re-run cluster)")
    parents = pq.read_table(directory / PARENTS).to_pydict()
    level, valid = np.asarray(parents["level"]), np.asarray(parents["valid"])
    depths = range(len(meta["levels"]))
    return ClusterTree(meta, [np.load(directory / centroids_file(d)) for d in depths],
                       [valid[level == d] for d in depths])
