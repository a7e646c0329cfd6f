"""Ingest memory per document: what deduplication costs as the corpus grows.

    python bench/ingest_dedup.py --sizes 100000 1000000                          # default partitions
    python bench/ingest_dedup.py --sizes 100000 1000000 --partition-docs 131072  # forced: 8 partitions at 1M

A seeded synthetic corpus (files of FILE_DOCS documents, .jsonl.zst, about 200 characters a document, DUP_RATE of
the documents an exact copy of an earlier one, in the same file or an earlier one) is ingested by `dgamix ingest`
(the local engine) in a fresh child process per size. The launcher records the child's wall time and peak RSS
(`ru_maxrss` from os.wait4) and samples its anonymous RSS. Files have the same size at every corpus size, so the
per-file working memory (one file's texts, one staged shard) is the same and the growth between two sizes is what
the run holds per document: "bytes per doc" = (peak at N2 - peak at N1) / (N2 - N1) documents read.

The corpus of N documents is the prefix of any larger one (each file is drawn from its own seed), generated under
the git-ignored bench/work/ingest_dedup/ and never committed. Results: bench/results/ingest_dedup.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, WORK, print_table, write_result  # noqa: E402

BASE = WORK / "ingest_dedup"
FILE_DOCS = 50_000
DUP_RATE = 0.05
WORDS = 25
POLL_S = 0.05


def text_of(j: int, vocab: list[str]) -> str:
    """Document j's text: a function of j alone, so a planted duplicate is rebuilt without holding the corpus."""
    n = len(vocab)
    return f"document {j}: " + " ".join(vocab[(j * 7919 + k * 104729 + k * k * 31) % n] for k in range(WORDS))


def generate(n_docs: int, seed: int = 0) -> Path:
    import numpy as np
    import zstandard

    out = BASE / "input"
    out.mkdir(parents=True, exist_ok=True)
    vocab = [f"w{v:04d}" for v in range(4096)] + ["lorem", "ipsum", "dolor", "sit", "amet"]
    for f in range((n_docs + FILE_DOCS - 1) // FILE_DOCS):
        path = out / f"part-{f:05d}.jsonl.zst"
        if path.exists():
            continue
        rng = np.random.default_rng([seed, f])
        first = f * FILE_DOCS
        dup = rng.random(FILE_DOCS) < DUP_RATE
        earlier = (rng.random(FILE_DOCS) * np.arange(first, first + FILE_DOCS)).astype(np.int64)
        lines = []
        for k in range(FILE_DOCS):
            i = first + k
            j = int(earlier[k]) if dup[k] and i > 0 else i
            lines.append(json.dumps({"text": text_of(j, vocab), "meta": {"source": f"s{i % 7}"}}).encode())
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
        tmp.replace(path)
    return out


def child(n_files: int, out: Path, partition_docs: int | None) -> None:
    """One ingest run over the first n_files files (in a fresh process, measured by the launcher)."""
    sys.path.insert(0, str(ROOT))  # this checkout's dgamix, whatever the environment has installed
    from dgamix.pipeline import ingest

    if partition_docs:
        ingest.PARTITION_DOCS = partition_docs
    inputs = [str(BASE / "input" / f"part-{f:05d}.jsonl.zst") for f in range(n_files)]
    params = {"ingest": {"inputs": inputs, "output": str(out / "docs"), "rejects": str(out / "rejects.parquet"),
                         "report": str(out / "report.json"), "metrics": str(out / "metrics.json")}}
    start = time.perf_counter()
    report = ingest.run(params)
    print(json.dumps({k: report[k] for k in ("read", "kept", "rejected", "duplicates", "shards")}
                     | {"ingest_s": round(time.perf_counter() - start, 2)}))


def measured(cmd: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    anon = 0
    while True:  # wait4 for exactly this child; meanwhile sample its anonymous RSS
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            m = re.search(r"RssAnon:\s+(\d+) kB", Path(f"/proc/{proc.pid}/status").read_text())
            anon = max(anon, int(m.group(1)) if m else 0)
        except OSError:
            pass
        time.sleep(POLL_S)
    out = proc.stdout.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-2000:]}")
    return {"wall_s": round(time.perf_counter() - start, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "anon_rss_mib": round(anon / 1024, 1), **json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--partition-docs", type=int, default=None, help="ingest.PARTITION_DOCS for the run")
    parser.add_argument("--label", default=None, help="a name for this configuration in the results")
    parser.add_argument("--child", nargs=2, metavar=("FILES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(int(args.child[0]), Path(args.child[1]), args.partition_docs)
        return
    import shutil

    sizes = sorted(args.sizes)
    if any(n % FILE_DOCS for n in sizes):
        raise SystemExit(f"--sizes: expected multiples of {FILE_DOCS} (the documents of one input file)")
    generate(sizes[-1])
    rows = []
    for n in sizes:
        out = BASE / "out" / str(n)
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n // FILE_DOCS), str(out)]
        if args.partition_docs:
            cmd += ["--partition-docs", str(args.partition_docs)]
        record = measured(cmd)
        shutil.rmtree(out, ignore_errors=True)
        rows.append({"docs": n, **record})
        print(f"[{n}] {record}", flush=True)
    first = rows[0]
    for row in rows[1:]:
        grown = row["read"] - first["read"]
        row["bytes_per_doc_peak"] = round((row["peak_rss_mib"] - first["peak_rss_mib"]) * 2**20 / grown, 1)
        row["bytes_per_doc_anon"] = round((row["anon_rss_mib"] - first["anon_rss_mib"]) * 2**20 / grown, 1)
    print_table(rows)
    label = args.label or (f"partition_docs_{args.partition_docs}" if args.partition_docs else "default")
    path = ROOT / "bench" / "results" / "ingest_dedup.json"
    previous = json.loads(path.read_text()).get("runs", {}) if path.exists() else {}
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    previous[label] = {"commit": git.stdout.strip(), "partition_docs": args.partition_docs, "rows": rows,
                       "file_docs": FILE_DOCS, "dup_rate": DUP_RATE}
    print(write_result("ingest_dedup", rows, {"runs": previous}))


if __name__ == "__main__":
    main()
