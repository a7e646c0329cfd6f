"""The anchored update rule: without signal the weights stay near where they started (the paper's compounding rule
collapses onto one item), with a planted signal they move toward it, and eta means the same at any batch size.

Both strategies are replayed on synthetic alignments: their statistics, scores and updates are the real ones, while
each alignment is drawn from a known distribution instead of a backward (a model's backward cannot be told which
clusters are interchangeable): for in-batch DGA each training sequence's d_x, for exact DGA each update's half-batch
measurements. Real-model tests check the measurements themselves. Fixed seeds throughout."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dgamix.mixer import ClusterStore, Mixture, MixtureStream, TargetSampler
from dgamix.formats import token_store
from dgamix.mixer.dga import (SplitAlignment, anchored_weights, average_scores, averaged_variance, dga_update,
                              exact_alignment, kl_divergence, pooled_standard_errors, relative_gains, shrink,
                              split_alignment)
from dgamix.mixer.inbatch import InBatchAlignment
from dgamix.mixer.strategies import DGAStrategy, InBatchDGAStrategy
from dgamix.trainer.model import GPT, GPTConfig

from .mixer_fixtures import EOS, synthetic_store

# Per-sequence alignments as measured on the development corpus: a common component (+0.01 to +0.07) far below
# their spread (0.15 to 0.3). The target's own gain G sets the unit of the scores.
COMMON, SPREAD, GAIN = 0.04, 0.2, 0.05


def tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(np.asarray(a) - np.asarray(b)).sum())


# ---- the pure rule ------------------------------------------------------------------------------------------------
def test_relative_gains_are_centered_on_the_mixture_and_in_units_of_the_target_gain():
    weights = np.array([0.5, 0.25, 0.25])
    s = relative_gains([0.3, 0.1, 0.5], weights, gain=0.2)
    assert np.dot(weights, s) == pytest.approx(0.0)  # the mixture's own gain is the zero
    np.testing.assert_allclose(s, (np.array([0.3, 0.1, 0.5]) - 0.3) / 0.2)
    # scale-free: alignments and the target's gain both scale with the loss
    np.testing.assert_allclose(relative_gains([3.0, 1.0, 5.0], weights, gain=2.0), s)
    # unscored items sit at the mixture mean of the scored ones; a noisy estimate shrinks toward 0
    s = relative_gains([0.3, 0.1, 99.0], weights, gain=0.2, scored=np.array([True, True, False]))
    assert s[2] == 0.0 and np.dot(weights[:2], s[:2]) == pytest.approx(0.0)
    # a standard error of 0.2 is a relative error of 1: kappa = tau^2 / (tau^2 + 1)
    shrunk = relative_gains([0.3, 0.1, 0.5], weights, 0.2, standard_errors=np.array([0.0, 0.0, 0.2]), tau=0.25)
    assert shrunk[2] == pytest.approx((0.5 - 0.3) / 0.2 * 0.0625 / (0.0625 + 1.0))
    assert np.isnan(relative_gains([0.3, 0.1, 0.5], weights, gain=-0.01)).all()  # no unit: the update is skipped


def test_anchored_weights_stay_anchored_and_respect_the_kl_cap():
    prior = np.array([0.5, 0.3, 0.2, 0.0])
    scores = np.array([1.0, -1.0, 0.5, 3.0])
    new = anchored_weights(prior, scores, eta=2.0)
    assert new[3] == 0.0 and new.sum() == pytest.approx(1.0)  # a basis outside the prior stays out
    np.testing.assert_allclose(np.log(new[:3] / prior[:3]) - np.log(new[0] / prior[0]), 2.0 * (scores[:3] - 1.0))
    capped = anchored_weights(prior, scores, eta=2.0, kl_cap=0.05)
    assert kl_divergence(capped, prior) == pytest.approx(0.05, rel=1e-6)
    assert kl_divergence(new, prior) > 0.05
    # the same scores again leave the weights where they are: an average, not a sum
    average = average_scores(average_scores(None, scores, 0.5), scores, 0.5)
    np.testing.assert_allclose(anchored_weights(prior, average, 2.0), new)


# ---- in-batch DGA replayed on synthetic alignments ----------------------------------------------------------------
def _strategy(tmp_path, n_clusters: int, level: str, batch_size: int, rule: str, seed: int = 0,
              **settings) -> InBatchDGAStrategy:
    tokens = synthetic_store(tmp_path / f"tokens{n_clusters}", [3] * n_clusters, vocab=4000)
    target = synthetic_store(tmp_path / "target", [12], seed=5, vocab=4000)
    store = ClusterStore(tokens)
    if level == "clusters":
        mixture = Mixture.identity(store.available)
    else:  # 19 bases, as the bases stage builds them: 16 coarse blocks of clusters, uniform, and two broad ones
        rng = np.random.default_rng(seed)
        block = n_clusters // 16
        rows = [np.repeat(np.eye(16)[i], block) for i in range(16)] + [np.ones(n_clusters)]
        rows += list(rng.dirichlet(np.ones(n_clusters), size=2))
        rows = np.array(rows)
        mixture = Mixture(sp.csr_matrix(rows / rows.sum(axis=1, keepdims=True)))
    stream = MixtureStream(store, mixture, seq_len=8, batch_size=batch_size, seed=seed)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=4000, block_size=8, n_layer=1, n_head=2, n_embd=16))
    strategy = InBatchDGAStrategy(stream, target=TargetSampler(ClusterStore(target), seq_len=8),
                                  tracker=InBatchAlignment(model), loss_fn=model.loss, level=level, rule=rule,
                                  refresh=10 ** 6, **settings)
    strategy.gain = GAIN  # the unit, as a refresh would measure it
    return strategy


def _replay(strategy: InBatchDGAStrategy, updates: int, signal: np.ndarray | None = None, seed: int = 0) -> None:
    """`updates` steps: the stream's batch (its clusters and probabilities, drawn under the weights in force), each
    sequence's alignment COMMON + signal[cluster] + SPREAD * noise, then the strategy's update."""
    rng = np.random.default_rng(seed + 1)
    for step in range(updates):
        planned = strategy.stream.plan_step()
        d = COMMON + SPREAD * rng.standard_normal(len(planned.clusters))
        if signal is not None:
            d += signal[planned.clusters]
        strategy.window.add(planned.clusters, d, planned.probs)
        strategy.on_step(step)


@pytest.mark.parametrize("n_clusters,level,bound", [(64, "bases", 0.25), (256, "clusters", 0.3)])
def test_no_signal_leaves_the_weights_near_the_start(tmp_path, n_clusters, level, bound):
    """Interchangeable clusters: 300 updates of the anchored rule stay within TV `bound` of alpha_0 (no cluster above
    0.05 over 256 clusters); the paper's compounding rule, replayed on the same alignments, collapses."""
    anchored = _strategy(tmp_path, n_clusters, level, 16, "anchored")
    start = anchored.stream.weights
    _replay(anchored, 300)
    assert anchored.skipped == 0 and tv(anchored.stream.weights, start) < bound, tv(anchored.stream.weights, start)
    if level == "clusters":
        assert anchored.stream.weights.max() < 0.05
    paper = _strategy(tmp_path, n_clusters, level, 16, "paper", eta=0.02)
    _replay(paper, 300)
    assert tv(paper.stream.weights, start) > 0.5  # the shipped rule without signal: one item takes over


