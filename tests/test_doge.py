"""DoGE, the baseline: its update against hand-computed values, its gradient norms against brute force, how it
depends on the loss scale, and its strategy's exact resume."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dgamix.mixer.dga import exact_alignment, exact_alignment_with_norms
from dgamix.mixer.doge import check_doge_params, doge_scores, doge_update

from .conftest import brute_force_gradient


def test_update_matches_a_hand_computed_example():
    """a = (2, -1, 0.5), ||g|| = (1, 2, 3) (mean 2), lr = 0.1, no gradient clipping:
    s = 0.1 * a / (2 + 1e-6) = (0.1, -0.05, 0.025) (to 1e-7), clipped to [0, 0.5] -> (0.1, 0, 0.025);
    alpha = normalize(alpha * exp(s / mu)) with mu = 0.05: alpha * (e^2, 1, e^0.5)."""
    weights = np.array([0.5, 0.25, 0.25])
    new, scores, skipped = doge_update(weights, np.array([2.0, -1.0, 0.5]), np.array([1.0, 2.0, 3.0]),
                                       target_norm=4.0, lr=0.1, mu=0.05, clip_min=0.0, clip_max=5.0, grad_clip=0)
    assert not skipped
    np.testing.assert_allclose(scores, [0.1 * 2 / (2 + 1e-6), 0.0, 0.1 * 0.5 / (2 + 1e-6)], rtol=1e-12)
    expected = weights * np.exp(scores / 0.05)
    np.testing.assert_allclose(new, expected / expected.sum(), rtol=1e-12)
    np.testing.assert_allclose(new, np.array([0.5 * np.e ** 2, 0.25, 0.25 * np.e ** 0.5])
                               / (0.5 * np.e ** 2 + 0.25 + 0.25 * np.e ** 0.5), rtol=1e-5)
    # no EMA: the same update from the same weights twice lands where one update of twice the score would
    twice, _, _ = doge_update(new, np.array([2.0, -1.0, 0.5]), np.array([1.0, 2.0, 3.0]), 4.0, 0.1, 0.05, 0.0,
                              5.0, 0)
    once = weights * np.exp(2 * scores / 0.05)
    np.testing.assert_allclose(twice, once / once.sum(), rtol=1e-12)


def test_scores_scale_with_the_learning_rate_and_are_bounded_in_its_units():
    a, norms = np.array([30.0, -30.0, 1.0]), np.array([1.0, 1.0, 1.0])
    for lr in (1e-3, 3e-3):
        scores = doge_scores(a, norms, 1.0, lr, clip_min=-2.0, clip_max=5.0, grad_clip=0)
        # 30 / 1 = 30 > 5 -> lr * 5; -30 < -2 -> lr * -2; 1 / (1 + 1e-6) stays
        np.testing.assert_allclose(scores, [lr * 5.0, lr * -2.0, lr / (1 + 1e-6)], rtol=1e-12)
    # lr = 0 (e.g. the first warmup step): nothing moves
    new, scores, _ = doge_update(np.array([0.2, 0.3, 0.5]), a, norms, 1.0, 0.0, 0.05, 0.0, 5.0, 1.0)
    np.testing.assert_array_equal(scores, 0.0)
    np.testing.assert_allclose(new, [0.2, 0.3, 0.5], rtol=1e-15)


def test_gradient_clipping_through_the_norms_equals_clipping_the_gradients():
    """The reference clips each gradient (torch.nn.utils.clip_grad_norm_) before the dot products and norms; the
    factors applied to a and ||g|| give the same scores as clipping real vectors."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(50, generator=gen, dtype=torch.float64) * s for s in (0.3, 2.0, 7.0)]
    target = torch.randn(50, generator=gen, dtype=torch.float64) * 3.0

    def clipped(g):
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_([p], max_norm=1.5)
        return p.grad

    a = np.array([float(g @ target) for g in grads])
    norms = np.array([float(g.norm()) for g in grads])
    got = doge_scores(a, norms, float(target.norm()), 0.01, -1e9, 1e9, grad_clip=1.5)
    cg, ct = [clipped(g) for g in grads], clipped(target)
    mean_norm = np.mean([float(g.norm()) for g in cg])
    np.testing.assert_allclose(got, [0.01 * float(g @ ct) / (mean_norm + 1e-6) for g in cg], rtol=1e-10)


