"""Streaming readers for RedPajama-layout documents: jsonl, jsonl.gz, jsonl.zst and Parquet, local or fsspec URLs.

Every record read yields exactly one item, a `Record` or a `Reject`, so that the ingest counts add up
(read = kept + rejected + duplicates). A truncated or corrupt compressed stream yields one `Reject` for the
unreadable remainder; the records before it are kept.
"""
from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import pyarrow.parquet as pq
import zstandard

CHUNK_BYTES = 1 << 20
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".jsonl.zstd", ".parquet")


@dataclass(frozen=True)
class Record:
    line: int
    text: str
    source: str | None


@dataclass(frozen=True)
class Reject:
    file: str
    line: int
    reason: str


class CorruptStream(Exception):
    """The compressed stream ended early or could not be decoded."""


def is_supported(url: str) -> bool:
    return url.lower().endswith(SUPPORTED_SUFFIXES)


def get_field(record: dict[str, Any], dotted: str) -> Any:
    """`get_field(r, "meta.source")` -> r["meta"]["source"]; raises KeyError when any part is missing."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def validate_record(obj: Any, file: str, line: int, text_field: str, source_field: str | None) -> Record | Reject:
    """Check one decoded record against the contract; pure, so tests reach every reason directly."""
    if not isinstance(obj, dict):
        return Reject(file, line, f"record is a JSON {type(obj).__name__}, expected an object")
    try:
        text = get_field(obj, text_field)
    except KeyError:
        return Reject(file, line, f"missing text field '{text_field}'")
    if not isinstance(text, str):
        return Reject(file, line, f"text field '{text_field}' is {type(text).__name__}, expected a string")
    if not text.strip():
        return Reject(file, line, "empty or whitespace-only text")
    try:
        # JSON escapes can smuggle lone surrogates (\ud800) that no UTF-8 writer accepts.
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return Reject(file, line, f"text is not valid Unicode ({err.reason} at character {err.start})")
    source = None
    if source_field:
        try:
            raw = get_field(obj, source_field)
            source = None if raw is None else str(raw)
        except KeyError:
            source = None
    return Record(line, text, source)


def iter_records(url: str, text_field: str = "text", source_field: str | None = "meta.source") -> Iterator[Record | Reject]:
    if url.lower().endswith(".parquet"):
        yield from _iter_parquet(url, text_field, source_field)
    else:
        yield from _iter_jsonl(url, text_field, source_field)


def _iter_jsonl(url: str, text_field: str, source_field: str | None) -> Iterator[Record | Reject]:
    line_no = 0
    pending = b""
    try:
        for chunk in _decompressed_chunks(url):
            pending += chunk
            *lines, pending = pending.split(b"\n")  # split on "\n" only: texts may hold U+0085 and friends
            for raw in lines:
                line_no += 1
                yield _parse_line(raw, url, line_no, text_field, source_field)
    except CorruptStream as err:
        # Whatever was buffered is the start of a record we cannot finish: it is part of this one reject.
        yield Reject(url, line_no + 1, f"truncated or corrupt compressed file: {err}")
        return
    if pending:
        line_no += 1
        yield _parse_line(pending, url, line_no, text_field, source_field)


def _parse_line(raw: bytes, file: str, line: int, text_field: str, source_field: str | None) -> Record | Reject:
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if not raw.strip():
        return Reject(file, line, "empty line")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Reject(file, line, f"invalid UTF-8 at byte {err.start}")
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as err:
        # json's own messages may end in "at" ("Unterminated string starting at"): then the column follows directly
        where = f"column {err.colno}" if err.msg.endswith(" at") else f"at column {err.colno}"
        return Reject(file, line, f"invalid JSON: {err.msg} {where}")
    return validate_record(obj, file, line, text_field, source_field)


def _decompressed_chunks(url: str) -> Iterator[bytes]:
    lower = url.lower()
    with fsspec.open(url, "rb") as fh:
        if lower.endswith(".gz"):
            yield from _gzip_chunks(fh)
        elif lower.endswith((".zst", ".zstd")):
            yield from _zstd_chunks(fh)
        else:
            while chunk := fh.read(CHUNK_BYTES):
                yield chunk


def _gzip_chunks(fh: Any) -> Iterator[bytes]:
    try:
        with gzip.GzipFile(fileobj=fh) as gz:
            while chunk := gz.read1(CHUNK_BYTES):  # read1: hand over what decoded before a broken tail
                yield chunk
    except (EOFError, OSError, zlib.error) as err:
        raise CorruptStream(str(err)) from err


def _zstd_chunks(fh: Any) -> Iterator[bytes]:
    # zstandard's stream_reader returns a short read on a truncated file without complaint, so decode frame by
    # frame and check that the last frame reached its end.
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    frame_has_input = False
    try:
        while compressed := fh.read(CHUNK_BYTES):
            while compressed:
                frame_has_input = True
                out = dobj.decompress(compressed)
                if out:
                    yield out
                if dobj.eof:
                    compressed = dobj.unused_data
                    dobj = dctx.decompressobj()
                    frame_has_input = False
                else:
                    compressed = b""
    except zstandard.ZstdError as err:
        raise CorruptStream(str(err)) from err
    if frame_has_input:
        raise CorruptStream("the zstd stream ends in the middle of a frame")


def _iter_parquet(url: str, text_field: str, source_field: str | None) -> Iterator[Record | Reject]:
    top_level = {text_field.split(".")[0]}
    if source_field:
        top_level.add(source_field.split(".")[0])
    row = 0
    try:
        with fsspec.open(url, "rb") as fh:
            pf = pq.ParquetFile(fh)
            columns = [c for c in pf.schema_arrow.names if c in top_level]
            if text_field.split(".")[0] not in columns:
                # Every row lacks the text field: reject them one by one so the counts still add up.
                for _ in range(pf.metadata.num_rows):
                    row += 1
                    yield Reject(url, row, f"missing text field '{text_field}'")
                return
            for batch in pf.iter_batches(columns=columns, batch_size=8192):
                for obj in batch.to_pylist():
                    row += 1
                    yield validate_record(obj, url, row, text_field, source_field)
    except (OSError, ValueError) as err:  # pyarrow raises ArrowInvalid (a ValueError) / OSError on corrupt files
        yield Reject(url, row + 1, f"unreadable or corrupt Parquet file: {err}")