@pytest.mark.parametrize("level", ["bases", "clusters"])
def test_a_planted_signal_moves_the_weights_toward_it(tmp_path, level):
    """One basis (or cluster) truly aligned: a step on it gains a target step's own gain more than the others
    (relative gain 1, a quarter of the per-sequence spread), remembered over about 100 updates."""
    strategy = _strategy(tmp_path, 64, level, 16, "anchored", decay=0.99)
    aligned = 0 if level == "bases" else 5
    # the aligned basis's clusters (its coarse block), or the aligned cluster, help the target
    signal = GAIN * (strategy.stream.mixture.bases.toarray()[aligned] > 0)
    _replay(strategy, 300, signal)
    weights = strategy.stream.weights
    assert weights.argmax() == aligned and weights[aligned] > 2 / len(weights), weights[aligned]


def test_eta_means_the_same_at_batch_16_and_batch_64(tmp_path):
    """The scores are relative gains, not t-statistics: the weights the same signal leads to do not depend on how
    many sequences each update sees, once the estimates are precise enough for the shrinkage to let them through
    (a long memory and a wide prior, tau = 1). The paper's snr scores grow with the square root of the sequences."""
    aligned = {}
    for batch_size in (16, 64):
        strategy = _strategy(tmp_path, 64, "bases", batch_size, "anchored", decay=0.999, tau=1.0)
        _replay(strategy, 300, GAIN * (strategy.stream.mixture.bases.toarray()[0] > 0))
        aligned[batch_size] = strategy.stream.weights[0]
    assert aligned[16] > 2 / 19 and abs(aligned[16] - aligned[64]) < 0.2 * aligned[64], aligned


