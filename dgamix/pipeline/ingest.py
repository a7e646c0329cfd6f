"""Stage 1, ingest: RedPajama-layout files -> normalized Parquet shards (doc_id, text, source, n_chars).

`ingest_file` is the pure per-file step (one input file -> its valid, within-file-unique documents and its
rejects); `StageFile` runs it on either engine (engine.py) and stages the documents. Exact duplicates across files
are dropped by the driver in input order, so the result does not depend on where or in which order files were
processed. Counts always add up: read = kept + rejected + duplicates.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.atomic import atomic_path, write_json, write_parquet
from .engine import Engine
from ..core.params import InputError, ParamError, local_path, require, section
from .readers import Record, Reject, is_supported, iter_records

log = logging.getLogger(__name__)

DOCS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("n_chars", pa.int64()),
    ]
)
REJECTS_SCHEMA = pa.schema([("file", pa.string()), ("line", pa.int64()), ("reason", pa.string())])
UNKNOWN_SOURCE = "unknown"
PROGRESS_EVERY = 1000
SHARD_ROWS = 10_000  # Parquet row group size of the docs shards


def content_hash(text: str) -> str:
    """The document's identity: 128-bit BLAKE2b of its UTF-8 text (stable across runs, file order and machines)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


@dataclass
class FileResult:
    file: str
    doc_ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    read: int = 0
    duplicates: int = 0


