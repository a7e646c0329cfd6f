"""The stream under DataLoader workers: each sequence once and in straight order (also after a resume), weights that
reach the workers (main-process planning), and exact resume with prefetched steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dgamix.mixer import ClusterStore, Mixture, MixtureStream
from dgamix.mixer.hooks import SequenceDataset
from dgamix.mixer.loader import MixtureLoader

from .mixer_fixtures import synthetic_store


@pytest.fixture
def store_dir(tmp_path):
    return synthetic_store(tmp_path / "tokens", [20, 15, 10, 25])


def _stream(store_dir, batch_size=2, max_steps=None) -> MixtureStream:
    store = ClusterStore(store_dir)
    return MixtureStream(store, Mixture.identity(store.available), seq_len=8, batch_size=batch_size, seed=4,
                         max_steps=max_steps)


def _rows(tokens: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(row) for row in tokens.tolist()]


def test_sequence_dataset_under_workers_yields_each_sequence_once(store_dir):
    """3 steps of batch 2 with 2 workers: the 6 sequences of the in-process stream, once each, in order (every worker
    used to materialize every step: 12 sequences, 6 distinct)."""
    expected = []
    reference = _stream(store_dir)
    for _ in range(3):
        expected += _rows(reference.next_batch()["tokens"])
    loader = DataLoader(SequenceDataset(_stream(store_dir, max_steps=3)), batch_size=2, num_workers=2)
    got = [row for batch in loader for row in _rows(batch["input_ids"])]
    assert got == expected


def test_workers_keep_straight_order_after_a_resume(store_dir):
    """A stream resumed at step 5 into 2 workers yields steps 5, 6, 7, ... (not 6, 5, 8, 7, ...)."""
    stream = _stream(store_dir, max_steps=11)
    for _ in range(5):
        stream.next_batch()
    resumed = _stream(store_dir, max_steps=11)
    resumed.load_state_dict(stream.state_dict())
    steps = [batch["step"] for batch in DataLoader(resumed, batch_size=None, num_workers=2)]
    assert steps == [5, 6, 7, 8, 9, 10]


def _run(store_dir, workers, steps=12, resume_at=None, state=None):
    """A loop whose 'strategy' sets weights from the step number after each step; optionally saves the loader's
    state after step `resume_at` and stops."""
    stream = _stream(store_dir, batch_size=3, max_steps=steps)
    loader = MixtureLoader(stream, num_workers=workers)
    if state is not None:
        loader.load_state_dict(state)
    seen = []
    for batch in loader:
        step = batch["step"]
        seen.append((step, _rows(batch["tokens"]), batch["prob"].tolist()))
        weights = np.full(4, 0.05)
        weights[step % 4] = 0.85
        stream.set_weights(weights)
        if step == resume_at:
            return seen, loader.state_dict()
    return seen, None


@pytest.mark.parametrize("workers", [0, 2])
def test_mixture_loader_resumes_exactly_with_prefetched_steps(store_dir, workers):
    straight, _ = _run(store_dir, workers)
    assert [s for s, _, _ in straight] == list(range(12))
    first, state = _run(store_dir, workers, resume_at=4)
    resumed, _ = _run(store_dir, workers, state=state)
    assert first + resumed == straight


@pytest.mark.parametrize("workers,prefetch", [(0, None), (2, 2), (1, 3)])
def test_a_weight_change_reaches_the_next_planned_step(store_dir, workers, prefetch):
    """Weights changed after step 0 is handed out apply from the first step planned after that: step 1 in-process,
    step workers * prefetch + 1 with workers (the steps planned ahead keep the weights they were planned with)."""
    stream = _stream(store_dir, batch_size=4, max_steps=10)
    extra = {"prefetch_factor": prefetch} if workers else {}
    clusters = []
    for batch in MixtureLoader(stream, num_workers=workers, **extra):
        clusters.append(set(batch["cluster"].tolist()))
        if batch["step"] == 0:
            stream.set_weights([0.0, 0.0, 1.0, 0.0])
    first_new = 1 + workers * (prefetch or 0)
    assert all(c == {2} for c in clusters[first_new:])
    assert any(c != {2} for c in clusters[:first_new])


def test_loader_refuses_planning_further_ahead_than_it_can_save(store_dir):
    with pytest.raises(ValueError, match="plans 17 steps ahead"):
        MixtureLoader(_stream(store_dir), num_workers=8, prefetch_factor=2)


def test_weight_change_under_iterating_workers_names_the_remedy(store_dir):
    stream = _stream(store_dir, max_steps=20)
    loader = DataLoader(SequenceDataset(stream), batch_size=2, num_workers=2)
    with pytest.raises(RuntimeError, match="MixtureLoader"):
        for i, _ in enumerate(loader):
            if i == 1:
                stream.set_weights([0.1, 0.2, 0.3, 0.4])


def test_spawned_workers_read_the_store_by_reference(store_dir):
    """Under spawn (macOS's default; forkserver is Linux's from Python 3.14) the workers unpickle the reader: the
    store travels as its path (not a copy of every token) and the collate function must be picklable."""
    import pickle

    store = ClusterStore(store_dir)
    assert len(pickle.dumps(store)) < 2_000 < store.tokens.nbytes
    expected = [_rows(b["tokens"]) for b in MixtureLoader(_stream(store_dir, max_steps=4))]
    loader = MixtureLoader(_stream(store_dir, max_steps=4), num_workers=2, multiprocessing_context="spawn",
                           transform=_token_rows)
    assert list(loader) == expected


def _token_rows(batch):  # module level: a spawned worker imports it by name
    return _rows(batch["tokens"])
