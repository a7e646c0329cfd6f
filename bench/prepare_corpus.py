"""Ingest and embed ../shared/corpus/generic into the git-ignored scratch folder bench/work (resumable).

    .venv/bin/python bench/prepare_corpus.py                    # embed.backend openvino (~7 min on 2 cores)
    .venv/bin/python bench/prepare_corpus.py --backend torch    # the reference encoder (~25 min on 2 cores)

The backend is recorded with the embeddings (a different backend re-embeds); the target stages reuse the
corpus's encoder (`embed.encoder_from`), so spec and eval are embedded the same way.

The source label is `meta.domain` (the ground truth), used only to score clusterings, never by the methods.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import CORPUS, WORK  # noqa: E402

from dgamix.pipeline import embed, ingest  # noqa: E402

WORKDIR = WORK / "generic"


BACKENDS = ["openvino", "openvino-int8", "torch"]


def params(backend: str = "openvino", corpus: Path = CORPUS, workdir: Path = WORKDIR,
           embed: dict | None = None) -> dict:
    """The ingest and embed sections for a corpus folder (generic/part-*) into workdir/{docs,embeddings}; `embed`:
    extra embed settings (experiments/gpu_suite.py: device and batch size)."""
    return {
        "ingest": {"inputs": [str(corpus / "generic" / "part-*")], "source_field": "meta.domain",
                   "output": str(workdir / "docs"), "rejects": str(workdir / "rejects.parquet"),
                   "metrics": str(workdir / "ingest.json"), "report": str(workdir / "report.json")},
        "embed": {"docs": str(workdir / "docs"), "output": str(workdir / "embeddings"), "max_tokens": 128,
                  "backend": backend, **(embed or {})},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=BACKENDS, default="openvino",
                        help="embed.backend: openvino is 3-4x faster than torch on CPUs (same pipeline code)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    p = params(args.backend)
    if not (WORKDIR / "docs").exists():
        print(ingest.run(p)["kept"], "documents ingested", file=sys.stderr)
    print(embed.run(p))


if __name__ == "__main__":
    main()
