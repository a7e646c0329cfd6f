"""MixtureStream: fixed-length token sequences drawn from a mixture over clusters, exactly resumable.

Step t's global batch (batch_size x world_size sequences) is planned from a generator seeded by (seed, t) and the
weights in force at step t: each sequence picks a cluster from p = alpha^T P and takes the next seq_len + 1 tokens of
that cluster's stream (packed within the cluster: documents back to back, EOS between them). Planning is cheap and
identical everywhere, so every rank replays the same global plan and materializes only its own slice: no sequence
is produced twice, and the union over ranks is the single-process stream.

The stream is the one owner of the weights alpha: strategies read `weights` and write them through
`set_weights()`, which takes effect from the next step planned. It composes three parts: the `plan.Planner`
(cursors, the step, replay of planned steps), the `reader.SequenceReader` (tokens from the store) and the
`basis_sampler.BasisSampler` (fresh sequences per basis for alignment draws). It is not a Dataset: batches come
from `next_batch()` in-process, or from `loader.MixtureLoader` with any number of DataLoader workers. A stream with
`max_steps` ends there: iteration over a loader stops, and `next_batch()` raises `StreamExhausted` (a
StopIteration, as `next()` on an exhausted iterator raises).

The state (`state_dict()`) is the step, the per-cluster stream positions, the weights, and the auxiliary sampler's
positions; it carries fingerprints of the store and the bases, and loading it onto different data is an error.
"""
from __future__ import annotations

from typing import Any, NoReturn

import numpy as np
import torch

from ..core.errors import StateMismatchError
from .basis_sampler import BasisSampler
from .distributed import shard_bounds
from .mixture import Mixture, check_weights
from .plan import SNAPSHOTS_KEPT, PlannedStep, Planner, cdf_of
from .reader import SequenceReader, StepLog
from .state import array, plain
from .store import ClusterStore

STATE_VERSION = 3
READABLE_VERSIONS = (2, 3)  # 2: the same fields and a DataLoader worker's phase, which is ignored

__all__ = ["MixtureStream", "PlannedStep", "SNAPSHOTS_KEPT", "StateMismatchError", "StepLog", "StreamExhausted",
           "TargetSampler"]

MIGRATION = ("MixtureStream is not a Dataset: take batches from stream.next_batch() in a plain loop, or iterate "
             "dgamix.mixer.MixtureLoader(stream, num_workers=N) (a DataLoader; the weights stay in this process, "
             "so their changes reach every worker), or use dgamix.mixer.Mixer(...).loader(num_workers=N)")


class StreamExhausted(StopIteration):
    """`next_batch()` on a stream that has planned all of its `max_steps` steps. A StopIteration, so that the end of
    the stream reads as the end of any iterator (`except StopIteration`), and a loop over `next_batch()` ends instead
    of running past the run's last step."""


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} = {value!r}: expected a positive integer")


