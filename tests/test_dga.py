"""The DGA update against hand-computed values, and exact alignment against brute-force gradients."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dgamix.mixer.dga import check_dga_params, dga_update, exact_alignment, exponentiated_update

from .conftest import brute_force_gradient


def test_update_matches_a_hand_computed_example():
    weights = np.array([0.5, 0.25, 0.25])
    scores = np.array([0.0, 1.0, -1.0])
    # alpha * exp(eta a) with eta = ln 2: [0.5, 0.5, 0.125] -> normalized by 1.125
    new, skipped = dga_update(weights, scores, eta=np.log(2.0))
    np.testing.assert_allclose(new, [0.5 / 1.125, 0.5 / 1.125, 0.125 / 1.125])
    assert not skipped
    ema, _ = dga_update(weights, scores, eta=np.log(2.0), beta=0.1)
    np.testing.assert_allclose(ema, 0.9 * weights + 0.1 * new)


def test_update_survives_huge_scores_and_keeps_zero_weights():
    new = exponentiated_update(np.array([0.2, 0.0, 0.8]), np.array([1e6, 5.0, -1e6]), eta=0.5)
    np.testing.assert_allclose(new, [1.0, 0.0, 0.0])
    assert np.isfinite(new).all()


def test_non_finite_scores_skip_the_update():
    weights = np.array([0.3, 0.7])
    for bad in (np.nan, np.inf):
        new, skipped = dga_update(weights, np.array([bad, 0.1]), eta=0.3, beta=0.1)
        assert skipped and np.array_equal(new, weights)


@pytest.mark.parametrize("eta, beta, every, message", [
    (0.0, 0.1, 10, "eta = 0.0"), (-1, 0.1, 10, "eta = -1"), (0.3, 0.0, 10, "beta = 0.0"),
    (0.3, 1.5, 10, "beta = 1.5"), (0.3, 0.1, 0, "every = 0"),
])
def test_bad_parameters_are_clear_errors(eta, beta, every, message):
    with pytest.raises(ValueError, match=message):
        check_dga_params(eta, beta, every)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))


def test_exact_alignment_equals_brute_force_gradient_dot_products():
    model = tiny_model()
    gen = torch.Generator().manual_seed(1)
    batches = [[(torch.randn(8, 5, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(2)]
               for _ in range(4)]
    target = [(torch.randn(8, 5, generator=gen), torch.randn(8, 1, generator=gen))]
    loss_fn = lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1])  # noqa: E731

    def brute(micro):
        return brute_force_gradient(model, loss_fn, micro)

    expected = [float(brute(b) @ brute(target)) for b in batches]
    model.zero_grad()
    scores = exact_alignment(loss_fn, list(model.parameters()), batches, target)
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert all(p.grad is None or not p.grad.abs().sum() for p in model.parameters())  # .grad untouched


def test_a_loss_without_grad_is_a_clear_error():
    model = tiny_model()
    with torch.no_grad():
        with pytest.raises(ValueError, match="does not require grad"):
            exact_alignment(lambda b: model(b).sum(), list(model.parameters()), [[torch.ones(1, 5)]],
                            [torch.ones(1, 5)])


def test_theorem_1_dga_recovers_the_mixture_of_a_specialized_set():
    """Least squares over 3 synthetic domains; the specialized loss is the exact mixture sum_i w_i L_i with
    w = (0.6, 0.3, 0.1). Training theta on the alpha-mixture and updating alpha by DGA every T_r steps drives alpha
    to w (Theorem 1 of Fan et al. 2024: the specialized mixture is DGA's fixed point)."""
    gen = torch.Generator().manual_seed(0)
    d, n = 6, 200
    xs = [torch.randn(n, d, generator=gen) @ (torch.eye(d) + 0.5 * torch.randn(d, d, generator=gen)) for _ in range(3)]
    ys = [x @ (2 * torch.randn(d, 1, generator=gen)) for x in xs]
    truth = np.array([0.6, 0.3, 0.1])
    theta = torch.zeros(d, 1, requires_grad=True)

    def domain_loss(i):
        return ((xs[i] @ theta - ys[i]) ** 2).mean()

    def loss_fn(batch):
        if batch == "target":
            return sum(float(truth[i]) * domain_loss(i) for i in range(3))
        return domain_loss(batch)

    alpha = np.full(3, 1 / 3)
    optimizer = torch.optim.SGD([theta], lr=0.02)
    for update in range(150):
        for _ in range(50):  # T_r = 50 steps of training on the current mixture
            optimizer.zero_grad()
            sum(float(alpha[i]) * domain_loss(i) for i in range(3)).backward()
            optimizer.step()
        scores = exact_alignment(loss_fn, [theta], [[0], [1], [2]], ["target"])
        alpha, skipped = dga_update(alpha, scores, eta=0.002)  # 150 updates from uniform
        assert not skipped
    assert np.abs(alpha - truth).max() < 0.03, alpha


def _lm(vocab: int = 128, seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab))


