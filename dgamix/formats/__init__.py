"""The file formats that cross a stage boundary: one module per artifact, each with its schema, writer, reader and
a format version stored in the artifact. The module docstrings are the specification a user writing their own
reader (or trainer) can follow; README.md ("File formats") links here.

| artifact | module | written by | version stored in |
|---|---|---|---|
| docs shards | `docs` | ingest | each shard's Parquet schema metadata |
| embeddings + sidecars | `embeddings` | embed | each shard's JSON sidecar |
| clusters (the tree) | `clusters` | cluster | `clusters.json` |
| domains shards + manifest | `domains` | assign | each shard's and the manifest's Parquet schema metadata |
| token store | `token_store` | tokenize | `store.json` |
| bases table | `bases` | bases | `bases.parquet`'s schema metadata |

A reader refuses a version it does not know (`FormatError`, naming the file and the versions), including files
written before versions existed: re-run the stage that writes them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from ..core.errors import FormatError

FORMAT_KEY = b"dgamix.format"
VERSION_KEY = b"dgamix.format_version"
JSON_VERSION_KEY = "format_version"


def parquet_metadata(name: str, version: int) -> dict[bytes, bytes]:
    """The schema metadata that marks a Parquet file as artifact `name`, format `version`."""
    return {FORMAT_KEY: name.encode(), VERSION_KEY: str(version).encode()}


def with_format(schema: pa.Schema, name: str, version: int) -> pa.Schema:
    """`schema` stamped with the format (other metadata kept; an upstream stamp is replaced)."""
    metadata = {k: v for k, v in (schema.metadata or {}).items() if k not in (FORMAT_KEY, VERSION_KEY)}
    return schema.with_metadata({**metadata, **parquet_metadata(name, version)})


def check_parquet(path: str | Path, schema: pa.Schema, name: str, supported: Iterable[int], stage: str) -> int:
    """The format version of a Parquet file's schema, or a FormatError naming the file, what it holds and what this
    dgamix reads."""
    metadata = schema.metadata or {}
    found_name = metadata.get(FORMAT_KEY, b"").decode() or None
    version = metadata.get(VERSION_KEY, b"").decode() or None
    return _check(path, found_name, version, name, supported, stage)


def check_json(path: str | Path, meta: dict[str, Any], name: str, supported: Iterable[int], stage: str) -> int:
    """The format version recorded in a JSON file (`format_version`), checked as `check_parquet` does."""
    version = meta.get(JSON_VERSION_KEY) if isinstance(meta, dict) else None
    return _check(path, name, None if version is None else str(version), name, supported, stage)


def _check(path: str | Path, found_name: str | None, version: str | None, name: str, supported: Iterable[int],
           stage: str) -> int:
    supported = sorted(supported)
    if found_name is not None and found_name != name:
        raise FormatError(f"{path} holds a dgamix '{found_name}' artifact, expected '{name}' (format versions "
                          f"{supported})")
    if version is None:
        raise FormatError(f"{path} has no dgamix format version (written by an older dgamix?); this dgamix reads "
                          f"{name} format versions {supported}: re-run the {stage} stage")
    if not version.isdigit() or int(version) not in supported:
        raise FormatError(f"{path} is {name} format version {version}; this dgamix reads versions {supported} "
                          f"(re-run the {stage} stage, or upgrade dgamix)")
    return int(version)
