"""Does post-stratifying in-batch DGA's basis estimates cut their error? Importance-weighted against post-stratified,
on the same simulated sequences.

    .venv/bin/python bench/stratified_estimates.py [--reps 200]     # writes bench/results/stratified_estimates.json

In-batch DGA over bases estimates a_j = E_{c~P_j}[abar_c] from the training sequences. The importance-weighted
estimate (`AlignmentStats.basis_estimates`, unbiased; the paper rule's) against the post-stratified one
(`AlignmentStats.stratified_estimates`: ahat_j = sum_c P_j(c) abar_c, unseen clusters at the mean, the anchored
rule's), which removes the noise of how many sequences each cluster drew but shrinks unseen clusters to the mean.
Each with the root mean square of its reported standard error ("its se"), which should match its rmse. Both are
scored as the anchored rule uses them, centered on the plain mean of the recent sequences, against the centered
truth. Setting: 256 fine clusters, 19 bases as the bases stage builds
them (16 coarse blocks, uniform, two broad Dirichlet rows), the uniform mixture, 16 sequences per update, the
default decay (auto_decay: 0.95), 60 updates (three memories). Each sequence's alignment is common + its cluster's
offset (sd `between`) + noise (sd `within`). The first scenario uses the magnitudes recorded on the development
corpus (alignment.parquet of the in-batch runs: common 0.01-0.07, per-sequence spread 0.13-0.18, cluster offsets
about 0.03); the others exaggerate one term each.
"""
from __future__ import annotations

import argparse

import numpy as np
import scipy.sparse as sp

from common import print_table, write_result

from dgamix.mixer.alignment_stats import AlignmentStats, auto_decay

K, BATCH, UPDATES = 256, 16, 60
SCENARIOS = {"as measured": (0.04, 0.03, 0.15), "large cluster offsets": (0.04, 0.15, 0.15),
             "large common part": (0.3, 0.03, 0.15)}


def nineteen_bases(rng: np.random.Generator) -> np.ndarray:
    block = K // 16
    rows = [np.repeat(np.eye(16)[i], block) for i in range(16)] + [np.ones(K)]
    rows = np.array(rows + list(rng.dirichlet(np.ones(K), size=2)))
    return rows / rows.sum(axis=1, keepdims=True)


def errors(bases: np.ndarray, common: float, between: float, within: float, reps: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    p = bases.mean(axis=0)  # the uniform mixture over the bases
    decay = auto_decay(BATCH, len(bases), 8)
    squared = {"importance": [], "post-stratified": []}
    reported = {"importance": [], "post-stratified": []}
    for _ in range(reps):
        offsets = between * rng.standard_normal(K)
        truth = bases @ (common + offsets)
        stats = AlignmentStats(K, decay)
        for _ in range(UPDATES):
            clusters = rng.choice(K, size=BATCH, p=p)
            d = common + offsets[clusters] + within * rng.standard_normal(BATCH)
            stats.add(clusters, d, p[clusters])
            stats.age()
        center = stats.total.sum() / stats.count.sum()
        truth_centered = truth - p @ (common + offsets)
        for name, estimate in (("importance", stats.basis_estimates(sp.csr_matrix(bases))),
                               ("post-stratified", stats.stratified_estimates(sp.csr_matrix(bases)))):
            squared[name].append((estimate[0] - center - truth_centered) ** 2)
            reported[name].append(estimate[1] ** 2)
    return {name: (float(np.mean(squared[name])), float(np.mean(reported[name]))) for name in squared}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    bases = nineteen_bases(np.random.default_rng(0))
    rows = []
    for i, (name, (common, between, within)) in enumerate(SCENARIOS.items()):
        mse = errors(bases, common, between, within, args.reps, seed=i)
        (importance, importance_se), (stratified, stratified_se) = mse["importance"], mse["post-stratified"]
        rows.append({"scenario": name, "common": common, "between": between, "within": within,
                     "rmse importance": importance ** 0.5, "its se": importance_se ** 0.5,
                     "rmse post-stratified": stratified ** 0.5, "its se ": stratified_se ** 0.5,
                     "mse ratio (post / importance)": stratified / importance})
    print_table(rows)
    print("wrote", write_result("stratified_estimates", rows, {"reps": args.reps, "updates": UPDATES, "batch": BATCH}))


if __name__ == "__main__":
    main()
