"""Docs shards: the corpus as normalized Parquet (written by ingest; read by embed, cluster, assign).

Layout: `<ingest.output>/part-NNNNN.parquet`, one shard per input file that kept at least one document, numbered
in input order. Columns:

| column | type | meaning |
|---|---|---|
| `doc_id` | string | 32 hex digits: the 128-bit BLAKE2b of the document's UTF-8 text (its identity) |
| `text` | string | the document |
| `source` | string | the input's source label (`ingest.source_field`), `unknown` when it has none |
| `n_chars` | int64 | `len(text)` in code points |

Row groups of 10,000 rows, zstd. A doc_id occurs once in the whole folder (exact duplicates are dropped, the first
occurrence in input order kept). Schema metadata: `dgamix.format = docs`, `dgamix.format_version = 1`.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..core.atomic import write_parquet
from ..core.errors import InputError, ParamError
from . import check_parquet, with_format

NAME = "docs"
VERSION = 1
SUPPORTED = {1}
SCHEMA = with_format(pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("source", pa.string()),
                                ("n_chars", pa.int64())]), NAME, VERSION)
SHARD_GLOB = "part-*.parquet"
SHARD_ROWS = 10_000  # Parquet row group size


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def docs_table(doc_ids: list[str], texts: list[str], sources: list[str]) -> pa.Table:
    return pa.table({"doc_id": doc_ids, "text": texts, "source": sources, "n_chars": [len(t) for t in texts]},
                    schema=SCHEMA)


def write_shard(table: pa.Table, path: str | Path) -> None:
    """Write a docs table (built by `docs_table`, or a filtered one: its schema keeps the stamp) atomically."""
    write_parquet(table, path, row_group_size=SHARD_ROWS)


def list_shards(directory: Path, param: str = "embed.docs") -> list[Path]:
    """The docs shards of an ingest output, in order; errors name the parameter that pointed here."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ParamError(f"{param} = '{directory}' does not exist (expected the ingest stage's output directory)")
    shards = sorted(directory.glob(SHARD_GLOB))
    if not shards:
        raise InputError(f"{param} = '{directory}' holds no {SHARD_GLOB} shard: empty corpus (run ingest first)")
    return shards


def read_shard(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A docs shard (or some of its columns), after checking its format version."""
    check_parquet(path, pq.read_schema(path), NAME, SUPPORTED, "ingest")
    return pq.read_table(path, columns=columns)


def read_doc_ids(path: str | Path) -> list[str]:
    return read_shard(path, ["doc_id"]).column("doc_id").to_pylist()
