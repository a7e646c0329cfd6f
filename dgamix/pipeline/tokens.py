"""Stage 5, tokenize: every cluster's documents -> one memory-mappable token store with a per-cluster index.

(The module is `tokens`, so as not to shadow the standard library's `tokenize`.)

The store's layout is `dgamix.formats.token_store`. Besides it, tokenize.output holds `tokenizer.json` (the one
used) and `heldout/`: the held-out generic documents (`holdout_fraction` of them, chosen by a hash of their
doc_id, so the choice does not depend on the clustering or the shard order), as a one-cluster store of the same
layout. They are not in the training store: the reference trainer's generic loss is measured on them.

With `tokenize.docs` set (what the target stages do), the documents of that ingest output are tokenized as one
cluster, in their order, with the corpus's tokenizer: the specialized set's own store.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np
import pyarrow.parquet as pq

from ..core.atomic import atomic_path, write_npy
from ..core.errors import InputError, ParamError
from ..core.config import load
from ..core.sections import TokenizeConfig
from ..formats import docs, domains, token_store
from ..formats.token_store import token_dtype
from .engine import Engine
from .sampling import sample_texts

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


def held_out(doc_ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Pure step: which documents are held out. A seeded hash of the doc_id, uniform in [0, 1), below `fraction`."""
    salt = str(seed).encode()
    draws = np.fromiter((int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8, salt=salt[:16]).digest(), "big")
                         for d in doc_ids), dtype=np.uint64, count=len(doc_ids))
    return draws.astype(np.float64) / 2.0**64 < fraction


class TokenizeTask(NamedTuple):
    """One engine item of TokenizeShard (absolute paths: a Ray worker's working directory is not ours)."""

    shard: str  # the domains shard read
    staged: str  # the prefix of the token parts it writes (<staged>.train_tokens.bin, ...)


class TokenizeShard:
    """The per-task step of either engine: one domains shard -> its tokens, held-out documents apart, staged.

    A domains shard holds one row group per cluster, in cluster order, so the staged arrays are in (cluster,
    ingest order) order within the shard; the driver then interleaves shards cluster by cluster. Each task opens
    one shard's Parquet footer only: with thousands of clusters those footers are large, and holding every
    shard's at once grew with the corpus. Holds the tokenizer as its JSON text so it travels to Ray workers as is.
    """

    def __init__(self, tokenizer_json: str, eos: int, dtype: str, holdout: float, seed: int):
        self.tokenizer_json, self.eos, self.dtype = tokenizer_json, eos, np.dtype(dtype)
        self.holdout, self.seed = holdout, seed
        self._tokenizer = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}  # the Rust tokenizer is rebuilt from its JSON where it runs

    def __call__(self, task: TokenizeTask) -> dict[str, Any]:
        from tokenizers import Tokenizer

        shard, staged = task.shard, task.staged
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
        clusters, parts = [], {"train": [], "heldout": []}
        counts: dict[str, list[int]] = {"train": [], "heldout": []}
        with domains.open_shard(Path(shard)) as parquet:
            for group in range(parquet.metadata.num_row_groups):  # one cluster's texts in memory at a time
                table = parquet.read_row_group(group, columns=["doc_id", "text", "cluster"])
                ids = np.unique(table.column("cluster").to_numpy())
                if len(ids) != 1:
                    raise ParamError(f"tokenize.domains: row group {group} of {shard} holds clusters "
                                     f"{ids.tolist()[:5]} (expected exactly one cluster per row group); re-run assign")
                clusters.append(int(ids[0]))
                out = held_out(table.column("doc_id").to_pylist(), self.holdout, self.seed)
                texts = table.column("text").to_pylist()
                for kind, mask in (("train", ~out), ("heldout", out)):
                    chosen = [t for t, m in zip(texts, mask) if m]
                    counts[kind].append(len(chosen))
                    if chosen:
                        parts[kind].append(tokenize_texts(self._tokenizer, chosen, self.eos, self.dtype))
        for kind in ("train", "heldout"):
            with atomic_path(f"{staged}.{kind}_tokens.bin") as tmp, open(tmp, "wb") as fh:
                for tokens_, _ in parts[kind]:
                    fh.write(tokens_.tobytes())
            write_npy(_concat([n for _, n in parts[kind]], np.int64), f"{staged}.{kind}_lengths.npy")
        return {"clusters": np.array(clusters, dtype=np.int64), "train": np.array(counts["train"], dtype=np.int64),
                "heldout": np.array(counts["heldout"], dtype=np.int64)}


def interleave(staged: list[str], parts: list[dict[str, Any]], kind: str, n_clusters: int, dtype: np.dtype
               ) -> tuple[np.ndarray, Iterable[tuple[np.ndarray, np.ndarray]]]:
    """Documents per cluster, and the staged (tokens, lengths) chunks of `kind` in cluster order, shard order
    within a cluster (the order of the manifest's files). Token slices are read, not memory-mapped, so that what
    has been copied does not stay resident; what stays is 16 bytes per document (lengths and offsets) and one
    open file per shard."""
    per_cluster = np.zeros(n_clusters, dtype=np.int64)
    for part in parts:
        np.add.at(per_cluster, part["clusters"], part[kind])

    def chunks() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        _allow_open_files(len(staged) + 64)
        shards = []
        try:
            for path, part in zip(staged, parts):
                lengths = np.load(f"{path}.{kind}_lengths.npy")
                doc_start = np.zeros(len(part[kind]) + 1, dtype=np.int64)
                doc_start[1:] = np.cumsum(part[kind])
                token_start = np.zeros(len(lengths) + 1, dtype=np.int64)
                token_start[1:] = np.cumsum(lengths)
                where = {c: i for i, c in enumerate(part["clusters"].tolist())}
                shards.append((open(f"{path}.{kind}_tokens.bin", "rb"), lengths, doc_start, token_start, where))
            for cluster in range(n_clusters):
                for fh, lengths, doc_start, token_start, where in shards:
                    group = where.get(cluster)
                    if group is None or doc_start[group] == doc_start[group + 1]:
                        continue
                    first, last = doc_start[group], doc_start[group + 1]
                    fh.seek(int(token_start[first]) * dtype.itemsize)
                    count = int(token_start[last] - token_start[first])
                    yield np.fromfile(fh, dtype=dtype, count=count), lengths[first:last]
        finally:
            for shard in shards:
                shard[0].close()

    return per_cluster, chunks()


