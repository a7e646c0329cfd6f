"""tokenize and bases stages on the real fixture corpus; pure bases functions against known answers."""
from __future__ import annotations

import json
import re

import numpy as np
import polars as pl
import pytest
import zstandard

from dgamix.mixer import ClusterStore, Mixture
from dgamix.pipeline import assign, bases, cluster, ingest, tokens
from dgamix.core.errors import InputError, ParamError

from dgamix.formats import domains
from dgamix.pipeline.targets import run_stage, stage_params

from .conftest import load_params, run_target_stages


@pytest.fixture
def tokenized(workspace):
    params = load_params(workspace)
    params["tokenize"]["vocab_size"] = 1024
    cluster.run(params)
    assign.run(params)
    tokens.run(params)
    run_target_stages(params)
    return workspace, params


def test_token_store_round_trips_every_document_and_holds_some_out(tokenized):
    work, params = tokenized
    store = ClusterStore(work / "data/tokens")
    heldout = ClusterStore(work / "data/tokens/heldout")
    meta = json.loads((work / "data/tokens/store.json").read_text())
    assert meta["dtype"] == "uint16" and store.n_clusters == 16 and heldout.n_clusters == 1
    assert meta["documents"] + meta["heldout_documents"] == 240 and meta["heldout_documents"] > 0
    tokenizer = tokens.load_tokenizer(work / "data/tokens/tokenizer.json")
    by_cluster = dict(domains.iter_clusters(work / "data/domains", ["doc_id", "text"]))
    doc, held = 0, 0
    for c in range(16):
        table = by_cluster[c]
        out = tokens.held_out(table.column("doc_id").to_pylist(), params["tokenize"]["holdout_fraction"], 0)
        for text, is_out in zip(table.column("text").to_pylist(), out):
            source, i = (heldout, held) if is_out else (store, doc)
            ids = source.tokens[source.doc_offsets[i]:source.doc_offsets[i + 1]]
            assert ids[-1] == store.eos_id and store.eos_id not in ids[:-1]
            assert tokenizer.decode(ids[:-1].tolist()) == text  # byte-level BPE is lossless
            held, doc = (held + 1, doc) if is_out else (held, doc + 1)
        assert store.cluster_offsets[c + 1] == doc
    assert held == meta["heldout_documents"]


def test_holdout_fraction_outside_0_1_is_a_clear_error(workspace):
    params = load_params(workspace)
    params["tokenize"]["holdout_fraction"] = 1.5
    with pytest.raises(ParamError, match=r"tokenize.holdout_fraction = 1.5: expected 0 <= fraction < 1"):
        tokens.run(params)


def test_holdout_choice_is_a_seeded_fraction():
    ids = [f"doc-{i}" for i in range(20000)]
    out = tokens.held_out(ids, 0.1, seed=0)
    assert abs(out.mean() - 0.1) < 4 * np.sqrt(0.1 * 0.9 / len(ids))  # binomial, 4 sigma
    assert (tokens.held_out(ids, 0.1, seed=0) == out).all() and (tokens.held_out(ids, 0.1, seed=1) != out).any()
    assert not tokens.held_out(ids, 0.0, seed=0).any()


def test_tokenize_is_deterministic_and_accepts_a_given_tokenizer(tokenized):
    work, params = tokenized
    first = json.loads((work / "data/tokens/store.json").read_text())["fingerprint"]
    (work / "given.json").write_bytes((work / "data/tokens/tokenizer.json").read_bytes())
    assert tokens.run(params)["fingerprint"] == first
    params["tokenize"]["tokenizer"] = "given.json"
    assert tokens.run(params)["fingerprint"] == first
    params["tokenize"]["tokenizer"] = "missing.json"
    with pytest.raises(ParamError, match="tokenize.tokenizer = 'missing.json' does not exist"):
        tokens.run(params)


