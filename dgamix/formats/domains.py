"""Domains: the corpus grouped by fine cluster (written by assign; read by stats, tokenize, bases, and users).

Layout of `<assign.output>/`:
- `part-NNNNN.parquet`: one shard per docs shard (same name), the docs columns (see `docs`) plus `cluster` (int32,
  the fine cluster), `parent_l0` … `parent_l{L-2}` (int32, its ancestors from the top level down; none for a
  flat clustering) and `similarity` (float32, inner product with its fine centroid). Rows are sorted by cluster
  (stable: ingest order within a cluster) with exactly one row group per (shard, cluster), so reading a cluster
  touches only its row groups. No min/max statistics on `text`.
- `manifest.parquet`: one row per fine cluster, empty ones included (zero counts): `cluster`, the `parent_l*`
  columns, `docs` and `chars` (int64 totals), `files` (list of shard names) and `row_groups` (list of row group
  indices, aligned with `files`) that hold it.
Both carry schema metadata `dgamix.format = domains`, `dgamix.format_version = 1`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.atomic import atomic_path, write_parquet
from ..core.errors import ParamError
from . import check_parquet, with_format

NAME = "domains"
VERSION = 1
SUPPORTED = {1}
MANIFEST = "manifest.parquet"
SHARD_GLOB = "part-*.parquet"


def parent_columns(levels: list[int]) -> list[str]:
    """Names of the ancestor id columns, from the top level down (none for a flat clustering)."""
    return [f"parent_l{depth}" for depth in range(len(levels) - 1)]


def write_shard(table: pa.Table, path: Path) -> list[dict[str, Any]]:
    """Write a cluster-sorted table with one row group per cluster; return its (cluster, row_group, docs, chars)."""
    table = table.replace_schema_metadata(with_format(table.schema, NAME, VERSION).metadata)
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
    table = pa.table(columns)
    return table.replace_schema_metadata(with_format(table.schema, NAME, VERSION).metadata)


def write_manifest(manifest: pa.Table, directory: Path) -> None:
    write_parquet(manifest, Path(directory) / MANIFEST)


def read_manifest(directory: Path, columns: list[str] | None = None, param: str = "domains") -> pa.Table:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise ParamError(f"{param} = '{directory}' holds no {MANIFEST} (expected the assign stage's output)")
    check_parquet(path, pq.read_schema(path), NAME, SUPPORTED, "assign")
    return pq.read_table(path, columns=columns)


def list_shards(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob(SHARD_GLOB))


def open_shard(path: Path) -> pq.ParquetFile:
    """A domains shard, opened after checking its format version (close it, or use it as a context manager)."""
    parquet = pq.ParquetFile(path)
    try:
        check_parquet(path, parquet.schema_arrow, NAME, SUPPORTED, "assign")
    except Exception:
        parquet.close()
        raise
    return parquet


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    with open_shard(path) as parquet:
        return parquet.read(columns=columns)


def iter_clusters(directory: str | Path, columns: list[str] | None = None,
                  clusters: range | None = None) -> Iterator[tuple[int, pa.Table]]:
    """(cluster id, table) for every fine cluster (or those in `clusters`) in id order, empty ones included; one
    cluster in memory."""
    directory = Path(directory)
    manifest = read_manifest(directory, ["cluster", "files", "row_groups"]).to_pylist()
    if clusters is not None:
        manifest = manifest[clusters.start : clusters.stop]
    files: dict[str, pq.ParquetFile] = {}
    empty = None
    try:
        for row in manifest:
            parts = []
            for file, rg in zip(row["files"], row["row_groups"]):
                if file not in files:
                    files[file] = open_shard(directory / file)
                parts.append(files[file].read_row_group(rg, columns=columns))
            if parts:
                yield row["cluster"], pa.concat_tables(parts)
            else:
                empty = empty if empty is not None else _empty_cluster_table(directory, columns)
                yield row["cluster"], empty
    finally:
        for parquet in files.values():
            parquet.close()


def read_cluster(directory: str | Path, cluster: int, columns: list[str] | None = None) -> pa.Table:
    """All documents of one fine cluster, reading only its row groups."""
    directory = Path(directory)
    manifest = read_manifest(directory, ["cluster", "files", "row_groups"]).to_pylist()
    rows = [r for r in manifest if r["cluster"] == cluster]
    if not rows:
        raise ValueError(f"cluster {cluster} is not in {directory / MANIFEST}")
    row = rows[0]
    parts = []
    for file, rg in zip(row["files"], row["row_groups"]):
        with open_shard(directory / file) as parquet:
            parts.append(parquet.read_row_group(rg, columns=columns))
    if not parts:
        return _empty_cluster_table(directory, columns)
    return pa.concat_tables(parts)


def _empty_cluster_table(directory: Path, columns: list[str] | None) -> pa.Table:
    schema = pq.read_schema(list_shards(directory)[0])
    if columns:
        schema = pa.schema([schema.field(c) for c in columns])
    return schema.empty_table()
