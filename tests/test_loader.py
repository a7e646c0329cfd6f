"""The stream under DataLoader workers (MixtureLoader): each sequence once and in straight order (also after a resume
and after a break, by the same loader, a new one or next_batch()), weights that reach the workers (main-process
planning), exact resume with prefetched steps, and the tokens' dtype and transport (int64 by default, the store's
dtype on request, by value through the workers' pipes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dgamix.mixer import ClusterStore, Mixture, MixtureStream
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


def test_loader_under_workers_yields_each_sequence_once(store_dir):
    """3 steps of batch 2 with 2 workers: the 6 sequences of the in-process stream, once each, in order (a worker
    iterating its own copy of the stream would materialize every step: 12 sequences, 6 distinct)."""
    expected = []
    reference = _stream(store_dir)
    for _ in range(3):
        expected += _rows(reference.next_batch()["tokens"])
    loader = MixtureLoader(_stream(store_dir, max_steps=3), num_workers=2)
    assert isinstance(loader, DataLoader) and loader.dataloader is loader  # a DataLoader itself
    got = [row for batch in loader for row in _rows(batch["tokens"])]
    assert got == expected


def test_workers_keep_straight_order_after_a_resume(store_dir):
    """A stream resumed at step 5 into 2 workers yields steps 5, 6, 7, ... (not 6, 5, 8, 7, ...)."""
    stream = _stream(store_dir, max_steps=11)
    for _ in range(5):
        stream.next_batch()
    resumed = _stream(store_dir, max_steps=11)
    resumed.load_state_dict(stream.state_dict())
    batches = list(MixtureLoader(resumed, num_workers=2))
    assert [batch["step"] for batch in batches] == [5, 6, 7, 8, 9, 10]
    assert [batch["log"].step for batch in batches] == [5, 6, 7, 8, 9, 10]
    assert [_rows(batch["tokens"]) for batch in batches] == [_rows(stream.next_batch()["tokens"]) for _ in range(6)]


def _run(store_dir, workers, steps=12, resume_at=None, state=None):
    """A loop whose 'strategy' sets weights from the step number after each step; optionally saves the loader's
    state after step `resume_at` and stops."""
    stream = _stream(store_dir, batch_size=3, max_steps=steps)
    loader = MixtureLoader(stream, num_workers=workers)
    if state is not None:
        loader.load_stream_state(state)
    seen = []
    for batch in loader:
        step = batch["step"]
        assert batch["log"].step == step
        seen.append((step, _rows(batch["tokens"]), batch["prob"].tolist(), batch["log"].weights.tolist()))
        weights = np.full(4, 0.05)
        weights[step % 4] = 0.85
        stream.set_weights(weights)
        if step == resume_at:
            return seen, loader.stream_state()
    return seen, None


@pytest.mark.parametrize("workers", [0, 2])
def test_mixture_loader_resumes_exactly_with_prefetched_steps(store_dir, workers):
    straight, _ = _run(store_dir, workers)
    assert [s for s, *_ in straight] == list(range(12))
    first, state = _run(store_dir, workers, resume_at=4)
    resumed, _ = _run(store_dir, workers, state=state)
    assert first + resumed == straight


@pytest.mark.parametrize("workers,prefetch", [(0, None), (2, 2), (1, 3)])
def test_a_weight_change_reaches_the_next_planned_step(store_dir, workers, prefetch):
    """Weights changed after step 0 is handed out apply from the first step planned after that: step 1 in-process,
    step workers * prefetch + 1 with workers (the steps planned ahead keep the weights they were planned with)."""
    stream = _stream(store_dir, batch_size=4, max_steps=10)
    extra = {"prefetch_factor": prefetch} if workers else {}
    clusters, weights = [], []
    for batch in MixtureLoader(stream, num_workers=workers, **extra):
        clusters.append(set(batch["cluster"].tolist()))
        weights.append(batch["log"].weights.tolist())
        if batch["step"] == 0:
            stream.set_weights([0.0, 0.0, 1.0, 0.0])
    first_new = 1 + workers * (prefetch or 0)
    assert all(c == {2} for c in clusters[first_new:])
    assert any(c != {2} for c in clusters[:first_new])
    # each batch's log names the weights it was drawn with
    assert weights == [[0.25] * 4] * first_new + [[0.0, 0.0, 1.0, 0.0]] * (10 - first_new)


def test_loader_refuses_planning_further_ahead_than_it_can_save(store_dir):
    with pytest.raises(ValueError, match="plans 17 steps ahead"):
        MixtureLoader(_stream(store_dir), num_workers=8, prefetch_factor=2)


@pytest.mark.parametrize("key", ["batch_size", "shuffle", "sampler", "batch_sampler", "collate_fn", "drop_last"])
def test_loader_refuses_the_batching_arguments_it_sets_itself(store_dir, key):
    with pytest.raises(ValueError, match=f"MixtureLoader\\(\\.\\.\\., {key}=\\.\\.\\.\\)"):
        MixtureLoader(_stream(store_dir), num_workers=2, **{key: None})


# (with workers, torch's DataLoader iterator fails half-built, after starting them; its __del__ then complains)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_weight_change_under_iterating_workers_names_the_remedy(store_dir):
    """A DataLoader over the stream itself is refused, naming MixtureLoader; under MixtureLoader with 2 workers a
    weight change during iteration reaches the workers (from the first step planned after it)."""
    stream = _stream(store_dir, max_steps=20)
    for batch_size in (None, 2):
        with pytest.raises(TypeError, match="MixtureLoader"):
            for _ in DataLoader(stream, batch_size=batch_size, num_workers=2):
                pass
    with pytest.raises(TypeError, match="MixtureLoader"):
        iter(stream)
    assert stream.step == 0
    new = [0.1, 0.2, 0.3, 0.4]
    drawn_with = []
    for i, batch in enumerate(MixtureLoader(stream, num_workers=2)):
        drawn_with.append(batch["log"].weights.tolist())
        np.testing.assert_allclose(batch["prob"].numpy(),
                                   stream.mixture.cluster_probs(drawn_with[-1])[batch["cluster"].numpy()])
        if i == 1:
            stream.set_weights(new)
    # steps 2..5 were planned (2 workers x prefetch 2) before the change; step 6 on were drawn with it
    assert drawn_with == [[0.25] * 4] * 6 + [new] * 14


def _pass(loader, stop_after=None):
    """Iterate `loader` (optionally breaking after `stop_after` batches), setting weights from each step number as a
    strategy would; each batch's (step, rows, weights drawn with)."""
    seen = []
    for batch in loader:
        step = batch["step"]
        seen.append((step, _rows(batch["tokens"]), batch["log"].weights.tolist()))
        weights = np.full(4, 0.05)
        weights[step % 4] = 0.85
        loader.stream.set_weights(weights)
        if stop_after is not None and len(seen) == stop_after:
            break
    return seen


