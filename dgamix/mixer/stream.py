"""MixtureStream: fixed-length token sequences drawn from a mixture over clusters, exactly resumable.

Step t's global batch (batch_size x world_size sequences) is planned from a generator seeded by (seed, t) and the
weights in force at step t: each sequence picks a cluster from p = alpha^T P and takes the next seq_len + 1 tokens of
that cluster's stream (packed within the cluster: documents back to back, EOS between them). Planning is cheap and
identical everywhere, so every rank and DataLoader worker replays the same global plan and materializes only its
own slice: no sequence is produced twice, and the union over ranks is the single-process stream.

`set_weights()` takes effect from the next batch this object plans. The state (`state_dict()`) is the step, the
per-cluster stream positions, the weights, and the auxiliary samplers' positions; it carries fingerprints of the
store and the bases, and loading it onto different data is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .distributed import shard_bounds
from .mixture import Mixture, check_weights
from .state import array, plain
from .store import ClusterStore

STATE_VERSION = 2
SNAPSHOTS_KEPT = 16  # planned-but-untrained steps a trainer's data prefetching may hold (Lightning, accelerate: 1-2)


class StateMismatchError(ValueError):
    """A saved stream state does not belong to this store, these bases, or this configuration."""


@dataclass(frozen=True)
class PlannedStep:
    """This rank's slice of one step, as planned: a few numbers per sequence (what a DataLoader worker receives)."""
    step: int
    clusters: np.ndarray  # int64, the cluster of each sequence
    positions: np.ndarray  # int64, where each sequence starts in its cluster's stream
    probs: np.ndarray  # float64, each sequence's probability p(c) under the weights it was planned with


@dataclass
class StepLog:
    step: int
    weights: np.ndarray
    clusters: np.ndarray  # this rank's sequences' clusters
    tokens_per_cluster: dict[int, int] = field(default_factory=dict)
    repeated_clusters: list[int] = field(default_factory=list)  # clusters of this batch that are past their 1st pass
    clusters_repeating: int = 0  # clusters whose first pass the stream has finished, so far