def test_bases_stage_builds_valid_rows_with_the_importance_histogram(tokenized):
    work, params = tokenized
    metrics = bases.run(params)
    names = json.loads((work / "data/bases/names.json").read_text())
    store = ClusterStore(work / "data/tokens")
    mixture = Mixture.from_bases_dir(work / "data/bases")
    mixture.check_store(store.available)
    assert names[0] == "importance" and "natural" in names and "uniform" in names
    assert any(n.startswith("reference:") for n in names) and any(n.startswith("coarse:") for n in names)
    target = pl.read_parquet(work / "data/targets/spec/domains/part-*.parquet")["cluster"].to_numpy()
    expected = np.bincount(target, minlength=16) / len(target)
    np.testing.assert_allclose(mixture.bases.getrow(0).toarray().ravel(), expected)
    natural = mixture.bases.getrow(names.index("natural")).toarray().ravel()
    np.testing.assert_allclose(natural, store.cluster_tokens / store.cluster_tokens.sum())
    assert metrics["importance_clusters_covered"] == len(np.unique(target))
    assert metrics["target_documents"] == 176
    target_store = ClusterStore(work / "data/targets/spec/tokens")
    assert target_store.n_clusters == 1 and target_store.meta["documents"] == 176
    assert json.loads((work / "metrics/bases.json").read_text()) == {
        "bases": len(names), "target_clusters": len(np.unique(target))}


def test_target_store_holds_the_target_in_its_order_with_the_corpus_tokenizer(tokenized):
    work, params = tokenized
    tokenizer = tokens.load_tokenizer(work / "data/tokens/tokenizer.json")
    texts = pl.read_parquet(work / "data/targets/spec/docs/part-*.parquet")["text"].to_list()
    store = ClusterStore(work / "data/targets/spec/tokens")
    assert store.meta["documents"] == len(texts) == 176 and store.eos_id == tokenizer.token_to_id(tokens.EOS)
    for i in (0, 1, len(texts) - 1):
        ids = store.tokens[store.doc_offsets[i]:store.doc_offsets[i + 1]]
        assert ids[-1] == store.eos_id and tokenizer.decode(ids[:-1].tolist()) == texts[i]
    # Same encoder and tree as the corpus: the target's embeddings come from the corpus's model.
    corpus = json.loads(next((work / "data/embeddings").glob("part-*.json")).read_text())
    target = json.loads(next((work / "data/targets/spec/embeddings").glob("part-*.json")).read_text())
    assert {k: target[k] for k in ("model", "max_tokens", "backend")} == {
        k: corpus[k] for k in ("model", "max_tokens", "backend")}


def test_empty_target_and_missing_text_field_are_errors(workspace, tmp_path):
    params = load_params(workspace)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "  "}\n')
    params["targets"]["sets"]["spec"] = [str(empty)]
    with pytest.raises(InputError, match="empty corpus: no document kept from 1 file.s. of targets.sets.spec"):
        run_stage(params, "spec", "ingest", ingest)
    other = tmp_path / "other.jsonl.zst"
    other.write_bytes(zstandard.ZstdCompressor().compress(b'{"body": "a licence"}\n{"body": "another"}\n'))
    params["targets"]["sets"]["spec"] = [str(other)]
    with pytest.raises(InputError, match="rejected 2.*no record has the text field 'text'"):
        run_stage(params, "spec", "ingest", ingest)
    # One path as a plain string is accepted (a list of one); what is not a list of paths is refused, on its own.
    params["targets"]["sets"]["spec"] = str(other)
    assert stage_params(params, "spec", "ingest")["ingest"]["inputs"] == [str(other)]
    for bad in (42, [], ["x", 3]):
        params["targets"]["sets"]["spec"] = bad
        with pytest.raises(ParamError, match=rf"targets.sets.spec = {re.escape(repr(bad))}: expected a non-empty list"):
            stage_params(params, "spec", "ingest")
    params["targets"]["sets"]["spec"] = [str(other)]
    params["targets"]["sets"]["bad name"] = ["x"]
    with pytest.raises(ParamError, match="set name 'bad name' must be a plain folder name"):
        stage_params(params, "spec", "ingest")
    with pytest.raises(ParamError, match="--target nowhere: not in targets.sets"):
        stage_params(load_params(workspace), "nowhere", "ingest")


