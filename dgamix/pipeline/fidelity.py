"""Is a faster encoder faithful? Its embeddings against the fp32 torch reference, on the same documents.

Two numbers, both pure functions of the two embedding matrices:
- mean cosine between each document's two vectors (the geometry the clusters are built on);
- fine-cluster agreement: k-means fit on the reference vectors, then the share of documents whose candidate vector
  lands in the same fine cluster as its reference vector (what the mixer actually sees).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .kmeans import HierarchicalKMeans, l2_normalize

MIN_MEAN_COSINE = 0.99
MIN_CLUSTER_AGREEMENT = 0.95


def mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    if reference.shape != candidate.shape:
        raise ValueError(f"reference {reference.shape} and candidate {candidate.shape} must have the same shape")
    cos = (l2_normalize(reference.astype(np.float32)) * l2_normalize(candidate.astype(np.float32))).sum(axis=1)
    return float(cos.mean())


def cluster_agreement(reference: np.ndarray, candidate: np.ndarray, model: HierarchicalKMeans) -> float:
    """Share of rows assigned to the same fine cluster by `model` from either matrix."""
    ours, _ = model.predict(candidate.astype(np.float32))
    theirs, _ = model.predict(reference.astype(np.float32))
    return float((ours[:, -1] == theirs[:, -1]).mean())


def fidelity_report(reference: np.ndarray, candidate: np.ndarray, levels: list[int], seed: int = 0,
                    min_cosine: float = MIN_MEAN_COSINE,
                    min_agreement: float = MIN_CLUSTER_AGREEMENT) -> dict[str, Any]:
    """Both measures, with the clustering fit on the reference at `levels`, and whether they pass."""
    model = HierarchicalKMeans(levels=list(levels), seed=seed).fit(reference.astype(np.float32))
    cosine = mean_cosine(reference, candidate)
    agreement = cluster_agreement(reference, candidate, model)
    return {"docs": int(len(reference)), "levels": list(levels), "mean_cosine": cosine,
            "cluster_agreement": agreement, "min_mean_cosine": min_cosine, "min_cluster_agreement": min_agreement,
            "passed": bool(cosine >= min_cosine and agreement >= min_agreement)}
