"""Stage 1, ingest: RedPajama-layout files -> normalized Parquet shards (doc_id, text, source, n_chars).

`ingest_file` is the pure per-file step (one input file -> its valid, within-file-unique documents and its
rejects); `StageFile` runs it on either engine (engine.py), stages the documents and writes their digests. Exact
duplicates across files are then dropped in input order by partitions of the digest space (dedup.py, also on the
engine), and `CommitShard` moves each staged shard, less its dropped rows, into place. The result does not depend
on where or in which order files were processed, and the driver holds nothing per document (per file: counts and
rejects). Counts always add up: read = kept + rejected + duplicates.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.atomic import atomic_path, write_json, write_parquet
from ..core.errors import InputError, ParamError
from ..core.config import load
from ..core.sections import IngestConfig
from ..formats import docs
from . import dedup
from .engine import Engine
from .readers import Record, Reject, is_supported, iter_records

log = logging.getLogger(__name__)

REJECTS_SCHEMA = pa.schema([("file", pa.string()), ("line", pa.int64()), ("reason", pa.string())])
UNKNOWN_SOURCE = "unknown"
PROGRESS_EVERY = 1000
# Digests a deduplication partition holds at most (about 42 bytes each while it sorts them: ~180 MB). The number of
# partitions follows from the corpus size, so a partition task's memory does not grow with the corpus.
PARTITION_DOCS = 1 << 22


def content_digest(text: str) -> bytes:
    """The document's identity as 16 bytes: 128-bit BLAKE2b of its UTF-8 text."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=dedup.DIGEST_BYTES).digest()


def content_hash(text: str) -> str:
    """The document's identity: 128-bit BLAKE2b of its UTF-8 text (stable across runs, file order and machines)."""
    return content_digest(text).hex()


@dataclass
class FileResult:
    file: str
    digests: list[bytes] = field(default_factory=list)  # 16 bytes each; doc_ids are their hex
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
    seen: set[bytes] = set()  # one file's digests: this worker holds the file's texts anyway
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
        digest = content_digest(item.text)
        if digest in seen:
            result.duplicates += 1
            continue
        seen.add(digest)
        result.digests.append(digest)
        result.doc_ids.append(digest.hex())
        result.texts.append(item.text)
        result.sources.append(item.source if item.source is not None else UNKNOWN_SOURCE)
    if on_progress:
        on_progress(result.read % PROGRESS_EVERY)
    return result


class StageFileTask(NamedTuple):
    """One engine item of StageFile (absolute paths: a Ray worker's working directory is not ours)."""

    name: str  # how reports call the file
    url: str  # where the worker reads it
    staged: str  # the staged docs shard written
    digests: str  # the sorted digests written (dedup.write_digests)


class CommitTask(NamedTuple):
    """One engine item of CommitShard."""

    staging: str  # the staging directory
    file_index: int  # the input file, in input order
    unique: int  # documents of its staged shard
    dropped: int  # of those, the ones an earlier file holds
    shard_path: str  # the final docs shard


class StageFile:
    """The per-file step of either engine: one input file -> a staged shard of its within-file-unique documents and
    their sorted digests (dedup.write_digests), which the partitions read to drop duplicates across files.

    Returns only the counts and the rejects: nothing per document goes back to the driver.
    """

    def __init__(self, text_field: str, source_field: str | None, strict: bool):
        self.text_field, self.source_field, self.strict = text_field, source_field, strict
        self.on_progress: Callable[[int], None] | None = None  # set by the local engine for a finer progress bar

    def __call__(self, task: StageFileTask) -> dict[str, Any]:
        result = ingest_file(task.url, self.text_field, self.source_field, self.strict, self.on_progress)
        result.rejects = [Reject(task.name, r.line, r.reason) for r in result.rejects]
        if result.doc_ids:
            docs.write_shard(docs.docs_table(result.doc_ids, result.texts, result.sources), task.staged)
            dedup.write_digests(result.digests, task.digests)
        return {"read": result.read, "duplicates": result.duplicates, "rejects": result.rejects,
                "unique": len(result.doc_ids)}


