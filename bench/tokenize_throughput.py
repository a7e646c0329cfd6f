"""Tokenize throughput: pipeline.tokens.tokenize_texts on the embedded sample, with the BPE the stage trained.

    make run   # (or dvc repro tokenize) so that data/tokens/tokenizer.json exists
    .venv/bin/python bench/tokenize_throughput.py

Also times BPE training on the same documents (vocab 8192), which the stage does once.
"""
from __future__ import annotations

import time

import pyarrow.parquet as pq

from common import ROOT, print_table, write_result

from dgamix.formats.token_store import token_dtype
from dgamix.pipeline.tokens import load_tokenizer, tokenize_texts, train_bpe


def main() -> None:
    texts = pq.read_table(ROOT / "data/docs", columns=["text"]).column("text").to_pylist()
    chars = sum(len(t) for t in texts)
    tokenizer = load_tokenizer(ROOT / "data/tokens/tokenizer.json")
    rows = []
    for repeat in range(2):
        start = time.perf_counter()
        tokens, _ = tokenize_texts(tokenizer, texts, 0, token_dtype(tokenizer.get_vocab_size()))
        elapsed = time.perf_counter() - start
        rows.append({"what": f"tokenize_texts (repeat {repeat})", "docs": len(texts), "tokens": int(tokens.size),
                     "seconds": elapsed, "docs_per_s": len(texts) / elapsed, "tokens_per_s": tokens.size / elapsed,
                     "chars_per_token": chars / tokens.size})
    start = time.perf_counter()
    train_bpe((t[:4000] for t in texts), 8192)
    rows.append({"what": "train_bpe vocab 8192 (first 4000 chars of each doc)", "docs": len(texts),
                 "seconds": time.perf_counter() - start})
    print_table(rows)
    print("wrote", write_result("tokenize_throughput", rows))


if __name__ == "__main__":
    main()
