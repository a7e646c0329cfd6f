"""Small token stores with known contents, written with the tokenize stage's own writer."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dgamix.formats import token_store

EOS = 0


def synthetic_store(directory: Path, docs_per_cluster: list[int], seed: int = 0, vocab: int = 1000) -> Path:
    """Cluster c's documents hold tokens of value in [c*10+1, c*10+9] so a token tells its cluster; EOS = 0."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    chunks = []
    for cluster, n_docs in enumerate(docs_per_cluster):
        lengths = rng.integers(5, 60, size=n_docs) + 1
        tokens = np.concatenate([np.r_[rng.integers(cluster * 10 + 1, cluster * 10 + 10, size=n - 1), EOS]
                                 for n in lengths]).astype(np.uint16) if n_docs else np.zeros(0, np.uint16)
        chunks.append((tokens, lengths.astype(np.int64)))
    token_store.write(directory, chunks, np.array(docs_per_cluster), {"vocab_size": vocab, "eos_id": EOS})
    return directory