# ---- exact DGA: the half-batch measurement on a real model, then replayed on synthetic measurements ----------------
def _interchangeable_store(directory, n_clusters: int, docs: int = 4, seed: int = 0):
    """Every cluster's documents drawn from the same token distribution: no cluster is better than another."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    chunks = []
    for _ in range(n_clusters):
        lengths = rng.integers(20, 40, size=docs) + 1
        tokens = np.concatenate([np.r_[rng.integers(1, 60, size=n - 1), EOS] for n in lengths]).astype(np.uint16)
        chunks.append((tokens, lengths.astype(np.int64)))
    token_store.write(directory, chunks, np.full(n_clusters, docs), {"vocab_size": 64, "eos_id": EOS})
    return directory


def _bases_over(n_clusters: int, rng: np.random.Generator) -> Mixture:
    """19 bases, as the bases stage builds them: 16 coarse blocks of clusters, uniform, and two broad ones."""
    block = n_clusters // 16
    rows = [np.repeat(np.eye(16)[i], block) for i in range(16)] + [np.ones(n_clusters)]
    rows = np.array(rows + list(rng.dirichlet(np.ones(n_clusters), size=2)))
    return Mixture(sp.csr_matrix(rows / rows.sum(axis=1, keepdims=True)))


def _exact_strategy(tmp_path, n_clusters: int, level: str, **settings) -> DGAStrategy:
    tokens = tmp_path / f"exact{n_clusters}"
    if not tokens.exists():
        _interchangeable_store(tokens, n_clusters)
        _interchangeable_store(tmp_path / "exact_target", 1, docs=16, seed=9)
    store = ClusterStore(tokens)
    mixture = Mixture.identity(store.available) if level == "clusters" else _bases_over(n_clusters,
                                                                                        np.random.default_rng(0))
    stream = MixtureStream(store, mixture, seq_len=8, batch_size=8, seed=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    return DGAStrategy(stream, target=TargetSampler(ClusterStore(tmp_path / "exact_target"), seq_len=8),
                       loss_fn=model.loss, params=list(model.parameters()), module=model, **settings)


def test_split_alignment_is_the_exact_alignment_with_a_standard_error_and_the_target_gain(tmp_path):
    """The halves' mean is the exact a_j of the whole batches (equal halves: the mean of two half-batch mean
    gradients is the whole batch's); G is <g1, g2>; the standard error is the halves' pooled disagreement."""
    strategy = _exact_strategy(tmp_path, 32, "bases")
    bases, target, shares = strategy.draw.draw()
    weights = strategy.weights
    measured = split_alignment("exact", strategy.loss_fn, strategy.params, bases, target, weights)
    np.testing.assert_allclose(measured.alignments, exact_alignment(strategy.loss_fn, strategy.params, bases, target),
                               rtol=1e-4, atol=1e-7)
    half = len(target[0]) // 2
    grads = []
    for part in (target[0][:half], target[0][half:]):
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(strategy.loss_fn(part),
                                                                           strategy.params)]).double())
    assert measured.gain == pytest.approx(float(grads[0] @ grads[1]), rel=1e-5)
    assert measured.standard_errors.shape == (19,) and (measured.standard_errors > 0).all()
    assert np.ptp(measured.standard_errors) == 0.0  # pooled over the bases
    # the forward-mode estimator measures the same alignments and the basis half of the noise
    forward = split_alignment("forward", strategy.loss_fn, strategy.params, bases, target, weights,
                              module=strategy.module)
    np.testing.assert_allclose(forward.alignments, measured.alignments, rtol=1e-3, atol=1e-6)


def test_pooled_standard_errors_count_the_basis_and_the_target_noise():
    """The noise of each centered score a_j - mean_alpha(a): the halves' differences, centered with the weights,
    a quarter of their square (the mean of two halves), pooled over the bases."""
    basis = np.array([[1.0, 2.0, 3.0], [1.0, 0.0, 3.0]])  # only the second basis's halves disagree, by 2
    # differences (0, 2, 0), centered (-2/3, 4/3, -2/3): variances (1/9, 4/9, 1/9), pooled 2/9
    np.testing.assert_allclose(pooled_standard_errors(basis, None, np.ones(3)), np.sqrt(2.0 / 9))
    # target halves that differ by the same amount for every basis: common noise, removed by the centering
    target = np.array([[5.0, 5.0, 5.0], [4.0, 4.0, 4.0]])
    np.testing.assert_allclose(pooled_standard_errors(basis, target, np.ones(3)), np.sqrt(2.0 / 9))
    # g1 - g2 moves basis 0 alone: (2/3, -1/3, -1/3) centered, variances (1/9, 1/36, 1/36), pooled 1/18 more
    target = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(pooled_standard_errors(basis, target, np.ones(3)), np.sqrt(2.0 / 9 + 1.0 / 18))
    # with 0.9 of the weight on the noisy basis, the mixture's mean carries its noise into every other centered
    # score: differences centered (-1.8, 0.2, -1.8), variances (0.81, 0.01, 0.81)
    np.testing.assert_allclose(pooled_standard_errors(basis, None, np.array([0.05, 0.9, 0.05])), np.sqrt(1.63 / 3))


def test_the_averaged_variance_lets_a_persistent_signal_through_the_shrinkage():
    variance, average = None, None
    for _ in range(200):
        average = average_scores(average, np.array([1.0, 0.0]), 0.1)
        variance = averaged_variance(variance, np.array([4.0, 4.0]), 0.1)
    assert variance[0] == pytest.approx(4.0 * 0.1 / 1.9, rel=1e-6)  # beta / (2 - beta) of one update's
    assert shrink(average, variance, 0.5)[0] == pytest.approx(0.25 / (0.25 + 4.0 / 19), rel=1e-6)
    assert shrink(np.array([1.0]), np.array([4.0]), 0.5)[0] < 0.06  # one noisy update alone barely moves


def _replay_exact(strategy: DGAStrategy, updates: int, signal: np.ndarray | None = None, seed: int = 0,
                  half_spread: float = SPREAD / 2, target_spread: float = SPREAD / 4) -> None:
    """`updates` anchored updates from synthetic measurements: each basis's two half-batch alignments COMMON +
    signal + noise (`half_spread`, the per-sequence spread over 4 sequences), the noise of g_spe as each basis's
    dot product with the two target halves' noise (`target_spread`), G = GAIN. The pooling, the averaging, the
    shrinkage and the update are the strategy's own."""
    rng = np.random.default_rng(seed + 1)
    m = len(strategy.weights)
    true = COMMON + (np.zeros(m) if signal is None else signal)
    for step in range(updates):
        target_noise = target_spread * rng.standard_normal((2, m)) + rng.standard_normal((2, 1)) * target_spread
        basis_halves = true + half_spread * rng.standard_normal((2, m)) + target_noise.mean(axis=0)
        target_halves = basis_halves.mean(axis=0) - target_noise.mean(axis=0) + target_noise
        measured = SplitAlignment(basis_halves.mean(axis=0),
                                  pooled_standard_errors(basis_halves, target_halves, strategy.weights), GAIN)
        strategy.absorb(measured)


