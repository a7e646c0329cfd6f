"""The Ray engine against the local one on a small corpus: wall time per stage and whether the bytes match.

    .venv/bin/python bench/engine_overhead.py [--docs-per-shard 120] [--num-cpus 2]

Cuts the first --docs-per-shard documents of each shard of data/sample/generic into bench/work/engine/raw, then runs
ingest, embed, assign and tokenize once with `engine: local` and once with `engine: ray` (a local Ray with
--num-cpus CPUs; its start-up is timed apart). cluster runs once, locally, and both engines assign with its
centroids. On one machine Ray can only add overhead; this measures how much.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import yaml
import zstandard

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import ROOT, WORK, print_table, write_result  # noqa: E402

STAGES = ("ingest", "embed", "cluster", "assign", "tokenize")


def cut_sample(out: Path, per_shard: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(sorted((ROOT / "data/sample/generic").glob("*.jsonl.zst"))):
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(shard.read_bytes()), read_across_frames=True).read()
        lines = [line for line in raw.split(b"\n") if line.strip()][:per_shard]
        (out / f"part-{i}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))


def params_for(root: Path, engine: str) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"]["inputs"] = [str(root.parent / "raw" / "*.jsonl.zst")]
    params["cluster"]["levels"] = [4, 4]
    params["tokenize"].update(vocab_size=1000, train_docs=500)
    for stage in STAGES:
        for key, value in params[stage].items():
            if isinstance(value, str) and value.startswith(("data/", "metrics/")):
                params[stage][key] = str(root / value)
        if stage != "cluster":
            params[stage]["engine"] = engine
    return params


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.blake2b(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def main() -> None:
    import ray

    from dgamix.pipeline import assign, cluster, embed, ingest, tokens

    parser = argparse.ArgumentParser()
    parser.add_argument("--docs-per-shard", type=int, default=120)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()

    work = WORK / "engine"
    shutil.rmtree(work, ignore_errors=True)
    cut_sample(work / "raw", args.docs_per_shard)
    modules = {"ingest": ingest, "embed": embed, "assign": assign, "tokenize": tokens}
    rows = []
    seconds: dict[str, dict[str, float]] = {}
    for engine in ("local", "ray"):
        params = params_for(work / engine, engine)
        if engine == "ray":
            start = time.perf_counter()
            ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
            rows.append({"stage": "ray.init", "engine": "ray", "seconds": round(time.perf_counter() - start, 2)})
        for stage in ("ingest", "embed", "cluster", "assign", "tokenize"):
            if stage == "cluster":
                if engine == "local":
                    cluster.run(params)
                else:
                    shutil.copytree(work / "local/data/clusters", work / "ray/data/clusters")
                continue
            start = time.perf_counter()
            modules[stage].run(params)
            seconds.setdefault(stage, {})[engine] = time.perf_counter() - start
    for stage, by_engine in seconds.items():
        output = {"ingest": "docs", "embed": "embeddings", "assign": "domains", "tokenize": "tokens"}[stage]
        same = digests(work / "local/data" / output) == digests(work / "ray/data" / output)
        rows.append({"stage": stage, "local_s": round(by_engine["local"], 2), "ray_s": round(by_engine["ray"], 2),
                     "same_bytes": same})
    ray.shutdown()
    print_table(rows[1:])
    print(f"ray.init: {rows[0]['seconds']} s")
    print("wrote", write_result("engine_overhead", rows, {"args": vars(args)}))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