class CommitShard:
    """The last per-file step: a staged shard, less the rows earlier files hold, moved into its final place."""

    def __call__(self, task: CommitTask) -> int:
        staged = Path(task.staging) / f"{task.file_index:06d}.parquet"
        if not staged.exists():  # a retried task (Ray) whose first attempt got as far as committing
            return task.unique - task.dropped
        rows = dedup.dropped_rows(task.staging, task.file_index, task.dropped)
        kept = task.unique - task.dropped
        if task.dropped == 0:
            os.replace(staged, task.shard_path)
        else:
            if kept:
                keep = np.ones(task.unique, dtype=bool)
                keep[rows] = False
                # One chunk, as a table built from lists is: row groups (and so the bytes) then match a direct
                # write.
                table = pq.read_table(staged).filter(pa.array(keep)).combine_chunks()
                docs.write_shard(table, task.shard_path)
            staged.unlink()
        dedup.remove_drops(task.staging, task.file_index)
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
                  "duplicates": result["duplicates"] + result["unique"] - kept}
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


def ingest_files(files: list[str], step: StageFile, engine: Engine, out_dir: Path,
                 partition_docs: int | None = None) -> IngestReport:
    """Run `step` on every file, drop duplicates across files by digest partitions (at most `partition_docs`
    digests each, default PARTITION_DOCS) and commit the shards into `out_dir` in input order (the first copy of a
    document wins). All three passes run on the engine; the driver holds per-file counts and the rejects only."""
    # Absolute paths: a Ray worker's working directory is not ours.
    staging = (out_dir / "staged").resolve()
    staging.mkdir(parents=True)
    tasks = [StageFileTask(name=url, url=_readable_anywhere(url), staged=str(staging / f"{i:06d}.parquet"),
                           digests=str(dedup.digests_path(staging, i))) for i, url in enumerate(files)]
    results = list(engine.imap(step, tasks, f"ingest ({len(files)} files)", unit="doc"))
    unique = np.array([r["unique"] for r in results], dtype=np.int64)

    holders = np.flatnonzero(unique)
    bits = dedup.partition_bits(int(unique.sum()), partition_docs or PARTITION_DOCS)
    dropped = np.zeros(len(files), dtype=np.int64)
    partitions = engine.imap(dedup.DedupPartition(staging, holders, bits), range(1 << bits),
                             f"ingest: deduplicate ({1 << bits} partitions)")
    for part in partitions:
        np.add.at(dropped, part["files"], part["dropped"])
    for f in holders.tolist():
        dedup.digests_path(staging, f).unlink()

    kept = unique - dropped
    shard_index = np.cumsum(kept > 0) - 1  # shards are numbered in input order, over files that keep documents
    commits = [CommitTask(staging=str(staging), file_index=f, unique=int(unique[f]), dropped=int(dropped[f]),
                          shard_path=str((out_dir / docs.shard_name(int(shard_index[f]))).resolve()))
               for f in holders.tolist()]
    committed = dict(zip(holders.tolist(), engine.imap(CommitShard(), commits, f"ingest: commit ({len(commits)} "
                                                                                  "files)")))
    report = IngestReport(files=len(files))
    for f, (url, result) in enumerate(zip(files, results)):
        report.add(url, result, committed.get(f, 0))
    if (staging / "drops").exists():
        (staging / "drops").rmdir()
    staging.rmdir()
    return report


def run(params: dict[str, Any], inputs_param: str = "ingest.inputs") -> dict[str, Any]:
    """The ingest stage. `inputs_param` names the parameter the inputs came from in errors (the target stages
    ingest `targets.sets.<set>`)."""
    cfg = load(IngestConfig, params.get("ingest"), "ingest")
    inputs = [cfg.inputs] if isinstance(cfg.inputs, str) else cfg.inputs
    text_field, rejects_path = cfg.text_field, cfg.rejects
    step = StageFile(text_field, cfg.source_field, cfg.strict)

    files = expand_inputs(inputs, inputs_param)
    with atomic_path(cfg.output) as tmp_dir:
        report = ingest_files(files, step, Engine.for_stage(params, "ingest", cfg.engine), tmp_dir)
        write_parquet(_rejects_table(report.rejects), rejects_path)
        write_json(report.details(), cfg.report)
        write_json(report.metrics(), cfg.metrics)
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

