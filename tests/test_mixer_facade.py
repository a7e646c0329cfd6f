"""The Mixer a plain training loop holds: every strategy through the same four calls, one state that resumes exactly
(prefetched loader steps included), and clear errors for what a strategy needs and was not given."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from dgamix.mixer import DGA, ODM, ClusterStore, DoGE, InBatchDGA, Mixer, Mixture, StateMismatchError, Static
from dgamix.mixer.mixer import purpose_seed
from dgamix.trainer.model import GPT, GPTConfig

from .mixer_fixtures import synthetic_store

SEQ, BATCH, STEPS = 8, 4, 10
SETTINGS = {"static": Static(basis="cluster:2"), "dga": DGA(eta=3.0, beta=1.0, every=2, batch_size=2),
            "doge": DoGE(every=2, batch_size=2),
            "inbatch": InBatchDGA(eta=0.5, every=2, refresh=3, target_batch_size=4, decay=0.9, min_sequences=2),
            "odm": ODM()}


@pytest.fixture
def stores(tmp_path):
    return (synthetic_store(tmp_path / "tokens", [20, 15, 10, 25]), synthetic_store(tmp_path / "target", [12], seed=5))


def _build(stores, strategy: str, dropout: float = 0.1):
    torch.manual_seed(0)
    mixer = Mixer.from_dirs(stores[0], None, target=stores[1], seq_len=SEQ, batch_size=BATCH, seed=0,
                            strategy=SETTINGS[strategy], max_steps=STEPS)
    model = GPT(GPTConfig(vocab_size=mixer.vocab_size, block_size=SEQ, n_layer=1, n_head=2, n_embd=16,
                          dropout=dropout))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    mixer.attach(model, loss_fn=model.loss, optimizer=optimizer)
    return mixer, model, optimizer


def _train(stores, strategy: str, workers: int, stop_at: int | None = None, state=None):
    """The README's loop; `stop_at`: save everything after that many steps and stop; `state`: resume from it."""
    mixer, model, optimizer = _build(stores, strategy)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        mixer.load_state_dict(state["mixer"])
        torch.set_rng_state(state["rng"])
    seen, records = [], []
    for batch in mixer.loader(num_workers=workers):
        seen.append(hashlib.blake2b(batch["tokens"].numpy().tobytes(), digest_size=8).hexdigest())
        with mixer.training_step():
            losses = model.sequence_losses(batch["tokens"])
            optimizer.zero_grad()
            losses.mean().backward()
        mixer.observe(batch, sequence_losses=losses)
        optimizer.step()
        records.append(mixer.step())
        if stop_at is not None and mixer.steps == stop_at:
            return seen, mixer, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "mixer": mixer.state_dict(), "rng": torch.get_rng_state()}
    return seen, mixer, records


@pytest.mark.parametrize("strategy,workers", [("static", 0), ("dga", 2), ("doge", 0), ("inbatch", 2), ("odm", 2)])
def test_every_strategy_runs_the_same_loop_and_resumes_exactly(stores, tmp_path, strategy, workers):
    seen, mixer, records = _train(stores, strategy, workers)
    assert len(seen) == STEPS and mixer.steps == STEPS
    if strategy == "static":
        assert mixer.weights.tolist() == [0.0, 0.0, 1.0, 0.0] and records == [None] * STEPS
    else:
        assert not np.allclose(mixer.weights, 0.25), mixer.weights  # the strategy moved the weights
    if strategy in ("dga", "doge"):  # updates at steps 1, 3, ... but not after the last: their records
        assert [r is not None for r in records] == [s % 2 == 1 and s < STEPS - 1 for s in range(STEPS)]
    # stopped mid-run with workers' prefetched steps planned but not trained; saved through torch's defaults
    first, _, state = _train(stores, strategy, workers, stop_at=4)
    torch.save(state, tmp_path / "c.pt")
    rest, resumed, _ = _train(stores, strategy, workers, state=torch.load(tmp_path / "c.pt"))
    assert first + rest == seen
    assert resumed.weights.tobytes() == mixer.weights.tobytes() and resumed.steps == STEPS


