"""Faster CPU encoders, side by side in one run: docs/s and fidelity to the fp32 torch reference.

    .venv/bin/python bench/encoder_backends.py [--docs 6000] [--speed-docs 2000] [--levels 16 16] [--ov-precision f32]

Documents: a seeded sample of ../shared/corpus/generic. Every backend embeds the same documents through the
pipeline's own path (embed_texts: character cut, length-sorted batches, fp16 output), so docs/s are comparable;
the speed column times the first --speed-docs of them, after a warm-up batch. Fidelity (pipeline/fidelity.py):
mean cosine to the torch fp32 vectors, and fine-cluster agreement under a hierarchical k-means fit on the torch
vectors at --levels (the goal: >= 0.99 and >= 0.95). The int8 export is calibrated on a seeded sample of the same
corpus, as the embed stage does.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import CORPUS, print_table, write_result  # noqa: E402

BACKENDS = ("torch", "openvino", "openvino-int8")


def corpus_texts(n: int, seed: int) -> list[str]:
    texts = []
    for shard in sorted((CORPUS / "generic").glob("*.jsonl.zst")):
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(shard.read_bytes()), read_across_frames=True).read()
        texts += [json.loads(line)["text"] for line in raw.split(b"\n") if line.strip()]
    rng = np.random.default_rng(seed)
    return [texts[i] for i in rng.choice(len(texts), size=min(n, len(texts)), replace=False)]


def main() -> None:
    import torch

    from dgamix.pipeline.embed import CHARS_PER_TOKEN_BOUND, embed_texts, load_encoder
    from dgamix.pipeline.encoders import OpenVINOEncoder, ensure_openvino_export
    from dgamix.pipeline.fidelity import fidelity_report

    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=6000, help="documents the fidelity is measured on")
    parser.add_argument("--speed-docs", type=int, default=2000, help="of those, documents the speed is timed on")
    parser.add_argument("--levels", type=int, nargs="+", default=[16, 16])
    parser.add_argument("--calibration-docs", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ov-precision", default=None, help="f32: force OpenVINO to fp32 (a CPU without AMX)")
    args = parser.parse_args()

    texts = corpus_texts(args.docs + args.calibration_docs, args.seed)
    texts, calibration = texts[: args.docs], [t[: args.max_tokens * CHARS_PER_TOKEN_BOUND]
                                              for t in texts[args.docs :]]
    st_model = load_encoder("all-MiniLM-L6-v2", "cpu", args.max_tokens)
    vectors, rows = {}, []
    with tempfile.TemporaryDirectory() as cache:
        for backend in BACKENDS:
            start = time.perf_counter()
            encoder = st_model
            if backend != "torch":  # exported into the cache as the embed stage does, then loaded
                ensure_openvino_export(lambda: st_model, "all-MiniLM-L6-v2", backend, Path(cache),
                                       calibration if backend == "openvino-int8" else None)
                encoder = OpenVINOEncoder(st_model, Path(cache) / backend / "model.xml", backend, args.ov_precision)
            prepare_s = time.perf_counter() - start
            embed_texts(encoder, texts[:64], args.max_tokens, args.batch_size)  # warm-up
            start = time.perf_counter()
            speed = embed_texts(encoder, texts[: args.speed_docs], args.max_tokens, args.batch_size)
            seconds = time.perf_counter() - start
            rest = embed_texts(encoder, texts[args.speed_docs :], args.max_tokens, args.batch_size)
            vectors[backend] = np.concatenate([speed, rest])
            rows.append({"backend": backend, "precision": getattr(encoder, "precision", "f32"),
                         "export_s": round(prepare_s, 1), "docs_per_s": round(args.speed_docs / seconds, 1)})
    reference = vectors["torch"].astype(np.float32)
    for row in rows:
        row["speedup_vs_torch"] = round(row["docs_per_s"] / rows[0]["docs_per_s"], 2)
        report = fidelity_report(reference, vectors[row["backend"]].astype(np.float32), args.levels, args.seed)
        cos = (reference * vectors[row["backend"]].astype(np.float32)).sum(1) / (
            np.linalg.norm(reference, axis=1) * np.linalg.norm(vectors[row["backend"]].astype(np.float32), axis=1))
        row.update({"mean_cosine": round(report["mean_cosine"], 5), "min_cosine": round(float(cos.min()), 4),
                    "cluster_agreement": round(report["cluster_agreement"], 4), "passes": report["passed"]})
    print_table(rows)
    name = "encoder_backends" + (f"_{args.ov_precision}" if args.ov_precision else "")
    print("wrote", write_result(name, rows, {"args": vars(args), "torch_threads": torch.get_num_threads(),
                                                          "fidelity_docs": len(texts)}))


if __name__ == "__main__":
    main()