def _dga_run(directory, target_dir, steps, resume_at=(), seed=0):
    """Train a tiny LM on the stream with DGA; stop and resume (fresh objects) at the given steps."""
    import hashlib

    from dgamix.mixer import ClusterStore, Mixture, MixtureStream, TargetSampler
    from dgamix.mixer.strategies import DGAStrategy

    def build(state=None):
        model = _lm(seed=seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        store = ClusterStore(directory, seed=1)
        stream = MixtureStream(store, Mixture.identity(store.available), seq_len=8, batch_size=4, seed=3)
        target = TargetSampler(ClusterStore(target_dir), seq_len=8)
        loss_fn = lambda t: torch.nn.functional.cross_entropy(  # noqa: E731
            model(t[:, :-1]).reshape(-1, 128), t[:, 1:].reshape(-1))
        dga = DGAStrategy(stream, target=target, loss_fn=loss_fn, params=list(model.parameters()), eta=0.5, beta=0.5,
                          every=3, batch_size=2)
        if state:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            stream.load_state_dict(state["stream"])
            dga.load_state_dict(state["dga"])
        return model, optimizer, stream, dga, loss_fn

    model, optimizer, stream, dga, loss_fn = build()
    hashes, alphas = [], []
    for step in range(steps):
        if step in resume_at:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "stream": stream.state_dict(), "dga": dga.state_dict()}
            model, optimizer, stream, dga, loss_fn = build(state)
        batch = stream.next_batch()
        hashes.append(hashlib.sha1(batch["tokens"].numpy().tobytes()).hexdigest())
        optimizer.zero_grad()
        loss_fn(batch["tokens"]).backward()
        optimizer.step()
        dga.on_step(step)
        alphas.append(dga.weights.copy())
    return hashes, np.array(alphas)


def test_dga_resume_gives_the_same_weights_and_data(tmp_path):
    from .mixer_fixtures import synthetic_store

    directory = synthetic_store(tmp_path / "tokens", [20, 15, 10, 25])
    target_dir = synthetic_store(tmp_path / "target", [12], seed=5)
    straight_hashes, straight_alphas = _dga_run(directory, target_dir, 20)
    resumed_hashes, resumed_alphas = _dga_run(directory, target_dir, 20, resume_at=(7, 13))
    assert resumed_hashes == straight_hashes
    np.testing.assert_array_equal(resumed_alphas, straight_alphas)
    assert not np.allclose(straight_alphas[-1], straight_alphas[0])  # DGA did move the weights


def test_dga_strategy_defaults_are_the_settings_and_params_yaml():
    """The strategy built by hand and the settings a Mixer takes have one set of defaults, and params.yaml's
    train.strategy.dga ships them."""
    import dataclasses

    import yaml

    from dgamix.mixer.strategies import DGA, DGAStrategy

    settings = {f.name: f.default for f in dataclasses.fields(DGA)}
    runtime = {f.name: f.default for f in dataclasses.fields(DGAStrategy) if f.name in settings}
    assert runtime == settings
    shipped = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    assert shipped["train"]["strategy"]["dga"] == settings