def _allow_open_files(needed: int) -> None:
    """Raise the soft limit on open files (often 1,024) toward the hard one when a corpus has that many shards."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _concat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def tokenizer_for(cfg: TokenizeConfig) -> Any:
    """The tokenizer tokenize.tokenizer names, or a byte-level BPE trained here on a seeded sample of the corpus."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    log.info("tokenize: training a byte-level BPE (vocab %d) on up to %d documents", cfg.vocab_size, cfg.train_docs)
    return train_bpe(sample_texts(domains.list_shards(cfg.domains), cfg.train_docs, cfg.seed, TRAIN_CHARS_PER_DOC,
                                  domains.read_shard), cfg.vocab_size)


def store_meta(tokenizer: Any, eos: int) -> dict[str, Any]:
    """What store.json records of the tokenizer: its vocabulary, EOS id and fingerprint (so that a target store
    tokenized with another tokenizer is refused where the stores are read together)."""
    return {"vocab_size": int(tokenizer.get_vocab_size(with_added_tokens=True)), "eos_id": eos,
            token_store.TOKENIZER_KEY: token_store.tokenizer_fingerprint(tokenizer.to_str())}


def tokenize_clusters(tmp: Path, domains_dir: Path, tokenizer: Any, eos: int, holdout: float, seed: int,
                      engine: Engine) -> dict[str, Any]:
    """The corpus: every domains shard tokenized (on the engine), interleaved cluster by cluster into the training
    store, and the held-out documents into `heldout/`. Returns store.json's content."""
    manifest = domains.read_manifest(domains_dir, ["docs"], "tokenize.domains").column("docs").to_numpy()
    shards = domains.list_shards(domains_dir)
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    meta = store_meta(tokenizer, eos)
    staging = tmp / "staged"
    staging.mkdir(parents=True)
    tasks = [TokenizeTask(shard=str(shard.resolve()), staged=str((staging / shard.stem).resolve())) for shard in shards]
    parts = engine.map(TokenizeShard(tokenizer.to_str(), eos, dtype.name, holdout, seed), tasks, "tokenize",
                       weights=[pq.read_metadata(s).num_rows for s in shards], unit="doc")
    staged = [task.staged for task in tasks]
    kept, train_chunks = interleave(staged, parts, "train", len(manifest), dtype)
    held, heldout_chunks = interleave(staged, parts, "heldout", len(manifest), dtype)
    if not np.array_equal(kept + held, manifest):
        bad = int(np.flatnonzero(kept + held != manifest)[0])
        raise ParamError(f"tokenize.domains: cluster {bad} has {int(kept[bad] + held[bad])} documents but the "
                         f"manifest says {int(manifest[bad])}; re-run assign")
    summary = token_store.write(tmp, train_chunks, kept, meta)
    if held.sum():
        (tmp / token_store.HELDOUT).mkdir()
        held_summary = token_store.write(tmp / token_store.HELDOUT, heldout_chunks, np.array([held.sum()]), meta)
        summary["heldout_documents"], summary["heldout_tokens"] = held_summary["documents"], held_summary["tokens"]
        token_store.write_meta(summary, tmp)
    shutil.rmtree(staging)
    return summary


def tokenize_documents(tmp: Path, docs_dir: Path, tokenizer: Any, eos: int) -> dict[str, Any]:
    """A docs folder (the specialized set) as a one-cluster store, in its order. Returns store.json's content."""
    vocab = int(tokenizer.get_vocab_size(with_added_tokens=True))
    texts = [t for shard in docs.list_shards(docs_dir, "tokenize.docs")
             for t in docs.read_shard(shard, ["text"]).column("text").to_pylist()]
    if not texts:
        raise InputError(f"tokenize.docs = '{docs_dir}' holds no document")
    chunk = tokenize_texts(tokenizer, texts, eos, token_dtype(vocab))
    tmp.mkdir(parents=True)
    return token_store.write(tmp, [chunk], np.array([len(texts)]), store_meta(tokenizer, eos))


def run(params: dict[str, Any]) -> dict[str, Any]:
    cfg = load(TokenizeConfig, params.get("tokenize"), "tokenize")
    if cfg.docs is None:
        domains.read_manifest(cfg.domains, ["docs"], "tokenize.domains")  # a missing input fails before training
    tokenizer = tokenizer_for(cfg)
    eos = eos_id(tokenizer, cfg.eos_token)
    with atomic_path(cfg.output) as tmp:
        if cfg.docs is None:
            summary = tokenize_clusters(tmp, cfg.domains, tokenizer, eos, cfg.holdout_fraction, cfg.seed,
                                        Engine.for_stage(params, "tokenize", cfg.engine))
        else:
            summary = tokenize_documents(tmp, cfg.docs, tokenizer, eos)
        tokenizer.save(str(tmp / token_store.TOKENIZER))
    log.info("tokenize: %d documents in the store, %d held out", summary["documents"],
             summary.get("heldout_documents", 0))
    return summary
