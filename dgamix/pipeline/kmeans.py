"""Spherical k-means, flat and hierarchical: pure numerical code, no I/O.

One Lloyd loop with two interchangeable backends for its expensive step (nearest centroid by inner product):
faiss on CPU, torch (CUDA when present). Initialisation, empty-cluster repair and the centroid update are shared
numpy code, so both backends give the same clustering up to floating-point ties.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

# The values of cluster.backend and assign.backend (defined with those sections): the nearest-centroid step on
# faiss (CPU) or torch (CUDA when present); auto takes torch when CUDA is available, else faiss.
from ..core.sections import CLUSTER_BACKENDS as BACKENDS


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, as float32 (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def backend_choices() -> str:
    """BACKENDS as an error message lists them ("auto, faiss or torch")."""
    return f"{', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}"


def resolve_backend(backend: str) -> str:
    """The backend that runs: `backend`, or for auto the one this machine suits."""
    if backend not in BACKENDS:
        raise ValueError(f"backend = '{backend}': expected {backend_choices()}")
    if backend == "auto":
        import torch

        return "torch" if torch.cuda.is_available() else "faiss"
    return backend


def nearest_centroid(x: np.ndarray, centroids: np.ndarray, backend: str = "faiss") -> tuple[np.ndarray, np.ndarray]:
    """For unit rows x and unit centroids: (index of the most similar centroid, that cosine similarity)."""
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(centroids.shape[1])
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        sims, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        return idx[:, 0].astype(np.int64), sims[:, 0]
    if backend == "torch":
        return _nearest_torch(x, centroids)
    raise ValueError(f"backend = '{backend}': expected faiss or torch")


def _nearest_torch(x: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)
    idx_out = np.empty(len(x), dtype=np.int64)
    sim_out = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), chunk):
        xb = torch.from_numpy(np.ascontiguousarray(x[start : start + chunk], dtype=np.float32)).to(device)
        sims, idx = (xb @ c.T).max(dim=1)
        idx_out[start : start + chunk] = idx.cpu().numpy()
        sim_out[start : start + chunk] = sims.cpu().numpy()
    return idx_out, sim_out


def spherical_kmeans(
    x: np.ndarray, k: int, iterations: int = 20, seed: int = 0, backend: str = "faiss"
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's algorithm on the unit sphere. x: unit rows (n, d), n >= k. Returns (centroids (k, d), labels (n,))."""
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k = {k}: expected 1 <= k <= number of points ({n})")
    rng = np.random.default_rng(seed)
    centroids = x[np.sort(rng.choice(n, size=k, replace=False))].astype(np.float32)
    labels = np.full(n, -1, dtype=np.int64)
    for _ in range(max(1, iterations)):
        new_labels, sims = nearest_centroid(x, centroids, backend)
        new_labels = _repair_empty(new_labels, sims, k)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        centroids = _centroids(x, labels, k)
    return centroids, labels


def _repair_empty(labels: np.ndarray, sims: np.ndarray, k: int) -> np.ndarray:
    # An empty cluster takes the point worst served by its centroid (deterministic, as faiss splits big ones).
    counts = np.bincount(labels, minlength=k)
    empty = np.flatnonzero(counts == 0)
    if not len(empty):
        return labels
    labels = labels.copy()
    todo = iter(empty)
    cluster = next(todo)
    for point in np.argsort(sims, kind="stable"):
        if counts[labels[point]] > 1:  # never empty another cluster to fill this one
            counts[labels[point]] -= 1
            labels[point] = cluster
            counts[cluster] = 1
            cluster = next(todo, None)
            if cluster is None:
                break
    return labels