def _small_dga(tmp_path, **settings):
    from dgamix.mixer import ClusterStore, Mixture, MixtureStream, TargetSampler
    from dgamix.mixer.strategies import DGAStrategy

    from .mixer_fixtures import synthetic_store

    tokens, target = tmp_path / "tokens", tmp_path / "target"
    if not tokens.exists():
        synthetic_store(tokens, [20, 15, 10])
        synthetic_store(target, [12], seed=5)
    model = _lm()
    store = ClusterStore(tokens)
    stream = MixtureStream(store, Mixture.identity(store.available), seq_len=8, batch_size=4, seed=0)
    loss_fn = lambda t: torch.nn.functional.cross_entropy(  # noqa: E731
        model(t[:, :-1]).reshape(-1, 128), t[:, 1:].reshape(-1))
    return DGAStrategy(stream, target=TargetSampler(ClusterStore(target), seq_len=8), loss_fn=loss_fn,
                       params=list(model.parameters()), **{"module": model, **settings})


def test_dga_state_records_its_settings_and_round_trips_through_a_checkpoint(tmp_path):
    dga = _small_dga(tmp_path, eta=0.5, beta=0.5, every=2, batch_size=2)
    assert dga.target_batch_size == 2  # None means batch_size: the effective value is saved
    for step in range(4):
        record = dga.on_step(step)
        assert (record is None) == (step % 2 == 0)
        assert record is None or record.step == step and record.weights == dga.weights.tolist()
    assert not hasattr(dga, "history")  # the caller logs the returned records; nothing grows without bound
    state = dga.state_dict()
    assert {k: state[k] for k in dga.SETTINGS} == {"eta": 0.5, "beta": 0.5, "every": 2, "estimator": "exact",
                                                   "batch_size": 2, "micro_batches": 1, "target_batch_size": 2,
                                                   "rule": "anchored", "kl_cap": None, "tau": 0.25}
    assert "weights" not in state  # the stream owns the weights and saves them
    torch.save({"stream": dga.stream.state_dict(), "strategy": state}, tmp_path / "state.pt")  # as the hooks do
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = _small_dga(tmp_path, eta=0.5, beta=0.5, every=2, batch_size=2)
    resumed.stream.load_state_dict(loaded["stream"])
    resumed.load_state_dict(loaded["strategy"])
    np.testing.assert_array_equal(resumed.weights, dga.weights)
    assert (resumed.updates, resumed.target.position) == (2, dga.target.position)
    # the anchored rule's averaged scores and their variance (the shrinkage's denominator) resume with it
    np.testing.assert_array_equal(resumed.score_average, dga.score_average)
    np.testing.assert_array_equal(resumed.score_variance, dga.score_variance)


@pytest.mark.parametrize("changed, message", [
    ({"eta": 0.4}, r"eta: saved 0\.5, now 0\.4"),
    ({"beta": 1.0}, r"beta: saved 0\.5, now 1\.0"),
    ({"every": 3}, r"every: saved 2, now 3"),
    ({"estimator": "finite_difference"}, r"estimator: saved 'exact', now 'finite_difference'"),
    ({"batch_size": 4}, r"batch_size: saved 2, now 4; target_batch_size: saved 2, now 4"),
    ({"target_batch_size": 3}, r"target_batch_size: saved 2, now 3"),
    ({"micro_batches": 2}, r"micro_batches: saved 1, now 2"),
])
def test_dga_refuses_a_state_saved_under_other_settings(tmp_path, changed, message):
    from dgamix.mixer import StateMismatchError

    saved = _small_dga(tmp_path, eta=0.5, beta=0.5, every=2, batch_size=2)
    saved.on_step(1)
    state = saved.state_dict()
    other = _small_dga(tmp_path, **{"eta": 0.5, "beta": 0.5, "every": 2, "batch_size": 2, **changed})
    before = (other.weights.copy(), other.updates, other.target.position)
    with pytest.raises(StateMismatchError, match=message):
        other.load_state_dict(state)
    after = (other.weights, other.updates, other.target.position)
    assert np.array_equal(after[0], before[0]) and after[1:] == before[1:]  # refused before anything was restored


