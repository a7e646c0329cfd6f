"""The per-cluster and per-basis alignment estimators: unbiasedness and standard errors (statistical tests with
fixed seeds), decay, the minimum-sample rule, the scales, and state round trips."""
from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dgamix.mixer.alignment_stats import AlignmentStats, scale_scores

K = 6
TRUE_MEANS = np.array([1.0, -2.0, 0.5, 3.0, 0.0, -1.0])
NOISE = 1.5


def draw(rng: np.random.Generator, p: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    clusters = rng.choice(K, size=n, p=p)
    return clusters, TRUE_MEANS[clusters] + NOISE * rng.standard_normal(n)


def test_basis_estimates_are_unbiased_under_a_different_sampling_mixture_and_se_is_calibrated():
    # Sequences come from p; the bases put their mass elsewhere (within p's support). Over many repetitions the
    # importance-weighted estimates center on E_{c~P_j}[abar_c], and their spread matches the reported se.
    p = np.array([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
    bases = sp.csr_matrix(np.array([[0, 0, 0.5, 0.5, 0, 0], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1], [0, 0, 0, 0, 0, 1.0]]))
    truth = bases @ TRUE_MEANS
    rng = np.random.default_rng(0)
    estimates, errors = [], []
    for _ in range(400):
        stats = AlignmentStats(K)
        clusters, d = draw(rng, p, 800)
        stats.add(clusters, d, p[clusters])
        a, se, support = stats.basis_estimates(bases)
        estimates.append(a)
        errors.append(se)
    estimates, errors = np.array(estimates), np.array(errors)
    spread = estimates.std(axis=0)
    # mean within 4 standard errors of the mean of 400 repetitions
    assert (np.abs(estimates.mean(axis=0) - truth) < 4 * spread / np.sqrt(400)).all(), (estimates.mean(0), truth)
    # the reported se matches the observed spread within 15%
    np.testing.assert_allclose(errors.mean(axis=0), spread, rtol=0.15)


def test_cluster_means_and_their_standard_errors():
    p = np.full(K, 1 / K)
    stats = AlignmentStats(K)
    rng = np.random.default_rng(1)
    clusters, d = draw(rng, p, 6000)
    stats.add(clusters, d, p[clusters])
    mean, se, count = stats.cluster_means()
    assert count.sum() == 6000
    assert (np.abs(mean - TRUE_MEANS) < 4 * se).all()
    np.testing.assert_allclose(se, NOISE / np.sqrt(count), rtol=0.1)


def test_identity_bases_give_the_unbiased_per_cluster_estimate():
    p = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    stats = AlignmentStats(K)
    clusters, d = draw(np.random.default_rng(2), p, 20000)
    stats.add(clusters, d, p[clusters])
    a, se, _ = stats.basis_estimates(sp.identity(K, format="csr"))
    assert (np.abs(a - TRUE_MEANS) < 4 * se).all()


def test_decay_weights_recent_sequences_more():
    stats = AlignmentStats(2, decay=0.5)
    p = np.array([0.5, 0.5])
    stats.add(np.array([0, 0]), np.array([10.0, 10.0]), p[[0, 0]])
    stats.age()
    stats.add(np.array([0, 1]), np.array([-2.0, 4.0]), p[[0, 1]])
    mean, _, count = stats.cluster_means()
    # cluster 0: (0.5 * 2 * 10 + 1 * -2) / (0.5 * 2 + 1) = 4
    assert mean[0] == pytest.approx(4.0) and count[0] == pytest.approx(2.0) and mean[1] == pytest.approx(4.0)
    assert stats.sequences == pytest.approx(0.5 * 2 + 2)


def test_scores_of_rarely_seen_clusters_do_not_move_and_scales_are_scale_free():
    a, se, seen = np.array([0.02, -0.01, 0.5]), np.array([0.01, 0.01, 0.2]), np.array([10, 10, 1])
    assert scale_scores(a, se, seen, "raw", 4).tolist() == [0.02, -0.01, 0.0]
    np.testing.assert_allclose(scale_scores(a, se, seen, "snr", 4), [2.0, -1.0, 0.0])
    for scale in ("snr", "standardized"):
        np.testing.assert_allclose(scale_scores(1e3 * a, 1e3 * se, seen, scale, 4), scale_scores(a, se, seen, scale, 4))
    z = scale_scores(a, se, seen, "standardized", 4)
    assert z[2] == 0 and z[0] == pytest.approx(1.0) and z[1] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="scale = 'cosine': expected one of raw, snr, standardized"):
        scale_scores(a, se, seen, "cosine", 4)


def test_bad_input_is_refused_and_state_round_trips():
    stats = AlignmentStats(3, decay=0.9)
    with pytest.raises(ValueError, match="probability 0"):
        stats.add(np.array([0]), np.array([1.0]), np.array([0.0]))
    with pytest.raises(ValueError, match=r"cluster ids must lie in \[0, 3\)"):
        stats.add(np.array([3]), np.array([1.0]), np.array([0.5]))
    with pytest.raises(ValueError, match="NaN or inf"):
        stats.add(np.array([0]), np.array([np.nan]), np.array([0.5]))
    with pytest.raises(ValueError, match="NaN or inf"):
        stats.add(np.array([0]), np.array([1.0]), np.array([0.5]), noise=np.array([np.inf]))
    with pytest.raises(ValueError, match=r"noise \(2,\): expected vectors with one entry per sequence"):
        stats.add(np.array([0]), np.array([1.0]), np.array([0.5]), noise=np.array([1.0, 2.0]))
    assert stats.count.sum() == 0  # nothing refused was counted
    stats.add(np.array([0, 2]), np.array([1.0, -1.0]), np.array([0.5, 0.25]))
    for state in (stats.state_dict(), {**stats.state_dict(), "total": torch.from_numpy(stats.total)}):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        again = AlignmentStats(3, decay=0.9)
        again.load_state_dict(torch.load(buffer))  # torch's defaults (weights_only): plain values and tensors
        for name in AlignmentStats.FIELDS:
            assert getattr(again, name).tobytes() == getattr(stats, name).tobytes()
        assert again.sequences == stats.sequences
    with pytest.raises(ValueError, match="saved for 3 clusters with decay 0.9, not 4 and 0.9"):
        AlignmentStats(4, decay=0.9).load_state_dict(stats.state_dict())


def test_auto_decay_memory_grows_with_the_number_of_scored():
    from dgamix.mixer.alignment_stats import auto_decay
    assert auto_decay(16, 19, 8) == pytest.approx(0.95)  # floor: 20 updates
    assert auto_decay(16, 256, 8) == pytest.approx(1 - 1 / 256)
    assert auto_decay(16, 4096, 8) == pytest.approx(1 - 1 / 4096)
    # steady state under uniform weights: B / m / (1 - decay) = 2 * min_sequences
    assert 16 / 256 / (1 - auto_decay(16, 256, 8)) == pytest.approx(16)
    with pytest.raises(ValueError, match="positive number of sequences per update"):
        auto_decay(0, 4, 8)


def test_standard_errors_under_decay_count_the_effective_sample_size():
    """Decayed statistics: the reported standard errors match the spread of the estimates over repetitions
    (Var = sigma^2 sum w^2 / (sum w)^2). Dividing by the decayed count instead overstates them by sqrt(1 + decay)."""
    p = np.array([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
    bases = sp.csr_matrix(np.array([[0, 0, 0.5, 0.5, 0, 0], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]]))
    rng = np.random.default_rng(3)
    means, mean_errors, basis, basis_errors = [], [], [], []
    for _ in range(300):
        stats = AlignmentStats(K, decay=0.9)
        for _ in range(60):  # six memories: steady state
            clusters, d = draw(rng, p, 40)
            stats.add(clusters, d, p[clusters])
            stats.age()
        mean, se, _ = stats.cluster_means()
        a, a_se, _ = stats.basis_estimates(bases)
        means.append(mean), mean_errors.append(se), basis.append(a), basis_errors.append(a_se)
    np.testing.assert_allclose(np.mean(mean_errors, axis=0), np.std(means, axis=0), rtol=0.15)
    np.testing.assert_allclose(np.mean(basis_errors, axis=0), np.std(basis, axis=0), rtol=0.15)


def test_a_state_saved_without_the_squared_weights_loads_with_the_old_standard_errors():
    stats = AlignmentStats(3, decay=0.9)
    stats.add(np.array([0, 2, 2]), np.array([1.0, -1.0, 0.5]), np.array([0.5, 0.25, 0.25]))
    stats.age()
    state = stats.state_dict()
    del state["count_sq"], state["sequences_sq"]
    again = AlignmentStats(3, decay=0.9)
    again.load_state_dict(state)
    assert again.count_sq.tolist() == again.count.tolist() and again.sequences_sq == again.sequences


def test_post_stratified_estimates_are_calibrated_and_ignore_how_many_sequences_each_cluster_drew():
    """Post-stratified basis estimates (each seen cluster's mean weighed by P_j): centered on the truth, their
    reported standard error (pooled within-cluster variance, effective sample sizes under decay) matches their
    spread, and with a large common alignment they beat the importance-weighted estimate, whose error grows with
    it (the luck of the cluster counts times the level)."""
    p = np.array([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
    bases = sp.csr_matrix(np.array([[0, 0, 0.5, 0.5, 0, 0], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]]))
    rng = np.random.default_rng(4)
    level = 5.0  # a common part far above the clusters' differences
    stratified, errors, importance = [], [], []
    for _ in range(300):
        stats = AlignmentStats(K, decay=0.9)
        for _ in range(60):
            clusters, d = draw(rng, p, 40)
            stats.add(clusters, d + level, p[clusters])
            stats.age()
        a, se, support = stats.stratified_estimates(bases)
        stratified.append(a), errors.append(se), importance.append(stats.basis_estimates(bases)[0])
    truth = bases @ TRUE_MEANS + level
    assert (np.abs(np.mean(stratified, axis=0) - truth) < 4 * np.std(stratified, axis=0) / np.sqrt(300)).all()
    np.testing.assert_allclose(np.mean(errors, axis=0), np.std(stratified, axis=0), rtol=0.15)
    assert (np.std(stratified, axis=0) < 0.5 * np.std(importance, axis=0)).all()
    # unseen clusters count at the mean of every recent sequence (2.0): a basis never seen scores the mixture's own
    stats = AlignmentStats(K)
    stats.add(np.array([0, 0, 1]), np.array([1.0, 2.0, 3.0]), np.full(3, 0.5))
    a, se, support = stats.stratified_estimates(sp.csr_matrix(np.array([[0, 0, 0, 0, 1.0, 0], [0.5, 0.5, 0, 0, 0, 0],
                                                                         [0.5, 0, 0, 0, 0.5, 0]])))
    assert (a[0], se[0], support[0]) == (2.0, 0.0, 0.0) and a[1] == pytest.approx((1.5 + 3.0) / 2)
    assert a[2] == pytest.approx((1.5 + 2.0) / 2)


def test_post_stratified_standard_errors_exist_before_any_cluster_is_seen_twice():
    """Every cluster seen once: no within-cluster spread yet, so the spread around the mean stands in; a standard
    error of 0 would let the first, noisiest scores through unshrunk."""
    stats = AlignmentStats(4)
    stats.add(np.array([0, 1, 2]), np.array([1.0, -1.0, 3.0]), np.full(3, 0.25))
    _, se, _ = stats.stratified_estimates(sp.identity(4, format="csr"))
    assert (se[:3] > 0).all() and se[3] == 0.0
    np.testing.assert_allclose(se[:3], np.sqrt(np.var([1.0, -1.0, 3.0])))


@pytest.mark.parametrize("level,decay,updates,reps", [("clusters", 0.9, 60, 300), ("bases", 0.9, 60, 300),
                                                      ("bases", 0.99, 150, 150)])
def test_standard_errors_count_the_noise_of_g_spe_shared_within_a_refresh_window(level, decay, updates, reps):
    """Every sequence of a refresh window is scored along the same noisy g = g_spe + e: its share <f_x, e> is common
    to the window and does not average away over more sequences. With the split-half direction h (an independent
    draw of e's distribution, u_x = <f_x, h>), the reported standard errors (per-sequence part plus the pooled g-noise
    variance) match the spread of the centered estimates over repetitions (observed 0.95-0.96 of it); without the
    g-noise part they are about half of it (the g-noise variance is about twice the per-sequence one). With a long
    memory (decay 0.99: windows folded while the counts still grow), a window counts with the counts at the time it
    is read, not at its fold (which overstated the spread 2-3x)."""
    k, dim, refresh = 16, 16, 5
    rng = np.random.default_rng(11)
    centers = rng.standard_normal((k, dim)) + 1.0  # each cluster's mean gradient (a common part too)
    g_spe = 0.2 * rng.standard_normal(dim)
    bases = sp.csr_matrix(np.vstack([np.repeat(np.eye(8), 2, axis=1) / 2.0, np.full((1, k), 1.0 / k)]))
    mapping = None if level == "clusters" else bases
    p = np.full(k, 1.0 / k)
    estimates, with_noise, without = [], [], []
    for _ in range(reps):
        stats = AlignmentStats(k, decay=decay)
        for update in range(updates):
            if update % refresh == 0:
                if update:
                    stats.fold_noise(mapping, np.ones(k if mapping is None else bases.shape[0], dtype=bool))
                e, h = 0.2 * rng.standard_normal((2, dim))
            clusters = rng.integers(0, k, 32)
            f = centers[clusters] + rng.standard_normal((32, dim))
            stats.add(clusters, f @ (g_spe + e), p[clusters], noise=f @ h)
            stats.age()
        center = stats.total.sum() / stats.count.sum()
        if mapping is None:
            a, se, _ = stats.cluster_means()
        else:
            a, se, _ = stats.stratified_estimates(bases)
        shared = stats.shared_noise_variance(mapping, np.ones(len(a), dtype=bool))
        estimates.append(a - center), with_noise.append(np.sqrt(se ** 2 + shared)), without.append(se)
    spread = np.sqrt(np.mean(np.var(estimates, axis=0)))  # pooled over the items, as the g-noise part is
    reported = np.sqrt(np.mean(np.square(with_noise)))
    print(f"\nreported {reported:.4f}, without the g-noise {np.sqrt(np.mean(np.square(without))):.4f}, "
          f"spread {spread:.4f}")
    assert reported == pytest.approx(spread, rel=0.15), (reported, spread)
    assert np.sqrt(np.mean(np.square(without))) < 0.6 * spread


def test_the_window_noise_is_the_sum_over_pairs_of_distinct_sequences():
    """v_j^2 - sum_c b_jc^2 Q_c is the sum over ordered pairs of distinct sequences x != y of b_j(c_x) b_j(c_y)
    w_x w_y u_x u_y (brute force over one window, with decay and an unseen cluster): a sequence's own u_x^2 stays
    out, since the per-sequence spread already counts it."""
    rng = np.random.default_rng(5)
    k = 5
    bases = sp.csr_matrix(np.array([[0.5, 0.5, 0, 0, 0], [0.2, 0.2, 0.2, 0.2, 0.2], [0, 0, 0.3, 0, 0.7]]))
    stats = AlignmentStats(k, decay=0.8)
    sequences = []  # (cluster, weight at the end, u)
    for batch in range(3):
        clusters = rng.choice([0, 1, 2, 3], size=4)  # cluster 4 never seen
        u = rng.standard_normal(4)
        stats.add(clusters, rng.standard_normal(4), np.full(4, 0.25), noise=u)
        stats.age()
        sequences += [(c, 0.8 ** (3 - batch), value) for c, value in zip(clusters, u)]
    count = np.array([sum(w for c, w, _ in sequences if c == cluster) for cluster in range(k)])
    total = count.sum()
    dense = bases.toarray()
    pooled = []
    for mapping, rows in ((bases, dense), (None, np.eye(k))):
        unseen = rows @ (count == 0)
        b = np.where(count > 0, rows / np.where(count > 0, count, 1.0), 0.0) - ((1 - unseen) / total)[:, None]
        b[:, count == 0] = 0.0
        expected = [sum(b[j, cx] * b[j, cy] * wx * wy * ux * uy
                        for i, (cx, wx, ux) in enumerate(sequences) for m, (cy, wy, uy) in enumerate(sequences)
                        if i != m) for j in range(len(rows))]
        np.testing.assert_allclose(stats.window_noise(mapping), expected, rtol=1e-9, atol=1e-12)
        pooled.append(np.mean(expected))
    stats.fold_noise(bases, np.ones(3, dtype=bool))  # the window joins the past ones; the next one starts empty
    assert stats.noise_variance == pytest.approx(pooled[0] * total ** 2)  # kept times N^2, read over the current
    assert not stats.noise.any() and not stats.noise_sq.any()
    assert stats.shared_noise_variance(bases, np.ones(3, dtype=bool)) == pytest.approx(max(pooled[0], 0.0))
    stats.age()  # N^2 and the kept share age alike: the window's variance is read back unchanged
    assert stats.shared_noise_variance(bases, np.ones(3, dtype=bool)) == pytest.approx(max(pooled[0], 0.0))
    stats.add(np.array([0, 1]), np.zeros(2), np.full(2, 0.25))  # more sequences: the old window's share shrinks
    n = stats.count.sum()
    assert stats.shared_noise_variance(bases, np.ones(3, dtype=bool)) == pytest.approx(
        max(pooled[0] * (0.8 * total / n) ** 2, 0.0))
