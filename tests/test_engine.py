"""The Ray engine: a local Ray cluster (2 CPUs) writes the local engine's bytes, and a killed worker loses nothing."""
from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pytest
import ray

from dgamix.pipeline import assign, cluster, embed, ingest, tokens
from dgamix.pipeline.engine import FAULT_DIR_ENV, FAULT_ENV
from dgamix.core.errors import InputError, ParamError, StageFailed

from .conftest import load_params, write_jsonl_zst

STAGES = ("ingest", "embed", "cluster", "assign", "tokenize")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture
def reference(workspace) -> dict:
    """The local engine's outputs for the fixture corpus (ingest and embed come from the session workspace)."""
    params = load_params(workspace)
    params["tokenize"].update(vocab_size=600, train_docs=200, holdout_fraction=0.1)
    cluster.run(params)
    assign.run(params)
    tokens.run(params)
    return params


def on_ray(params: dict, root: str, max_retries: int = 0) -> dict:
    """The same params with every output under `root` and the per-shard stages on Ray."""
    out = {**params, "ray": {"max_retries": max_retries}}
    for stage in STAGES:
        section = dict(params[stage])
        for key, value in section.items():
            if isinstance(value, str) and value.startswith(("data/", "metrics/")):
                section[key] = f"{root}/{value}"
        if stage != "cluster":
            section["engine"] = "ray"
        out[stage] = section
    return out


def digests(directory: str | Path) -> dict[str, str]:
    directory = Path(directory)
    return {str(p.relative_to(directory)): hashlib.blake2b(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_ray_writes_the_same_bytes_as_the_local_engine(reference, local_ray):
    params = on_ray(reference, "ray")
    ingest.run(params)
    assert embed.run(params)["engine"] == "ray"
    shutil.copytree("data/clusters", "ray/data/clusters")  # the fit is not a per-shard stage
    assign.run(params)
    tokens.run(params)
    for output in ("docs", "ingest", "embeddings", "domains", "tokens"):  # ingest: the rejects
        local, distributed = digests(f"data/{output}"), digests(f"ray/data/{output}")
        assert local and distributed == local, output
    assert Path("ray/metrics/ingest.json").read_text() == Path("metrics/ingest.json").read_text()


def test_a_worker_killed_mid_stage_leaves_no_partial_output_and_the_rerun_completes(reference, local_ray,
                                                                                   monkeypatch):
    params = on_ray(reference, "ray")
    monkeypatch.setenv(FAULT_ENV, "ingest:1")
    with pytest.raises(StageFailed, match="ingest: a task failed on Ray"):
        ingest.run(params)
    assert not Path("ray/data/docs").exists() and not list(Path("ray/data").glob("*.tmp"))

    monkeypatch.delenv(FAULT_ENV)
    ingest.run(params)
    monkeypatch.setenv(FAULT_ENV, "embed:1")  # the worker embedding the second shard dies before writing it
    with pytest.raises(StageFailed, match="embed: a task failed on Ray"):
        embed.run(params)
    left = digests("ray/data/embeddings")
    assert "part-00001.npy" not in left and "part-00001.json" not in left
    assert not [name for name in left if name.endswith(".tmp")]
    local = digests("data/embeddings")
    for name, digest in left.items():  # whatever finished is complete and final
        if name.startswith("part-"):
            assert digest == local[name], name
    finished = sum(name.endswith(".json") for name in left)

    monkeypatch.delenv(FAULT_ENV)
    summary = embed.run(params)
    assert summary["skipped"] == finished and summary["embedded"] == 2 - finished
    assert digests("ray/data/embeddings") == local


def test_ray_retries_a_killed_worker_and_the_stage_completes_in_one_run(reference, local_ray, monkeypatch,
                                                                       tmp_path):
    params = on_ray(reference, "ray", max_retries=1)
    monkeypatch.setenv(FAULT_ENV, "assign:0:once")
    monkeypatch.setenv(FAULT_DIR_ENV, str(tmp_path / "faults"))
    shutil.copytree("data/docs", "ray/data/docs")
    shutil.copytree("data/embeddings", "ray/data/embeddings")
    shutil.copytree("data/clusters", "ray/data/clusters")
    assign.run(params)
    assert list((tmp_path / "faults").glob("*.injected"))  # the first worker did die
    assert digests("ray/data/domains") == digests("data/domains")


def test_unknown_engine_and_malformed_fault_spec_are_named(workspace, monkeypatch):
    params = load_params(workspace)
    params["ingest"]["engine"] = "spark"
    with pytest.raises(ParamError, match=r"ingest.engine = 'spark': expected local or ray"):
        ingest.run(params)
    params = on_ray(load_params(workspace), "ray")
    monkeypatch.setenv(FAULT_ENV, "ingest-first")
    with pytest.raises(ParamError, match=FAULT_ENV):
        ingest.run(params)


def test_bad_input_found_by_a_worker_is_the_same_error_as_on_the_local_engine(workspace, local_ray):
    write_jsonl_zst([{"text": "fine"}, {"no_text": 1}], workspace / "raw/part-9.jsonl.zst")
    params = on_ray(load_params(workspace), "ray")
    params["ingest"]["strict"] = True
    with pytest.raises(InputError, match=r"part-9.jsonl.zst:2: missing text field 'text' \(ingest.strict is true\)"):
        ingest.run(params)
    assert not Path("ray/data/docs").exists()


def test_a_model_that_cannot_load_on_a_ray_actor_is_the_parameter_error(workspace, local_ray):
    params = on_ray(load_params(workspace), "ray")
    shutil.copytree("data/docs", "ray/data/docs")
    params["embed"]["model"] = "no-such-org/no-such-model"
    with pytest.raises(ParamError, match=r"embed.model = 'no-such-org/no-such-model' could not be loaded"):
        embed.run(params)
    assert not list(Path("ray/data/embeddings").glob("part-*"))


def test_the_openvino_encoder_on_ray_actors_writes_the_local_bytes(workspace, local_ray):
    params = load_params(workspace)
    params["embed"].update(backend="openvino", output="data/emb_ov")
    embed.run(params)
    distributed = on_ray(params, "ray")
    distributed["embed"]["docs"] = "data/docs"
    embed.run(distributed)
    local, remote = digests("data/emb_ov"), digests("ray/data/emb_ov")
    assert {k: v for k, v in remote.items() if k.startswith("part-")} == \
        {k: v for k, v in local.items() if k.startswith("part-")} != {}