def test_non_finite_inputs_skip_the_update_and_bad_parameters_are_errors():
    weights = np.array([0.4, 0.6])
    for a, norms, lr in (([np.nan, 1.0], [1.0, 1.0], 0.1), ([1.0, 1.0], [np.inf, 1.0], 0.1),
                         ([1.0, 1.0], [1.0, 1.0], np.nan)):
        new, scores, skipped = doge_update(weights, np.array(a), np.array(norms), 1.0, lr, 0.05, 0.0, 5.0, 1.0)
        assert skipped and np.array_equal(new, weights) and np.isnan(scores).all()
    for args, message in (((0.0, 0.0, 5.0, 1.0, 1), "mu = 0.0"), ((0.05, 1.0, 0.5, 1.0, 1), "clip_min = 1.0 >"),
                          ((0.05, 0.0, 5.0, -1.0, 1), "grad_clip = -1.0"), ((0.05, 0.0, 5.0, 1.0, 0), "every = 0")):
        with pytest.raises(ValueError, match=message):
            check_doge_params(*args)


def _problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    gen = torch.Generator().manual_seed(1)
    batches = [[(torch.randn(8, 5, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(2)]
               for _ in range(3)]
    target = [(torch.randn(8, 5, generator=gen), torch.randn(8, 1, generator=gen))]
    return model, batches, target


def test_exact_alignment_with_norms_matches_brute_force_and_leaves_the_scores_unchanged():
    model, batches, target = _problem()
    loss_fn = lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1])  # noqa: E731

    def brute(micro):
        return brute_force_gradient(model, loss_fn, micro)

    params = list(model.parameters())
    scores, norms, target_norm = exact_alignment_with_norms(loss_fn, params, batches, target)
    assert scores.tobytes() == exact_alignment(loss_fn, params, batches, target).tobytes()  # DGA's, bit for bit
    np.testing.assert_allclose(norms, [float(brute(b).norm()) for b in batches], rtol=1e-5)
    assert target_norm == pytest.approx(float(brute(target).norm()), rel=1e-5)


def test_the_update_follows_the_loss_scale_unless_every_gradient_is_clipped():
    """Normalizing by the mean gradient norm removes one power of the loss scale c from <g_j, g_t>, not both: the
    scores (within the bounds) grow by c. With the reference's gradient clipping and every gradient longer than the
    clip norm, the update no longer depends on c."""
    model, batches, target = _problem()
    params = list(model.parameters())
    weights = np.array([0.2, 0.3, 0.5])

    def update(c, grad_clip):
        loss_fn = lambda b: c * torch.nn.functional.mse_loss(model(b[0]), b[1])  # noqa: E731
        a, norms, t = exact_alignment_with_norms(loss_fn, params, batches, target)
        return doge_update(weights, a, norms, t, lr=0.01, mu=0.05, clip_min=-1e9, clip_max=1e9,
                           grad_clip=grad_clip), min(norms.min(), t)

    (new1, s1, _), shortest = update(1.0, 0)
    (new10, s10, _), _ = update(10.0, 0)
    np.testing.assert_allclose(s10, 10 * s1, rtol=1e-4)
    assert not np.allclose(new10, new1)
    clip = 0.5 * shortest  # below every gradient's norm (the target's too) at c = 1, so at c = 10 too
    (clipped1, _, _), _ = update(1.0, clip)
    (clipped10, _, _), _ = update(10.0, clip)
    np.testing.assert_allclose(clipped10, clipped1, rtol=1e-5)


