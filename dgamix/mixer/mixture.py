"""Mixture: basis distributions P (m x k, sparse rows on the simplex); p = alpha^T P for weights alpha.

Domain reweighting is the special case P = identity over the (non-empty) clusters, or over coarse clusters with
`coarse:<id>` bases (natural within each).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..formats import bases as bases_format


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
    """The basis distributions P over clusters and their names: what the weights alpha mix. It holds no weights:
    the stream (`MixtureStream`) owns them, so what it draws from is what it saves."""

    def __init__(self, bases: sp.spmatrix | np.ndarray, names: list[str] | None = None):
        m = sp.csr_matrix(bases).shape[0]
        self.names = list(names) if names is not None else [f"basis:{j}" for j in range(m)]
        self.bases = bases_format.validate(bases, self.names)

    @property
    def n_bases(self) -> int:
        return self.bases.shape[0]

    @property
    def n_clusters(self) -> int:
        return self.bases.shape[1]

    def cluster_probs(self, weights: np.ndarray | list[float]) -> np.ndarray:
        """p = alpha^T P over clusters."""
        w = check_weights(weights, self.n_bases)
        p = np.asarray(self.bases.T @ w).ravel()
        return p / p.sum()

    def check_store(self, available: np.ndarray) -> None:
        """The bases must cover exactly the store's clusters and put no mass where there are no tokens."""
        bases_format.validate(self.bases, self.names, available)

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