class MixtureStream:
    """Batches of `batch_size` sequences of `seq_len + 1` tokens drawn from `store`'s clusters under a mixture of
    `mixture`'s bases, exactly resumable; the one owner of the weights over the bases (`weights`, `set_weights`).

    seed: the stream's draws (step t is planned from (seed, t) and the weights in force); alignment_seed: the
    alignment draws' (`sample_basis`; default `seed`). rank / world_size: this
    process's slice of each global step under data parallelism. max_steps: where the stream ends (None: never).
    weights: the starting weights (default uniform over the bases). Batches come from `next_batch()` in-process or
    from `MixtureLoader(stream, num_workers=N)`; `state_dict()` / `load_state_dict()` save and restore it."""

    def __init__(self, store: ClusterStore, mixture: Mixture, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, max_steps: int | None = None,
                 weights: np.ndarray | list[float] | None = None, alignment_seed: int | None = None):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            _check_positive_int(name, value)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank = {rank}: expected 0 <= rank < world_size ({world_size})")
        mixture.check_store(store.available)
        self.store, self.mixture = store, mixture
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.max_steps = rank, world_size, max_steps
        self.planner = Planner(store.n_clusters, seed, self.sequence_tokens)
        self.reader = SequenceReader(store, self.sequence_tokens)
        self.basis_sampler = BasisSampler(mixture, self.reader, seed if alignment_seed is None else alignment_seed)
        # The first step a MixtureLoader has not handed out while it had planned further (prefetching), kept until
        # the next step is planned or a state is loaded: what a new pass, a new loader or next_batch() starts from.
        self._handed_out: int | None = None
        m = mixture.n_bases
        self._set_weights_exactly(check_weights(np.full(m, 1.0 / m) if weights is None else weights, m))

    # ---- weights: this object is their one owner ------------------------------------------------------------
    @property
    def weights(self) -> np.ndarray:
        return self._weights.copy()

    def set_weights(self, weights: np.ndarray | list[float]) -> None:
        """New weights over the bases, validated; they take effect from the next step planned."""
        self._set_weights_exactly(check_weights(weights, self.mixture.n_bases))

    def _set_weights_exactly(self, weights: np.ndarray) -> None:
        self._weights = np.array(weights, dtype=np.float64)
        self._probs = self.mixture.cluster_probs(self._weights)  # p over clusters, kept for each batch's "prob"
        self._cdf = cdf_of(self._probs)

    # ---- the training stream ----------------------------------------------------------------------------------
    @property
    def sequence_tokens(self) -> int:
        return self.seq_len + 1  # inputs and shifted targets

    @property
    def step(self) -> int:
        """The next step to plan."""
        return self.planner.step

    @property
    def next_to_hand_out(self) -> int:
        """The first step not yet handed to the trainer: `step`, unless a `MixtureLoader` stopped (a `break`) with
        steps planned ahead of the last batch it handed out and nothing has been planned since."""
        return self.step if self._handed_out is None else self._handed_out

    def mark_handed_out(self, next_step: int) -> None:
        """Record that the steps before `next_step` are handed out and those planned from it on are not (a loader's
        prefetched steps): until the next step is planned, `next_batch()`, `state_dict()` and any loader over this
        stream start from `next_step` (re-planning those steps with the weights they were planned with)."""
        self._handed_out = None if next_step == self.step else int(next_step)

    @property
    def cursors(self) -> np.ndarray:
        """Per cluster, the training stream's position (tokens taken so far)."""
        return self.planner.cursors

    def plan_step(self) -> PlannedStep:
        """Plan step `self.step` (this rank's slice) with the weights in force (or those it was first planned with,
        after a resume) and advance: the cheap, stateful half of a batch, done by the process that owns the
        weights. Past `max_steps`: `StreamExhausted`."""
        if self.max_steps is not None and self.step >= self.max_steps:
            raise StreamExhausted(f"the stream has planned all of its max_steps = {self.max_steps} steps")
        self._handed_out = None  # planning on from here: the steps planned beyond a loader's last batch are gone
        weights, replayed = self.planner.next_weights(self._weights)
        # Each sequence's probability of being drawn (p = alpha^T P at its cluster, under the weights it was planned
        # with): what importance-weighted estimates over the bases need (alignment_stats). Computed once per weight
        # change, not per batch: only a replayed step's older weights need their own.
        probs = self.mixture.cluster_probs(weights) if replayed else self._probs
        cdf = cdf_of(probs) if replayed else self._cdf
        step = self.planner.step
        clusters, positions = self.planner.plan(weights, cdf, self.batch_size * self.world_size)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        self.planner.step += 1
        # Clusters past their first pass (passes_completed() > 0) counted without its division over every
        # cluster, which cost more than the rest of the planning with thousands of clusters.
        tokens = self.store.cluster_tokens
        repeating = int(np.count_nonzero((self.planner.cursors >= tokens) & (tokens > 0)))
        return PlannedStep(step, clusters[mine], positions[mine], probs[clusters[mine]], weights, repeating)

    def read(self, planned: PlannedStep, widen: bool = True) -> dict[str, Any]:
        """The batch of a planned step: reads the memory-mapped store and nothing else, so any DataLoader worker can
        do it with its copy of the stream. Its `log` (a `StepLog`) records what the step drew; its tokens are int64,
        or in the store's dtype with `widen=False` (`SequenceReader.tokens`)."""
        return self.reader.batch(planned, widen=widen)

    def next_batch(self) -> dict[str, Any]:
        """Plan the next step and return this rank's slice of it: `tokens` (batch_size, seq_len + 1) int64,
        `cluster`, `pass`, `prob`, `step` and `log`. After a `MixtureLoader` stopped with prefetched steps, the next
        step is the first it did not hand out (`next_to_hand_out`). Past `max_steps`: `StreamExhausted`."""
        if self.next_to_hand_out != self.step:
            self.load_state_dict(self.state_dict())  # re-plan the prefetched steps, as they were planned
        return self.read(self.plan_step())

    def passes_completed(self) -> np.ndarray:
        """Per cluster, how many full passes the training stream has made (>= 1: its data is being repeated)."""
        tokens = self.store.cluster_tokens
        return np.where(tokens > 0, self.planner.cursors // np.maximum(tokens, 1), 0)

    def __iter__(self) -> NoReturn:
        raise TypeError(MIGRATION)

    def __len__(self) -> NoReturn:  # what a DataLoader asks of a map-style dataset
        raise TypeError(MIGRATION)

    def __bool__(self) -> bool:
        return True

    # ---- fresh batches for alignment (their own sampler state: the training stream is untouched) ----------
    def sample_basis(self, basis: int, n: int, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """n fresh sequences from basis `basis` alone (`BasisSampler.sample`)."""
        return self.basis_sampler.sample(basis, n, rank, world_size)

    # ---- state ---------------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        return {"store": self.store.fingerprint, "bases": self.mixture.fingerprint(), "seed": self.seed,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "world_size": self.world_size}

    def state_dict(self, next_step: int | None = None) -> dict[str, Any]:
        """The state to resume from. `next_step`: the first step not yet trained on, when the trainer's loader has
        already planned further ahead (prefetching); those planned steps are re-planned on resume with the weights
        they were planned with, then the current weights apply. Default: `next_to_hand_out` (`self.step` unless a
        loader stopped with prefetched steps)."""
        next_step = self.next_to_hand_out if next_step is None else int(next_step)
        cursors, replay = self.planner.position_at(next_step)
        # Plain Python (lists of ints and floats), so that torch.load's default (weights_only) reads it; the float64
        # weights round-trip exactly as Python floats.
        return plain({"version": STATE_VERSION, "fingerprint": self.fingerprint(), "step": next_step,
                      "cursors": cursors, "aux_cursors": self.basis_sampler.cursors,
                      "aux_draws": self.basis_sampler.draws, "weights": self._weights, "replay": replay})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") not in READABLE_VERSIONS:
            raise StateMismatchError(f"stream state version {state.get('version')}, expected one of "
                                     f"{list(READABLE_VERSIONS)}")
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
        self.planner.restore(int(state["step"]), array(state["cursors"], np.int64),
                             [array(w, np.float64) for w in state.get("replay", [])])
        self.basis_sampler.cursors = array(state["aux_cursors"], np.int64)
        self.basis_sampler.draws = int(state["aux_draws"])
        self._handed_out = None


class TargetSampler:
    """Sequences of the specialized set (a one-cluster store, e.g. data/targets/spec/tokens), with its own resumable
    position. Its document order is the store's (seeded by the store's `seed`)."""

    def __init__(self, store: ClusterStore, seq_len: int):
        if store.n_clusters != 1 or not store.available[0]:
            raise ValueError(f"the target store at {store.directory} must hold one non-empty cluster")
        _check_positive_int("seq_len", seq_len)
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