def _cdf(p: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    return cdf


class MixtureStream(IterableDataset):
    def __init__(self, store: ClusterStore, mixture: Mixture, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, max_steps: int | None = None):
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} = {value!r}: expected a positive integer")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank = {rank}: expected 0 <= rank < world_size ({world_size})")
        mixture.check_store(store.available)
        self.store, self.mixture = store, mixture
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.max_steps = rank, world_size, max_steps
        self.step = 0
        self.cursors = np.zeros(store.n_clusters, dtype=np.int64)
        self.aux_cursors = np.zeros(store.n_clusters, dtype=np.int64)
        self.aux_draws = 0
        # The stream keeps its own copy of the weights: what it draws from is exactly what it saves.
        self._weights = mixture.weights.copy()
        self._probs = mixture.cluster_probs(self._weights)  # p over clusters, kept for each batch's "prob"
        self._cdf = _cdf(self._probs)
        self.last_log: StepLog | None = None
        # Trainers prefetch: by the time step t is trained the stream may already have planned t + 1. To save the
        # state "after step t was trained" exactly, keep for each recent step the cursors before it was planned
        # and the weights it was planned with (see state_dict(next_step=...)).
        self._snapshots: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._replay: list[np.ndarray] = []  # weights of steps planned before a resume point, to re-plan them
        # Counts set_weights() calls across processes: DataLoader workers iterate copies of this object, so a
        # change made in the trainer cannot reach them; they check this counter and fail loudly instead of
        # silently drawing from stale weights.
        self._weights_version = torch.zeros(1, dtype=torch.int64).share_memory_()
        # Set by DataLoader workers: the trainer's copy of the stream then holds no position worth saving.
        self._iterated_in_workers = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._worker_origin: int | None = None  # set in a DataLoader worker: the step its round-robin counts from

    # ---- weights -------------------------------------------------------------------------------------------
    @property
    def weights(self) -> np.ndarray:
        return self._weights.copy()

    def set_weights(self, weights: np.ndarray | list[float]) -> None:
        """New weights over the bases; they take effect from the next batch."""
        self._set_weights_exactly(check_weights(weights, self.mixture.n_bases))

    def _set_weights_exactly(self, weights: np.ndarray) -> None:
        self._weights = np.array(weights, dtype=np.float64)
        self._probs = self.mixture.cluster_probs(self._weights)
        self._cdf = _cdf(self._probs)
        self._weights_version += 1

    # ---- planning (cheap, identical on every rank and worker) -----------------------------------------------
    @property
    def sequence_tokens(self) -> int:
        return self.seq_len + 1  # inputs and shifted targets

    def _plan(self, step: int, cursors: np.ndarray, cdf: np.ndarray, n: int, salt: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Clusters and stream positions of step's n sequences; advances `cursors` in place."""
        rng = np.random.default_rng((self.seed, salt, step))
        clusters = np.searchsorted(cdf, rng.random(n), side="right").astype(np.int64)
        clusters = np.minimum(clusters, len(cdf) - 1)
        # The i-th draw of cluster c in this batch starts after the earlier draws of c in the same batch.
        order = np.argsort(clusters, kind="stable")
        sorted_clusters = clusters[order]
        first = np.r_[0, np.flatnonzero(np.diff(sorted_clusters)) + 1]
        rank_in_cluster = np.arange(n) - np.repeat(first, np.diff(np.r_[first, n]))
        positions = np.empty(n, dtype=np.int64)
        positions[order] = cursors[sorted_clusters] + rank_in_cluster * self.sequence_tokens
        np.add.at(cursors, clusters, self.sequence_tokens)
        return clusters, positions

    def _materialize(self, clusters: np.ndarray, positions: np.ndarray, stream: int = 0) -> torch.Tensor:
        out = np.empty((len(clusters), self.sequence_tokens), dtype=self.store.dtype)
        for i, (c, pos) in enumerate(zip(clusters.tolist(), positions.tolist())):
            self.store.read(c, pos, self.sequence_tokens, out[i], stream=stream)
        return torch.from_numpy(out.astype(np.int64))

    def _plan_next(self) -> tuple[np.ndarray, np.ndarray]:
        """Plan step `self.step` with the weights in force (or those it was first planned with, after a resume)."""
        weights, cdf = self._weights, self._cdf
        if self._replay:
            weights = self._replay.pop(0)
            cdf = _cdf(self.mixture.cluster_probs(weights))
        self._snapshots[self.step] = (self.cursors.copy(), weights)
        self._snapshots.pop(self.step - SNAPSHOTS_KEPT, None)
        return self._plan(self.step, self.cursors, cdf, self.batch_size * self.world_size)

    def plan_step(self) -> PlannedStep:
        """Plan step `self.step` (this rank's slice) with the weights in force and advance: the cheap, stateful half
        of a batch, done by the process that owns the weights (`loader.StepPlanner`)."""
        clusters, positions = self._plan_next()
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        planned_with = self._snapshots[self.step][1]
        # Each sequence's probability of being drawn (p = alpha^T P at its cluster, under the weights it was planned
        # with): what importance-weighted estimates over the bases need (alignment_stats). Computed once per weight
        # change, not per batch: only a replayed step's older weights need their own.
        p = self._probs if planned_with is self._weights else self.mixture.cluster_probs(planned_with)
        planned = PlannedStep(self.step, clusters[mine], positions[mine], p[clusters[mine]])
        self.step += 1
        return planned

    def read(self, planned: PlannedStep) -> dict[str, Any]:
        """The tokens of a planned step: reads the memory-mapped store and nothing else, so any DataLoader worker can
        do it with its copy of the stream (`loader.TokenReader`)."""
        tokens = self._materialize(planned.clusters, planned.positions)
        per_epoch = self.store.cluster_tokens[planned.clusters]
        passes = (planned.positions + self.sequence_tokens - 1) // per_epoch + 1  # pass reached by the sequence's end
        return {"tokens": tokens, "cluster": torch.from_numpy(planned.clusters), "pass": torch.from_numpy(passes),
                "prob": torch.from_numpy(planned.probs), "step": planned.step}

    def next_batch(self) -> dict[str, Any]:
        """Plan step `self.step` and return this rank's slice of it."""
        planned = self.plan_step()
        batch = self.read(planned)
        clusters, passes = planned.clusters, batch["pass"].numpy()
        unique, counts = np.unique(clusters, return_counts=True)
        self.last_log = StepLog(planned.step, self._snapshots[planned.step][1].copy(), clusters,
                                dict(zip(unique.tolist(), (counts * self.sequence_tokens).tolist())),
                                sorted(set(clusters[passes > 1].tolist())),
                                int((self.passes_completed() > 0).sum()))
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for step in self._steps_of_this_worker():
            yield self.next_batch()

    def _steps_of_this_worker(self) -> Iterator[int]:
        """Advance through the steps; yield those this DataLoader worker materializes (all of them in-process).

        Worker w of W takes the steps origin + w, origin + w + W, ..., where origin is the step the workers started
        from (not 0): the DataLoader collects batches from its workers in turn, so a stream resumed at any step
        still comes out in straight order. The origin is part of a worker's saved state, so a StatefulDataLoader
        that restores each worker's state keeps every worker's phase. The other steps are planned and skipped, to
        keep the cursors in step."""
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        version = int(self._weights_version)
        if info is not None:
            self._iterated_in_workers.fill_(1)
            if self._worker_origin is None:
                self._worker_origin = self.step
        start = self.step if info is None else self._worker_origin
        while self.max_steps is None or self.step < self.max_steps:
            if info is not None and int(self._weights_version) != version:
                raise RuntimeError(
                    "MixtureStream.set_weights() was called while DataLoader workers iterate copies of the stream; "
                    "they cannot see the change. Plan batches in the process that owns the weights: "
                    "dgamix.mixer.loader.MixtureLoader(stream, num_workers=...) (any number of workers).")
            if (self.step - start) % workers == worker:
                yield self.step
            else:  # another worker materializes this step; keep the cursors in step with it
                self._plan_next()
                self.step += 1

    # ---- fresh batches for alignment (their own sampler state: the training stream is untouched) ----------
    def sample_basis(self, basis: int, n: int, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """n fresh sequences from basis `basis` alone. With `world_size` > 1, the whole draw of n is planned (the
        auxiliary cursors advance the same on every rank, as for n) and only rank's contiguous share of it is read
        (`shard_bounds`: sizes differ by at most one); the shares of all ranks, in rank order, are the n sequences."""
        if not 0 <= basis < self.mixture.n_bases:
            raise ValueError(f"basis = {basis}: expected 0 <= basis < {self.mixture.n_bases}")
        row = self.mixture.bases.getrow(basis).toarray().ravel()
        clusters, positions = self._plan(self.aux_draws, self.aux_cursors, _cdf(row), n, salt=1 + basis)
        self.aux_draws += 1
        start, stop = shard_bounds(n, rank, world_size)
        clusters, positions = clusters[start:stop], positions[start:stop]
        # stream=1: the auxiliary sampler walks its own document orders, not the ones training is about to read.
        return {"tokens": self._materialize(clusters, positions, stream=1), "cluster": torch.from_numpy(clusters)}

    def passes_completed(self) -> np.ndarray:
        """Per cluster, how many full passes the training stream has made (>= 1: its data is being repeated)."""
        tokens = self.store.cluster_tokens
        return np.where(tokens > 0, self.cursors // np.maximum(tokens, 1), 0)

    # ---- state ---------------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        return {"store": self.store.fingerprint, "bases": self.mixture.fingerprint(), "seed": self.seed,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "world_size": self.world_size}

    def state_dict(self, next_step: int | None = None) -> dict[str, Any]:
        """The state to resume from. `next_step`: the first step not yet trained on, when the trainer's loader has
        already planned further ahead (prefetching); those planned steps are re-planned on resume with the weights
        they were planned with, then the current weights apply. Default: `self.step` (nothing prefetched)."""
        if int(self._iterated_in_workers) and get_worker_info() is None:
            raise RuntimeError(
                "this MixtureStream was iterated by DataLoader workers, so the trainer's copy holds no position: "
                "plan in this process with dgamix.mixer.loader.MixtureLoader(stream, num_workers=...) and save "
                "its state_dict() (or save torchdata's StatefulDataLoader.state_dict() of the loader over the stream)")
        next_step = self.step if next_step is None else int(next_step)
        cursors, replay = self.cursors.copy(), list(self._replay)
        if next_step != self.step:
            missing = [s for s in range(next_step, self.step) if s not in self._snapshots]
            if next_step > self.step or missing:
                raise ValueError(f"next_step = {next_step}: the stream has planned steps up to {self.step - 1} and "
                                 f"keeps the last {SNAPSHOTS_KEPT}; expected {self.step - SNAPSHOTS_KEPT} <= "
                                 f"next_step <= {self.step}")
            cursors = self._snapshots[next_step][0].copy()
            replay = [self._snapshots[s][1].copy() for s in range(next_step, self.step)] + replay
        # Plain Python (lists of ints and floats), so that torch.load's default (weights_only) reads it; the float64
        # weights round-trip exactly as Python floats.
        return plain({"version": STATE_VERSION, "fingerprint": self.fingerprint(), "step": next_step,
                      "cursors": cursors, "aux_cursors": self.aux_cursors, "aux_draws": self.aux_draws,
                      "weights": self._weights, "replay": replay, "worker_origin": self._worker_origin})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise StateMismatchError(f"stream state version {state.get('version')}, expected {STATE_VERSION}")
        saved, ours = state["fingerprint"], self.fingerprint()
        diff = {k: (saved.get(k), v) for k, v in ours.items() if saved.get(k) != v}
        if diff:
            raise StateMismatchError(
                "the saved stream state belongs to other data or settings; refusing to resume on a different stream: "
                + "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        # Lists (what state_dict() writes), tensors or numpy arrays (older checkpoints) alike.
        weights = array(state["weights"], np.float64)
        check_weights(weights, self.mixture.n_bases)  # validated, but restored bit for bit (no renormalization)
        self._set_weights_exactly(weights)
        self.step = int(state["step"])
        self.cursors = array(state["cursors"], np.int64)
        self.aux_cursors = array(state["aux_cursors"], np.int64)
        self.aux_draws = int(state["aux_draws"])
        self._replay = [array(w, np.float64) for w in state.get("replay", [])]
        self._snapshots = {}
        # A worker's own state (StatefulDataLoader restores each worker's) keeps its phase; a trainer's starts anew.
        self._worker_origin = state.get("worker_origin")


class TargetSampler:
    """Sequences of the specialized set (a one-cluster store, e.g. data/targets/spec/tokens), with its own resumable
    position. Its document order is the store's (seeded by the store's `seed`)."""

    def __init__(self, store: ClusterStore, seq_len: int):
        if store.n_clusters != 1 or not store.available[0]:
            raise ValueError(f"the target store at {store.directory} must hold one non-empty cluster")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len = {seq_len!r}: expected a positive integer")
        self.store, self.seq_len, self.position = store, seq_len, 0

    def sample(self, n: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """The next n sequences; with `world_size` > 1 only rank's contiguous share of them (`shard_bounds`), while
        the position advances past all n on every rank."""
        start, stop = shard_bounds(n, rank, world_size)
        out = np.empty((stop - start, self.seq_len + 1), dtype=self.store.dtype)
        for i in range(stop - start):
            self.store.read(0, self.position + (start + i) * (self.seq_len + 1), self.seq_len + 1, out[i])
        self.position += n * (self.seq_len + 1)
        return torch.from_numpy(out.astype(np.int64))

    def state_dict(self) -> dict[str, Any]:
        return plain({"position": self.position, "store": self.store.fingerprint, "seq_len": self.seq_len})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["store"] != self.store.fingerprint or state.get("seq_len") != self.seq_len:
            raise StateMismatchError(f"target sampler state is for store {state['store']} and seq_len "
                                     f"{state.get('seq_len')}, not {self.store.fingerprint} and {self.seq_len}")
        self.position = int(state["position"])