def test_to_distribution_known_answer():
    available = np.array([True, True, False, True])
    row, dropped = bases.to_distribution(np.array([2.0, 0.0, 1.0, 1.0]), available, "x")
    np.testing.assert_allclose(row, [2 / 3, 0.0, 0.0, 1 / 3])
    assert dropped == pytest.approx(0.25)
    smoothed, _ = bases.to_distribution(np.array([2.0, 0.0, 0.0, 0.0]), available, "x", smoothing=1.0)
    np.testing.assert_allclose(smoothed, [3 / 5, 1 / 5, 0.0, 1 / 5])
    with pytest.raises(InputError, match="basis 'x' has all its mass on empty clusters"):
        bases.to_distribution(np.array([0.0, 0.0, 3.0, 0.0]), available, "x")


def test_validate_bases_errors():
    available = np.array([True, True, False])
    with pytest.raises(InputError, match="sums to 0.900000000, expected 1"):
        bases.validate_bases(np.array([[0.5, 0.4, 0.0]]), ["a"], available)
    with pytest.raises(InputError, match="bases have 4 clusters but the store has 3"):
        bases.validate_bases(np.array([[0.5, 0.25, 0.0, 0.25]]), ["a"], available)  # a cluster that does not exist
    with pytest.raises(InputError, match="basis 'a' puts mass 0.25 on clusters with no tokens"):
        bases.validate_bases(np.array([[0.5, 0.25, 0.25]]), ["a"], available)
    with pytest.raises(InputError, match="basis 'b' has negative, NaN or inf probabilities"):
        bases.validate_bases(np.array([[0.5, 0.5, 0.0], [1.5, -0.5, 0.0]]), ["a", "b"], available)
    bases.validate_bases(np.array([[0.5, 0.5, 0.0]]), ["a"], available)


def test_held_out_eval_set_is_tokenized_apart(tokenized):
    work, params = tokenized
    held_out = ClusterStore(work / "data/targets/eval/tokens")
    assert held_out.meta["documents"] == 75 and held_out.n_clusters == 1
    params["targets"]["sets"]["eval"] = ["nowhere.jsonl"]
    with pytest.raises(ParamError, match="targets.sets.eval: 'nowhere.jsonl' matches no file"):
        run_stage(params, "eval", "ingest", ingest)


# ---- bases on a corpus of small sources ------------------------------------------------------------------------
PLANTED_SOURCE = "tiny-source"


def held_out_text(fraction: float, seed: int) -> str:
    """A document unlike the sample's (so it sits alone in its cluster) that tokenize holds out at this fraction."""
    for i in range(10_000):
        text = (f"Recette {i}: battre six oeufs avec du sucre, ajouter la farine et cuire quarante minutes au four; "
                "servir la tarte aux pommes tiede avec de la creme.")
        if tokens.held_out([ingest.content_hash(text)], fraction, seed)[0]:
            return text
    raise AssertionError("no held-out text found")


@pytest.fixture
def small_sources(tmp_path, sample_records):
    """Eighty sample documents (most packages once or a few times) and one planted source whose only document
    tokenize holds out, one cluster a document: ingest, embed, cluster, assign and tokenize run for real."""
    from .conftest import chdir, make_params, write_jsonl_zst

    fraction, seed = 0.25, 0
    planted = held_out_text(fraction, seed)
    (tmp_path / "raw").mkdir()
    records = sample_records[0][:40] + sample_records[1][:40] + [{"text": planted, "meta": {"source": PLANTED_SOURCE}}]
    write_jsonl_zst(records, tmp_path / "raw" / "part-0.jsonl.zst")
    params = make_params(tmp_path, ["raw/*.jsonl.zst"], [len(records)])  # one cluster a document
    params["tokenize"].update(vocab_size=300, holdout_fraction=fraction, seed=seed)
    params["bases"]["target"] = "data/domains"  # the corpus as its own specialized set: no target stages needed
    with chdir(tmp_path):
        from dgamix.pipeline import embed

        for stage in (ingest, embed, cluster, assign, tokens):
            stage.run(params)
        yield tmp_path, params, ingest.content_hash(planted)


