"""Stage 6, tokenize: every cluster's documents -> one memory-mappable token store with a per-cluster index.

(The module is `tokens`, so as not to shadow the standard library's `tokenize`.)

Layout of tokenize.output:
- `tokens.bin`: token ids (uint16 when the vocabulary fits, else uint32), documents grouped by fine cluster in
  cluster-id order, each document followed by EOS;
- `doc_offsets.npy`: int64, n_docs + 1 token offsets (document i is tokens[doc_offsets[i]:doc_offsets[i+1]],
  its EOS included);
- `cluster_offsets.npy`: int64, k + 1 document offsets (cluster c holds documents cluster_offsets[c] ..
  cluster_offsets[c+1] - 1);
- `tokenizer.json` (the one used) and `store.json` (dtype, vocab size, EOS id, counts, fingerprint);
- `heldout/`: the held-out generic documents (`holdout_fraction` of them, chosen by a hash of their doc_id, so the
  choice does not depend on the clustering or the shard order), as a one-cluster store of the same layout. They are
  not in the training store: the reference trainer's generic loss is measured on them (forgetting).
The mixer slices any cluster's token stream with two array lookups, no parsing.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .assign import MANIFEST, iter_clusters
from .atomic import atomic_path, write_json, write_npy
from .sampling import sample_texts
from .params import ParamError, non_negative_int, positive_int, require, section

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
TRAIN_CHARS_PER_DOC = 4000  # characters of each sampled document the BPE trainer sees


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 style) trained on `texts`, with EOS as its only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Any:
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.exists():
        raise ParamError(f"tokenize.tokenizer = '{path}' does not exist (expected a Hugging Face tokenizer.json, "
                         "or null to train a byte-level BPE)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise ParamError(f"tokenize.tokenizer = '{path}' is not a valid tokenizer.json: {err}") from err


def eos_id(tokenizer: Any, eos_token: str | None) -> int:
    candidates = [eos_token] if eos_token else [EOS, "</s>", "[SEP]", "<eos>"]
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    raise ParamError(f"tokenize.eos_token = {eos_token!r}: the tokenizer has none of {candidates} "
                     "(expected the name of its end-of-document token)")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_texts(tokenizer: Any, texts: list[str], eos: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Pure step: (token ids of all texts, each followed by EOS; per-text lengths including the EOS)."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
    out = np.empty(int(lengths.sum()), dtype=dtype)
    position = 0
    for encoding, length in zip(encodings, lengths):
        out[position : position + length - 1] = encoding.ids
        out[position + length - 1] = eos
        position += length
    return out, lengths


def write_token_store(directory: Path, chunks: Iterable[tuple[np.ndarray, np.ndarray]], docs_per_cluster: np.ndarray,
                      meta: dict[str, Any]) -> dict[str, Any]:
    """Write tokens.bin, doc_offsets.npy, cluster_offsets.npy and store.json from (tokens, doc lengths) chunks
    given in cluster order. The fingerprint identifies the exact tokens and their grouping."""
    digest = hashlib.blake2b(digest_size=16)
    lengths: list[np.ndarray] = []
    dtype = None
    with open(directory / "tokens.bin", "wb") as fh:
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
    write_npy(doc_offsets, directory / "doc_offsets.npy")
    write_npy(cluster_offsets, directory / "cluster_offsets.npy")
    summary = {"dtype": (dtype or token_dtype(meta["vocab_size"])).name, **meta, "documents": int(len(all_lengths)),
               "tokens": int(doc_offsets[-1]), "clusters": int(len(docs_per_cluster)),
               "fingerprint": digest.hexdigest()}
    write_json(summary, directory / "store.json")
    return summary


def held_out(doc_ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Pure step: which documents are held out. A seeded hash of the doc_id, uniform in [0, 1), below `fraction`."""
    salt = str(seed).encode()
    draws = np.fromiter((int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8, salt=salt[:16]).digest(), "big")
                         for d in doc_ids), dtype=np.uint64, count=len(doc_ids))
    return draws.astype(np.float64) / 2.0**64 < fraction


