"""Embeddings: one float16 matrix per docs shard, row-aligned with it (written by embed; read by cluster, assign).

Layout: `<embed.output>/part-NNNNN.npy` (NumPy .npy, float16, shape (rows, dim), L2-normalized by the model;
`np.load(path, mmap_mode="r")`) and beside it `part-NNNNN.json`, the sidecar:

| key | meaning |
|---|---|
| `format_version` | 1 |
| `rows`, `dim` | the matrix's shape |
| `docs_fingerprint` | BLAKE2b-128 over the docs shard's doc_ids, each followed by a newline: which rows these are |
| `model`, `max_tokens`, `backend` | the encoder (`backend`: torch, openvino or openvino-int8) |
| `export` | for OpenVINO backends: a digest of the export under `<embed.output>/encoder/<backend>/` |
| `precision` | what the encoder computed in (float32, float16, bf16, int8 ...) |

The sidecar is written last: a shard is complete when both files exist and the sidecar matches its docs shard.
All shards of one folder come from one encoder.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import write_json, write_npy
from ..core.errors import InputError, ParamError
from . import JSON_VERSION_KEY, check_json, docs

NAME = "embeddings"
VERSION = 1
SUPPORTED = {1}
ENCODER_DIR = "encoder"  # under embed.output: exported faster encoders, shared by every worker


def docs_fingerprint(doc_ids: list[str]) -> str:
    """Identifies a docs shard's rows, so embeddings can be checked against the documents they claim to be."""
    h = hashlib.blake2b(digest_size=16)
    for doc_id in doc_ids:
        h.update(doc_id.encode())
        h.update(b"\n")
    return h.hexdigest()


def matrix_path(directory: Path, docs_shard: Path) -> Path:
    return Path(directory) / f"{Path(docs_shard).stem}.npy"


def sidecar_for(npy: Path) -> Path:
    return Path(npy).with_suffix(".json")


def expected_sidecar(doc_ids: list[str], encoder: dict[str, Any]) -> dict[str, Any]:
    """What a complete shard's sidecar must say, for these rows and this encoder (model, max_tokens, backend and,
    for exported backends, export)."""
    return {JSON_VERSION_KEY: VERSION, "rows": len(doc_ids), "docs_fingerprint": docs_fingerprint(doc_ids),
            **encoder}


def write_shard(vectors: np.ndarray, npy: Path, sidecar: dict[str, Any]) -> None:
    """The matrix, then its sidecar: never new vectors beside metadata describing old ones."""
    sidecar_for(npy).unlink(missing_ok=True)
    write_npy(vectors.astype(np.float16, copy=False), npy)
    write_json({**sidecar, "dim": int(vectors.shape[1])}, sidecar_for(npy))


def read_sidecar(npy: Path) -> dict[str, Any] | None:
    """A shard's sidecar, or None when missing or unreadable (the shard is then not done)."""
    try:
        return json.loads(sidecar_for(npy).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def shard_is_done(npy: Path, expected: dict[str, Any]) -> bool:
    recorded = read_sidecar(npy)
    if recorded is None or not Path(npy).exists():
        return False
    return all(recorded.get(key) == value for key, value in expected.items())


def encoder_sidecar(directory: Path, param: str = "embeddings") -> dict[str, Any]:
    """The sidecar of the first shard of an embeddings folder: which encoder embedded it."""
    sidecars = sorted(Path(directory).glob("part-*.json"))
    if not sidecars:
        raise ParamError(f"{param} = '{directory}' holds no embedding shards (run embed first)")
    meta = json.loads(sidecars[0].read_text())
    check_json(sidecars[0], meta, NAME, SUPPORTED, "embed")
    return meta


def load(emb_dir: Path, docs_dir: Path, param: str = "embeddings") -> list[np.ndarray]:
    """Memory-map every shard's embeddings after checking their format and that they match the docs shards row for
    row and come from one encoder."""
    shards = docs.list_shards(docs_dir, param.replace("embeddings", "docs"))
    arrays = []
    encoders: set[tuple[Any, ...]] = set()
    for shard in shards:
        npy = matrix_path(emb_dir, shard)
        if not npy.exists() or not sidecar_for(npy).exists():
            raise InputError(f"{param}: no embeddings for docs shard {shard} (expected {npy}; run embed first)")
        try:
            meta = json.loads(sidecar_for(npy).read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{param}: sidecar {sidecar_for(npy)} is not valid JSON ({err}); re-run embed") \
                from err
        check_json(sidecar_for(npy), meta, NAME, SUPPORTED, "embed")
        encoders.add((meta.get("model"), meta.get("max_tokens"), meta.get("backend"), meta.get("export")))
        doc_ids = docs.read_doc_ids(shard)
        array = np.load(npy, mmap_mode="r")
        if array.shape[0] != len(doc_ids) or meta.get("docs_fingerprint") != docs_fingerprint(doc_ids):
            raise InputError(
                f"{param}: embeddings {npy} do not match docs shard {shard} "
                f"({array.shape[0]} embedding rows for {len(doc_ids)} documents"
                + (")" if array.shape[0] != len(doc_ids) else ", but embedded from other documents)")
                + "; re-run embed"
            )
        arrays.append(array)
    if len(encoders) > 1:
        raise InputError(f"{param}: embedding shards come from different encoders (model, max_tokens, backend, "
                              f"export) {sorted(encoders, key=str)}; re-run embed")
    dims = {a.shape[1] for a in arrays}
    if len(dims) != 1:
        raise InputError(f"{param}: embedding shards have different dimensions {sorted(dims)}; re-run embed")
    return arrays
