"""Planning a step: which cluster each sequence comes from and where in that cluster's token stream it starts.

Planning is cheap and deterministic: step t's draws come from a generator seeded by (seed, salt, t) and the cluster
probabilities in force, so every rank and DataLoader worker that replays it gets the same plan. `Planner` holds the
state that planning advances (the step, each cluster's stream position) and what an exact resume needs when a
trainer has planned further than it has trained (the positions before each recent step and the weights it was
planned with). It never reads tokens (`reader`) and never owns the weights (`stream.MixtureStream` does).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SNAPSHOTS_KEPT = 16  # planned-but-untrained steps a trainer's data prefetching may hold (Lightning, accelerate: 1-2)


def cdf_of(p: np.ndarray) -> np.ndarray:
    """The normalized cumulative distribution of the probabilities p (what `np.searchsorted` draws from)."""
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    return cdf


def plan_draws(seed: int, salt: int, step: int, cursors: np.ndarray, cdf: np.ndarray, n: int,
               sequence_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Clusters and stream positions of `step`'s n sequences under `cdf`; advances `cursors` in place. The i-th draw
    of cluster c in this batch starts after the earlier draws of c in the same batch."""
    rng = np.random.default_rng((seed, salt, step))
    clusters = np.searchsorted(cdf, rng.random(n), side="right").astype(np.int64)
    clusters = np.minimum(clusters, len(cdf) - 1)
    order = np.argsort(clusters, kind="stable")
    sorted_clusters = clusters[order]
    # (np.concatenate, not np.r_: this runs in the main process once per step, and np.r_ costs 10 us a call)
    first = np.concatenate(([0], np.flatnonzero(np.diff(sorted_clusters)) + 1))
    rank_in_cluster = np.arange(n) - np.repeat(first, np.diff(np.append(first, n)))
    positions = np.empty(n, dtype=np.int64)
    positions[order] = cursors[sorted_clusters] + rank_in_cluster * sequence_tokens
    np.add.at(cursors, clusters, sequence_tokens)
    return clusters, positions


@dataclass(frozen=True)
class PlannedStep:
    """This rank's slice of one step, as planned: a few numbers per sequence (what a DataLoader worker receives)."""
    step: int
    clusters: np.ndarray  # int64, the cluster of each sequence
    positions: np.ndarray  # int64, where each sequence starts in its cluster's stream
    probs: np.ndarray  # float64, each sequence's probability p(c) under the weights it was planned with
    weights: np.ndarray  # float64, the weights over the bases the step was planned with
    clusters_repeating: int  # clusters whose first pass the training stream has finished, after this step


class Planner:
    """The training stream's planning state: the next step, the per-cluster cursors, and the snapshots that let a
    state be saved "after step t was trained" while later steps are already planned."""

    def __init__(self, n_clusters: int, seed: int, sequence_tokens: int):
        self.seed, self.sequence_tokens = seed, sequence_tokens
        self.step = 0
        self.cursors = np.zeros(n_clusters, dtype=np.int64)
        # step -> (cursors before it was planned, the weights it was planned with)
        self.snapshots: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.replay: list[np.ndarray] = []  # weights of steps planned before a resume point, to re-plan them

    def next_weights(self, current: np.ndarray) -> tuple[np.ndarray, bool]:
        """The weights the next step is planned with: a replayed step's own, else `current`; and whether replayed."""
        if self.replay:
            return self.replay.pop(0), True
        return current, False

    def plan(self, weights: np.ndarray, cdf: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Plan step `self.step` (n sequences) with `weights` (whose cluster CDF is `cdf`), recording its snapshot.
        Does not advance the step (the caller does, once it has taken its slice)."""
        self.snapshots[self.step] = (self.cursors.copy(), weights)
        self.snapshots.pop(self.step - SNAPSHOTS_KEPT, None)
        return plan_draws(self.seed, 0, self.step, self.cursors, cdf, n, self.sequence_tokens)

    def position_at(self, next_step: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(cursors, weights to replay) of the state after step next_step - 1 was trained, when steps up to
        `self.step - 1` are planned; a clear error when that state is no longer known."""
        cursors, replay = self.cursors.copy(), [w.copy() for w in self.replay]
        if next_step == self.step:
            return cursors, replay
        missing = [s for s in range(next_step, self.step) if s not in self.snapshots]
        if next_step > self.step or missing:
            raise ValueError(f"next_step = {next_step}: the stream has planned steps up to {self.step - 1} and "
                             f"keeps the last {SNAPSHOTS_KEPT}; expected {self.step - SNAPSHOTS_KEPT} <= "
                             f"next_step <= {self.step}")
        cursors = self.snapshots[next_step][0].copy()
        return cursors, [self.snapshots[s][1].copy() for s in range(next_step, self.step)] + replay

    def restore(self, step: int, cursors: np.ndarray, replay: list[np.ndarray]) -> None:
        self.step, self.cursors, self.replay = step, cursors, replay
        self.snapshots = {}
