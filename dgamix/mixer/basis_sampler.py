"""Fresh sequences from one basis at a time, for the alignment draws of exact DGA and DoGE.

The auxiliary sampler has its own cursors and its own document order (the store's stream 1), so drawing alignment
batches never moves the training stream. Its state is part of the stream's saved state.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .distributed import shard_bounds
from .mixture import Mixture
from .plan import cdf_of, plan_draws
from .reader import SequenceReader


class BasisSampler:
    def __init__(self, mixture: Mixture, reader: SequenceReader, seed: int):
        self.mixture, self.reader, self.seed = mixture, reader, seed
        self.cursors = np.zeros(mixture.n_clusters, dtype=np.int64)
        self.draws = 0

    def sample(self, basis: int, n: int, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """n fresh sequences from basis `basis` alone. With `world_size` > 1, the whole draw of n is planned (the
        cursors advance the same on every rank) and only rank's contiguous share of it is read (`shard_bounds`:
        sizes differ by at most one); the shares of all ranks, in rank order, are the n sequences."""
        if not 0 <= basis < self.mixture.n_bases:
            raise ValueError(f"basis = {basis}: expected 0 <= basis < {self.mixture.n_bases}")
        row = self.mixture.bases.getrow(basis).toarray().ravel()
        clusters, positions = plan_draws(self.seed, 1 + basis, self.draws, self.cursors, cdf_of(row), n,
                                         self.reader.sequence_tokens)
        self.draws += 1
        start, stop = shard_bounds(n, rank, world_size)
        clusters, positions = clusters[start:stop], positions[start:stop]
        return {"tokens": self.reader.tokens(clusters, positions, stream=1), "cluster": torch.from_numpy(clusters)}