@pytest.mark.parametrize("n_clusters,level,bound", [(64, "bases", 0.25), (256, "clusters", 0.3)])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_exact_dga_without_signal_stays_near_the_start(tmp_path, n_clusters, level, bound, beta):
    """Interchangeable bases, 300 anchored updates (dga_ema's beta and dga's beta = 1): within TV `bound` of alpha_0,
    no cluster above 0.05 over 256 clusters. The paper's rule on the same alignments (eta 10, as the long runs
    used it) walks away."""
    strategy = _exact_strategy(tmp_path, n_clusters, level, beta=beta)
    start = strategy.weights
    _replay_exact(strategy, 300)
    assert tv(strategy.weights, start) < bound, tv(strategy.weights, start)
    if level == "clusters":
        assert strategy.weights.max() < 0.05
    rng, weights = np.random.default_rng(1), start
    for _ in range(300):
        weights, _ = dga_update(weights, COMMON + SPREAD / 2 / np.sqrt(2) * rng.standard_normal(len(start)), 10.0, beta)
    # a random walk: the EMA (beta 0.1) slows it (TV ~0.35-0.5 after 300 updates) but never stops it
    assert tv(weights, start) > (0.5 if beta == 1.0 else 0.3)


@pytest.mark.parametrize("level", ["bases", "clusters"])
def test_exact_dga_moves_toward_a_planted_signal(tmp_path, level):
    """One basis (cluster) whose step gains a target step's own gain more than the others (relative gain 1,
    below one update's noise of about 1.5): the averaged, shrunk scores let it through."""
    strategy = _exact_strategy(tmp_path, 64, level)
    aligned = 0 if level == "bases" else 5
    signal = np.zeros(len(strategy.weights))
    signal[aligned] = GAIN
    _replay_exact(strategy, 100, signal)
    assert strategy.weights.argmax() == aligned and strategy.weights[aligned] > 2 / len(signal), strategy.weights