def run(params: dict[str, Any]) -> dict[str, Any]:
    cfg = section(params, "tokenize")
    domains_dir = Path(require(cfg, "tokenize", "domains", str, "data/domains"))
    out_dir = Path(require(cfg, "tokenize", "output", str, "data/tokens"))
    tokenizer_path = require(cfg, "tokenize", "tokenizer", str, None)
    vocab_size = positive_int(cfg, "tokenize", "vocab_size", 8192)
    train_docs = positive_int(cfg, "tokenize", "train_docs", 20000)
    seed = non_negative_int(cfg, "tokenize", "seed", 0)
    eos_token = require(cfg, "tokenize", "eos_token", str, None)
    holdout = float(require(cfg, "tokenize", "holdout_fraction", (int, float), 0.0))
    if not 0.0 <= holdout < 1.0:
        raise ParamError(f"tokenize.holdout_fraction = {holdout}: expected 0 <= fraction < 1 (share of documents "
                         "kept out of training for the generic eval loss)")
    if not (domains_dir / MANIFEST).exists():
        raise ParamError(f"tokenize.domains = '{domains_dir}' holds no {MANIFEST} (expected the assign stage's output)")
    if tokenizer_path is None and vocab_size < 257:
        raise ParamError(f"tokenize.vocab_size = {vocab_size}: expected at least 257 (256 bytes + EOS)")

    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        log.info("tokenize: training a byte-level BPE (vocab %d) on up to %d documents", vocab_size, train_docs)
        tokenizer = train_bpe(sample_texts(sorted(domains_dir.glob("part-*.parquet")), train_docs, seed,
                                           TRAIN_CHARS_PER_DOC), vocab_size)
    eos = eos_id(tokenizer, eos_token)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)

    manifest = pq.read_table(domains_dir / MANIFEST, columns=["docs"]).column("docs").to_numpy()
    # Held-out documents are decided first (doc_ids only) because the store's index needs the kept counts upfront.
    kept = manifest.copy()
    for cluster, table in iter_clusters(domains_dir, ["doc_id"]):
        if table.num_rows != manifest[cluster]:
            raise ParamError(f"tokenize.domains: cluster {cluster} has {table.num_rows} documents but the "
                             f"manifest says {manifest[cluster]}; re-run assign")
        kept[cluster] -= int(held_out(table.column("doc_id").to_pylist(), holdout, seed).sum())
    heldout_chunks: list[tuple[np.ndarray, np.ndarray]] = []

    def chunks():
        with tqdm(total=int(manifest.sum()), desc="tokenize", unit="doc") as bar:
            for _, table in iter_clusters(domains_dir, ["doc_id", "text"]):
                out = held_out(table.column("doc_id").to_pylist(), holdout, seed)
                texts = table.column("text").to_pylist()
                if out.any():
                    heldout_chunks.append(tokenize_texts(tokenizer, [t for t, o in zip(texts, out) if o], eos, dtype))
                yield tokenize_texts(tokenizer, [t for t, o in zip(texts, out) if not o], eos, dtype)
                bar.update(table.num_rows)

    meta = {"vocab_size": int(vocab), "eos_id": eos}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        summary = write_token_store(tmp, chunks(), kept, meta)
        tokenizer.save(str(tmp / "tokenizer.json"))
        if heldout_chunks:
            (tmp / "heldout").mkdir()
            held = write_token_store(tmp / "heldout", heldout_chunks,
                                     np.array([sum(len(c[1]) for c in heldout_chunks)]), meta)
            summary["heldout_documents"], summary["heldout_tokens"] = held["documents"], held["tokens"]
            write_json(summary, tmp / "store.json")
    log.info("tokenize: %d documents in the store, %d held out", summary["documents"],
             summary.get("heldout_documents", 0))
    return summary
