"""Clustering on ../shared/corpus/generic: fit + assign time and quality, ours (faiss) vs scikit-learn.

    .venv/bin/python bench/prepare_corpus.py     # once: ingest + embed the corpus (resumable)
    .venv/bin/python bench/cluster_bench.py [--backend faiss]

Rows, all on the same L2-normalized MiniLM vectors of every document, side by side in one run:
- dgamix HierarchicalKMeans (Lloyd on faiss or torch), levels [64] and [64, 64];
- faiss.Kmeans (faiss's own trainer, spherical) for [64], as a reference;
- scikit-learn MiniBatchKMeans on the same fit sample, flat [64] and the same two-level procedure for [64, 64].
Quality: purity and NMI of each clustering against meta.domain (ground truth, never an input).
"""
from __future__ import annotations

import argparse
import time
from math import prod

import numpy as np
import polars as pl
from sklearn.cluster import MiniBatchKMeans
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from common import WORK, print_table, write_result

from dgamix.pipeline.sampling import gather_rows, sample_rows
from dgamix.formats.embeddings import load as load_embeddings
from dgamix.pipeline.kmeans import HierarchicalKMeans, l2_normalize
from dgamix.pipeline.stats import contingency_scores

WORKDIR = WORK / "generic"
SEED = 0


def sklearn_hierarchical(x_fit: np.ndarray, x_all: np.ndarray, levels: list[int], ppc: int) -> np.ndarray:
    """The same top-down procedure with MiniBatchKMeans as the fitter; returns fine labels of x_all."""
    rng = np.random.default_rng(SEED)
    labels_fit = np.zeros(len(x_fit), dtype=np.int64)
    labels_all = np.zeros(len(x_all), dtype=np.int64)
    for branching in levels:
        new_fit = np.zeros_like(labels_fit)
        new_all = np.zeros_like(labels_all)
        for parent in np.unique(labels_fit):
            members = np.flatnonzero(labels_fit == parent)
            k = min(branching, len(members))
            if len(members) > k * ppc:
                members = np.sort(rng.choice(members, k * ppc, replace=False))
            model = MiniBatchKMeans(k, random_state=SEED, n_init=1, batch_size=4096).fit(x_fit[members])
            in_fit = labels_fit == parent
            in_all = labels_all == parent
            new_fit[in_fit] = parent * branching + model.predict(x_fit[in_fit])
            if in_all.any():
                new_all[in_all] = parent * branching + model.predict(x_all[in_all])
        labels_fit, labels_all = new_fit, new_all
    return labels_all


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="faiss")
    parser.add_argument("--ppc", type=int, default=256)
    args = parser.parse_args()

    arrays = load_embeddings(WORKDIR / "embeddings", WORKDIR / "docs")
    x_all = l2_normalize(np.concatenate([np.asarray(a) for a in arrays]))
    domains = pl.read_parquet(WORKDIR / "docs" / "*.parquet")["source"].to_numpy()
    n = len(x_all)
    rows = []

    def record(method: str, levels: list[int], fit_s: float, assign_s: float, labels: np.ndarray, fit_n: int):
        rows.append({"method": method, "levels": str(levels), "docs": n, "fit_points": fit_n,
                     "fit_s": fit_s, "assign_s": assign_s, "total_s": fit_s + assign_s,
                     "clusters_used": int(len(np.unique(labels))),
                     "purity": contingency_scores(contingency_matrix(labels, domains))[0], "nmi": float(normalized_mutual_info_score(domains, labels))})
        print_table(rows[-1:])

    for levels in ([64], [64, 64]):
        fit_rows = sample_rows(n, prod(levels) * args.ppc, SEED)
        x_fit = gather_rows([x_all], fit_rows)

        start = time.perf_counter()
        model = HierarchicalKMeans(levels, seed=SEED, points_per_centroid=args.ppc, backend=args.backend).fit(x_fit)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        ids, _ = model.predict(x_all)
        record(f"dgamix ({args.backend})", levels, fit_s, time.perf_counter() - start, ids[:, -1], len(fit_rows))

        if len(levels) == 1:
            import faiss

            start = time.perf_counter()
            km = faiss.Kmeans(x_fit.shape[1], levels[0], niter=20, seed=SEED, spherical=True,
                              max_points_per_centroid=args.ppc)
            km.train(x_fit)
            fit_s = time.perf_counter() - start
            start = time.perf_counter()
            _, labels = km.index.search(x_all, 1)
            record("faiss.Kmeans", levels, fit_s, time.perf_counter() - start, labels[:, 0], len(fit_rows))

        start = time.perf_counter()
        labels = sklearn_hierarchical(x_fit, x_all, levels, args.ppc)
        total = time.perf_counter() - start
        # sklearn's fit and predict are interleaved per parent; report the whole as fit, assign as 0.
        record("sklearn MiniBatchKMeans", levels, total, 0.0, labels, len(fit_rows))

    print()
    print_table(rows)
    print("wrote", write_result(f"cluster_{args.backend}", rows, {"args": vars(args)}))


if __name__ == "__main__":
    main()
