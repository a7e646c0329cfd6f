"""Defaults are defined once (dgamix.core.defaults) and params.yaml, the README and dvc.yaml agree with them; every
artifact format refuses a version it does not know."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from dgamix.core.config import defaults
from dgamix.core.defaults import DEFAULTS
from dgamix.trainer.config import TrainSettings
from dgamix.formats import FormatError, bases, clusters, docs, domains, embeddings, token_store

from .conftest import ROOT

README = (ROOT / "README.md").read_text()


# Every section's defaults: the offline stages' (dgamix.core.defaults, from dgamix.core.sections) and the nested train
# section's (dgamix.trainer.config, whose strategy parts are the mixer's own settings).
ALL_DEFAULTS = {**DEFAULTS, "train": defaults(TrainSettings)}


def test_params_yaml_is_exactly_the_defaults():
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert shipped == ALL_DEFAULTS, "params.yaml and the sections' dataclasses disagree"


def dotted(prefix: str, section: dict) -> dict[str, object]:
    """`section.key` -> value; the train section's parts (mappings of settings) as `train.part.key`."""
    out: dict[str, object] = {}
    for key, value in section.items():
        if prefix.startswith("train") and isinstance(value, dict):
            out |= dotted(f"{prefix}.{key}", value)
        else:
            out[f"{prefix}.{key}"] = value
    return out


def readme_configuration() -> dict[str, object]:
    """`section.key` -> default from the README's configuration table (backticked keys and YAML values, paired)."""
    table = README.split("## Configuration (params.yaml)", 1)[1].split("\n## ", 1)[0]
    found: dict[str, object] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        keys, values = re.findall(r"`([^`]+)`", cells[0]), re.findall(r"`([^`]+)`", cells[1])
        assert len(keys) == len(values), f"README configuration row pairs {keys} with {values}"
        for key, value in zip(keys, values):
            found[key] = yaml.safe_load(value)
    return found


def test_readme_configuration_table_lists_every_key_with_its_default():
    documented = readme_configuration()
    expected = {k: v for section, keys in ALL_DEFAULTS.items() for k, v in dotted(section, keys).items()}
    assert sorted(set(expected) - set(documented)) == [], "keys missing from the README's configuration table"
    assert sorted(set(documented) - set(expected)) == [], "README documents keys that do not exist"
    wrong = {k: (documented[k], expected[k]) for k in expected if documented[k] != expected[k]}
    assert wrong == {}, "README default (left) differs from dgamix.core.defaults (right)"


# ---- formats ----------------------------------------------------------------------------------------------------
def _rewrite_parquet_metadata(path: Path, version: bytes | None) -> None:
    table = pq.read_table(path)
    metadata = dict(table.schema.metadata or {})
    metadata.pop(b"dgamix.format_version", None)
    if version is not None:
        metadata[b"dgamix.format_version"] = version
    pq.write_table(table.replace_schema_metadata(metadata), path)


def test_docs_shard_version_is_checked(tmp_path):
    shard = tmp_path / docs.shard_name(0)
    docs.write_shard(docs.docs_table(["a" * 32], ["text"], ["s"]), shard)
    assert docs.read_doc_ids(shard) == ["a" * 32]
    _rewrite_parquet_metadata(shard, b"7")
    with pytest.raises(FormatError, match=rf"{re.escape(str(shard))} is docs format version 7; this dgamix reads "
                                          r"versions \[1\]"):
        docs.read_shard(shard)
    _rewrite_parquet_metadata(shard, None)
    with pytest.raises(FormatError, match="has no dgamix format version .* re-run the ingest stage"):
        docs.read_shard(shard)


def test_domains_manifest_and_shards_are_stamped_and_checked(tmp_path):
    table = docs.docs_table(["a" * 32, "b" * 32], ["x", "y"], ["s", "s"])
    import pyarrow as pa

    table = table.append_column("cluster", pa.array([0, 1], pa.int32()))
    groups = domains.write_shard(table, tmp_path / "part-00000.parquet")
    manifest = domains.build_manifest([("part-00000.parquet", g) for g in groups], 3, [3])
    domains.write_manifest(manifest, tmp_path)
    assert domains.read_cluster(tmp_path, 1).column("text").to_pylist() == ["y"]
    assert domains.read_cluster(tmp_path, 2).num_rows == 0
    # A domains shard is not a docs shard, though it carries the docs columns.
    with pytest.raises(FormatError, match="holds a dgamix 'domains' artifact, expected 'docs'"):
        docs.read_shard(tmp_path / "part-00000.parquet")
    _rewrite_parquet_metadata(tmp_path / domains.MANIFEST, b"2")
    with pytest.raises(FormatError, match="manifest.parquet is domains format version 2"):
        domains.read_manifest(tmp_path)


