"""A seeded synthetic corpus of any size, recombined from real paragraphs of ../shared/corpus/generic.

    .venv/bin/python bench/synthetic_corpus.py --docs 100000 --out bench/work/scale/100000/input

Every synthetic document is 1 to 4 paragraphs drawn (uniformly, with numpy's seeded Generator) from the paragraphs
of the documents of ONE `meta.domain`; the domain is drawn with probability proportional to its number of
documents in the generic corpus. Paragraphs are blank-line separated blocks of the real texts (a text without a
blank line falls back to its non-empty lines), stripped, empty ones dropped, each cut to 2,000 characters; they are
joined with a blank line. `meta` = {"source": the source of the first paragraph's document, "domain", "id":
"syn-<i>"}. Nothing artificial is appended, so some documents repeat (mostly one-paragraph documents of small
domains): ingest drops them as exact duplicates and reports how many.

Shard s (SHARD_DOCS documents, `part-SSSSS.jsonl.zst`) is drawn from its own generator seeded by (seed, s), always
for a full shard, so a corpus of N documents is exactly the first N documents of any larger one with the same
seed: the 1M corpus starts with the 100k corpus. Generated data lives in the git-ignored bench/work and is never
committed.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CORPUS  # noqa: E402

SHARD_DOCS = 50_000
MAX_PARAGRAPH_CHARS = 2000
MAX_PARAGRAPHS = 4
_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs of a text (its non-empty lines when it has no blank line), each cut."""
    parts = [p.strip() for p in _BLANK_LINE.split(text)]
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        lines = [line.strip() for line in text.split("\n")]
        parts = [line for line in lines if line] or parts
    return [p[:MAX_PARAGRAPH_CHARS] for p in parts]


def read_jsonl_zst(path: str) -> list[dict]:
    with open(path, "rb") as fh:
        data = zstandard.ZstdDecompressor().stream_reader(fh).read().decode("utf-8")
    return [json.loads(line) for line in data.split("\n") if line.strip()]  # "\n" only: texts may hold U+0085


@dataclass
class Pools:
    domains: list[str]
    probs: np.ndarray             # domain probability, proportional to its document count
    paragraphs: list[list[str]]   # per domain
    sources: list[list[str]]      # per domain, the source of each paragraph's document
    documents: int


def load_pools(corpus_dir: Path = CORPUS / "generic") -> Pools:
    files = sorted(glob.glob(str(corpus_dir / "*.jsonl.zst")))
    if not files:
        raise SystemExit(f"no *.jsonl.zst under {corpus_dir}")
    by_domain: dict[str, tuple[list[str], list[str]]] = {}
    doc_counts: dict[str, int] = {}
    documents = 0
    for path in files:
        for record in read_jsonl_zst(path):
            meta = record.get("meta") or {}
            domain, source = str(meta.get("domain")), str(meta.get("source"))
            paras = paragraphs(record.get("text") or "")
            if not paras:
                continue
            documents += 1
            doc_counts[domain] = doc_counts.get(domain, 0) + 1
            texts, srcs = by_domain.setdefault(domain, ([], []))
            texts.extend(paras)
            srcs.extend([source] * len(paras))
    domains = sorted(by_domain)
    counts = np.array([doc_counts[d] for d in domains], dtype=np.float64)
    return Pools(domains, counts / counts.sum(), [by_domain[d][0] for d in domains],
                 [by_domain[d][1] for d in domains], documents)


def shard_documents(pools: Pools, shard: int, n: int, seed: int) -> list[dict]:
    """The first n documents of shard `shard` (draws are always made for a full shard: prefixes are stable)."""
    rng = np.random.default_rng([seed, shard])
    domain = rng.choice(len(pools.domains), size=SHARD_DOCS, p=pools.probs)
    k = rng.integers(1, MAX_PARAGRAPHS + 1, size=SHARD_DOCS)
    u = rng.random((SHARD_DOCS, MAX_PARAGRAPHS))
    sizes = np.array([len(p) for p in pools.paragraphs])
    picks = np.minimum((u * sizes[domain][:, None]).astype(np.int64), sizes[domain][:, None] - 1)
    docs = []
    for i in range(n):
        d = int(domain[i])
        chosen = picks[i, : k[i]].tolist()
        text = "\n\n".join(pools.paragraphs[d][j] for j in chosen)
        docs.append({"text": text, "meta": {"source": pools.sources[d][chosen[0]], "domain": pools.domains[d],
                                            "id": f"syn-{shard * SHARD_DOCS + i}"}})
    return docs


def generate(n_docs: int, out_dir: Path, seed: int = 0, level: int = 3) -> dict:
    """Write ceil(n_docs / SHARD_DOCS) shards under out_dir (skipped when the manifest says they are complete)."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / "corpus.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("docs") == n_docs and manifest.get("seed") == seed:
            return manifest
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pools = load_pools()
    n_shards = -(-n_docs // SHARD_DOCS)
    chars = 0
    written = 0
    domain_docs: dict[str, int] = {}
    for shard in range(n_shards):
        n = min(SHARD_DOCS, n_docs - shard * SHARD_DOCS)
        docs = shard_documents(pools, shard, n, seed)
        buf = io.StringIO()
        for doc in docs:
            buf.write(json.dumps(doc))
            buf.write("\n")
            chars += len(doc["text"])
            domain_docs[doc["meta"]["domain"]] = domain_docs.get(doc["meta"]["domain"], 0) + 1
        path = out_dir / f"part-{shard:05d}.jsonl.zst"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(zstandard.ZstdCompressor(level=level).compress(buf.getvalue().encode("utf-8")))
        tmp.replace(path)
        written += n
        print(f"generate: shard {shard + 1}/{n_shards} ({written:,} docs)", file=sys.stderr, flush=True)
    manifest = {"docs": n_docs, "seed": seed, "shards": n_shards, "shard_docs": SHARD_DOCS, "chars": chars,
                "source_documents": pools.documents, "paragraph_pool": sum(len(p) for p in pools.paragraphs),
                "domain_docs": dict(sorted(domain_docs.items())),
                "bytes": sum(p.stat().st_size for p in out_dir.glob("part-*.jsonl.zst")),
                "seconds": round(time.perf_counter() - start, 1)}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(generate(args.docs, args.out, args.seed)))


if __name__ == "__main__":
    main()
