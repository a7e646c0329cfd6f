"""Seeded samples across shards: rows of memory-mapped arrays, texts of Parquet shards."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def sample_rows(n_rows: int, size: int, seed: int) -> np.ndarray:
    """Sorted global row indices of a seeded sample without replacement (all rows when size >= n_rows)."""
    if size >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=size, replace=False))


def gather_rows(arrays: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Read global rows from a list of row-concatenated (memory-mapped) shards, as float32."""
    offsets = np.cumsum([0] + [len(a) for a in arrays])
    out = np.empty((len(rows), arrays[0].shape[1]), dtype=np.float32)
    shard_of = np.searchsorted(offsets, rows, side="right") - 1
    for s, array in enumerate(arrays):
        mask = shard_of == s
        if mask.any():
            out[mask] = array[rows[mask] - offsets[s]]
    return out


def sample_texts(shards: list[Path], size: int, seed: int, max_chars: int,
                 read: Callable[[Path, list[str]], pa.Table]) -> list[str]:
    """A seeded sample of `size` texts (each cut to max_chars) across Parquet shards, reading one shard at a time
    with `read(shard, columns)` (the shards' format reader, e.g. `dgamix.formats.docs.read_shard`)."""
    sizes = [pq.read_metadata(s).num_rows for s in shards]
    chosen = sample_rows(sum(sizes), size, seed)
    texts: list[str] = []
    offset = 0
    for shard, rows in zip(shards, sizes):
        local = chosen[(chosen >= offset) & (chosen < offset + rows)] - offset
        if len(local):
            column = read(shard, ["text"]).column("text").take(local)
            texts += [t[:max_chars] for t in column.to_pylist()]
        offset += rows
    return texts