def test_bases_leave_out_a_source_whose_only_document_is_held_out(small_sources, caplog):
    work, params, planted_id = small_sources
    table = pl.read_parquet(work / "data/domains/part-*.parquet")
    mine = table.filter(pl.col("doc_id") == planted_id)
    assert mine["source"].to_list() == [PLANTED_SOURCE]
    assert table.filter(pl.col("cluster") == mine["cluster"][0]).height == 1  # alone in its cluster: now empty
    with caplog.at_level("WARNING", logger="dgamix.pipeline.bases"):
        summary = bases.run(params)
    names = json.loads((work / "data/bases/names.json").read_text())
    assert f"reference:{PLANTED_SOURCE}" not in names and any(n.startswith("reference:") for n in names)
    assert "importance" in names and "natural" in names
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    left_out = [m for m in messages if f"leaving out basis 'reference:{PLANTED_SOURCE}'" in m]
    assert len(left_out) == 1 and "held out" in left_out[0], messages
    assert "held out" in summary["dropped_bases"][f"reference:{PLANTED_SOURCE}"]
    # Every basis left out is a source none of whose documents reached the training store.
    store = ClusterStore(work / "data/tokens")
    for name in summary["dropped_bases"]:
        clusters_ = table.filter(pl.col("source") == name.removeprefix("reference:"))["cluster"].to_numpy()
        assert (store.cluster_tokens[clusters_] == 0).all(), name
    # The two other warnings: clusters of about one document, and more bases than exact DGA can afford.
    assert any("of the 81 fine clusters hold at most 2 documents" in m for m in messages), messages
    assert len(names) + 1 > bases.EXACT_DGA_MAX_PASSES
    assert any(f"{len(names)} bases: exact DGA" in m and f"costs {len(names) + 1} backward passes" in m
               for m in messages), messages
    Mixture.from_bases_dir(work / "data/bases").check_store(store.available)


def test_clustering_warnings_thresholds():
    roomy = np.full(16, 15)
    assert bases.clustering_warnings(bases.EXACT_DGA_MAX_PASSES - 1, roomy) == []
    [cost] = bases.clustering_warnings(bases.EXACT_DGA_MAX_PASSES, roomy)
    assert f"costs {bases.EXACT_DGA_MAX_PASSES + 1} backward passes" in cost
    half = np.array([1] * 8 + [5] * 8)  # half the clusters with about one document: not most of them
    assert bases.clustering_warnings(3, half) == []
    [sparse] = bases.clustering_warnings(3, np.array([1] * 9 + [5] * 7))
    assert "9 of the 16 fine clusters hold at most 2 documents" in sparse


def test_usable_references_keep_a_source_with_any_training_token():
    tokens_ = np.array([10, 0, 5, 0])
    docs_ = np.array([3, 1, 2, 0])
    reference = {"a": np.array([2.0, 1.0, 0.0, 0.0]), "b": np.array([0.0, 1.0, 0.0, 0.0])}
    kept, dropped = bases.usable_references(reference, tokens_, docs_)
    assert list(kept) == ["a"] and list(dropped) == ["reference:b"] and "held out" in dropped["reference:b"]


