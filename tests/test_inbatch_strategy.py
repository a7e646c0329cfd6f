"""In-batch DGA as a strategy: its basis scores estimate the paper's a_j, it moves weight toward the clusters that
match the target, and it resumes exactly."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dgamix.mixer import ClusterStore, Mixture, MixtureStream, StateMismatchError, TargetSampler
from dgamix.mixer.inbatch import InBatchAlignment
from dgamix.mixer.strategies import Evidence, InBatchDGAStrategy

from .mixer_fixtures import synthetic_store

VOCAB = 128


def lm(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 16), torch.nn.Linear(16, VOCAB))


def sequence_losses(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1),
                                                  reduction="none")
    return per_token.view(tokens.shape[0], -1).mean(dim=1)


@pytest.fixture
def stores(tmp_path):
    # Cluster c's tokens lie in [10c + 1, 10c + 9]; the target's are cluster 0's range: it is cluster 0's text.
    return (synthetic_store(tmp_path / "tokens", [20, 15, 10, 25]),
            synthetic_store(tmp_path / "target", [12], seed=5))


def build(stores, level="bases", seed=0, state=None, **settings):
    directory, target_dir = stores
    model = lm(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    store = ClusterStore(directory, seed=1)
    mixture = Mixture.identity(store.available) if level == "clusters" else Mixture(
        sp.csr_matrix(np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.0, 0.0, 0.5, 0.5]])),
        ["zero", "one", "rest"])
    stream = MixtureStream(store, mixture, seq_len=8, batch_size=8, seed=3)
    target = TargetSampler(ClusterStore(target_dir), seq_len=8)
    loss_fn = lambda t: sequence_losses(model, t).mean()  # noqa: E731
    options = {"eta": 0.2, "every": 1, "refresh": 4, "decay": 0.9, "min_sequences": 2, "level": level} | settings
    strategy = InBatchDGAStrategy(stream, target=target, tracker=InBatchAlignment(model), loss_fn=loss_fn, **options)
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["stream"])
        strategy.load_state_dict(state["strategy"])
    return model, optimizer, stream, strategy


def train(stores, steps, level="bases", resume_at=(), **settings):
    model, optimizer, stream, strategy = build(stores, level, **settings)
    hashes, weights = [], []
    for step in range(steps):
        if step in resume_at:
            # Through a file read back with torch.load's defaults (weights_only since torch 2.6), as a user would.
            checkpoint = stores[0].parent / "checkpoint.pt"
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "stream": stream.state_dict(), "strategy": strategy.state_dict()}, checkpoint)
            state = torch.load(checkpoint)
            model, optimizer, stream, strategy = build(stores, level, state=state, **settings)
        batch = stream.next_batch()
        hashes.append(hashlib.sha1(batch["tokens"].numpy().tobytes()).hexdigest())
        optimizer.zero_grad()
        with strategy.training_step(step):  # unscored steps run with the hooks paused, and observe ignores them
            sequence_losses(model, batch["tokens"]).mean().backward()
        strategy.observe(Evidence(batch))
        optimizer.step()
        strategy.on_step(step)
        weights.append(strategy.weights.copy())
    return hashes, np.array(weights), strategy


@pytest.mark.parametrize("rule", ["anchored", "paper"])
@pytest.mark.parametrize("level", ["bases", "clusters"])
def test_weight_moves_toward_the_clusters_that_match_the_target(stores, level, rule):
    """On a real model: the basis (or cluster) holding the target's own distribution gains the most weight. The
    paper's compounding rule (at its own step size) runs further than the anchored one in 40 updates."""
    _, weights, strategy = train(stores, 40, level, rule=rule, eta=0.2 if rule == "paper" else 4.0)
    final = weights[-1]
    assert final.argmax() == 0, final  # basis "zero" / cluster 0: the target's own distribution
    assert final[0] > (1.5 if rule == "paper" else 1.1) / len(final)
    assert strategy.updates == 40 and strategy.skipped == 0
    if rule == "paper":
        assert (final >= strategy.floor / len(final) * (1 - 1e-12)).all()  # the floor: no weight sticks at 0


@pytest.mark.parametrize("level", ["bases", "clusters"])
def test_resume_between_refreshes_gives_the_same_data_and_weights(stores, level):
    straight_hashes, straight, _ = train(stores, 14, level)
    resumed_hashes, resumed, _ = train(stores, 14, level, resume_at=(5, 11))  # refresh = 4: mid-window
    assert resumed_hashes == straight_hashes
    np.testing.assert_array_equal(resumed, straight)


