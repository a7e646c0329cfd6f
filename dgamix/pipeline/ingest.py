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
from ..core.params import InputError, ParamError, local_path, require, section
from ..formats import docs
from .engine import Engine
from .readers import Record, Reject, is_supported, iter_records

log = logging.getLogger(__name__)

REJECTS_SCHEMA = pa.schema([("file", pa.string()), ("line", pa.int64()), ("reason", pa.string())])
UNKNOWN_SOURCE = "unknown"
PROGRESS_EVERY = 1000


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
            docs.write_shard(docs.docs_table(result.doc_ids, result.texts, result.sources), staged)
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
        docs.write_shard(table, shard_path)
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


@dataclass
class IngestReport:
    """What ingest did, file by file; the counts always add up (read = kept + rejected + duplicates)."""

    files: int = 0
    shards: int = 0
    totals: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    rejects: list[Reject] = field(default_factory=list)
    per_file: list[dict[str, Any]] = field(default_factory=list)

    def add(self, url: str, result: dict[str, Any], kept: int) -> None:
        counts = {"read": result["read"], "kept": kept, "rejected": len(result["rejects"]),
                  "duplicates": result["duplicates"] + len(result["doc_ids"]) - kept}
        self.per_file.append({"file": url, **counts})
        self.totals.update(counts)
        self.reasons.update(_reason_kind(r.reason) for r in result["rejects"])
        self.rejects.extend(result["rejects"])
        self.shards += kept > 0

    def metrics(self) -> dict[str, int]:
        """The DVC metrics: the four counts only (the report holds the rest)."""
        metrics = {k: self.totals[k] for k in ("read", "kept", "rejected", "duplicates")}
        assert metrics["read"] == metrics["kept"] + metrics["rejected"] + metrics["duplicates"]
        return metrics

    def details(self) -> dict[str, Any]:
        return {"files": self.files, "shards": self.shards, **self.metrics(),
                "rejected_by_reason": dict(sorted(self.reasons.items())), "per_file": self.per_file}


def ingest_files(files: list[str], step: StageFile, engine: Engine, out_dir: Path) -> IngestReport:
    """Run `step` on every file and commit the shards into `out_dir` in input order (the first copy of a document
    wins). Results are committed as they arrive, so the driver holds the set of kept doc ids, not every file's
    list at once."""
    staging = out_dir / "staged"
    staging.mkdir(parents=True)
    # Absolute paths: a Ray worker's working directory is not ours.
    tasks = [(url, _readable_anywhere(url), str((staging / f"{i:06d}.parquet").resolve()))
             for i, url in enumerate(files)]
    results = engine.imap(step, tasks, f"ingest ({len(files)} files)", unit="doc")
    report, seen = IngestReport(files=len(files)), set()
    for (url, _, staged), result in zip(tasks, results):
        kept = commit_staged(Path(staged), result["doc_ids"], seen, out_dir / docs.shard_name(report.shards))
        report.add(url, result, kept)
    staging.rmdir()
    return report


def run(params: dict[str, Any], inputs_param: str = "ingest.inputs") -> dict[str, Any]:
    """The ingest stage. `inputs_param` names the parameter the inputs came from in errors (the target stages
    ingest `targets.sets.<set>`)."""
    cfg = section(params, "ingest")
    inputs = require(cfg, "ingest", "inputs", (list, str))
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not all(isinstance(item, str) for item in inputs):
        raise ParamError(f"{inputs_param} = {inputs!r}: expected a list of paths, globs or URLs (strings)")
    text_field = require(cfg, "ingest", "text_field", str)
    step = StageFile(text_field, require(cfg, "ingest", "source_field", str), require(cfg, "ingest", "strict", bool))
    out_dir = local_path(cfg, "ingest", "output")
    rejects_path = local_path(cfg, "ingest", "rejects")

    files = expand_inputs(inputs, inputs_param)
    with atomic_path(out_dir) as tmp_dir:
        report = ingest_files(files, step, Engine.for_stage(params, "ingest"), tmp_dir)
        write_parquet(_rejects_table(report.rejects), rejects_path)
        write_json(report.details(), local_path(cfg, "ingest", "report"))
        write_json(report.metrics(), local_path(cfg, "ingest", "metrics"))
        counts = report.metrics()
        if counts["kept"] == 0:
            no_text = bool(report.reasons) and all(r.startswith("missing text field") for r in report.reasons)
            raise InputError(
                f"empty corpus: no document kept from {len(files)} file(s) of {inputs_param} "
                f"(read {counts['read']}, rejected {counts['rejected']}, duplicates {counts['duplicates']}; "
                f"rejects listed in {rejects_path})"
                + (f"; no record has the text field '{text_field}' (expected the field that holds each "
                   "document's text)" if no_text else ""))
    log.info("ingest: read %d, kept %d, rejected %d, duplicates %d", *counts.values())
    return report.details()


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