def test_dga_names_every_differing_setting_and_refuses_a_state_without_them(tmp_path):
    from dgamix.mixer import StateMismatchError

    state = _small_dga(tmp_path, eta=0.5, beta=0.5, every=2, batch_size=2).state_dict()
    other = _small_dga(tmp_path, eta=0.3, beta=0.1, every=2, batch_size=2)
    with pytest.raises(StateMismatchError, match=r"eta: saved 0\.5, now 0\.3; beta: saved 0\.5, now 0\.1$"):
        other.load_state_dict(state)
    del state["estimator"]
    with pytest.raises(StateMismatchError, match=r"estimator: not saved, now 'exact'"):
        _small_dga(tmp_path, eta=0.5, beta=0.5, every=2, batch_size=2).load_state_dict(state)


@pytest.mark.parametrize("estimator, batched, tolerance", [
    ("finite_difference", False, 0.05), ("finite_difference", True, 0.05), ("forward", False, 1e-3),
    ("forward", True, 1e-3)])
def test_cheaper_estimators_are_faithful_to_exact_on_the_reference_gpt(estimator, batched, tolerance):
    """Across 10 parameter states of the reference GPT in training (fp32), each cheaper estimator stays within its
    stated relative error of the exact scores (max |error| / max |a|) and ranks the bases the same way
    (Spearman >= 0.95): central differences within 5%, forward-mode AD within 0.1% (it is exact up to rounding).
    `batched`: all bases' sequences evaluated together through per-sequence losses."""
    from scipy.stats import spearmanr

    from dgamix.mixer.dga import ESTIMATORS
    from dgamix.trainer.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2, n_embd=32))
    gen = torch.Generator().manual_seed(0)
    domains = [torch.randint(12 * j, 12 * j + 36, (4, 17), generator=gen) for j in range(6)]
    target = [torch.randint(0, 48, (4, 17), generator=gen)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    options = {"module": model, "sequence_loss_fn": model.sequence_losses if batched else None, "chunk": 10}
    errors, correlations = [], []
    for state in range(10):
        params = list(model.parameters())
        exact = exact_alignment(model.loss, params, [[d] for d in domains], target)
        estimate = ESTIMATORS[estimator](model.loss, params, [[d] for d in domains], target, **options)
        errors.append(np.abs(estimate - exact).max() / np.abs(exact).max())
        correlations.append(spearmanr(exact, estimate).statistic)
        if state == 0:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # parameters untouched
        optimizer.zero_grad()
        model.loss(domains[state % 6]).backward()
        optimizer.step()
    assert max(errors) < tolerance, errors
    assert min(correlations) >= 0.95, correlations


def test_forward_estimator_needs_the_module():
    from dgamix.mixer.dga import forward_mode_alignment

    model = torch.nn.Linear(5, 1)
    with pytest.raises(ValueError, match="needs the model"):
        forward_mode_alignment(lambda b: model(b).sum(), list(model.parameters()), [[torch.ones(1, 5)]],
                               [torch.ones(1, 5)])
    other = torch.nn.Linear(5, 1)
    with pytest.raises(ValueError, match="not parameters of the given module"):
        forward_mode_alignment(lambda b: model(b).sum(), list(model.parameters()), [[torch.ones(1, 5)]],
                               [torch.ones(1, 5)], module=other)


def test_exp3_policy_explores_and_favours_high_reward_domains():
    from dgamix.mixer.strategies import exp3_probabilities

    pi, eps = exp3_probabilities(np.zeros(4), step=1)
    np.testing.assert_allclose(pi, 0.25)
    assert eps == pytest.approx(0.25)
    pi, eps = exp3_probabilities(np.array([100.0, 0.0, 0.0, 0.0]), step=100)
    assert eps == pytest.approx(np.sqrt(np.log(4) / 400))
    assert pi[0] > 0.5 and np.allclose(pi[1:], pi[1]) and pi.min() >= eps and pi.sum() == pytest.approx(1.0)


def test_odm_moves_weight_to_the_domain_with_the_highest_loss(tmp_path):
    from dgamix.mixer import ClusterStore, Mixture, MixtureStream
    from dgamix.mixer.strategies import Evidence, ODMStrategy

    from .mixer_fixtures import synthetic_store

    store = ClusterStore(synthetic_store(tmp_path / "tokens", [10, 10, 10]))
    stream = MixtureStream(store, Mixture.identity(store.available), seq_len=8, batch_size=16, seed=0)
    odm = ODMStrategy(stream)
    for step in range(200):
        clusters = stream.next_batch()["cluster"].numpy()
        odm.observe(Evidence({"cluster": clusters}, np.where(clusters == 2, 3.0, 1.0)))  # domain 2: the hardest
        odm.on_step(step)
    assert stream.weights[2] > 2 * stream.weights[:2].max()  # 0.60 vs 0.20 after 200 steps
    with pytest.raises(ValueError, match="ODM needs disjoint domains"):
        ODMStrategy(MixtureStream(store, Mixture(np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])), 8, 2))