def ingest_file(
    url: str, text_field: str, source_field: str | None, strict: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> FileResult:
    """Read one input file; keep valid documents that are not duplicates of an earlier one in the same file."""
    result = FileResult(file=url)
    seen: set[str] = set()
    for item in iter_records(url, text_field, source_field):
        result.read += 1
        if on_progress and result.read % PROGRESS_EVERY == 0:
            on_progress(PROGRESS_EVERY)
        if isinstance(item, Reject):
            if strict:
                raise InputError(f"{item.file}:{item.line}: {item.reason} (ingest.strict is true)")
            result.rejects.append(item)
            continue
        assert isinstance(item, Record)
        doc_id = content_hash(item.text)
        if doc_id in seen:
            result.duplicates += 1
            continue
        seen.add(doc_id)
        result.doc_ids.append(doc_id)
        result.texts.append(item.text)
        result.sources.append(item.source if item.source is not None else UNKNOWN_SOURCE)
    if on_progress:
        on_progress(result.read % PROGRESS_EVERY)
    return result


def docs_table(doc_ids: list[str], texts: list[str], sources: list[str]) -> pa.Table:
    return pa.table({"doc_id": doc_ids, "text": texts, "source": sources, "n_chars": [len(t) for t in texts]},
                    schema=DOCS_SCHEMA)


class StageFile:
    """The per-file step of either engine: one input file -> a staged shard of its within-file-unique documents.

    Returns what the driver needs to drop duplicates across files in input order: the counts, the rejects and the
    doc ids (not the texts, which stay in the staged file).
    """

    def __init__(self, text_field: str, source_field: str | None, strict: bool):
        self.text_field, self.source_field, self.strict = text_field, source_field, strict
        self.on_progress: Callable[[int], None] | None = None  # set by the local engine for a finer progress bar

    def __call__(self, task: tuple[str, str, str]) -> dict[str, Any]:
        name, url, staged = task  # name: how reports call the file; url: where this worker reads it
        result = ingest_file(url, self.text_field, self.source_field, self.strict, self.on_progress)
        result.rejects = [Reject(name, r.line, r.reason) for r in result.rejects]
        if result.doc_ids:
            write_parquet(docs_table(result.doc_ids, result.texts, result.sources), staged, row_group_size=SHARD_ROWS)
        return {"read": result.read, "duplicates": result.duplicates, "rejects": result.rejects,
                "doc_ids": result.doc_ids}


def commit_staged(staged: Path, doc_ids: list[str], seen: set[str], shard_path: Path) -> int:
    """Drop documents kept from earlier files (updating `seen`), move what is left into place; return its rows."""
    keep = [doc_id not in seen for doc_id in doc_ids]
    seen.update(doc_id for doc_id, k in zip(doc_ids, keep) if k)
    kept = sum(keep)
    if kept == len(doc_ids):
        if kept:
            os.replace(staged, shard_path)
        return kept
    if kept:
        # One chunk, as a table built from lists is: row groups (and so the bytes) then match a direct write.
        table = pq.read_table(staged).filter(pa.array(keep)).combine_chunks()
        write_parquet(table, shard_path, row_group_size=SHARD_ROWS)
    staged.unlink()
    return kept


def expand_inputs(patterns: Iterable[str], param: str = "ingest.inputs") -> list[str]:
    """Resolve paths, globs and fsspec URLs to a sorted, de-duplicated list of supported files."""
    files: list[str] = []
    for pattern in patterns:
        fs, _, paths = fsspec.get_fs_token_paths(pattern)
        if len(paths) == 1 and fs.isdir(paths[0]):  # a folder means every supported file in it
            paths = [p for p in fs.find(paths[0]) if is_supported(p)]
        if not paths or not any(fs.isfile(p) for p in paths):
            raise ParamError(f"{param}: '{pattern}' matches no file (expected a path, glob or fsspec URL)")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        for p in sorted(paths):
            if not fs.isfile(p):
                continue
            url = _local_name(p) if protocol in ("file", "local") else f"{protocol}://{p}"
            if not is_supported(url):
                raise ParamError(
                    f"{param}: '{url}' is not a supported format "
                    "(expected .jsonl, .jsonl.gz, .jsonl.zst or .parquet)"
                )
            files.append(url)
    unique = list(dict.fromkeys(files))
    if not unique:
        raise ParamError(f"{param} is empty (expected at least one path, glob or fsspec URL)")
    return unique


def run(params: dict[str, Any]) -> dict[str, Any]:
    cfg = section(params, "ingest")
    inputs = require(cfg, "ingest", "inputs", (list, str))
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not all(isinstance(item, str) for item in inputs):
        raise ParamError(f"ingest.inputs = {inputs!r}: expected a list of paths, globs or URLs (strings)")
    text_field = require(cfg, "ingest", "text_field", str, "text")
    source_field = require(cfg, "ingest", "source_field", str, "meta.source")
    strict = require(cfg, "ingest", "strict", bool, False)
    out_dir = local_path(cfg, "ingest", "output", "data/docs")
    rejects_path = local_path(cfg, "ingest", "rejects", "data/ingest/rejects.parquet")
    metrics_path = local_path(cfg, "ingest", "metrics", "metrics/ingest.json")

    files = expand_inputs(inputs)
    engine = Engine.for_stage(params, "ingest")
    seen: set[str] = set()
    totals = Counter()
    reasons = Counter()
    rejects: list[Reject] = []
    per_file = []
    with atomic_path(out_dir) as tmp_dir:
        staging = tmp_dir / "staged"
        staging.mkdir(parents=True)
        # Absolute paths: a Ray worker's working directory is not ours.
        tasks = [(url, _readable_anywhere(url), str((staging / f"{i:06d}.parquet").resolve()))
                 for i, url in enumerate(files)]
        # Results arrive in input order (the first copy of a document wins) and are committed as they arrive, so
        # the driver holds the set of kept doc ids, not every file's list at once.
        results = engine.imap(StageFile(text_field, source_field, strict), tasks, f"ingest ({len(files)} files)",
                              unit="doc")
        shard = 0
        for (url, _, staged), result in zip(tasks, results):
            kept = commit_staged(Path(staged), result["doc_ids"], seen, tmp_dir / f"part-{shard:05d}.parquet")
            shard += kept > 0
            counts = {"read": result["read"], "kept": kept, "rejected": len(result["rejects"]),
                      "duplicates": result["duplicates"] + len(result["doc_ids"]) - kept}
            per_file.append({"file": url, **counts})
            totals.update(counts)
            reasons.update(_reason_kind(r.reason) for r in result["rejects"])
            rejects.extend(result["rejects"])
        staging.rmdir()
        write_parquet(_rejects_table(rejects), rejects_path)
        metrics = {
            "files": len(files),
            "shards": shard,
            **{k: totals[k] for k in ("read", "kept", "rejected", "duplicates")},
            "rejected_by_reason": dict(sorted(reasons.items())),
            "per_file": per_file,
        }
        assert metrics["read"] == metrics["kept"] + metrics["rejected"] + metrics["duplicates"]
        write_json(metrics, metrics_path)
        if totals["kept"] == 0:
            raise InputError(
                f"empty corpus: no document kept from {len(files)} file(s) of ingest.inputs "
                f"(read {totals['read']}, rejected {totals['rejected']}, duplicates {totals['duplicates']}; "
                f"rejects listed in {rejects_path})"
            )
    log.info("ingest: read %d, kept %d, rejected %d, duplicates %d", totals["read"], totals["kept"],
             totals["rejected"], totals["duplicates"])
    return metrics


def _local_name(path: str) -> str:
    # Reports and metrics name files relative to the project when they live in it, so they do not depend on
    # where the project was cloned.
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _readable_anywhere(url: str) -> str:
    """An absolute path for a local file (a worker's working directory is not ours); URLs are left alone."""
    return url if "://" in url else os.path.abspath(url)


def _reason_kind(reason: str) -> str:
    # "invalid JSON: Expecting value at column 3" -> "invalid JSON": groups rejects for the metrics.
    return reason.split(":")[0].split(" (")[0].split(" at ")[0]


def _rejects_table(rejects: list[Reject]) -> pa.Table:
    return pa.table(
        {"file": [r.file for r in rejects], "line": [r.line for r in rejects], "reason": [r.reason for r in rejects]},
        schema=REJECTS_SCHEMA,
    )

