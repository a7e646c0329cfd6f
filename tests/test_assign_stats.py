"""cluster -> assign -> stats on the real fixture corpus; pure stats functions against hand-computed answers."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from dgamix.formats import domains, token_store
from dgamix.pipeline import assign, cluster, stats, tokens
from dgamix.core.errors import InputError, ParamError
from sklearn.metrics import normalized_mutual_info_score

from dgamix.pipeline.stats import class_tfidf_keywords, contingency_scores

from .conftest import load_params


@pytest.fixture
def clustered(workspace):
    params = load_params(workspace)
    cluster.run(params)
    assign.run(params)
    return workspace, params


def test_cluster_outputs_and_determinism(clustered):
    work, params = clustered
    meta = json.loads((work / "data/clusters/clusters.json").read_text())
    assert meta["levels"] == [4, 4] and meta["documents"] == meta["fit_points"] == 240
    first = {p.name: p.read_bytes() for p in (work / "data/clusters").iterdir()}
    cluster.run(params)
    assert {p.name: p.read_bytes() for p in (work / "data/clusters").iterdir()} == first


def test_every_document_lands_in_exactly_one_cluster(clustered):
    work, _ = clustered
    docs = pl.read_parquet(work / "data/docs/*.parquet")
    rows = pl.read_parquet(work / "data/domains/part-*.parquet")
    assert sorted(rows["doc_id"].to_list()) == sorted(docs["doc_id"].to_list())
    assert (rows["cluster"] // 4 == rows["parent_l0"]).all()
    manifest = pl.read_parquet(work / "data/domains/manifest.parquet")
    assert manifest["cluster"].to_list() == list(range(16))  # empty clusters too, with zero counts
    assert manifest["docs"].sum() == len(docs)
    counts = rows.group_by("cluster").len()
    for cluster_id, n in counts.iter_rows():
        assert manifest.filter(pl.col("cluster") == cluster_id)["docs"][0] == n


def test_read_cluster_touches_only_that_clusters_row_groups(clustered):
    work, _ = clustered
    manifest = pl.read_parquet(work / "data/domains/manifest.parquet")
    for row in manifest.iter_rows(named=True):
        table = domains.read_cluster(work / "data/domains", row["cluster"])
        assert table.num_rows == row["docs"]
        assert set(table.column("cluster").to_pylist()) <= {row["cluster"]}
        for file, rg in zip(row["files"], row["row_groups"]):
            group = pq.ParquetFile(work / "data/domains" / file).metadata.row_group(rg)
            names = [group.column(i).path_in_schema for i in range(group.num_columns)]
            column_stats = group.column(names.index("cluster")).statistics
            assert column_stats.min == column_stats.max == row["cluster"]


def test_assign_rejects_mismatched_centroids(clustered):
    work, params = clustered
    np.save(work / "data/clusters/centroids_level0.npy", np.zeros((4, 8), np.float32))
    with pytest.raises(ParamError, match=r"dimension 384 but the centroids .* have 8"):
        assign.run(params)


def test_stats_table_and_metrics(clustered):
    work, params = clustered
    with pytest.raises(FileNotFoundError, match=r"tokenize.output: data/tokens holds no store.json"):
        stats.run(params)  # stats runs after tokenize: without the token store it says so before any work
    params["tokenize"]["vocab_size"] = 1024
    tokens.run(params)
    metrics = stats.run(params)
    table = pl.read_parquet(work / "data/stats/clusters.parquet")
    assert table.height == 16
    assert {"cluster", "parent_l0", "docs", "chars", "tokens", "dominant_source", "purity", "source_shares",
            "mean_distance", "keywords"} <= set(table.columns)
    # tokens: each cluster's training tokens, summing to the store's token count (held-out documents apart)
    store = token_store.read(work / "data/tokens")
    assert table["tokens"].to_list() == store.cluster_tokens.tolist()
    assert table["tokens"].sum() == store.meta["tokens"] > 0 and store.meta["heldout_tokens"] > 0
    assert ((table["tokens"] > 0) == (table["docs"] > 0)).all()
    nonempty = table.filter(pl.col("docs") > 0)
    assert (nonempty["keywords"].list.len() > 0).all()
    shares = nonempty["source_shares"].list.eval(pl.element().struct.field("share")).list.sum()
    np.testing.assert_allclose(shares.to_numpy(), 1.0)
    docs = pl.read_parquet(work / "data/domains/part-*.parquet")
    dominant = docs.group_by("cluster", "source").len().group_by("cluster").agg(pl.col("len").max())["len"].sum()
    assert metrics["purity_fine"] == pytest.approx(dominant / docs.height)
    assert metrics["nmi_fine"] == pytest.approx(
        normalized_mutual_info_score(docs["source"].to_numpy(), docs["cluster"].to_numpy()))
    assert metrics["mean_distance"] == pytest.approx(float((1 - docs["similarity"]).mean()), rel=1e-5)
    assert 0 < metrics["nmi_coarse"] <= 1 and 0 < metrics["purity_coarse"] <= metrics["purity_fine"] + 1e-9
    assert json.loads((work / "data/stats/summary.json").read_text()) == metrics
    assert json.loads((work / "metrics/stats.json").read_text()) == {
        "clusters": 16, "nmi_fine": round(metrics["nmi_fine"], 4)}
    for plot in ("cluster_sizes.csv", "cluster_sizes.png", "source_by_coarse.png"):
        assert (work / "data/stats/plots" / plot).stat().st_size > 0


def test_tokens_column_is_the_stores_training_tokens_and_a_stale_store_is_refused(tmp_path):
    from .mixer_fixtures import synthetic_store

    train_docs = [3, 0, 5]
    directory = synthetic_store(tmp_path / "tokens", train_docs)
    meta = token_store.read_meta(directory)
    token_store.write_meta({**meta, "heldout_documents": 2, "heldout_tokens": 40}, directory)
    store = token_store.read(directory)
    manifest = pl.DataFrame({"cluster": [0, 1, 2], "docs": [4, 0, 6], "chars": [10, 0, 20]})  # 2 held out
    by_source = pl.DataFrame({"cluster": [0, 2], "source": ["a", "b"], "docs": [4, 6], "distance_sum": [1.0, 2.0]})
    counted = stats.training_tokens(store, manifest)
    table, _ = stats.cluster_table(manifest, by_source, [["x"], [], ["y"]], counted)
    offsets = np.load(directory / "doc_offsets.npy")
    per_cluster = [int(offsets[3] - offsets[0]), 0, int(offsets[8] - offsets[3])]  # documents 0-2 and 3-7
    assert table["tokens"].to_list() == per_cluster and table["tokens"].sum() == meta["tokens"]
    assert table["tokens"].dtype == pl.Int64
    for stale in (manifest.head(2), manifest.with_columns(pl.Series("docs", [4, 0, 7])),
                  manifest.with_columns(pl.Series("docs", [2, 2, 6]))):
        with pytest.raises(InputError, match="was not tokenized from these domains .* re-run tokenize"):
            stats.training_tokens(store, stale)


def test_source_heatmap_order_does_not_depend_on_row_order():
    # Sources b and c tie on 3 documents: polars' group_by returns groups in any order, so without a tie-break the
    # heat map's rows (and the PNG's bytes) changed from run to run.
    from dgamix.pipeline.plots import source_shares

    counts = pl.DataFrame({"source": ["a", "b", "c", "b", "c"], "parent_l0": [0, 0, 1, 1, 0],
                           "docs": [5, 1, 2, 2, 1]})
    orders = {tuple(source_shares(counts.sample(fraction=1.0, shuffle=True, seed=s), "parent_l0")[0])
              for s in range(20)}
    assert orders == {("a", "b", "c")}
    sources, grid = source_shares(counts, "parent_l0")
    np.testing.assert_allclose(grid, [[1.0, 0.0], [1 / 3, 2 / 3], [1 / 3, 2 / 3]])


def test_purity_by_hand():
    # clusters 0, 0, 0, 1, 1, 2 with labels a, a, b, b, b, c: the dominant labels cover 2 + 2 + 1 of 6.
    counts = np.array([[2, 1, 0], [0, 2, 0], [0, 0, 1]])
    purity_value, nmi = contingency_scores(counts)
    assert purity_value == pytest.approx(5 / 6)
    assert nmi == pytest.approx(normalized_mutual_info_score(list("aabbbc"), [0, 0, 0, 1, 1, 2]))


def test_class_tfidf_by_hand():
    # Cluster 0 uses "gpl" and "the"; cluster 1 uses "go" and "the"; cluster 2 is empty.
    counts = sp.csr_matrix(np.array([[3, 0, 3], [0, 4, 4], [0, 0, 0]], dtype=float))
    vocabulary = np.array(["gpl", "go", "the"])
    keywords = class_tfidf_keywords(counts, vocabulary, top=1)
    assert keywords == [["gpl"], ["go"], []]  # "the" is in every cluster: lower idf


def test_more_fine_clusters_than_documents_stops_cluster_stage(workspace):
    params = load_params(workspace)
    params["cluster"]["levels"] = [64, 64]
    with pytest.raises(ParamError, match=r"asks for 4096 fine clusters but the corpus has only 240 documents"):
        cluster.run(params)
    assert not (workspace / "data/clusters").exists()


def test_max_fit_docs_caps_the_fit_sample(workspace):
    params = load_params(workspace)
    params["cluster"].update(levels=[4, 4], max_fit_docs=100)
    assert cluster.run(params) == {"levels": [4, 4], "fit_points": 100, "documents": 240}
    params["cluster"]["max_fit_docs"] = 10
    with pytest.raises(ParamError, match=r"cluster.max_fit_docs = 10: expected at least one document per fine "
                                         r"cluster \(16 for levels \[4, 4\]\)"):
        cluster.run(params)


def test_stages_name_a_missing_input(workspace):
    params = load_params(workspace)
    params["embed"]["docs"] = "data/nothing"
    from dgamix.pipeline import embed

    with pytest.raises(ParamError, match=r"embed.docs = 'data/nothing' does not exist"):
        embed.run(params)
    params["cluster"]["embeddings"] = "data/nothing"
    with pytest.raises(ParamError, match=r"cluster.embeddings = 'data/nothing' does not exist"):
        cluster.run(params)
    with pytest.raises(ParamError, match=r"stats.domains = 'data/domains' holds no manifest.parquet"):
        stats.run(params)


def test_contingency_scores_match_per_document_scores():
    rng = np.random.default_rng(0)
    clusters = rng.integers(0, 7, size=500)
    labels = np.where(rng.random(500) < 0.7, clusters % 3, rng.integers(0, 3, size=500))
    table = np.zeros((7, 3))
    np.add.at(table, (clusters, labels), 1)
    purity_value, nmi = contingency_scores(table)
    # purity per document: the share of documents whose label is their cluster's most common label
    dominant = {c: np.bincount(labels[clusters == c]).argmax() for c in np.unique(clusters)}
    assert purity_value == pytest.approx(np.mean([dominant[c] == lab for c, lab in zip(clusters, labels)]))
    assert nmi == pytest.approx(normalized_mutual_info_score(labels, clusters))


def test_fit_on_a_sample_across_shards_is_deterministic(workspace):
    params = load_params(workspace)
    params["cluster"]["points_per_centroid"] = 5  # 16 clusters x 5 = 80 of the 240 documents, from both shards
    first = cluster.run(params)
    centroids = (workspace / "data/clusters/centroids_level1.npy").read_bytes()
    assert first["fit_points"] == 80
    assert cluster.run(params) == first
    assert (workspace / "data/clusters/centroids_level1.npy").read_bytes() == centroids
    assign.run(params)
    assert pl.read_parquet(workspace / "data/domains/manifest.parquet")["docs"].sum() == 240