@pytest.mark.parametrize("kind", ["static", "dga", "odm"])
def test_strategy_state_loads_with_torch_load_defaults(tmp_path, kind):
    """torch >= 2.6's default torch.load (weights_only) refuses numpy arrays and scalars: a strategy's state is plain
    even when its settings came in as numpy scalars (here DGA's batch sizes), and restores the weights bit for bit."""
    from dgamix.mixer.strategies import Evidence, ODMStrategy, StaticStrategy

    def make():
        dga = _small_dga(tmp_path, eta=0.5, beta=0.5, every=2, batch_size=np.int64(2), micro_batches=np.int64(1))
        if kind == "static":
            return StaticStrategy(dga.stream, weights=np.array([1.0, 1.0, 1.0]) / 3)
        return ODMStrategy(dga.stream) if kind == "odm" else dga

    strategy = make()
    for step in range(4):
        if kind == "odm":
            strategy.observe(Evidence({"cluster": np.array([0, 1, 1])}, np.array([2.0, 0.5, 0.25])))
        strategy.on_step(step)
    torch.save({"stream": strategy.stream.state_dict(), "strategy": strategy.state_dict()}, tmp_path / "state.pt")
    resumed = make()
    state = torch.load(tmp_path / "state.pt")  # torch's defaults
    resumed.stream.load_state_dict(state["stream"])  # as a checkpoint is loaded: the stream, then the strategy
    resumed.load_state_dict(state["strategy"])
    assert resumed.stream.weights.tobytes() == strategy.stream.weights.tobytes()
    if kind == "dga":
        saved = (strategy.updates, strategy.target.position)
        assert (resumed.updates, resumed.target.position) == saved == (2, 2 * 2 * 9)  # 2 updates x 2 seqs x 9 tokens
    if kind == "odm":
        assert resumed.rewards.tobytes() == strategy.rewards.tobytes() and resumed.steps == 4


def test_dga_updates_after_every_t_r_th_step_and_only_then(tmp_path):
    """Single process: with every = 3 the weights move after steps 2, 5 and 8 (0-based), on no other call."""
    dga = _small_dga(tmp_path, every=3, batch_size=2, target_batch_size=8, eta=1.0, tau=1e6)
    changed, records = [], []
    for step in range(9):
        before = dga.weights
        record = dga.on_step(step)
        if record is not None:
            records.append(record.step)
        if not np.array_equal(before, dga.weights):
            changed.append(step)
    assert records == [2, 5, 8] and changed == [2, 5, 8] and dga.updates == 3


def test_dga_takes_a_generator_of_parameters_and_refuses_none(tmp_path):
    """params=model.parameters() (a generator) would be exhausted by the first update; params=[] has nothing to
    differentiate: the first is kept as a list, the second refused at construction."""
    from dgamix.mixer.strategies import DGAStrategy

    model = _lm()
    dga = _small_dga(tmp_path, every=1, batch_size=2)
    generated = DGAStrategy(dga.stream, target=dga.target, loss_fn=dga.loss_fn, params=model.parameters(),
                            every=1, batch_size=2, target_batch_size=8)
    generated.loss_fn = lambda t: torch.nn.functional.cross_entropy(  # noqa: E731
        model(t[:, :-1]).reshape(-1, 128), t[:, 1:].reshape(-1))
    for step in range(2):
        assert generated.on_step(step) is not None
    assert generated.updates == 2
    with pytest.raises(ValueError, match="DGAStrategy: params holds no parameter that requires grad"):
        DGAStrategy(dga.stream, target=dga.target, loss_fn=dga.loss_fn, params=[], every=1, batch_size=2)