# ---- every store records its tokenizer; stores read together must share it -----------------------------------
def test_target_store_from_another_tokenizer_is_refused(tokenized, caplog):
    from dgamix.formats import token_store
    from dgamix.mixer.store import check_same_tokenizer

    work, params = tokenized
    stores = {"corpus": work / "data/tokens", "heldout": work / "data/tokens/heldout",
              "spec": work / "data/targets/spec/tokens", "eval": work / "data/targets/eval/tokens"}
    expected = token_store.tokenizer_fingerprint((work / "data/tokens/tokenizer.json").read_text())
    for name, directory in stores.items():
        assert json.loads((directory / "store.json").read_text())["tokenizer_fingerprint"] == expected, name
    corpus = ClusterStore(stores["corpus"])
    check_same_tokenizer(corpus, stores["spec"], stores["eval"], names=["tokens", "target", "target_eval"])

    # The spec set tokenized with another BPE of the same vocabulary size (same EOS id): only the fingerprint tells.
    other = {**params, "tokenize": {**params["tokenize"], "output": "data/other_tokens", "train_docs": 40}}
    tokens.run(other)
    run_stage(other, "spec", "tokenize", tokens)
    spec = ClusterStore(stores["spec"])
    assert (spec.vocab_size, spec.eos_id) == (corpus.vocab_size, corpus.eos_id)
    assert spec.meta["tokenizer_fingerprint"] != expected
    with pytest.raises(InputError, match=r"token stores tokens = '.*data/tokens' \(tokenizer [0-9a-f]{32}\) and "
                                         r"target = '.*data/targets/spec/tokens' \(tokenizer [0-9a-f]{32}\) were "
                                         r"tokenized with different tokenizers; rebuild target = .* re-run the "
                                         r"specialized set's tokenize stage"):
        check_same_tokenizer(corpus, spec, stores["eval"], names=["tokens", "target", "target_eval"])
    with pytest.raises(InputError, match="different tokenizers"):
        check_same_tokenizer(stores["corpus"], stores["eval"], stores["spec"])  # by folder, in any order after the first

    # A store written before the fingerprint existed is accepted, with a warning (a different vocabulary is not).
    meta = json.loads((stores["spec"] / "store.json").read_text())
    del meta["tokenizer_fingerprint"]
    (stores["spec"] / "store.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="dgamix.mixer.store"):
        check_same_tokenizer(corpus, stores["spec"])
    assert any("has no tokenizer fingerprint" in r.getMessage() for r in caplog.records)
    (stores["spec"] / "store.json").write_text(json.dumps({**meta, "vocab_size": 4096}))
    with pytest.raises(InputError, match=r"different tokenizers \(vocab_size 1024 vs 4096\)"):
        check_same_tokenizer(corpus, stores["spec"])


def restamp_keeping_row_groups(path, version: bytes) -> None:
    """Rewrite a Parquet file with another dgamix format version, its row groups (one per cluster) as they were."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    metadata = {**parquet.schema_arrow.metadata, b"dgamix.format_version": version}
    parts = [parquet.read_row_group(i).replace_schema_metadata(metadata) for i in range(parquet.num_row_groups)]
    parquet.close()
    with pq.ParquetWriter(path, parts[0].schema) as writer:
        for part in parts:
            writer.write_table(part)


def test_stages_refuse_a_domains_shard_of_another_version(workspace):
    """tokenize, stats and bases read the domains shards themselves, not only the manifest: one shard stamped with
    another format version stops each of them, naming that shard."""
    from dgamix.core.errors import FormatError
    from dgamix.pipeline import stats

    params = load_params(workspace)
    params["tokenize"]["vocab_size"] = 300
    params["bases"]["target"] = "data/domains"
    for stage in (cluster, assign, tokens):
        stage.run(params)
    shard = workspace / "data/domains/part-00001.parquet"
    restamp_keeping_row_groups(shard, b"2")
    domains.read_manifest(workspace / "data/domains")  # the manifest is still current
    for stage in (tokens, stats, bases):
        with pytest.raises(FormatError, match=r"part-00001.parquet is domains format version 2; this dgamix reads "
                                              r"versions \[1\]"):
            stage.run(params)
