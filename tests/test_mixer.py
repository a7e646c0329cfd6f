"""ClusterStore, Mixture and MixtureStream: statistics, caps, resume, ranks x workers, bad input."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import chisquare
from torch.utils.data import DataLoader

from dgamix.mixer import ClusterStore, Mixture, MixtureLoader, MixtureStream, StateMismatchError, StepLog

from .mixer_fixtures import synthetic_store

DOCS = [30, 20, 0, 25, 15, 40]  # cluster 2 is empty


@pytest.fixture
def store(tmp_path) -> ClusterStore:
    return ClusterStore(synthetic_store(tmp_path / "tokens", DOCS), seed=3)


def two_bases(available: np.ndarray) -> Mixture:
    k = len(available)
    first = np.zeros(k)
    first[[0, 1]] = [0.75, 0.25]
    second = available / available.sum()
    return Mixture(np.stack([first, second]), ["first", "spread"])


def cluster_of(tokens: np.ndarray) -> set[int]:
    return set(((tokens[tokens != 0] - 1) // 10).tolist())


def test_store_epoch_is_a_permutation_of_the_cluster(store):
    for cluster in (0, 3):
        per_epoch = int(store.cluster_tokens[cluster])
        first = store.read(cluster, 0, per_epoch)
        second = store.read(cluster, per_epoch, per_epoch)
        raw = store.tokens[store.doc_offsets[store.cluster_offsets[cluster]]:
                           store.doc_offsets[store.cluster_offsets[cluster + 1]]]
        assert sorted(first.tolist()) == sorted(raw.tolist()) == sorted(second.tolist())
        assert not np.array_equal(first, second)  # reshuffled each epoch
        assert cluster_of(first) == {cluster}
        # reading in pieces gives the same stream as one read
        pieces = np.concatenate([store.read(cluster, p, 37) for p in range(0, 2 * per_epoch, 37)])
        np.testing.assert_array_equal(pieces[: 2 * per_epoch], np.r_[first, second])


def test_token_cap_limits_and_repeats(tmp_path):
    capped = ClusterStore(synthetic_store(tmp_path / "t", DOCS), token_cap=100, seed=1)
    assert (capped.cluster_tokens[capped.available] == 100).all()
    full = ClusterStore(tmp_path / "t")
    head = full.tokens[full.doc_offsets[full.cluster_offsets[4]]:][:100].copy()
    head[-1] = 0  # the cap cut a document there, and a cut document still ends with EOS
    epoch1, epoch2 = capped.read(4, 0, 100), capped.read(4, 100, 100)
    assert sorted(epoch1.tolist()) == sorted(head.tolist()) == sorted(epoch2.tolist())
    # 30 sequences of 10 tokens from cluster 4 alone: its 100-token pass repeats every 10 sequences, and each
    # batch says which pass a sequence's last token comes from.
    stream = MixtureStream(capped, Mixture.identity(capped.available).select(["cluster:4"]), seq_len=9, batch_size=5)
    batches = [stream.next_batch() for _ in range(6)]
    passes = np.concatenate([batch["pass"].numpy() for batch in batches])
    assert passes.tolist() == [(10 * i + 9) // 100 + 1 for i in range(30)]
    # each batch's log says what its step drew: 50 tokens of cluster 4, repeated from the 3rd batch on (sequence
    # 10 onwards ends in the 2nd pass), with the cluster's 1st pass finished once 100 tokens are taken (2nd batch)
    for step, batch in enumerate(batches):
        log = batch["log"]
        assert isinstance(log, StepLog) and log.step == batch["step"] == step
        assert log.weights.tolist() == [1.0] and log.clusters.tolist() == [4] * 5
        assert log.tokens_per_cluster == {4: 50}
        assert log.repeated_clusters == ([4] if step >= 2 else [])
        assert log.clusters_repeating == (1 if step >= 1 else 0)
    with pytest.raises(ValueError, match="token_cap = 0: expected a positive number"):
        ClusterStore(tmp_path / "t", token_cap=0)


def test_cap_cut_document_still_ends_with_eos_and_caps_at_the_edges(tmp_path):
    directory = synthetic_store(tmp_path / "t", DOCS)
    full = ClusterStore(directory)
    first_doc = int(full.doc_offsets[1] - full.doc_offsets[0])
    total = int(full.cluster_tokens[0])
    for cap in (first_doc - 1, first_doc, first_doc + 1, total, total + 1000):
        capped = ClusterStore(directory, token_cap=cap, seed=2)
        per_pass = int(capped.cluster_tokens[0])
        assert per_pass == min(cap, total)
        tokens = capped.read(0, 0, 3 * per_pass)
        # every document, including the one the cap cut, ends with EOS: 1 EOS per document per pass
        docs = int(np.searchsorted(np.cumsum(np.diff(full.doc_offsets[:31])), per_pass, side="left")) + 1
        assert (tokens == 0).sum() == 3 * docs, cap
        assert tokens[per_pass - 1] == 0 or cap >= total


def test_stream_follows_p_before_and_after_a_weight_change(store):
    mixture = two_bases(store.available)
    stream = MixtureStream(store, mixture, seq_len=8, batch_size=50, seed=11)
    np.testing.assert_array_equal(stream.weights, [0.5, 0.5])  # uniform unless given
    p_before = mixture.cluster_probs(stream.weights)
    counts = np.zeros(6)
    for _ in range(100):
        np.add.at(counts, stream.next_batch()["cluster"].numpy(), 1)
    avail = store.available
    assert counts[~avail].sum() == 0
    assert chisquare(counts[avail], p_before[avail] * counts.sum()).pvalue > 1e-3
    stream.set_weights([0.1, 0.9])
    p_after = mixture.cluster_probs([0.1, 0.9])
    counts_after = np.zeros(6)
    for _ in range(100):
        np.add.at(counts_after, stream.next_batch()["cluster"].numpy(), 1)
    assert chisquare(counts_after[avail], p_after[avail] * counts_after.sum()).pvalue > 1e-3
    # the test has power: the old distribution is firmly rejected for the new counts
    assert chisquare(counts_after[avail], p_before[avail] * counts_after.sum()).pvalue < 1e-6


def test_sequences_are_packed_within_their_cluster(store):
    stream = MixtureStream(store, two_bases(store.available), seq_len=64, batch_size=16, seed=0)
    batch = stream.next_batch()
    assert batch["tokens"].shape == (16, 65)
    for tokens, cluster in zip(batch["tokens"].numpy(), batch["cluster"].numpy()):
        assert cluster_of(tokens) == {cluster}


def digest(batch) -> str:
    return hashlib.sha1(batch["tokens"].numpy().tobytes()).hexdigest()


def run_steps(stream, steps, changes):
    out = []
    while stream.step < steps:
        if stream.step in changes:
            stream.set_weights(changes[stream.step])
        out.append(digest(stream.next_batch()))
    return out


def test_resume_is_exact_after_weight_changes_and_two_resumes(store):
    changes = {5: [0.9, 0.1], 12: [0.2, 0.8], 21: [0.5, 0.5]}
    make = lambda: MixtureStream(store, two_bases(store.available), seq_len=32, batch_size=8, seed=5)  # noqa: E731
    straight = run_steps(make(), 30, changes)
    first = make()
    resumed = run_steps(first, 8, changes)
    second = make()
    second.load_state_dict(first.state_dict())
    resumed += run_steps(second, 17, changes)
    probe = digest(second.sample_basis(0, 4))  # alignment draws between checkpoints must not disturb the stream
    third = make()
    third.load_state_dict(second.state_dict())
    resumed += run_steps(third, 30, changes)
    assert resumed == straight
    # and the auxiliary sampler resumes too: the draw after the resume is the draw after `probe` in one run
    again = make()
    again.load_state_dict(first.state_dict())
    run_steps(again, 17, changes)
    assert digest(again.sample_basis(0, 4)) == probe
    assert digest(again.sample_basis(0, 4)) == digest(third.sample_basis(0, 4))


def test_sample_basis_leaves_the_training_stream_alone(store):
    make = lambda: MixtureStream(store, two_bases(store.available), seq_len=16, batch_size=4, seed=2)  # noqa: E731
    plain, probed = make(), make()
    a = [digest(plain.next_batch()) for _ in range(10)]
    b = []
    for _ in range(10):
        fresh = probed.sample_basis(0, 6)
        assert set(fresh["cluster"].tolist()) <= {0, 1}
        b.append(digest(probed.next_batch()))
    assert a == b


def test_resuming_on_other_data_is_an_error(store, tmp_path):
    stream = MixtureStream(store, two_bases(store.available), seq_len=16, batch_size=4)
    stream.next_batch()
    other_store = ClusterStore(synthetic_store(tmp_path / "other", DOCS, seed=99), seed=3)
    other = MixtureStream(other_store, two_bases(other_store.available), seq_len=16, batch_size=4)
    with pytest.raises(StateMismatchError, match="store: saved"):
        other.load_state_dict(stream.state_dict())
    longer = MixtureStream(store, two_bases(store.available), seq_len=32, batch_size=4)
    with pytest.raises(StateMismatchError, match="seq_len: saved 16, now 32"):
        longer.load_state_dict(stream.state_dict())


def test_workers_and_ranks_partition_the_single_process_stream(store):
    """2 ranks x 2 DataLoader workers: no sequence twice, and the union is the one-process stream."""
    steps = 12
    single = MixtureStream(store, two_bases(store.available), seq_len=16, batch_size=12, seed=4)
    expected = [single.next_batch()["tokens"].numpy() for _ in range(steps)]
    got = {}
    for rank in range(2):
        stream = MixtureStream(store, two_bases(store.available), seq_len=16, batch_size=6, seed=4, rank=rank,
                               world_size=2, max_steps=steps)
        for batch in MixtureLoader(stream, num_workers=2):
            got[(batch["step"], rank)] = batch["tokens"].numpy()
    assert sorted(got) == [(s, r) for s in range(steps) for r in range(2)]
    for step in range(steps):
        np.testing.assert_array_equal(np.concatenate([got[(step, 0)], got[(step, 1)]]), expected[step])


@pytest.mark.parametrize("weights, message", [
    ([0.5, -0.1], "non-negative"), ([0.3, 0.3, 0.4], r"expected \(2,\)"), ([np.nan, 1.0], "NaN"),
    ([0.0, 0.0], "sum to 0"),
])
def test_bad_weights_are_clear_errors(store, weights, message):
    stream = MixtureStream(store, two_bases(store.available), seq_len=8, batch_size=2)
    with pytest.raises(ValueError, match=message):
        stream.set_weights(weights)


def test_bases_that_do_not_match_the_store_are_errors(store):
    with pytest.raises(ValueError, match="bases have 4 clusters but the store has 6"):
        MixtureStream(store, Mixture(np.eye(4)), 8, 2)
    onto_empty = np.zeros((1, 6))
    onto_empty[0, 2] = 1.0
    with pytest.raises(ValueError, match="puts mass 1 on clusters with no tokens"):
        MixtureStream(store, Mixture(onto_empty), 8, 2)
    with pytest.raises(ValueError, match="sums to 0.5"):
        Mixture(sp.csr_matrix(np.full((1, 6), 0.5 / 6)))


def test_identity_mixture_is_domain_reweighting(store):
    mixture = Mixture.identity(store.available)
    assert mixture.n_bases == 5 and mixture.names[2] == "cluster:3"
    weights = np.arange(1, 6, dtype=float)
    probs = mixture.cluster_probs(weights)
    np.testing.assert_allclose(probs[store.available], weights / weights.sum())
    assert (probs[~store.available] == 0).all()
    # a stream given these weights draws from exactly these cluster probabilities
    stream = MixtureStream(store, mixture, seq_len=8, batch_size=4, weights=weights)
    np.testing.assert_allclose(stream.weights, weights / weights.sum())
    batch = stream.next_batch()
    np.testing.assert_allclose(batch["prob"].numpy(), probs[batch["cluster"].numpy()])


# (with workers, torch's DataLoader iterator fails half-built, after starting them; its __del__ then complains)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("workers", [0, 1])
def test_the_stream_is_not_a_dataset_and_names_the_loader(store, workers):
    """Workers iterating copies of the stream could never see a weight change: iterating the stream, or giving it
    to a DataLoader as its dataset, is refused with the remedy (MixtureLoader) instead."""
    stream = MixtureStream(store, two_bases(store.available), seq_len=8, batch_size=2, max_steps=200)
    assert not isinstance(stream, torch.utils.data.Dataset)
    with pytest.raises(TypeError, match="MixtureLoader"):
        iter(stream)
    with pytest.raises(TypeError, match="MixtureLoader"):
        len(stream)
    for batch_size in (None, 2):
        with pytest.raises(TypeError, match="MixtureLoader"):
            next(iter(DataLoader(stream, batch_size=batch_size, num_workers=workers)))
    assert stream.step == 0  # nothing was planned


def test_weights_changed_under_workers_reach_them(store):
    """Weights set while 2 DataLoader workers read the batches reach the steps planned after the change (steps
    1 + 2 workers x prefetch 2 onwards: the 4 planned ahead keep theirs), and each batch's log and probabilities say
    which weights it was drawn with."""
    mixture = two_bases(store.available)
    stream = MixtureStream(store, mixture, seq_len=8, batch_size=8, max_steps=30)
    logs = []
    for batch in MixtureLoader(stream, num_workers=2):
        log = batch["log"]
        assert log.step == batch["step"] == len(logs)
        np.testing.assert_array_equal(log.clusters, batch["cluster"].numpy())
        np.testing.assert_allclose(batch["prob"].numpy(), mixture.cluster_probs(log.weights)[log.clusters])
        logs.append((log.weights.tolist(), set(log.clusters.tolist())))
        if batch["step"] == 0:
            stream.set_weights([1.0, 0.0])  # all on clusters 0 and 1
    assert [w for w, _ in logs] == [[0.5, 0.5]] * 5 + [[1.0, 0.0]] * 25
    assert all(c <= {0, 1} for _, c in logs[5:])
    assert any(not c <= {0, 1} for _, c in logs[:5])
    assert stream.step == 30 and stream.weights.tolist() == [1.0, 0.0]


def test_basis_matrix_with_nan_is_rejected():
    with pytest.raises(ValueError, match="NaN or inf"):
        Mixture(np.array([[np.nan, 1.0], [0.5, 0.5]]))


def test_stream_draws_from_its_own_weights_not_a_shared_mixture(store):
    mixture = two_bases(store.available)
    assert not hasattr(mixture, "weights") and not hasattr(mixture, "set_weights")  # the stream owns them
    with pytest.raises(TypeError):
        mixture.cluster_probs()  # p = alpha^T P needs the weights alpha
    given = np.array([0.5, 0.5])
    stream = MixtureStream(store, mixture, seq_len=8, batch_size=4, weights=given)
    other = MixtureStream(store, mixture, seq_len=8, batch_size=4)
    # a change behind the stream's back (another stream on the same mixture, the array it was given, the copy it
    # hands out) changes neither its draws nor its state
    other.set_weights([0.0, 1.0])
    given[:] = [1.0, 0.0]
    stream.weights[:] = [1.0, 0.0]
    np.testing.assert_array_equal(stream.weights, [0.5, 0.5])
    assert stream.state_dict()["weights"] == [0.5, 0.5]
    batch = stream.next_batch()
    assert batch["log"].weights.tolist() == [0.5, 0.5]
    fresh = MixtureStream(store, two_bases(store.available), seq_len=8, batch_size=4)
    assert digest(batch) == digest(fresh.next_batch())


def test_step_and_cursors_are_the_planners_and_read_only(store):
    stream = MixtureStream(store, two_bases(store.available), seq_len=8, batch_size=4)
    stream.next_batch()
    assert stream.step == stream.planner.step == 1
    np.testing.assert_array_equal(stream.cursors, stream.planner.cursors)
    assert stream.cursors.sum() == 4 * 9
    with pytest.raises(AttributeError):
        stream.step = 0
    with pytest.raises(AttributeError):
        stream.cursors = np.zeros(6, dtype=np.int64)
    assert stream.step == 1 and stream.cursors.sum() == 4 * 9


def test_saved_weights_are_restored_bit_for_bit(store):
    stream = MixtureStream(store, two_bases(store.available), seq_len=8, batch_size=4)
    stream.set_weights([0.1 + 1e-17, 0.3])
    state = stream.state_dict()
    other = MixtureStream(store, two_bases(store.available), seq_len=8, batch_size=4)
    other.load_state_dict(state)
    assert other.weights.tobytes() == stream.weights.tobytes()


def _only_plain_or_tensors(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _only_plain_or_tensors(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_only_plain_or_tensors(v) for v in value)
    return type(value) in (int, float, str, bool, type(None)) or isinstance(value, torch.Tensor)


def _as_tensors(state: dict) -> dict:
    """The state as a checkpoint that stored its vectors as tensors (float64 weights, int64 positions)."""
    return {**state, "weights": torch.tensor(state["weights"], dtype=torch.float64),
            "cursors": torch.tensor(state["cursors"], dtype=torch.int64),
            "aux_cursors": torch.tensor(state["aux_cursors"], dtype=torch.int64),
            "replay": [torch.tensor(w, dtype=torch.float64) for w in state["replay"]]}


@pytest.mark.parametrize("form", ["plain", "tensors"])
def test_state_loads_with_torch_load_defaults_and_resumes_exactly(store, tmp_path, form):
    """torch >= 2.6 loads with weights_only=True by default, which refuses numpy arrays and scalars: the state is
    plain Python, and a resume from the file (two steps prefetched, a numpy seed) is the straight run."""
    weights = [1 / 3, 2 / 3]  # no short binary form: a lossy round trip would show
    changes = {5: weights, 12: [0.2, 0.8]}
    make = lambda: MixtureStream(store, two_bases(store.available), seq_len=16, batch_size=4,  # noqa: E731
                                 seed=np.int64(7))
    straight = run_steps(make(), 20, changes)
    first = make()
    run_steps(first, 10, changes)
    first.sample_basis(1, 3)
    state = first.state_dict(next_step=8)  # steps 8 and 9 planned (a prefetching loader), not trained
    assert _only_plain_or_tensors(state), state
    torch.save(state if form == "plain" else _as_tensors(state), tmp_path / "stream.pt")
    loaded = torch.load(tmp_path / "stream.pt")  # torch's defaults
    second = make()
    second.load_state_dict(loaded)
    assert second.step == 8 and second.weights.tobytes() == np.array(weights).tobytes()
    assert run_steps(second, 20, changes) == straight[8:]
    assert digest(second.sample_basis(0, 4)) == digest(first.sample_basis(0, 4))  # the auxiliary sampler too


def test_state_of_a_stream_read_by_workers_is_the_main_process_position(store):
    """Workers only read: the stream the trainer holds planned every step, so its state is the one to save (the
    in-process stream's after the same steps)."""
    make = lambda: MixtureStream(store, two_bases(store.available), seq_len=8, batch_size=2)  # noqa: E731
    stream = make()
    stream.max_steps = 3
    loader = MixtureLoader(stream, num_workers=1)
    got = [digest(batch) for batch in loader]
    in_process = make()
    assert got == [digest(in_process.next_batch()) for _ in range(3)]
    assert stream.step == 3
    assert stream.state_dict() == loader.stream_state() == in_process.state_dict()


def test_version_2_states_still_load_and_older_ones_are_refused(store):
    """Version 2 also saved a DataLoader worker's phase ("worker_origin"), which nothing reads any more."""
    make = lambda: MixtureStream(store, two_bases(store.available), seq_len=8, batch_size=4)  # noqa: E731
    changes = {2: [0.9, 0.1]}
    straight = run_steps(make(), 8, changes)
    first = make()
    run_steps(first, 5, changes)
    state = first.state_dict(next_step=3)
    assert state["version"] == 3 and "worker_origin" not in state
    old = make()
    old.load_state_dict({**state, "version": 2, "worker_origin": None})
    assert old.step == 3 and run_steps(old, 8, changes) == straight[3:]
    with pytest.raises(StateMismatchError, match="stream state version 1"):
        make().load_state_dict({**state, "version": 1})


def test_fresh_basis_batches_are_not_the_training_stream(store):
    stream = MixtureStream(store, two_bases(store.available), seq_len=16, batch_size=8, seed=0)
    fresh = stream.sample_basis(0, 8)["tokens"]
    stream.set_weights([1.0, 0.0])
    train = stream.next_batch()["tokens"]
    assert not {r.tobytes() for r in fresh.numpy()} & {r.tobytes() for r in train.numpy()}


def test_next_batch_stops_at_max_steps_as_iteration_does(store):
    """A stream with max_steps ends there for next_batch() too: past it, StreamExhausted (a StopIteration, what
    next() raises at the end of any iterator) with the bound in its message, the stream left where it was; a loop
    over next_batch() ends instead of drawing past the run's last step, after the batches a loader yields."""
    def stream() -> MixtureStream:
        return MixtureStream(store, Mixture.identity(store.available), seq_len=8, batch_size=2, seed=1, max_steps=3)

    looped, drawing = [], stream()
    for _ in range(10):  # a `while True` loop, bounded so that a stream that never ends fails instead of hanging
        try:
            looped.append(drawing.next_batch())
        except StopIteration:
            break
    iterated = list(MixtureLoader(stream()))
    assert [b["step"] for b in looped] == [b["step"] for b in iterated] == [0, 1, 2]
    assert [b["tokens"].tolist() for b in looped] == [b["tokens"].tolist() for b in iterated]
    from dgamix.mixer.stream import StreamExhausted

    with pytest.raises(StreamExhausted, match="max_steps = 3"):
        drawing.next_batch()
    assert drawing.step == 3 and drawing.state_dict()["step"] == 3
    assert issubclass(StreamExhausted, StopIteration)
