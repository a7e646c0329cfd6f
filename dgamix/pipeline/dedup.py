"""Exact deduplication across input files, in bounded memory: 16-byte digests, partitioned by their prefix.

Ingest keeps the first copy of a document in input order. Holding every kept document's id in one Python set costs
about 150-200 bytes a document in the driver (a 32-character str, plus its set slot), 200 GB at a billion. Here:

1. Each file's worker (after dropping duplicates within its file) writes its documents' 128-bit digests, sorted, as
   one `(3, n)` uint64 array: row 0 and 1 the digest's high and low 64 bits (big-endian, so the numeric order is
   the bytes' order), row 2 the document's row in the file's staged shard (`write_digests`). 24 bytes a document
   on disk; nothing per document goes back to the driver.
2. The digest space is cut into 2**bits partitions by the digests' top bits (`partition_bits`: enough that each
   holds at most `partition_docs` digests, for uniform hashes). A digest falls in exactly one partition, so every
   partition is deduplicated on its own (`DedupPartition`, one engine task each): it reads its slice of every
   file's sorted array (a binary search on a memory map), sorts the slices by (digest, file index), and every
   digest after the first of a run is a duplicate of a copy in an earlier file. The first occurrence in input order
   wins, as with the set. It writes the rows to drop per file (`drops_dir(...)/<partition>.npy`).
3. The driver commits each file's staged shard less its dropped rows (ingest.py).

A partition task holds its slices: about 40 bytes per digest of the partition while it sorts them (digests, rows,
file indices and the sort order), so `partition_docs` bounds its memory whatever the corpus size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

DIGEST_BYTES = 16
MAX_PARTITION_BITS = 20  # a million partitions: 4e12 documents at the default partition size


def digest_array(digests: Sequence[bytes]) -> np.ndarray:
    """16-byte digests -> a (2, n) uint64 array of their high and low halves, compared as the bytes would be."""
    if any(len(d) != DIGEST_BYTES for d in digests):
        raise ValueError(f"expected {DIGEST_BYTES}-byte digests")
    halves = np.frombuffer(b"".join(digests), dtype=">u8").reshape(len(digests), 2)
    return np.ascontiguousarray(halves.T, dtype=np.uint64)


def write_digests(digests: Sequence[bytes], path: str | Path) -> None:
    """One file's (within-file unique) digests, sorted, with each one's row in the staged shard (see the module
    docstring). Written in place: the staging folder lives inside the stage's temporary output, and a retried task
    rewrites the same bytes."""
    halves = digest_array(digests)
    order = np.lexsort((halves[1], halves[0]))
    table = np.stack([halves[0][order], halves[1][order], order.astype(np.uint64)])
    with open(path, "wb") as fh:
        np.save(fh, table)


def partition_bits(digests: int, partition_docs: int) -> int:
    """The fewest prefix bits that leave at most `partition_docs` digests a partition (uniform hashes assumed)."""
    if partition_docs < 1:
        raise ValueError(f"partition_docs = {partition_docs}: expected a positive number of digests a partition")
    bits = 0
    while -(-digests >> bits) > partition_docs and bits < MAX_PARTITION_BITS:
        bits += 1
    return bits


def drops_dir(staging: str | Path, file_index: int) -> Path:
    """Where the partitions write the rows of file `file_index` that an earlier file already holds."""
    return Path(staging) / "drops" / f"{file_index:06d}"


def digests_path(staging: str | Path, file_index: int) -> Path:
    return Path(staging) / f"{file_index:06d}.digests.npy"


class DedupPartition:
    """One partition of the digest space -> the rows of each file that repeat a digest of an earlier file.

    `holders` are the indices (in input order) of the files that kept documents; each has a digests file in
    `staging`. Returns the files with dropped rows and how many, for the driver's counts."""

    def __init__(self, staging: str | Path, holders: np.ndarray, bits: int):
        self.staging, self.holders, self.bits = str(staging), np.asarray(holders, dtype=np.int64), bits

    def __call__(self, partition: int) -> dict[str, Any]:
        shift = 64 - self.bits
        low, high = partition << shift, (partition + 1) << shift  # Python ints: high may be 2**64
        slices = []  # (file, start, stop): sized first, so the partition is read once into arrays of its size
        for f in self.holders.tolist():
            hi = np.load(digests_path(self.staging, f), mmap_mode="r")[0]
            start = int(np.searchsorted(hi, np.uint64(low))) if low else 0
            stop = int(np.searchsorted(hi, np.uint64(high))) if high < 2**64 else len(hi)
            if stop > start:
                slices.append((f, start, stop))
        n = sum(stop - start for _, start, stop in slices)
        empty = {"partition": partition, "digests": n, "files": np.zeros(0, np.int64),
                 "dropped": np.zeros(0, np.int64)}
        if not n:
            return empty
        # 24 bytes a digest: its halves, its row (a file's rows fit in 32 bits: a worker holds the file) and file.
        hi, lo = np.empty(n, np.uint64), np.empty(n, np.uint64)
        row, file = np.empty(n, np.uint32), np.empty(n, np.uint32)
        at = 0
        for f, start, stop in slices:
            table = np.load(digests_path(self.staging, f), mmap_mode="r")
            end = at + stop - start
            hi[at:end], lo[at:end], row[at:end] = table[0, start:stop], table[1, start:stop], table[2, start:stop]
            file[at:end] = f
            at = end
        # File index as the last key: among equal digests the earliest file comes first and is the one kept.
        order = np.lexsort((file, lo, hi))
        repeat = np.zeros(n, dtype=bool)  # one sorted copy at a time: the peak stays near 40 bytes a digest
        sorted_half = hi[order]
        repeat[1:] = sorted_half[1:] == sorted_half[:-1]
        del sorted_half
        sorted_half = lo[order]
        repeat[1:] &= sorted_half[1:] == sorted_half[:-1]
        del sorted_half
        dropped = order[repeat]
        if not len(dropped):
            return empty
        drop_file, drop_row = file[dropped], row[dropped]
        by_file = np.lexsort((drop_row, drop_file))
        drop_file, drop_row = drop_file[by_file], drop_row[by_file]
        owners, starts, counts = np.unique(drop_file, return_index=True, return_counts=True)
        for f, start, count in zip(owners.tolist(), starts.tolist(), counts.tolist()):
            directory = drops_dir(self.staging, f)
            directory.mkdir(parents=True, exist_ok=True)
            with open(directory / f"{partition:07d}.npy", "wb") as fh:
                np.save(fh, drop_row[start:start + count])
        return {"partition": partition, "digests": n, "files": owners.astype(np.int64), "dropped": counts}


def dropped_rows(staging: str | Path, file_index: int, expected: int) -> np.ndarray:
    """The rows of a file's staged shard that earlier files hold, gathered from every partition, in order."""
    directory = drops_dir(staging, file_index)
    parts = [np.load(p) for p in sorted(directory.glob("*.npy"))] if directory.is_dir() else []
    rows = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    if len(rows) != expected:  # a partition's output went missing: refuse rather than keep a duplicate
        raise RuntimeError(f"{directory}: {len(rows)} dropped rows on disk, the partitions reported {expected}")
    return np.sort(rows.astype(np.int64))


def remove_drops(staging: str | Path, file_index: int) -> None:
    directory = drops_dir(staging, file_index)
    if directory.is_dir():
        for p in directory.glob("*.npy"):
            p.unlink()
        directory.rmdir()
