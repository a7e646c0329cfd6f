"""Token store: every cluster's documents as token ids in one memory-mappable array (written by tokenize and by the
target stages; read by the mixer's ClusterStore, the bases stage, and your own trainer).

Layout of a store directory:
- `tokens.bin`: raw little-endian token ids, `dtype` of store.json (uint16 when the vocabulary fits in 65,536
  ids, else uint32); documents grouped by cluster in cluster-id order, each document followed by EOS;
- `doc_offsets.npy`: int64, documents + 1 token offsets: document i is `tokens[doc_offsets[i]:doc_offsets[i+1]]`,
  its EOS included;
- `cluster_offsets.npy`: int64, clusters + 1 document offsets: cluster c holds documents `cluster_offsets[c]` …
  `cluster_offsets[c+1] - 1` (a cluster may be empty);
- `store.json`: `format_version` (1), `dtype`, `vocab_size`, `eos_id`, `documents`, `tokens`, `clusters`,
  `fingerprint` (BLAKE2b-128 over the token bytes, then the two offset arrays' bytes) and `tokenizer_fingerprint`
  (BLAKE2b-128 of the tokenizer's JSON, keys sorted and whitespace dropped: `tokenizer_fingerprint()`; absent from
  stores written before it existed). Stores read together (the corpus's, the specialized sets') must share it:
  `dgamix.mixer.store.check_same_tokenizer`;
- optionally `tokenizer.json` (the Hugging Face tokenizer the ids come from) and `heldout/` (a one-cluster store of
  the same layout).
Reading cluster c's token stream takes two array lookups and a slice; nothing is parsed.

    meta = json.load(open("data/tokens/store.json"))
    tokens = np.memmap("data/tokens/tokens.bin", dtype=meta["dtype"], mode="r")
    docs, clusters = np.load("data/tokens/doc_offsets.npy"), np.load("data/tokens/cluster_offsets.npy")
    cluster_42 = tokens[docs[clusters[42]]:docs[clusters[43]]]
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..core.atomic import write_json, write_npy
from ..core.errors import InputError
from . import JSON_VERSION_KEY, check_json

NAME = "token store"
VERSION = 1
SUPPORTED = {1}
META = "store.json"
TOKENS = "tokens.bin"
DOC_OFFSETS = "doc_offsets.npy"
CLUSTER_OFFSETS = "cluster_offsets.npy"
TOKENIZER = "tokenizer.json"
HELDOUT = "heldout"
TOKENIZER_KEY = "tokenizer_fingerprint"


def tokenizer_fingerprint(tokenizer_json: str) -> str:
    """Identifies a tokenizer by its content: the same tokenizer saved again, or loaded and saved, gives the same
    fingerprint (keys sorted, whitespace dropped), while any other vocabulary, merges or normalizer does not."""
    canonical = json.dumps(json.loads(tokenizer_json), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write(directory: Path, chunks: Iterable[tuple[np.ndarray, np.ndarray]], docs_per_cluster: np.ndarray,
          meta: dict[str, Any]) -> dict[str, Any]:
    """Write a store from (tokens, document lengths) chunks given in cluster order; `meta` holds vocab_size and
    eos_id. Returns store.json's content."""
    directory = Path(directory)
    digest = hashlib.blake2b(digest_size=16)
    lengths: list[np.ndarray] = []
    dtype = None
    with open(directory / TOKENS, "wb") as fh:
        for tokens, chunk_lengths in chunks:
            dtype = tokens.dtype
            fh.write(tokens.tobytes())
            digest.update(tokens.tobytes())
            lengths.append(chunk_lengths)
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    doc_offsets = np.zeros(len(all_lengths) + 1, dtype=np.int64)
    doc_offsets[1:] = np.cumsum(all_lengths)
    cluster_offsets = np.zeros(len(docs_per_cluster) + 1, dtype=np.int64)
    cluster_offsets[1:] = np.cumsum(docs_per_cluster)
    if cluster_offsets[-1] != len(all_lengths):
        raise ValueError(f"{len(all_lengths)} documents tokenized but the clusters hold {cluster_offsets[-1]}")
    digest.update(doc_offsets.tobytes())
    digest.update(cluster_offsets.tobytes())
    write_npy(doc_offsets, directory / DOC_OFFSETS)
    write_npy(cluster_offsets, directory / CLUSTER_OFFSETS)
    summary = {JSON_VERSION_KEY: VERSION, "dtype": (dtype or token_dtype(meta["vocab_size"])).name, **meta,
               "documents": int(len(all_lengths)), "tokens": int(doc_offsets[-1]),
               "clusters": int(len(docs_per_cluster)), "fingerprint": digest.hexdigest()}
    write_meta(summary, directory)
    return summary


def write_meta(meta: dict[str, Any], directory: Path) -> None:
    write_json(meta, Path(directory) / META)


def read_meta(directory: Path, param: str = "tokens") -> dict[str, Any]:
    path = Path(directory) / META
    if not path.exists():
        raise FileNotFoundError(f"{param}: {Path(directory)} holds no {META} (expected a token store written by the "
                                "tokenize stage)")
    meta = json.loads(path.read_text())
    check_json(path, meta, NAME, SUPPORTED, "tokenize")
    return meta


@dataclass
class TokenStoreFiles:
    """A store as read from disk: its metadata, the memory-mapped tokens and the two offset arrays."""

    meta: dict[str, Any]
    tokens: np.ndarray
    doc_offsets: np.ndarray
    cluster_offsets: np.ndarray

    @property
    def cluster_tokens(self) -> np.ndarray:
        """Tokens per cluster."""
        return self.doc_offsets[self.cluster_offsets[1:]] - self.doc_offsets[self.cluster_offsets[:-1]]


def read(directory: Path, param: str = "tokens") -> TokenStoreFiles:
    """Open a store: tokens memory-mapped (a plain ndarray view: slicing np.memmap objects costs microseconds of
    subclass bookkeeping), offsets loaded, all checked against store.json."""
    directory = Path(directory)
    meta = read_meta(directory, param)
    dtype, n_tokens = np.dtype(meta["dtype"]), int(meta["tokens"])
    tokens = (np.memmap(directory / TOKENS, dtype=dtype, mode="r", shape=(n_tokens,)).view(np.ndarray)
              if n_tokens else np.zeros(0, dtype))
    doc_offsets = np.load(directory / DOC_OFFSETS)
    cluster_offsets = np.load(directory / CLUSTER_OFFSETS)
    if doc_offsets[-1] != n_tokens or cluster_offsets[-1] != len(doc_offsets) - 1:
        raise InputError(f"{directory}: index files do not match {META} (re-run tokenize)")
    return TokenStoreFiles(meta, tokens, doc_offsets, cluster_offsets)