def test_token_store_version_is_checked(tmp_path):
    chunks = [(np.array([5, 6, 0], np.uint16), np.array([3]))]
    token_store.write(tmp_path, chunks, np.array([1]), {"vocab_size": 10, "eos_id": 0})
    assert token_store.read(tmp_path).cluster_tokens.tolist() == [3]
    meta = json.loads((tmp_path / "store.json").read_text())
    (tmp_path / "store.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(FormatError, match=r"store.json is token store format version 99; this dgamix reads "
                                          r"versions \[1\]"):
        token_store.read(tmp_path)
    from dgamix.mixer import ClusterStore

    with pytest.raises(FormatError, match="token store format version 99"):
        ClusterStore(tmp_path)


def test_bases_clusters_and_embeddings_versions_are_checked(tmp_path):
    bases.write(tmp_path, ["a", "b"], np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]))
    names, matrix = bases.read(tmp_path)
    assert names == ["a", "b"] and matrix.shape == (2, 3)
    _rewrite_parquet_metadata(tmp_path / bases.TABLE, b"0")
    with pytest.raises(FormatError, match="bases.parquet is bases format version 0"):
        bases.read(tmp_path)

    tree = tmp_path / "tree"
    tree.mkdir()
    clusters.write(tree, [np.eye(2, dtype=np.float32)], {"level": np.array([0, 0]), "cluster": np.array([0, 1]),
                                                           "parent": np.array([-1, -1]), "valid": np.array([True, True])},
                   {"levels": [2], "seed": 0, "iterations": 1, "points_per_centroid": 1})
    assert clusters.read(tree).levels == [2]
    meta = json.loads((tree / clusters.META).read_text())
    (tree / clusters.META).write_text(json.dumps({k: v for k, v in meta.items() if k != "format_version"}))
    with pytest.raises(FormatError, match="clusters.json has no dgamix format version"):
        clusters.read(tree)

    shard = tmp_path / docs.shard_name(0)
    docs.write_shard(docs.docs_table(["c" * 32], ["t"], ["s"]), shard)
    emb = tmp_path / "emb"
    emb.mkdir()
    npy = embeddings.matrix_path(emb, shard)
    embeddings.write_shard(np.ones((1, 4), np.float32), npy, embeddings.expected_sidecar(
        ["c" * 32], {"model": "m", "max_tokens": 8, "backend": "torch"}))
    assert embeddings.load(emb, tmp_path)[0].shape == (1, 4)
    sidecar = json.loads(embeddings.sidecar_for(npy).read_text())
    embeddings.sidecar_for(npy).write_text(json.dumps({**sidecar, "format_version": 3}))
    with pytest.raises(FormatError, match="is embeddings format version 3"):
        embeddings.load(emb, tmp_path)


def test_every_error_type_is_defined_once_in_core_errors():
    """dgamix.core.errors defines each error type; no other module defines a class of the same name, and the
    modules that raise them hand out those very classes."""
    from dgamix.core import errors, params
    from dgamix.pipeline import engine

    defined = {node.name: str(path.relative_to(ROOT)) for path in sorted((ROOT / "dgamix").rglob("*.py"))
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(node, ast.ClassDef)
               and node.name in errors.__all__ and path != ROOT / "dgamix" / "core" / "errors.py"}
    assert defined == {}, f"error types defined outside dgamix/core/errors.py: {defined}"
    assert (params.ParamError, FormatError, engine.StageFailed) == (
        errors.ParamError, errors.FormatError, errors.StageFailed)
    assert issubclass(errors.FormatError, errors.InputError) and issubclass(errors.StateMismatchError, ValueError)


def test_a_domains_shard_of_another_version_is_refused_by_every_reader(tmp_path):
    """The manifest is not the only stamp checked: a shard stamped with another version (or holding another
    artifact) is refused by each way of reading shards, naming the shard, while its manifest is current."""
    import pyarrow as pa

    table = docs.docs_table(["a" * 32, "b" * 32], ["x", "y"], ["s", "s"])
    table = table.append_column("cluster", pa.array([0, 1], pa.int32()))
    shard = tmp_path / "part-00000.parquet"
    groups = domains.write_shard(table, shard)
    domains.write_manifest(domains.build_manifest([(shard.name, g) for g in groups], 2, [2]), tmp_path)
    _rewrite_parquet_metadata(shard, b"2")
    assert domains.read_manifest(tmp_path).num_rows == 2  # the manifest itself is fine
    readers = {"read_shard": lambda: domains.read_shard(shard),
               "open_shard": lambda: domains.open_shard(shard).close(),
               "read_cluster": lambda: domains.read_cluster(tmp_path, 1),
               "iter_clusters": lambda: list(domains.iter_clusters(tmp_path))}
    for name, read in readers.items():
        with pytest.raises(FormatError, match=rf"{re.escape(str(shard))} is domains format version 2; this dgamix "
                                              r"reads versions \[1\] \(re-run the assign stage"):
            read()
    docs.write_shard(docs.docs_table(["c" * 32], ["z"], ["s"]), shard)  # a docs shard where a domains shard belongs
    with pytest.raises(FormatError, match="holds a dgamix 'docs' artifact, expected 'domains'"):
        domains.read_shard(shard)