def _centroids(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    membership = sp.csr_matrix((np.ones(len(x), dtype=np.float32), (labels, np.arange(len(x)))), shape=(k, len(x)))
    return l2_normalize(membership @ x)


@dataclass
class HierarchicalKMeans:
    """Spherical k-means applied level by level: each cluster of level l is split into `levels[l+1]` children.

    Cluster ids are global per level: child j of parent p at a level with branching b has id p * b + j. A parent
    with fewer fit points than b gets as many children as it has points; the remaining ids stay empty (`valid_`
    False) and are never assigned, but they keep their place so that ids and the parent table stay regular.
    """

    levels: list[int]
    iterations: int = 20
    seed: int = 0
    points_per_centroid: int = 256
    backend: str = "faiss"
    centroids_: list[np.ndarray] = field(default_factory=list, init=False)
    valid_: list[np.ndarray] = field(default_factory=list, init=False)

    @property
    def n_clusters(self) -> int:
        return prod(self.levels)

    def fit(self, x: np.ndarray) -> "HierarchicalKMeans":
        x = l2_normalize(x)
        if not self.levels or any(int(k) < 1 for k in self.levels):
            raise ValueError(f"levels = {self.levels}: expected a non-empty list of positive integers")
        if self.n_clusters > len(x):
            raise ValueError(f"levels = {self.levels} ask for {self.n_clusters} clusters but only {len(x)} points were given")
        rng = np.random.default_rng(self.seed)
        self.centroids_, self.valid_ = [], []
        groups = [np.arange(len(x))]  # fit points of each parent at the previous level (one root at the top)
        for depth, branching in enumerate(self.levels):
            centroids = np.zeros((len(groups) * branching, x.shape[1]), dtype=np.float32)
            valid = np.zeros(len(groups) * branching, dtype=bool)
            children: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * (len(groups) * branching)
            bar = tqdm(groups, desc=f"cluster level {depth}", unit="split", disable=len(groups) < 8, leave=False)
            for parent, members in enumerate(bar):
                if not len(members):
                    if depth and self.valid_[depth - 1][parent]:
                        # A used cluster that routing left without points still needs one child, so that
                        # predict() can always descend; the child is the parent itself.
                        centroids[parent * branching] = self.centroids_[depth - 1][parent]
                        valid[parent * branching] = True
                    continue
                k = min(branching, len(members))
                cap = k * self.points_per_centroid
                fit_points = members if len(members) <= cap else np.sort(rng.choice(members, cap, replace=False))
                sub_seed = int(rng.integers(2**31))
                c, _ = spherical_kmeans(x[fit_points], k, self.iterations, sub_seed, self.backend)
                base = parent * branching
                centroids[base : base + k] = c
                valid[base : base + k] = True
                # Route all of this parent's points (not only those fit on) to its children for the next level.
                labels, _ = nearest_centroid(x[members], c, self.backend)
                for j in range(k):
                    children[base + j] = members[labels == j]
            self.centroids_.append(centroids)
            self.valid_.append(valid)
            groups = children
        return self

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Route each row down the tree. Returns (ids (n, levels) per level, cosine similarity to the fine centroid)."""
        if not self.centroids_:
            raise RuntimeError("HierarchicalKMeans is not fitted: call fit() or load centroids first")
        x = l2_normalize(x)
        ids = np.zeros((len(x), len(self.levels)), dtype=np.int64)
        sims = np.zeros(len(x), dtype=np.float32)
        parents = np.zeros(len(x), dtype=np.int64)
        for depth, branching in enumerate(self.levels):
            centroids, valid = self.centroids_[depth], self.valid_[depth]
            order = np.argsort(parents, kind="stable")
            uniques, starts = np.unique(parents[order], return_index=True)
            for parent, rows in zip(uniques, np.split(order, starts[1:])):
                base = parent * branching
                k = int(valid[base : base + branching].sum())  # valid children are always the first k ids
                labels, s = nearest_centroid(x[rows], centroids[base : base + k], self.backend)
                ids[rows, depth] = base + labels
                sims[rows] = s
            parents = ids[:, depth]
        return ids, sims

    def parent_table(self) -> dict[str, np.ndarray]:
        """One row per (level, cluster): its parent id at the level above (-1 at the top) and whether it is used."""
        level, cluster, parent, valid = [], [], [], []
        for depth, branching in enumerate(self.levels):
            n = len(self.valid_[depth])
            level.append(np.full(n, depth))
            cluster.append(np.arange(n))
            parent.append(np.arange(n) // branching if depth else np.full(n, -1))
            valid.append(self.valid_[depth])
        return {
            "level": np.concatenate(level),
            "cluster": np.concatenate(cluster),
            "parent": np.concatenate(parent),
            "valid": np.concatenate(valid),
        }