def test_exact_dga_without_signal_on_a_real_model(tmp_path):
    """End to end on a model (fixed parameters, 8 interchangeable clusters): the measured standard errors keep 15
    anchored updates near alpha_0 while the unshrunk scores (tau huge) move further."""
    moved = {}
    for tau in (0.25, 1e6):
        strategy = _exact_strategy(tmp_path, 8, "clusters", every=1, batch_size=4, tau=tau)
        start = strategy.weights
        for step in range(15):
            strategy.on_step(step)
        assert strategy.skipped < 15
        moved[tau] = tv(strategy.weights, start)
    assert moved[0.25] < 0.25 and moved[0.25] < moved[1e6], moved


def test_exact_dga_eta_means_the_same_at_batch_16_and_batch_64(tmp_path):
    """Exact DGA's scores are relative gains too: the same planted signal leads to the same weights whether each
    basis is measured on 16 or on 64 sequences, once the averaged estimates are precise enough for the shrinkage
    to let them through (tau = 1)."""
    aligned = {}
    for batch_size in (16, 64):
        strategy = _exact_strategy(tmp_path, 64, "bases", tau=1.0)
        signal = np.zeros(len(strategy.weights))
        signal[0] = GAIN
        _replay_exact(strategy, 300, signal, half_spread=SPREAD / np.sqrt(batch_size / 2))
        aligned[batch_size] = strategy.weights[0]
    assert aligned[16] > 2 / 19 and abs(aligned[16] - aligned[64]) < 0.2 * aligned[64], aligned