def test_basis_scores_estimate_the_papers_alignment(stores):
    """At fixed parameters, the importance-weighted basis estimates from the training stream's sequences agree
    with a_j measured directly on sequences drawn from each basis (within their standard errors)."""
    model, _, stream, strategy = build(stores, "bases", scale="raw", decay=1.0)
    tracker = strategy.tracker
    for _ in range(60):
        batch = stream.next_batch()
        model.zero_grad()
        sequence_losses(model, batch["tokens"]).mean().backward()
        strategy.observe(Evidence(batch))
    strategy.stats.absorb(strategy.window)
    estimate, se, _ = strategy.stats.basis_estimates(stream.mixture.bases)
    direct, direct_se = [], []
    for j in range(stream.mixture.n_bases):
        d = []
        for _ in range(20):
            tokens = stream.sample_basis(j, 8)["tokens"]
            model.zero_grad()
            sequence_losses(model, tokens).mean().backward()
            d.append(tracker.collect(loss_scale=1 / 8).numpy())
        d = np.concatenate(d)
        direct.append(d.mean())
        direct_se.append(d.std(ddof=1) / np.sqrt(len(d)))
    tracker.take()
    z = (estimate - np.array(direct)) / np.sqrt(se ** 2 + np.array(direct_se) ** 2)
    assert (np.abs(z) < 4).all(), (estimate, direct, z)
    assert np.argmax(estimate) == np.argmax(direct) == 0


def test_a_state_saved_under_other_settings_is_refused(stores):
    _, _, _, strategy = build(stores, "bases")
    state = strategy.state_dict()
    _, _, _, other = build(stores, "bases", eta=0.5, scale="standardized")
    with pytest.raises(StateMismatchError, match=r"eta: saved 0.2, now 0.5; .*scale: saved 'snr', now 'standardized'"):
        other.load_state_dict(state)


def test_bad_settings_are_clear_errors(stores):
    for settings, message in (({"scale": "cosine"}, "scale = 'cosine'"), ({"level": "coarse"}, "level = 'coarse'"),
                              ({"refresh": 0}, "refresh = 0"), ({"floor": 1.5}, "floor = 1.5")):
        with pytest.raises(ValueError, match=message):
            build(stores, **settings)


def test_steps_that_are_not_scored_bring_no_update(stores):
    """score_every = 3, every = 1: the weights move only after a scored step (no update on stale evidence)."""
    _, weights, strategy = train(stores, 9, "bases", score_every=3)
    moved = [not np.array_equal(weights[i], weights[i - 1]) for i in range(1, 9)]
    assert moved == [False, False, True, False, False, True, False, False] and strategy.updates == 3


def test_settings_under_which_nothing_can_move_are_named(stores, caplog):
    # batch 8 over 4 clusters, decay 0.9: about 20 recent sequences per cluster, so a gate of 100 is never passed
    build(stores, "clusters", min_sequences=100)
    assert "sees about 20.00 recent sequences under uniform weights, below min_sequences = 100" in caplog.text
    caplog.clear()
    build(stores, "clusters", min_sequences=8)
    assert "recent sequences" not in caplog.text


def test_default_decay_keeps_twice_the_gate_for_every_cluster(stores, caplog):
    """decay None: the memory grows with the number of scored clusters, so a gate that no fixed decay of 0.9 could
    pass (100 sequences, batch 8, 4 clusters) is passed in steady state, with no warning."""
    _, _, _, strategy = build(stores, "clusters", decay=None, min_sequences=100)
    assert strategy.decay == pytest.approx(1.0 - 8 / (2 * 100 * 4))
    assert "recent sequences" not in caplog.text
    _, _, _, bases = build(stores, "bases", decay=None, min_sequences=2)
    assert bases.decay == pytest.approx(0.95)  # 2 * 2 * 3 / 8 = 1.5 updates < the 20-update floor


def test_domain_reweighting_moves_at_the_default_decay(stores):
    """The defaults' gate (8 sequences) at the auto decay: cluster weights move within a short run, and toward the
    target's cluster (0) rather than away from it."""
    _, weights, strategy = train(stores, 40, "clusters", decay=None, min_sequences=8)
    assert not np.allclose(weights[-1], weights[0])
    assert weights[-1][0] > weights[0][0]


def test_a_target_batch_too_small_for_the_anchored_halves_is_refused(stores):
    """The anchored rule differentiates two halves of the target batch, each split across the ranks: one process
    needs two sequences, and the error names the setting, the world size and the remedy."""
    with pytest.raises(ValueError, match=r"target_batch_size = 1 with world size 1: .* expected >= 2 x the world "
                                         r"size \(2\); raise target_batch_size"):
        build(stores, target_batch_size=1)
    build(stores, rule="paper", target_batch_size=1)  # the paper rule takes the whole batch at once