@pytest.mark.parametrize("workers", [0, 2])
def test_iterating_again_after_a_break_continues_at_the_next_step_not_handed_out(store_dir, workers):
    """A break leaves steps planned (prefetched) but never handed out; the next pass over the same loader starts at
    the first of them, planned again with the weights they had: the two passes are the straight pass."""
    straight = _pass(MixtureLoader(_stream(store_dir, batch_size=3, max_steps=12), num_workers=workers))
    assert [s for s, *_ in straight] == list(range(12))
    loader = MixtureLoader(_stream(store_dir, batch_size=3, max_steps=12), num_workers=workers)
    first = _pass(loader, stop_after=4)
    assert loader.next_step == 4 and loader.stream.step == 4 + 2 * workers  # 2 workers x prefetch 2 planned ahead
    second = _pass(loader)
    assert [s for s, *_ in second] == list(range(4, 12))
    assert second == straight[4:]
    assert first + second == straight
    assert list(loader) == []  # the stream is exhausted: a third pass yields nothing


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("then", ["same loader", "persistent workers", "new loader", "next_batch"])
def test_after_a_break_every_way_on_continues_at_the_next_step_not_handed_out(store_dir, workers, then):
    """Break after k = 3 batches (2 workers x prefetch 2 have planned 4 more), then go on by iterating the loader
    again, a new loader over the same stream (what calling Mixer.loader() again makes), or stream.next_batch():
    each continues at step 3 with the straight run's batches, and the states saved in between resume there."""
    straight = _pass(MixtureLoader(_stream(store_dir, batch_size=3, max_steps=12), num_workers=workers))
    extra = {"persistent_workers": True} if then == "persistent workers" and workers else {}
    stream = _stream(store_dir, batch_size=3, max_steps=12)
    loader = MixtureLoader(stream, num_workers=workers, **extra)
    first = _pass(loader, stop_after=3)
    assert stream.step == 3 + 2 * workers  # planned ahead of the batches handed out
    saved, streams_own = loader.stream_state(), stream.state_dict()
    again_saved = None
    if then == "next_batch":
        second = []
        for _ in range(20):  # a `while True`, bounded: a stream that ran past max_steps fails instead of hanging
            try:
                batch = stream.next_batch()
            except StopIteration:
                break
            second.append((batch["step"], _rows(batch["tokens"]), batch["log"].weights.tolist()))
            weights = np.full(4, 0.05)
            weights[batch["step"] % 4] = 0.85
            stream.set_weights(weights)
    else:
        again = loader if then in ("same loader", "persistent workers") else MixtureLoader(stream, num_workers=workers)
        again_saved = again.stream_state()
        second = _pass(again)
    assert [s for s, *_ in second] == list(range(3, 12))
    assert first + second == straight
    assert saved["step"] == 3 and streams_own == saved and again_saved in (None, saved)


