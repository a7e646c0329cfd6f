"""Mixture: basis distributions P (m x k, sparse rows on the simplex) and weights alpha; p = alpha^T P.

Domain reweighting is the special case P = identity over the (non-empty) clusters, or over coarse clusters with
`coarse:<id>` bases (natural within each).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..formats import bases as bases_format

SUM_TOLERANCE = 1e-6


def check_weights(weights: np.ndarray | list[float], m: int) -> np.ndarray:
    """Weights as a float64 probability vector of length m, or a clear error."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (m,):
        raise ValueError(f"weights have shape {w.shape}, expected ({m},): one weight per basis")
    if not np.isfinite(w).all():
        raise ValueError(f"weights contain NaN or inf: {w[~np.isfinite(w)][:5]}")
    if (w < 0).any():
        raise ValueError(f"weights must be non-negative; got {w[w < 0][:5]} at {np.flatnonzero(w < 0)[:5]}")
    total = w.sum()
    if total <= 0:
        raise ValueError("weights sum to 0: expected at least one positive weight")
    # Weights already on the simplex are kept bit for bit, so saved and restored weights are identical.
    return w if abs(total - 1.0) <= 1e-12 else w / total


class Mixture:
    def __init__(self, bases: sp.spmatrix | np.ndarray, names: list[str] | None = None,
                 weights: np.ndarray | None = None):
        matrix = sp.csr_matrix(bases, dtype=np.float64)
        m, k = matrix.shape
        if m == 0 or k == 0:
            raise ValueError(f"bases matrix has shape {matrix.shape}: expected at least one basis and one cluster")
        if matrix.nnz and not np.isfinite(matrix.data).all():
            raise ValueError("bases matrix has NaN or inf entries: every basis must be a probability vector")
        if matrix.nnz and matrix.data.min() < 0:
            raise ValueError("bases matrix has negative entries: every basis must be a probability vector")
        sums = np.asarray(matrix.sum(axis=1)).ravel()
        bad = np.flatnonzero(np.abs(sums - 1) > SUM_TOLERANCE)
        if len(bad):
            raise ValueError(f"basis {bad[0]} ({(names or [])[bad[0]] if names else bad[0]}) sums to {sums[bad[0]]:.9f}, "
                             "expected 1")
        self.bases = matrix
        self.names = list(names) if names is not None else [f"basis:{j}" for j in range(m)]
        if len(self.names) != m:
            raise ValueError(f"{len(self.names)} names for {m} bases")
        self.weights = check_weights(np.full(m, 1.0 / m) if weights is None else weights, m)

    @property
    def n_bases(self) -> int:
        return self.bases.shape[0]

    @property
    def n_clusters(self) -> int:
        return self.bases.shape[1]

    def set_weights(self, weights: np.ndarray | list[float]) -> None:
        self.weights = check_weights(weights, self.n_bases)

    def cluster_probs(self, weights: np.ndarray | None = None) -> np.ndarray:
        """p = alpha^T P over clusters."""
        w = self.weights if weights is None else check_weights(weights, self.n_bases)
        p = np.asarray(self.bases.T @ w).ravel()
        return p / p.sum()

    def check_store(self, available: np.ndarray) -> None:
        """The bases must cover exactly the store's clusters and put no mass where there are no tokens."""
        if len(available) != self.n_clusters:
            raise ValueError(f"bases have {self.n_clusters} clusters but the store has {len(available)}; "
                             "build bases and tokens from the same clustering")
        mass = np.asarray(self.bases[:, ~available].sum(axis=1)).ravel()
        bad = np.flatnonzero(mass > 0)
        if len(bad):
            raise ValueError(f"basis '{self.names[bad[0]]}' puts mass {mass[bad[0]]:.3g} on clusters with no tokens")

    def select(self, names: list[str]) -> "Mixture":
        missing = [n for n in names if n not in self.names]
        if missing:
            raise ValueError(f"unknown bases {missing}; available: {self.names[:10]}...")
        rows = [self.names.index(n) for n in names]
        return Mixture(self.bases[rows], names)

    @classmethod
    def identity(cls, available: np.ndarray) -> "Mixture":
        """Domain reweighting: one basis per non-empty cluster."""
        clusters = np.flatnonzero(available)
        matrix = sp.csr_matrix((np.ones(len(clusters)), (np.arange(len(clusters)), clusters)),
                               shape=(len(clusters), len(available)))
        return cls(matrix, [f"cluster:{c}" for c in clusters])

    @classmethod
    def from_bases_dir(cls, directory: str | Path, names: list[str] | None = None) -> "Mixture":
        all_names, matrix = bases_format.read(Path(directory))
        mixture = cls(matrix, all_names)
        return mixture.select(names) if names else mixture

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(self.names).encode())
        csr = self.bases.tocsr()
        for array in (csr.indptr, csr.indices, csr.data):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()