@pytest.mark.parametrize("strategy", ["dga", "doge", "inbatch"])
def test_no_update_after_the_last_step(stores, strategy):
    """A run of N steps updating every k (N a multiple of k) updates N / k - 1 times: the update after the last step
    would set weights no batch is drawn with (exact DGA and DoGE: an alignment on fresh batches for nothing)."""
    def updates(**bounds) -> tuple[int, int]:
        torch.manual_seed(0)
        mixer = Mixer.from_dirs(stores[0], None, target=stores[1], seq_len=SEQ, batch_size=BATCH, seed=0,
                                strategy=SETTINGS[strategy], **bounds)
        model = GPT(GPTConfig(vocab_size=mixer.vocab_size, block_size=SEQ, n_layer=1, n_head=2, n_embd=16))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        mixer.attach(model, loss_fn=model.loss, optimizer=optimizer)
        for _ in range(STEPS):
            batch = mixer.next_batch()
            with mixer.training_step():
                optimizer.zero_grad()
                model.loss(batch["tokens"]).backward()
            mixer.observe(batch)
            optimizer.step()
            mixer.step()
        return mixer.strategy.updates, mixer.stream.basis_sampler.draws

    every = SETTINGS[strategy].every
    bases = 4  # one per cluster of the token store
    expected = STEPS // every - 1
    assert updates(max_steps=STEPS)[0] == expected
    # an unbounded stream: nothing tells the mixer which step is the last
    assert updates()[0] == expected + 1
    # gradient accumulation counts stream steps in max_steps: total_steps gives the optimizer steps
    assert updates(max_steps=2 * STEPS, total_steps=STEPS)[0] == expected
    if strategy == "dga":  # each update draws a batch per basis: none after the last step
        assert updates(max_steps=STEPS)[1] == expected * bases and updates()[1] == (expected + 1) * bases


def test_the_stream_and_the_alignment_draw_from_their_own_seeds(stores):
    """Mixer(seed=s): the stream's draws from purpose_seed(s, "stream"), the alignment draws (the fresh batches per
    basis, a target given by its directory) from purpose_seed(s, "alignment"); a store passed in keeps its seed."""
    stream, alignment = purpose_seed(3, "stream"), purpose_seed(3, "alignment")
    assert len({3, stream, alignment, purpose_seed(4, "stream")}) == 4 and purpose_seed(3, "stream") == stream
    mixer = Mixer.from_dirs(stores[0], target=stores[1], seq_len=SEQ, batch_size=BATCH, seed=3, strategy=DGA())
    assert (mixer.seed, mixer.stream.seed, mixer.stream.store.seed) == (3, stream, stream)
    assert (mixer.stream.basis_sampler.seed, mixer.target.store.seed) == (alignment, alignment)
    own = ClusterStore(stores[0], seed=11)
    mixer = Mixer(own, mixer.stream.mixture, seq_len=SEQ, batch_size=BATCH, seed=3)
    assert mixer.stream.store.seed == 11 and mixer.stream.seed == stream
    with pytest.raises(ValueError, match="seed = -1: expected a non-negative integer"):
        purpose_seed(-1, "stream")


def test_what_a_strategy_needs_is_asked_for_clearly(stores):
    assert Mixer.from_dirs(stores[0], seq_len=SEQ, batch_size=BATCH).needs == frozenset()
    with pytest.raises(ValueError, match="DGA aligns with the specialized set: give Mixer\\(..., target="):
        Mixer.from_dirs(stores[0], seq_len=SEQ, batch_size=BATCH, strategy=DGA())
    mixer = Mixer.from_dirs(stores[0], target=stores[1], seq_len=SEQ, batch_size=BATCH, strategy=DGA())
    with pytest.raises(RuntimeError, match="call mixer.attach\\(model"):
        mixer.step()
    model = GPT(GPTConfig(vocab_size=mixer.vocab_size, block_size=SEQ, n_layer=1, n_head=2, n_embd=16))
    doge = Mixer.from_dirs(stores[0], target=stores[1], seq_len=SEQ, batch_size=BATCH, strategy=DoGE())
    with pytest.raises(ValueError, match="DoGE reads the learning rate: attach\\(..., optimizer=...\\)"):
        doge.attach(model)
    odm = Mixer.from_dirs(stores[0], seq_len=SEQ, batch_size=BATCH, strategy=ODM())
    with pytest.raises(ValueError, match="sequence_losses=<\\(n,\\) losses>"):
        odm.observe(odm.next_batch())
    with pytest.raises(ValueError, match=r"strategy.eta = -1: expected a positive number \(anchored rule: log-odds"):
        Mixer.from_dirs(stores[0], target=stores[1], seq_len=SEQ, batch_size=BATCH, strategy=DGA(eta=-1))
    with pytest.raises(TypeError, match="expected a strategy's settings"):
        Mixer.from_dirs(stores[0], seq_len=SEQ, batch_size=BATCH, strategy="dga")


def test_one_loop_takes_batches_from_one_source(stores):
    mixer = Mixer.from_dirs(stores[0], seq_len=SEQ, batch_size=BATCH, max_steps=STEPS)
    loader = iter(mixer.loader(num_workers=2))
    next(loader)  # the workers have planned steps ahead of the one handed out
    with pytest.raises(RuntimeError, match="take batches from one of loader\\(\\) and next_batch\\(\\)"):
        mixer.next_batch()