def _tokens_dtype_seen(batch):  # module level, for the workers: what a transform sees, and what it can return
    tokens = batch["tokens"]
    out = {"tokens": tokens, "seen": str(tokens.dtype), "shifted": tokens[:, 1:], "prob": batch["prob"],
           "twice": [tokens, (batch["prob"], tokens)], "half": torch.zeros(2, dtype=torch.bfloat16),
           "step": batch["step"]}
    if tokens.dtype == torch.int64:  # (torch has no arithmetic on uint16)
        out["plus_one"] = tokens + 1
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_tokens_are_int64_by_default_and_the_stores_dtype_on_request(store_dir, workers):
    """By default the tokens handed out are int64 (what an embedding lookup needs), with or without workers, also
    through a transform (which sees int64 tokens); widen=False hands out the store's dtype (uint16 here), the same
    values, for a loop that widens them on the device."""
    expected = [_rows(b["tokens"]) for b in MixtureLoader(_stream(store_dir, max_steps=5))]
    embedding = torch.nn.Embedding(1000, 4)
    for batch in MixtureLoader(_stream(store_dir, max_steps=5), num_workers=workers):
        assert batch["tokens"].dtype == torch.int64 and batch["cluster"].dtype == torch.int64
        assert batch["prob"].dtype == torch.float64 and batch["pass"].dtype == torch.int64
        embedding(batch["tokens"])  # usable as indices as they come
        assert _rows(batch["tokens"]) == expected[batch["step"]]
    narrow = list(MixtureLoader(_stream(store_dir, max_steps=5), num_workers=workers, widen=False))
    assert [b["tokens"].dtype for b in narrow] == [torch.uint16] * 5
    assert [_rows(b["tokens"].long()) for b in narrow] == expected
    for widen, dtype in ((True, torch.int64), (False, torch.uint16)):
        loader = MixtureLoader(_stream(store_dir, max_steps=5), num_workers=workers, widen=widen,
                               transform=_tokens_dtype_seen)
        for batch in loader:
            assert batch["seen"] == str(dtype)
            assert batch["tokens"].dtype == dtype and _rows(batch["tokens"].long()) == expected[batch["step"]]
            # a tensor held twice arrives as one tensor; a view of the tokens keeps its dtype and values
            assert batch["twice"][0] is batch["tokens"] and batch["twice"][1][1] is batch["tokens"]
            assert batch["twice"][1][0] is batch["prob"] and batch["half"].dtype == torch.bfloat16
            assert batch["shifted"].dtype == dtype and torch.equal(batch["shifted"], batch["tokens"][:, 1:])
            if widen:
                assert torch.equal(batch["plus_one"], batch["tokens"] + 1)
    with pytest.raises(ValueError, match="widen = 'no'"):
        MixtureLoader(_stream(store_dir), widen="no")


def test_workers_send_batches_by_value_not_as_shared_memory_tensors(store_dir):
    """torch sends each tensor a worker returns as a shared-memory file, one round trip to the worker per tensor,
    which cost more than reading the batch: the loader's own workers send the batch by value through their pipe
    (the tokens in the store's dtype), and it arrives as ordinary, writable tensors."""
    for batch in MixtureLoader(_stream(store_dir, max_steps=4), num_workers=2):
        for key in ("tokens", "cluster", "pass", "prob"):
            assert not batch[key].is_shared(), key
        batch["tokens"][0, 0] = 7  # writable (torch.from_numpy of a read-only array would warn)


def test_a_rebuilt_dataloader_still_gets_int64_tokens(store_dir):
    """Trainers that rebuild the DataLoader from its parts (accelerate: dataset, batch_sampler, collate_fn) iterate
    without MixtureLoader's own iterator: the collate function they copy widens the tokens in the worker."""
    loader = MixtureLoader(_stream(store_dir, max_steps=4), num_workers=2)
    expected = [_rows(b["tokens"]) for b in MixtureLoader(_stream(store_dir, max_steps=4))]
    rebuilt = DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn,
                         num_workers=2)
    batches = list(rebuilt)
    assert [b["tokens"].dtype for b in batches] == [torch.int64] * 4
    assert [_rows(b["tokens"]) for b in batches] == expected


@pytest.mark.skipif(not torch.accelerator.is_available(), reason="pinned memory needs an accelerator")
@pytest.mark.parametrize("widen,dtype", [(True, torch.int64), (False, torch.uint16)])
def test_pin_memory_hands_out_pinned_tokens(store_dir, widen, dtype):
    for batch in MixtureLoader(_stream(store_dir, max_steps=3), num_workers=2, pin_memory=True, widen=widen):
        assert batch["tokens"].is_pinned() and batch["tokens"].dtype == dtype and batch["prob"].is_pinned()
        device = torch.accelerator.current_accelerator()
        assert batch["tokens"].to(device, non_blocking=True).long().dtype == torch.int64


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