def _small_doge(tmp_path, lr=0.01, defaults=False, **settings):
    """A DoGE strategy on three synthetic clusters (bases = clusters, stream batch 4) and a bigram model; the
    target is cluster 0's distribution. Unless `defaults`, every = 2 and batch_size = 2 (cheap resume tests)."""
    from dgamix.mixer import ClusterStore, Mixture, MixtureStream, TargetSampler
    from dgamix.mixer.strategies import DoGEStrategy

    from .mixer_fixtures import synthetic_store

    tokens, target = tmp_path / "tokens", tmp_path / "target"
    if not tokens.exists():
        synthetic_store(tokens, [20, 15, 10])
        synthetic_store(target, [12], seed=5)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(128, 16), torch.nn.Linear(16, 128))
    store = ClusterStore(tokens)
    stream = MixtureStream(store, Mixture.identity(store.available), seq_len=8, batch_size=4, seed=0)
    loss_fn = lambda t: torch.nn.functional.cross_entropy(  # noqa: E731
        model(t[:, :-1] % 128).reshape(-1, 128), t[:, 1:].reshape(-1) % 128)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    strategy = DoGEStrategy(stream, target=TargetSampler(ClusterStore(target), seq_len=8), loss_fn=loss_fn,
                            params=list(model.parameters()), lr_fn=lambda: optimizer.param_groups[0]["lr"],
                            **({} if defaults else {"every": 2, "batch_size": 2}), **settings)
    return strategy, model, optimizer


def _train(strategy, model, optimizer, steps):
    records = []
    for step in steps:
        tokens = strategy.stream.next_batch()["tokens"]
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1] % 128).reshape(-1, 128),
                                                 tokens[:, 1:].reshape(-1) % 128)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        records.append(strategy.on_step(step))
    return records


def test_doge_strategy_moves_the_weights_with_the_learning_rate_and_resumes_exactly(tmp_path):
    """A run saved at step 4 (stream, strategy, model, optimizer through torch.save and torch.load's defaults) and
    resumed reaches the weights, average and target position of the straight run, bit for bit."""
    straight, model, optimizer = _small_doge(tmp_path, lr=0.5, clip_min=-5.0)
    records = _train(straight, model, optimizer, range(8))
    assert [r is None for r in records] == [True, False] * 4
    assert records[1].weights != [1 / 3] * 3 and straight.updates == 4 and not straight.skipped
    assert records[1].scores == pytest.approx(np.clip(records[1].scores, -5 * 0.5, 5 * 0.5))
    np.testing.assert_allclose(straight.average_weights, np.mean([r.weights for r in records[1::2]], axis=0))

    first, model, optimizer = _small_doge(tmp_path, lr=0.5, clip_min=-5.0)
    _train(first, model, optimizer, range(4))
    torch.save({"stream": first.stream.state_dict(), "strategy": first.state_dict(), "model": model.state_dict(),
                "optimizer": optimizer.state_dict()}, tmp_path / "state.pt")
    resumed, model, optimizer = _small_doge(tmp_path, lr=0.5, clip_min=-5.0)
    state = torch.load(tmp_path / "state.pt")  # torch's defaults (weights_only)
    resumed.stream.load_state_dict(state["stream"])
    resumed.load_state_dict(state["strategy"])
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _train(resumed, model, optimizer, range(4, 8))
    assert resumed.weights.tobytes() == straight.weights.tobytes()
    assert resumed.average_weights.tobytes() == straight.average_weights.tobytes()
    assert (resumed.updates, resumed.target.position) == (straight.updates, straight.target.position)

    # lr = 0: the scores vanish and the weights stay uniform
    frozen, model, optimizer = _small_doge(tmp_path, lr=0.0)
    assert all(r is None or r.weights == pytest.approx([1 / 3] * 3) for r in _train(frozen, model, optimizer, range(4)))


def test_doge_refuses_a_state_saved_under_other_settings(tmp_path):
    from dgamix.mixer import StateMismatchError

    saved, model, optimizer = _small_doge(tmp_path)
    _train(saved, model, optimizer, range(2))
    state = saved.state_dict()
    assert {k: state[k] for k in saved.SETTINGS} == {"mu": 0.05, "clip_min": 0.0, "clip_max": 5.0,
                                                     "grad_clip": 1.0, "every": 2, "batch_size": 2,
                                                     "micro_batches": 1, "target_batch_size": 2}
    other, _, _ = _small_doge(tmp_path, mu=0.01, grad_clip=0.0)
    with pytest.raises(StateMismatchError, match=r"mu: saved 0\.05, now 0\.01; grad_clip: saved 1\.0, now 0\.0$"):
        other.load_state_dict(state)
    assert other.updates == 0 and other.weights.tolist() == [1 / 3] * 3


