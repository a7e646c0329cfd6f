"""Importance bases of the corpus targets at levels [64, 64]: coverage and the top clusters' dominant sources.

    .venv/bin/python bench/prepare_corpus.py      # once
    .venv/bin/python bench/importance_bases.py

Clusters ../shared/corpus/generic at [64, 64] (seed 0), embeds each target's spec set with the same model, routes
it down the same tree, and reports how many clusters its importance histogram covers, how many hold 90% of its
mass, and the dominant ground-truth domain (meta.domain) of its top clusters.
"""
from __future__ import annotations

import os
from math import prod

import numpy as np
import polars as pl

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import CORPUS, WORK, print_table, write_result  # noqa: E402

from dgamix.pipeline.sampling import gather_rows, sample_rows  # noqa: E402
from dgamix.formats.embeddings import load as load_embeddings  # noqa: E402
from dgamix.pipeline.embed import embed_texts, load_encoder  # noqa: E402
from dgamix.pipeline.kmeans import HierarchicalKMeans  # noqa: E402
from dgamix.pipeline.readers import Record, iter_records  # noqa: E402

WORKDIR = WORK / "generic"
LEVELS = [64, 64]


def main() -> None:
    arrays = load_embeddings(WORKDIR / "embeddings", WORKDIR / "docs")
    x = np.concatenate([np.asarray(a) for a in arrays]).astype(np.float32)
    domains = pl.read_parquet(WORKDIR / "docs" / "*.parquet")["source"].to_numpy()
    fit = gather_rows([x], sample_rows(len(x), prod(LEVELS) * 256, 0))
    model = HierarchicalKMeans(LEVELS, seed=0).fit(fit)
    corpus_clusters = model.predict(x)[0][:, -1]
    frame = pl.DataFrame({"cluster": corpus_clusters, "domain": domains})
    dominant = (frame.group_by("cluster", "domain").len().sort("cluster", "len", descending=[False, True])
                .group_by("cluster", maintain_order=True).agg(pl.col("domain").first(), pl.col("len").sum().alias("docs"),
                                                              (pl.col("len").first() / pl.col("len").sum()).alias("purity")))
    lookup = {r["cluster"]: r for r in dominant.iter_rows(named=True)}
    encoder = load_encoder("all-MiniLM-L6-v2", "auto", 128)
    rows, details = [], {}
    for target in sorted(p.name for p in (CORPUS / "targets").iterdir()):
        texts = [r.text for r in iter_records(str(CORPUS / "targets" / target / "spec.jsonl.zst"))
                 if isinstance(r, Record)]
        clusters = model.predict(embed_texts(encoder, texts, 128))[0][:, -1]
        hist = np.bincount(clusters, minlength=model.n_clusters) / len(clusters)
        order = np.argsort(-hist, kind="stable")
        top = order[:5]
        top_desc = [f"{c}:{hist[c]:.2f}:{lookup[c]['domain'] if c in lookup else '(no corpus docs)'}" for c in top]
        rows.append({"target": target, "spec_docs": len(texts), "clusters_covered": int((hist > 0).sum()),
                     "clusters_for_90pct": int(np.searchsorted(np.cumsum(hist[order]), 0.9) + 1),
                     # mass on clusters whose dominant corpus domain is the target's own domain
                     "mass_on_own_domain_clusters": float(sum(hist[c] for c in np.flatnonzero(hist)
                                                              if c in lookup and lookup[c]["domain"] == target)),
                     "top5 (cluster:mass:dominant domain)": " ".join(top_desc)})
        details[target] = [{"cluster": int(c), "mass": float(hist[c]), **({k: lookup[c][k] for k in ("domain", "docs", "purity")} if c in lookup else {})}
                           for c in order[:20] if hist[c] > 0]
    print_table(rows)
    print("wrote", write_result("importance_bases", rows, {"levels": LEVELS, "top_clusters": details}))


if __name__ == "__main__":
    main()
