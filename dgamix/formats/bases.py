"""Bases table: the basis distributions P (m bases × k clusters) of distribution reweighting (written by the bases
stage; read by the mixer's `Mixture.from_bases_dir`).

Layout of `<bases.output>/`:
- `bases.parquet`: the non-zero entries of P, one row each: `basis` (int32, row index), `name` (string),
  `cluster` (int32, fine cluster id), `prob` (float64). Every basis sums to 1 and puts no mass on a cluster
  without tokens. Schema metadata: `clusters` (k: the table is sparse, so k is not implied by its rows),
  `dgamix.format = bases`, `dgamix.format_version = 1`.
- `names.json`: the m basis names in row order (`importance`, `reference:<label>`, `natural`, `uniform`,
  `coarse:<id>`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from ..core.atomic import write_json, write_parquet
from ..core.errors import ParamError
from . import check_parquet, parquet_metadata

NAME = "bases"
VERSION = 1
SUPPORTED = {1}
TABLE = "bases.parquet"
NAMES = "names.json"


SUM_TOLERANCE = 1e-6


def validate(matrix: sp.spmatrix | np.ndarray, names: list[str], available: np.ndarray | None = None,
             error: type[Exception] = ValueError) -> sp.csr_matrix:
    """P as a float64 CSR matrix, or `error` naming the first basis that is not a probability vector over existing
    clusters (and, given the store's `available` clusters, over clusters that have tokens). The one check the bases
    stage runs before writing and the mixer runs before sampling."""
    matrix = sp.csr_matrix(matrix, dtype=np.float64)
    m, k = matrix.shape
    if m == 0 or k == 0:
        raise error(f"bases matrix has shape {matrix.shape}: expected at least one basis and one cluster")
    if len(names) != m:
        raise error(f"{len(names)} names for {m} bases")
    if available is not None and k != len(available):
        raise error(f"bases have {k} clusters but the store has {len(available)}; build bases and tokens from the "
                    "same clustering")
    rows = np.repeat(np.arange(m), np.diff(matrix.indptr))
    bad = ~np.isfinite(matrix.data) | (matrix.data < 0)
    if bad.any():
        raise error(f"basis '{names[rows[bad][0]]}' has negative, NaN or inf probabilities: every basis must be a "
                    "probability vector")
    sums = np.asarray(matrix.sum(axis=1)).ravel()
    off = np.flatnonzero(np.abs(sums - 1) > SUM_TOLERANCE)
    if len(off):
        raise error(f"basis '{names[off[0]]}' sums to {sums[off[0]]:.9f}, expected 1")
    if available is not None:
        mass = np.asarray(matrix[:, ~np.asarray(available, dtype=bool)].sum(axis=1)).ravel()
        empty = np.flatnonzero(mass > 0)
        if len(empty):
            raise error(f"basis '{names[empty[0]]}' puts mass {mass[empty[0]]:.3g} on clusters with no tokens")
    return matrix


def write(directory: Path, names: list[str], matrix: np.ndarray) -> None:
    basis_idx, cluster_idx = np.nonzero(matrix)
    table = pa.table({
        "basis": basis_idx.astype(np.int32),
        "name": [names[i] for i in basis_idx],
        "cluster": cluster_idx.astype(np.int32),
        "prob": matrix[basis_idx, cluster_idx],
    }).replace_schema_metadata({"clusters": str(matrix.shape[1]), **parquet_metadata(NAME, VERSION)})
    write_parquet(table, Path(directory) / TABLE)
    write_json(names, Path(directory) / NAMES)


def read(directory: Path, param: str = "bases") -> tuple[list[str], sp.csr_matrix]:
    """(names, P as a CSR matrix of shape (m, k))."""
    directory = Path(directory)
    for name in (TABLE, NAMES):
        if not (directory / name).exists():
            raise ParamError(f"{param} = '{directory}' holds no {name} (expected the bases stage's output)")
    schema = pq.read_schema(directory / TABLE)
    check_parquet(directory / TABLE, schema, NAME, SUPPORTED, "bases")
    names = json.loads((directory / NAMES).read_text())
    table = pq.read_table(directory / TABLE, columns=["basis", "cluster", "prob"]).to_pydict()
    k = int(schema.metadata[b"clusters"])
    return names, sp.csr_matrix((table["prob"], (table["basis"], table["cluster"])), shape=(len(names), k))