def test_doge_strategy_defaults_are_the_settings_and_params_yaml():
    import dataclasses

    import yaml

    from dgamix.mixer.strategies import DoGE, DoGEStrategy

    settings = {f.name: f.default for f in dataclasses.fields(DoGE)}
    runtime = {f.name: f.default for f in dataclasses.fields(DoGEStrategy) if f.name in settings}
    assert runtime == settings
    shipped = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    assert shipped["train"]["strategy"]["doge"] == settings

def test_doge_updates_at_every_optimizer_step_by_default_on_the_reference_share(tmp_path):
    """The reference updates the weights at every optimizer step, scoring each domain on its share of one training
    batch: by default every = 1 and batch_size = max(world, global batch // (m + 1)) = 4 // 4 = 1 sequence per
    basis (and of the target), so the target advances one sequence (9 tokens) per step."""
    from dgamix.mixer.strategies import DoGE

    assert (DoGE().every, DoGE().batch_size, DoGE().target_batch_size) == (1, None, None)
    strategy, model, optimizer = _small_doge(tmp_path, lr=0.5, defaults=True)
    assert (strategy.every, strategy.batch_size, strategy.target_batch_size) == (1, 1, 1)
    start = strategy.target.position
    records = _train(strategy, model, optimizer, range(6))
    assert all(r is not None and not r.skipped for r in records)
    assert [r.step for r in records] == list(range(6)) and strategy.updates == 6
    assert strategy.target.position - start == 6 * 9  # tokens: seq_len + 1 = 9 per sequence
    # each update moves a log-weight by at most clip_max * lr / mu = 5 * 0.5 / 0.05 = 50 (log-odds bound)
    history = np.log([[1 / 3] * 3] + [r.weights for r in records])
    assert np.abs(np.diff(history - history[:, :1], axis=0)).max() <= 50 + 1e-9


def test_doge_follows_the_target_at_every_step_with_fixed_seeds(tmp_path):
    """Target = cluster 0's distribution: with fixed seeds, over 40 every-step updates on one sequence per basis,
    basis 0's scores are the largest on most updates and its weight ends the largest, well above uniform."""
    strategy, model, optimizer = _small_doge(tmp_path, lr=0.05, defaults=True)
    records = _train(strategy, model, optimizer, range(40))
    scores = np.array([r.scores for r in records])
    assert (scores.argmax(axis=1) == 0).mean() >= 0.75
    assert strategy.weights.argmax() == 0 and strategy.weights[0] > 0.6


def test_doge_honours_its_cadence_and_an_explicit_draw_size(tmp_path):
    """every = 3 updates after steps 2, 5, 8 only; an explicit batch_size replaces the reference share, and the
    target batch follows it unless set."""
    strategy, model, optimizer = _small_doge(tmp_path, lr=0.5, defaults=True, every=3, batch_size=3)
    assert (strategy.batch_size, strategy.target_batch_size) == (3, 3)
    start = strategy.target.position
    records = _train(strategy, model, optimizer, range(9))
    assert [i for i, r in enumerate(records) if r is not None] == [2, 5, 8] and strategy.updates == 3
    assert strategy.target.position - start == 3 * 3 * 9  # tokens: seq_len + 1 = 9 per sequence


def test_doge_settings_accept_the_reference_share_and_refuse_bad_sizes():
    from dgamix.mixer.strategies import DoGE

    DoGE().validate()
    for field in ("batch_size", "target_batch_size", "micro_batches"):
        with pytest.raises(ValueError, match=f"strategy.{field} = 0"):
            DoGE(**{field: 0}).validate()
    with pytest.raises(ValueError, match="strategy.every = 0"):
        DoGE(every=0).validate()
