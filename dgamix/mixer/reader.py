"""Reading planned sequences from the memory-mapped store: the expensive, stateless half of a batch.

A `SequenceReader` holds nothing that changes during training, so a DataLoader worker's copy reads exactly what the
main process would. The batch it returns carries the step's `StepLog` (what was drawn, with which weights), so
the record of a step travels with its tokens through any number of workers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .plan import PlannedStep
from .store import ClusterStore


@dataclass
class StepLog:
    """What one step drew on this rank: the weights it was planned with and the tokens taken from each cluster."""
    step: int
    weights: np.ndarray
    clusters: np.ndarray  # this rank's sequences' clusters
    tokens_per_cluster: dict[int, int] = field(default_factory=dict)
    repeated_clusters: list[int] = field(default_factory=list)  # clusters of this batch that are past their 1st pass
    clusters_repeating: int = 0  # clusters whose first pass the stream has finished, so far


class SequenceReader:
    """Reads fixed-length sequences (seq_len + 1 tokens: inputs and shifted targets) from a cluster store."""

    def __init__(self, store: ClusterStore, sequence_tokens: int):
        self.store, self.sequence_tokens = store, sequence_tokens

    def tokens(self, clusters: np.ndarray, positions: np.ndarray, stream: int = 0,
               widen: bool = True) -> torch.Tensor:
        """(n, sequence_tokens) tokens, int64 (what embedding lookups and cross-entropy targets need) or, with
        `widen=False`, the store's own dtype (uint16 or uint32); `stream` selects the store's document order
        (0: training)."""
        out = np.empty((len(clusters), self.sequence_tokens), dtype=self.store.dtype)
        for i, (c, pos) in enumerate(zip(clusters.tolist(), positions.tolist())):
            self.store.read(c, pos, self.sequence_tokens, out[i], stream=stream)
        return torch.from_numpy(out.astype(np.int64) if widen else out)

    def batch(self, planned: PlannedStep, widen: bool = True) -> dict[str, Any]:
        """A planned step's batch: tokens (int64, or the store's dtype with `widen=False`), each sequence's cluster,
        the pass over its cluster it reached, its probability under the weights it was planned with, the step, and
        the step's `log`."""
        tokens = self.tokens(planned.clusters, planned.positions, widen=widen)
        per_epoch = self.store.cluster_tokens[planned.clusters]
        passes = (planned.positions + self.sequence_tokens - 1) // per_epoch + 1  # pass reached by the sequence's end
        unique, counts = np.unique(planned.clusters, return_counts=True)
        log = StepLog(planned.step, planned.weights.copy(), planned.clusters,
                      dict(zip(unique.tolist(), (counts * self.sequence_tokens).tolist())),
                      sorted(set(planned.clusters[passes > 1].tolist())), planned.clusters_repeating)
        return {"tokens": tokens, "cluster": torch.from_numpy(planned.clusters), "pass": torch.from_numpy(passes),
                "prob": torch.from_numpy(planned.probs), "step": planned.step, "log": log}
