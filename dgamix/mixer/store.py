"""ClusterStore: memory-mapped tokens of every cluster, read as an endless per-cluster stream.

Each cluster's stream is its epochs back to back; every epoch is the cluster's documents (EOS-terminated, as the
tokenize stage wrote them) in an order reshuffled per epoch from (seed, cluster, epoch). A position in that stream
is all the state a cursor needs, so any rank or worker can jump to any position without replaying reads.

With a token cap (the paper's token-limited regime), only the first `token_cap` tokens of each cluster (in stored
order; the last document cut) exist: the cluster repeats after that many tokens, and the repetitions are counted.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.errors import InputError
from ..formats import token_store

log = logging.getLogger(__name__)


class ClusterStore:
    """The tokenize stage's token store (`directory`), memory-mapped: each cluster's documents read as one endless
    stream of epochs, the documents reshuffled per epoch from (`seed`, cluster, epoch).

    token_cap: keep only each cluster's first `token_cap` tokens (the token-limited regime: the cluster repeats
    after them); None keeps every token. cache_clusters: how many shuffled document orders (one per cluster and
    epoch) are kept in memory. `vocab_size` and `eos_id` come from the store's metadata; `available` is the mask of
    the clusters that have tokens.
    Pickles by reference (the directory, not the tokens), so DataLoader workers reopen the memory map."""

    def __init__(self, directory: str | Path, token_cap: int | None = None, seed: int = 0, cache_clusters: int = 8192):
        directory = Path(directory)
        if token_cap is not None and (isinstance(token_cap, bool) or not isinstance(token_cap, (int, np.integer))
                                      or token_cap < 1):
            raise ValueError(f"token_cap = {token_cap!r}: expected a positive number of tokens per cluster, or None")
        files = token_store.read(directory, "ClusterStore")
        self.directory = directory
        self.meta = files.meta
        self.token_cap = None if token_cap is None else int(token_cap)
        self.seed = int(seed)
        self.dtype = np.dtype(self.meta["dtype"])
        self.eos_id = int(self.meta["eos_id"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.tokens, self.doc_offsets, self.cluster_offsets = files.tokens, files.doc_offsets, files.cluster_offsets
        full = files.cluster_tokens
        self.cluster_tokens = full if self.token_cap is None else np.minimum(full, self.token_cap)
        self._cache: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_size = cache_clusters

    def __getstate__(self) -> dict[str, object]:
        # Pickled by reference to its files, never by value: a DataLoader worker started by spawn or forkserver
        # re-opens the memory maps instead of receiving a copy of every token.
        return {"directory": self.directory, "token_cap": self.token_cap, "seed": self.seed,
                "cache_clusters": self._cache_size, "fingerprint": self.fingerprint}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["directory"], state["token_cap"], state["seed"], state["cache_clusters"])
        if self.fingerprint != state["fingerprint"]:
            raise RuntimeError(f"the token store at {self.directory} changed while a copy of it was being sent to a "
                               f"worker: {state['fingerprint']} became {self.fingerprint}")

    @property
    def n_clusters(self) -> int:
        return len(self.cluster_offsets) - 1

    @property
    def available(self) -> np.ndarray:
        """Clusters that have at least one token (the only ones a mixture may draw from)."""
        return self.cluster_tokens > 0

    @property
    def fingerprint(self) -> str:
        return f"{self.meta.get('fingerprint')}:cap={self.token_cap}:seed={self.seed}"

    def _documents(self, cluster: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(start, length) of the cluster's available documents in stored order, cut at the token cap, and whether
        the last one was cut."""
        first, last = self.cluster_offsets[cluster], self.cluster_offsets[cluster + 1]
        starts = self.doc_offsets[first:last]
        lengths = self.doc_offsets[first + 1 : last + 1] - starts
        cut = False
        if self.token_cap is not None:
            ends = np.cumsum(lengths)
            keep = int(np.searchsorted(ends, self.token_cap, side="left")) + 1
            starts, lengths = starts[:keep].copy(), lengths[:keep].copy()
            overflow = int(lengths.sum()) - self.token_cap
            if overflow > 0:
                lengths[-1] -= overflow
                cut = True
        return starts, lengths, cut

    def _pass_layout(self, stream: int, cluster: int, epoch: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(document starts in this pass's order, cumulative lengths, index of the cap-cut document or -1).

        Cached, as reads cluster around passes. `stream` salts the order, so that auxiliary samplers walk other
        orders than the training stream's.
        """
        key = (stream, cluster, epoch)
        layout = self._cache.get(key)
        if layout is not None:
            self._cache.move_to_end(key)
            return layout
        starts, lengths, cut = self._documents(cluster)
        order = np.random.default_rng((self.seed, stream, cluster, epoch)).permutation(len(starts))
        cut_index = int(np.flatnonzero(order == len(starts) - 1)[0]) if cut else -1
        layout = (starts[order], np.cumsum(lengths[order]), cut_index)
        self._cache[key] = layout
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return layout

    def read(self, cluster: int, position: int, length: int, out: np.ndarray | None = None,
             stream: int = 0) -> np.ndarray:
        """Tokens [position, position + length) of the cluster's endless stream (`stream` salts the orders)."""
        per_pass = int(self.cluster_tokens[cluster])
        if per_pass == 0:
            raise ValueError(f"cluster {cluster} has no tokens")
        if out is None:
            out = np.empty(length, dtype=self.dtype)
        filled = 0
        while filled < length:
            epoch, offset = divmod(position + filled, per_pass)
            starts, ends, cut_index = self._pass_layout(stream, cluster, epoch)
            doc = int(np.searchsorted(ends, offset, side="right"))
            while filled < length and doc < len(starts):
                doc_begin = ends[doc - 1] if doc else 0
                within = offset - doc_begin
                take = min(int(ends[doc] - offset), length - filled)
                source = starts[doc] + within
                out[filled : filled + take] = self.tokens[source : source + take]
                if doc == cut_index and offset + take == ends[doc]:
                    out[filled + take - 1] = self.eos_id  # the cap cut this document: it still ends with EOS
                filled += take
                offset += take
                doc += 1
        return out


def check_same_tokenizer(*stores: ClusterStore | str | Path, names: Sequence[str] | None = None) -> None:
    """Refuse token stores read together (the corpus's, then the specialized sets': train.paths.tokens, target,
    target_eval) that come from different tokenizers: the same ids would be other text, and training would align
    with noise without any error. Stores are compared with the first (the corpus's) by their store.json's
    `tokenizer_fingerprint`; a store written before fingerprints existed is accepted with a warning, unless its
    vocabulary size or EOS id already differ. `names` labels the stores in messages (default: their folders)."""
    if names is not None and len(names) != len(stores):
        raise ValueError(f"names = {list(names)}: expected one name per store ({len(stores)})")
    labelled: list[tuple[str, dict[str, Any]]] = []
    for i, store in enumerate(stores):
        if isinstance(store, ClusterStore):
            directory, meta = store.directory, store.meta
        else:
            directory = Path(store)
            meta = token_store.read_meta(directory, names[i] if names else "check_same_tokenizer")
        labelled.append((f"{names[i]} = '{directory}'" if names else f"'{directory}'", meta))
    if len(labelled) < 2:
        return
    reference, ref_meta = labelled[0]
    ref_print = ref_meta.get(token_store.TOKENIZER_KEY)
    for label, meta in labelled[1:]:
        printed = meta.get(token_store.TOKENIZER_KEY)
        rebuild = (f"rebuild {label} with the tokenizer of {reference} (its {token_store.TOKENIZER}): re-run the "
                   "specialized set's tokenize stage (`dgamix tokenize --target <set>`, dvc stage target_tokenize) "
                   "after the corpus's")
        if ref_print is not None and printed is not None:
            if printed != ref_print:
                raise InputError(f"the token stores {reference} (tokenizer {ref_print}) and {label} (tokenizer "
                                 f"{printed}) were tokenized with different tokenizers; {rebuild}")
            continue
        differs = [key for key in ("vocab_size", "eos_id") if meta.get(key) != ref_meta.get(key)]
        if differs:
            raise InputError(f"the token stores {reference} and {label} were tokenized with different tokenizers "
                             + ", ".join(f"({key} {ref_meta.get(key)} vs {meta.get(key)})" for key in differs)
                             + f"; {rebuild}")
        older = label if printed is None else reference
        log.warning("token store %s has no tokenizer fingerprint (written by an older dgamix): whether %s and %s "
                    "share a tokenizer is not checked; re-run its tokenize stage to record one", older, reference,
                    label)
