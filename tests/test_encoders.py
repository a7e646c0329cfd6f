"""Faster CPU encoders: OpenVINO exports of the packaged MiniLM, checked against the fp32 torch reference."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from dgamix.formats import embeddings
from dgamix.pipeline import embed
from dgamix.pipeline.fidelity import cluster_agreement, fidelity_report, mean_cosine
from dgamix.pipeline.kmeans import HierarchicalKMeans
from dgamix.core.errors import ParamError

from .conftest import load_params


def with_backend(work, backend: str, **extra) -> dict:
    params = load_params(work)
    params["embed"].update({"backend": backend, "output": f"data/emb_{backend}", "verify": True, "verify_docs": 240,
                            "verify_levels": [4, 4], **extra})
    return params


def test_fidelity_is_perfect_for_the_same_vectors_and_drops_with_noise():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(400, 32)).astype(np.float32)
    report = fidelity_report(reference, reference.copy(), [4, 4])
    assert report["mean_cosine"] == pytest.approx(1.0) and report["cluster_agreement"] == 1.0 and report["passed"]
    noisy = reference + rng.normal(scale=1.0, size=reference.shape).astype(np.float32)
    model = HierarchicalKMeans(levels=[4, 4]).fit(reference)
    assert 0.5 < mean_cosine(reference, noisy) < 0.9  # cos of x and x + unit noise in 32 dims: about 0.7
    assert cluster_agreement(reference, noisy, model) < 0.8
    assert not fidelity_report(reference, noisy, [4, 4])["passed"]


def test_openvino_backend_is_faithful_resumable_and_recorded(workspace):
    torch_rows = np.concatenate(embeddings.load(workspace / "data/embeddings", workspace / "data/docs"))
    params = with_backend(workspace, "openvino")
    summary = embed.run(params)
    assert summary["embedded"] == 2 and summary["fidelity"]["passed"]
    out = workspace / "data/emb_openvino"
    rows = np.concatenate(embeddings.load(out, workspace / "data/docs"))
    assert not np.array_equal(rows, torch_rows)  # another encoder did run
    assert mean_cosine(torch_rows, rows) >= 0.99
    sidecar = json.loads((out / "part-00000.json").read_text())
    assert sidecar["backend"] == "openvino" and sidecar["precision"] in ("f32", "bf16", "f16")
    fidelity = json.loads((out / "encoder/openvino/fidelity.json").read_text())
    assert fidelity["docs"] == 240 and fidelity["mean_cosine"] == summary["fidelity"]["mean_cosine"]

    params["embed"]["verify"] = False
    again = embed.run(params)
    assert again["skipped"] == 2 and again["embedded"] == 0
    # Text embedded later (the bases stage's target) goes through the same export.
    encoder = embed.build_encoder(embed.encoder_spec_of(out, "cpu", 64))
    texts = pq.read_table(workspace / "data/docs/part-00000.parquet").column("text").to_pylist()[:8]
    np.testing.assert_allclose(embed.embed_texts(encoder, texts, 128).astype(np.float32),
                               rows[:8].astype(np.float32), atol=2e-2)


def test_int8_is_calibrated_on_the_corpus_and_refused_when_it_misses_the_bar(workspace):
    summary = embed.run(with_backend(workspace, "openvino-int8"))
    assert summary["fidelity"]["passed"] and summary["fidelity"]["mean_cosine"] < 0.99999  # quantized, not exact
    export = json.loads((workspace / "data/emb_openvino-int8/encoder/openvino-int8/export.json").read_text())
    assert export["calibration_docs"] == 240 and len(export["calibration_fingerprint"]) == 32
    model_xml = workspace / "data/emb_openvino-int8/encoder/openvino-int8/model.xml"
    exported_at = model_xml.stat().st_mtime_ns
    assert embed.run(with_backend(workspace, "openvino-int8", verify=False))["skipped"] == 2
    assert model_xml.stat().st_mtime_ns == exported_at  # the export is reused, not redone

    # Another calibration sample is another graph: shards made with the old one are embedded again, so one corpus
    # never mixes two exports.
    first = json.loads((workspace / "data/emb_openvino-int8/part-00000.json").read_text())["export"]
    again = embed.run(with_backend(workspace, "openvino-int8", verify=False, calibration_docs=200))
    assert again["embedded"] == 2 and again["skipped"] == 0
    assert json.loads((workspace / "data/emb_openvino-int8/part-00000.json").read_text())["export"] != first

    # A stricter bar than int8 can meet: the stage refuses before embedding anything. (The export is reused:
    # same model, same calibration sample.)
    shutil.copytree(workspace / "data/emb_openvino-int8/encoder", workspace / "data/emb_strict/encoder")
    strict = with_backend(workspace, "openvino-int8", output="data/emb_strict", verify_min_cosine=0.99999)
    with pytest.raises(ParamError, match=r"embed.backend = 'openvino-int8' fails the fidelity check on 240 "
                                         r"documents: mean cosine 0\.9\d+ \(expected >= 0.99999\)"):
        embed.run(strict)
    assert not list((workspace / "data/emb_strict").glob("part-*"))


def test_verifying_torch_is_a_no_op(workspace):
    params = load_params(workspace)
    params["embed"]["verify"] = True
    summary = embed.run(params)
    assert summary["skipped"] == 2 and "fidelity" not in summary


def test_backend_parameters_are_checked(workspace):
    for update, message in [({"backend": "onnx"}, r"embed.backend = 'onnx': expected one of torch, openvino"),
                            ({"verify_levels": [0, 4]}, r"embed.verify_levels = \[0, 4\]: expected a list"),
                            ({"verify_levels": [64, 64]}, r"ask for more clusters than embed.verify_docs")]:
        params = with_backend(workspace, update.pop("backend", "openvino"), **update)
        with pytest.raises(ParamError, match=message):
            embed.run(params)