def _step(model, stream, strategy, optimizer, step: int) -> None:
    batch = stream.next_batch()
    optimizer.zero_grad()
    with strategy.training_step(step):
        sequence_losses(model, batch["tokens"]).mean().backward()
    strategy.observe(Evidence(batch))
    optimizer.step()
    strategy.on_step(step)


def test_resume_mid_window_restores_the_window(stores, tmp_path):
    """every = 2: after step 0 the strategy has observed 8 sequences that no update has used yet (its window). A
    checkpoint taken there and loaded into a fresh strategy continues bit for bit: the first update after the
    resume must count step 0's sequences as the uninterrupted run does."""
    settings = {"every": 2}
    model, optimizer, stream, strategy = build(stores, **settings)
    _step(model, stream, strategy, optimizer, 0)
    assert strategy.updates == 0 and strategy.window.sequences == 8  # observed, not yet used: mid-window
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "stream": stream.state_dict(),
                "strategy": strategy.state_dict()}, tmp_path / "checkpoint.pt")
    resumed = build(stores, state=torch.load(tmp_path / "checkpoint.pt"), **settings)
    assert resumed[3].window.sequences == 8
    for step in range(1, 7):
        for run in ((model, stream, strategy, optimizer), (resumed[0], resumed[2], resumed[3], resumed[1])):
            _step(*run, step)
        np.testing.assert_array_equal(resumed[3].weights, strategy.weights)
    assert strategy.updates == resumed[3].updates == 3
    assert not np.allclose(strategy.weights, strategy.prior)  # not vacuous: the weights moved
    for name in strategy.stats.FIELDS:
        np.testing.assert_array_equal(getattr(resumed[3].stats, name), getattr(strategy.stats, name))


@pytest.mark.parametrize("every", [1, 2])
def test_statistics_decay_once_per_update(stores, every):
    """With decay 0.9 and B = 8 sequences per step, after k updates the decayed number of sequences is the closed
    form 8 * every * sum_{j=1..k} decay^j (each update absorbs its window, then ages everything once) and the sum
    of squared weights 8 * every * sum_j decay^(2j); a decay applied twice per update gives decay^(2j) instead."""
    decay, steps = 0.9, 6
    _, _, strategy = train(stores, steps, decay=decay, every=every)
    k = steps // every
    assert strategy.updates == k
    per_update = 8 * every
    expected = per_update * sum(decay ** j for j in range(1, k + 1))
    expected_sq = per_update * sum(decay ** (2 * j) for j in range(1, k + 1))
    assert strategy.stats.sequences == pytest.approx(expected, rel=1e-12)
    assert strategy.stats.count.sum() == pytest.approx(expected, rel=1e-12)
    assert strategy.stats.sequences_sq == pytest.approx(expected_sq, rel=1e-12)
    assert strategy.stats.count_sq.sum() == pytest.approx(expected_sq, rel=1e-12)


@pytest.mark.parametrize("level", ["bases", "clusters"])
def test_the_anchored_standard_errors_count_the_measured_noise_of_g_spe(stores, level):
    """On a real model: under the anchored rule every scored sequence also carries <grad l(x), h> (h from the
    target's split halves), folded at each refresh into the variance g_spe's noise adds to the scores; with
    target_noise=False the second dot product is skipped and nothing is folded."""
    _, _, measured = train(stores, 14, level)  # refresh = 4: three windows folded, one open
    assert measured._noise_direction is not None and measured.tracker.last_noise_scores is not None
    # h = (g1 - g2) / 2 and g = (g1 + g2) / 2 for equal halves, so G = <g1, g2> = |g|^2 - |h|^2: h has the scale of
    # g's own noise (an unscaled g1 - g2 would have 4x its variance)
    g, h = measured._target_gradient.double(), measured._noise_direction.double()
    assert measured.gain == pytest.approx(float(g @ g - h @ h), rel=1e-6)
    # each window's share is an unbiased U-statistic (one draw; it may be negative), their total floored at 0
    assert measured.stats.noise_variance != 0 and measured.stats.noise_sq.any()
    bases = measured.stream.mixture.bases if level == "bases" else None
    everything = np.ones(measured.stream.mixture.n_bases if level == "bases" else 4, dtype=bool)
    assert measured.stats.shared_noise_variance(bases, everything) >= 0
    _, _, unmeasured = train(stores, 14, level, target_noise=False)
    assert unmeasured.tracker.last_noise_scores is None
    assert unmeasured.stats.noise_variance == 0 and not unmeasured.stats.noise.any()
