"""Embedding throughput: the pipeline's embed_texts against the raw model forward on the same batches.

    .venv/bin/python bench/embed_throughput.py [--docs 600] [--device auto]

Both sides embed the same documents in the same length-sorted batches of `--batch-size`. The raw side is
tokenized beforehand and times only `model(features)` (transformer + pooling + normalize) under inference_mode;
the pipeline side times everything it does (character cut, tokenization, batching, fp16 conversion). Their docs/s
ratio is the pipeline's own overhead. Documents come from data/sample (the embedded default).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
import zstandard

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import ROOT, print_table, write_result  # noqa: E402


def load_texts(n: int) -> list[str]:
    texts = []
    for shard in sorted((ROOT / "data/sample/generic").glob("*.jsonl.zst")):
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(shard.read_bytes()), read_across_frames=True).read()
        texts += [json.loads(line)["text"] for line in raw.split(b"\n") if line.strip()]
    rng = np.random.default_rng(0)
    return [texts[i] for i in rng.choice(len(texts), size=min(n, len(texts)), replace=False)]


def main() -> None:
    import torch

    from dgamix.pipeline.embed import CHARS_PER_TOKEN_BOUND, embed_texts, load_encoder

    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    texts = load_texts(args.docs)
    encoder = load_encoder("all-MiniLM-L6-v2", args.device, args.max_tokens)
    device = str(encoder.device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    # The raw side gets the same batches the pipeline forms: longest first, cut the same way.
    order = np.argsort([-len(t) for t in texts], kind="stable")
    cut = args.max_tokens * CHARS_PER_TOKEN_BOUND
    tokenize = getattr(encoder, "preprocess", None) or encoder.tokenize
    batches = [tokenize([texts[i][:cut] for i in order[s : s + args.batch_size]])
               for s in range(0, len(order), args.batch_size)]
    batches = [{k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()} for b in batches]
    tokens = int(sum(b["attention_mask"].sum().item() for b in batches))

    embed_texts(encoder, texts[:64], args.max_tokens, args.batch_size)  # warm-up
    rows = []
    for repeat in range(args.repeats):
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            for features in batches:
                encoder(dict(features))["sentence_embedding"]
        sync()
        raw = time.perf_counter() - start
        start = time.perf_counter()
        embed_texts(encoder, texts, args.max_tokens, args.batch_size)
        sync()
        pipe = time.perf_counter() - start
        rows.append({"repeat": repeat, "device": device, "docs": len(texts), "tokens": tokens,
                     "raw_docs_per_s": len(texts) / raw, "pipeline_docs_per_s": len(texts) / pipe,
                     "pipeline_tokens_per_s": tokens / pipe, "ratio_pipeline_over_raw": raw / pipe,
                     # The projection users ask for: one billion RedPajama-sized documents at this rate.
                     "hours_per_billion_docs": 1e9 / (len(texts) / pipe) / 3600})
    print_table(rows)
    print("wrote", write_result(f"embed_throughput_{device.split(':')[0]}", rows, {"args": vars(args)}))


if __name__ == "__main__":
    main()
