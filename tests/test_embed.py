"""embed: real MiniLM, row alignment, resume after a kill, and mismatches caught."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from dgamix.formats import embeddings
from dgamix.pipeline import cluster, embed
from dgamix.core.errors import InputError, ParamError

from .conftest import load_params


def test_embed_texts_keeps_input_order_and_matches_the_model(encoder):
    texts = ["short", "a much longer text about the GNU General Public License " * 5, "medium length text"]
    ours = embed.embed_texts(encoder, texts, max_tokens=128, batch_size=2)
    direct = encoder.encode(texts, convert_to_numpy=True)
    assert ours.dtype == np.float16 and ours.shape == (3, 384)
    np.testing.assert_allclose(ours.astype(np.float32), direct, atol=2e-3)


def test_only_the_first_max_tokens_tokens_count(encoder):
    # About 60 tokens but fewer characters than the pre-tokenization cut, so only the token limit can explain it.
    head = "The licensee may copy and distribute verbatim copies of the program. " * 4
    tail = " zebra giraffe " * 5
    assert len(head + tail) < 32 * embed.CHARS_PER_TOKEN_BOUND
    a = embed.embed_texts(encoder, [head + tail], max_tokens=32)
    b = embed.embed_texts(encoder, [head], max_tokens=32)
    np.testing.assert_array_equal(a, b)
    longer = embed.embed_texts(encoder, [head + tail, head], max_tokens=128)
    assert not np.array_equal(longer[0], longer[1])  # with room for the tail, it does change the vector


def test_embeddings_are_row_aligned_with_docs(embedded_workspace):
    arrays = embeddings.load(embedded_workspace / "data/embeddings", embedded_workspace / "data/docs")
    shards = sorted((embedded_workspace / "data/docs").glob("part-*.parquet"))
    assert [len(a) for a in arrays] == [pq.read_metadata(s).num_rows for s in shards]
    assert all(a.dtype == np.float16 for a in arrays)
    norms = np.linalg.norm(np.concatenate(arrays).astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-2)  # MiniLM's pipeline normalizes


def test_unknown_model_names_the_parameter(workspace):
    params = load_params(workspace)
    params["embed"]["model"] = "no-such-org/no-such-model"
    params["embed"]["output"] = "data/other_embeddings"
    with pytest.raises(ParamError, match=r"embed.model = 'no-such-org/no-such-model' could not be loaded"):
        embed.run(params)


def test_embeddings_that_do_not_match_the_docs_are_an_error(workspace):
    shard = workspace / "data/docs/part-00000.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.slice(1), shard)  # one document fewer than its embeddings
    with pytest.raises(InputError, match=r"cluster.embeddings: embeddings .*part-00000.npy do not match docs shard"):
        cluster.run(load_params(workspace))


def test_same_row_count_but_other_documents_is_an_error(workspace):
    shard = workspace / "data/docs/part-00000.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.take(list(range(1, table.num_rows)) + [0]), shard)  # same rows, other order
    with pytest.raises(InputError, match=r"embedded from other documents"):
        cluster.run(load_params(workspace))


def test_max_tokens_beyond_the_model_limit_names_the_parameter():
    with pytest.raises(ParamError, match=r"embed.max_tokens = 4096: .* at most 512 tokens"):
        embed.load_encoder("all-MiniLM-L6-v2", "cpu", 4096)


def test_rerun_skips_finished_shards(workspace, caplog):
    before = {p.name: p.read_bytes() for p in (workspace / "data/embeddings").iterdir()}
    with caplog.at_level("INFO"):
        result = embed.run(load_params(workspace))
    assert result == {"shards": 2, "embedded": 0, "skipped": 2, "backend": "torch", "engine": "local"}
    assert {p.name: p.read_bytes() for p in (workspace / "data/embeddings").iterdir()} == before


def test_killed_embed_resumes_to_identical_bytes(workspace, embedded_workspace):
    emb = workspace / "data/embeddings"
    for p in emb.iterdir():
        p.unlink()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dgamix.cli", "embed"]
    proc = subprocess.Popen(cmd, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (emb / "part-00000.json").exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (emb / "part-00001.json").exists(), "the kill came too late to interrupt the second shard"

    rerun = subprocess.run(cmd, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout.strip().splitlines()[-1]) == {"shards": 2, "embedded": 1, "skipped": 1,
                                                                "backend": "torch", "engine": "local"}
    reference = embedded_workspace / "data/embeddings"
    assert sorted(p.name for p in emb.iterdir()) == sorted(p.name for p in reference.iterdir())
    for p in reference.iterdir():
        assert (emb / p.name).read_bytes() == p.read_bytes(), p.name


def test_resume_re_embeds_a_shard_whose_documents_changed_but_not_its_row_count(workspace, encoder):
    """The resume check is the sidecar's fingerprint of the shard's doc ids (the hashes of its texts), not its row
    count: a docs shard re-ingested with one document replaced is embedded again, the untouched one skipped."""
    from dgamix.formats import docs
    from dgamix.pipeline import ingest

    shard = workspace / "data/docs/part-00000.parquet"
    table = docs.read_shard(shard)
    texts = table.column("text").to_pylist()
    old_rows = np.load(workspace / "data/embeddings/part-00000.npy")
    texts[3] = "A replacement document about sailing boats, tides and harbour charts."
    docs.write_shard(docs.docs_table([ingest.content_hash(t) for t in texts], texts,
                                     table.column("source").to_pylist()), shard)

    assert embed.run(load_params(workspace)) == {"shards": 2, "embedded": 1, "skipped": 1, "backend": "torch",
                                                 "engine": "local"}
    rows = np.load(workspace / "data/embeddings/part-00000.npy")
    assert rows.shape == old_rows.shape
    expected = embed.embed_texts(encoder, [texts[3]], max_tokens=128).astype(np.float32)[0]
    np.testing.assert_allclose(rows[3].astype(np.float32), expected, atol=2e-3)
    assert not np.allclose(rows[3].astype(np.float32), old_rows[3].astype(np.float32), atol=0.05)
    assert len(embeddings.load(workspace / "data/embeddings", workspace / "data/docs")) == 2  # consistent again
