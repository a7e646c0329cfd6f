"""Ingest and embed ../shared/corpus/generic into the git-ignored scratch folder bench/work (resumable; ~25 min on 2 cores).

    .venv/bin/python bench/prepare_corpus.py

The source label is `meta.domain` (the ground truth), used only to score clusterings, never by the methods.
"""
from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import CORPUS, WORK  # noqa: E402

from dgamix.pipeline import embed, ingest  # noqa: E402

WORKDIR = WORK / "generic"


def params() -> dict:
    return {
        "ingest": {"inputs": [str(CORPUS / "generic" / "part-*")], "source_field": "meta.domain",
                   "output": str(WORKDIR / "docs"), "rejects": str(WORKDIR / "rejects.parquet"),
                   "metrics": str(WORKDIR / "ingest.json")},
        "embed": {"docs": str(WORKDIR / "docs"), "output": str(WORKDIR / "embeddings"), "max_tokens": 128},
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    p = params()
    if not (WORKDIR / "docs").exists():
        print(ingest.run(p)["kept"], "documents ingested", file=sys.stderr)
    print(embed.run(p))


if __name__ == "__main__":
    main()