@pytest.mark.parametrize("workers", [0, 2])
def test_starting_the_loader_leaves_torchs_rng_alone(stores, workers):
    """A resumed loop restores torch's RNG state and then starts the loader: the start must not draw from it, or
    dropout would draw other masks than the straight run."""
    mixer = Mixer.from_dirs(stores[0], seq_len=SEQ, batch_size=BATCH, max_steps=STEPS)
    before = torch.random.get_rng_state()
    next(iter(mixer.loader(num_workers=workers)))
    assert torch.equal(torch.random.get_rng_state(), before)


def test_a_state_resumes_only_the_strategy_and_ranks_it_was_made_for(stores):
    static = Mixer.from_dirs(stores[0], seq_len=SEQ, batch_size=BATCH)
    odm = Mixer.from_dirs(stores[0], seq_len=SEQ, batch_size=BATCH, strategy=ODM())
    with pytest.raises(StateMismatchError, match="made by the ODM strategy; this mixer runs Static"):
        static.load_state_dict(odm.state_dict())
    with pytest.raises(ValueError, match="rank = None, world_size = 2: give both, or neither"):
        Mixer.from_dirs(stores[0], seq_len=SEQ, batch_size=BATCH, world_size=2)
    mixer, model, _ = _build(stores, "dga")
    with pytest.raises(RuntimeError, match="already attached to a model"):
        mixer.attach(model, loss_fn=model.loss)


def test_in_batch_scores_divide_out_a_grad_scaler_and_skip_an_overflowed_backward(stores):
    """fp16 training scales the loss: the scores come out in the loss's own units, and a backward that overflowed
    (the GradScaler skips that optimizer step) is not scored instead of raising."""
    def window_after(scale: float | None):
        mixer, model, _ = _build(stores, "inbatch", dropout=0.0)
        batch = mixer.next_batch()
        scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
        with mixer.training_step():
            loss = model.loss(batch["tokens"])
            (loss if scaler is None else scaler.scale(loss)).backward()
        mixer.observe(batch, grad_scaler=scaler)
        return mixer.strategy

    plain, scaled = window_after(None), window_after(1024.0)
    assert plain.window.sequences == scaled.window.sequences == BATCH
    np.testing.assert_allclose(scaled.window.total, plain.window.total, rtol=1e-5, atol=1e-12)
    overflowed = window_after(1e38)  # the scaled loss is inf in fp32: every gradient overflows
    assert overflowed.overflowed == 1 and overflowed.window.sequences == 0


def test_a_target_tokenized_with_another_tokenizer_is_refused(tmp_path):
    """The Mixer compares the corpus's and the target's tokenizer fingerprints (store.json): the same ids would be
    other text, and alignment with such a target is noise."""
    from dgamix.core.errors import InputError
    from dgamix.formats import token_store

    def store(directory, fingerprint):
        directory.mkdir()
        tokens = np.r_[np.arange(1, 40), 0].astype(np.uint16)
        token_store.write(directory, [(tokens, np.array([40]))], np.array([1]),
                          {"vocab_size": 64, "eos_id": 0, token_store.TOKENIZER_KEY: fingerprint})
        return directory

    corpus = ClusterStore(store(tmp_path / "corpus", "aaaa"))
    Mixer(corpus, Mixture.identity(corpus.available), seq_len=8, batch_size=2, target=store(tmp_path / "same", "aaaa"))
    with pytest.raises(InputError, match="different tokenizers"):
        Mixer(corpus, Mixture.identity(corpus.available), seq_len=8, batch_size=2,
              target=store(tmp_path / "other", "bbbb"))


def test_a_static_blend_puts_its_share_on_one_basis_and_the_rest_uniformly(tmp_path):
    """Static(basis=..., share=lam): lam on the basis, 1 - lam spread uniformly over all the bases, the static
    frontier between importance and uniform sampling."""
    store = ClusterStore(synthetic_store(tmp_path / "tokens", [5, 5, 5, 5]))
    mixture = Mixture.identity(store.available)
    mixer = Mixer(store, mixture, seq_len=8, batch_size=2, strategy=Static(basis="cluster:2", share=0.5))
    np.testing.assert_allclose(mixer.weights, [0.125, 0.125, 0.625, 0.125])
    assert Mixer(store, mixture, seq_len=8, batch_size=2, strategy=Static(basis="cluster:2")).weights[2] == 1.0
    with pytest.raises(ValueError, match="strategy.share = 1.5: expected a share of the weights"):
        Static(basis="cluster:2", share=1.5).validate()
