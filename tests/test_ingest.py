"""ingest: every format, every kind of bad record, duplicates, and counts that add up."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from dgamix.formats import docs
from dgamix.pipeline import ingest
from dgamix.core.params import InputError, ParamError
from dgamix.pipeline.readers import Record, Reject, iter_records

from .conftest import chdir

GOOD = [
    {"text": "Alpha document about licences.", "meta": {"source": "a"}},
    {"text": "Beta document with a NEL \u0085 inside, which is not a line break.", "meta": {"source": "b"}},
    {"text": "Gamma document.", "meta": {"source": "a"}},
]


def jsonl_bytes(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def write(path: Path, payload: bytes) -> Path:
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload)
    elif path.name.endswith(".zst"):
        payload = zstandard.ZstdCompressor().compress(payload)
    path.write_bytes(payload)
    return path


def run_ingest(tmp_path: Path, inputs: list[str], **extra) -> dict:
    params = {"ingest": {"inputs": inputs, "output": "docs", "rejects": "rejects.parquet",
                         "metrics": "metrics/ingest.json", **extra}}
    with chdir(tmp_path):
        return ingest.run(params)


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst"])
def test_jsonl_formats_read_the_same_records(tmp_path, name):
    path = write(tmp_path / name, jsonl_bytes(GOOD))
    items = list(iter_records(str(path)))
    assert [i.text for i in items] == [r["text"] for r in GOOD]
    assert [i.source for i in items] == ["a", "b", "a"]
    assert [i.line for i in items] == [1, 2, 3]


def test_parquet_with_nested_meta(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD), path)
    items = list(iter_records(str(path)))
    assert [(i.text, i.source) for i in items] == [(r["text"], r["meta"]["source"]) for r in GOOD]


def test_configurable_text_and_source_fields(tmp_path):
    path = write(tmp_path / "a.jsonl", jsonl_bytes([{"content": "x y z", "meta": {"set": "web"}}]))
    (item,) = iter_records(str(path), text_field="content", source_field="meta.set")
    assert (item.text, item.source) == ("x y z", "web")


def test_every_bad_record_is_rejected_with_file_line_and_reason(tmp_path):
    lines = [
        json.dumps(GOOD[0]).encode(),
        b'{"text": "unterminated',
        json.dumps({"meta": {"source": "a"}}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "  \n\t "}).encode(),
        b'{"text": "caf\xe9"}',  # latin-1 byte: invalid UTF-8
        b'{"text": "lone \\ud800 surrogate"}',
        b"[1, 2]",
        json.dumps(GOOD[2]).encode(),
    ]
    path = write(tmp_path / "bad.jsonl", b"\n".join(lines) + b"\n")
    items = list(iter_records(str(path)))
    reasons = {i.line: i.reason for i in items if isinstance(i, Reject)}
    assert [i.line for i in items if isinstance(i, Record)] == [1, 9]
    assert reasons[2].startswith("invalid JSON")
    assert reasons[3] == "missing text field 'text'"
    assert reasons[4] == "text field 'text' is int, expected a string"
    assert reasons[5] == "empty or whitespace-only text"
    assert reasons[6].startswith("invalid UTF-8")
    assert "not valid Unicode" in reasons[7]
    assert "expected an object" in reasons[8]
    assert all(isinstance(i, Record) or i.file == str(path) for i in items)


@pytest.mark.parametrize("name", ["cut.jsonl.zst", "cut.jsonl.gz"])
def test_truncated_compressed_file_keeps_what_was_readable(tmp_path, name):
    many = [{"text": f"document number {i} " * 20, "meta": {"source": "s"}} for i in range(2000)]
    full = write(tmp_path / ("full" + name[3:]), jsonl_bytes(many))
    cut = tmp_path / name
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    items = list(iter_records(str(cut)))
    records = [i for i in items if isinstance(i, Record)]
    rejects = [i for i in items if isinstance(i, Reject)]
    assert 0 < len(records) < len(many)
    assert len(rejects) == 1 and "truncated or corrupt compressed file" in rejects[0].reason
    assert rejects[0].line == len(records) + 1
    assert [r.text for r in records] == [m["text"] for m in many[: len(records)]]


def test_corrupt_parquet_is_a_reject(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all")
    (item,) = iter_records(str(path))
    assert isinstance(item, Reject) and "corrupt Parquet" in item.reason


def test_ingest_counts_add_up_and_duplicates_are_dropped(tmp_path):
    write(tmp_path / "x.jsonl.zst", jsonl_bytes(GOOD + [GOOD[0]]) + b"not json\n")  # 1 dup in-file, 1 reject
    write(tmp_path / "y.jsonl.gz", jsonl_bytes([GOOD[1], {"text": "Delta, new.", "meta": {}}]))  # 1 dup across
    metrics = run_ingest(tmp_path, ["x.jsonl.zst", "*.gz"])
    assert metrics["read"] == 7
    assert (metrics["kept"], metrics["rejected"], metrics["duplicates"]) == (4, 1, 2)
    assert metrics["read"] == metrics["kept"] + metrics["rejected"] + metrics["duplicates"]
    assert metrics["rejected_by_reason"] == {"invalid JSON": 1}
    on_disk = json.loads((tmp_path / "metrics" / "ingest.json").read_text())
    assert on_disk["kept"] == 4
    docs = pq.read_table(tmp_path / "docs").to_pylist()
    assert [d["text"] for d in docs] == [GOOD[0]["text"], GOOD[1]["text"], GOOD[2]["text"], "Delta, new."]
    assert docs[3]["source"] == "unknown"  # a missing source is kept, labelled, never dropped
    assert all(d["n_chars"] == len(d["text"]) for d in docs)
    assert docs[0]["doc_id"] == ingest.content_hash(GOOD[0]["text"])
    rejects = pq.read_table(tmp_path / "rejects.parquet").to_pylist()
    assert rejects == [{"file": "x.jsonl.zst", "line": 5,  # named relative to the project
                        "reason": "invalid JSON: Expecting value at column 1"}]


def test_a_shard_thinned_by_cross_file_duplicates_is_written_as_a_fresh_table_would_be(tmp_path):
    # More documents than one row group, some already seen in an earlier file: the thinned shard must be the
    # bytes of writing its documents directly (one row group per SHARD_ROWS rows), whatever path produced it.
    # (Texts long enough that a row group spans several Parquet data pages, where chunking shows in the bytes.)
    first = [{"text": f"document {i} " + "lorem ipsum " * 30} for i in range(0, 3000, 3)]
    second = [{"text": f"document {i} " + "lorem ipsum " * 30} for i in range(docs.SHARD_ROWS + 2500)]
    write(tmp_path / "a.jsonl", jsonl_bytes(first))
    write(tmp_path / "b.jsonl", jsonl_bytes(second))
    metrics = run_ingest(tmp_path, ["a.jsonl", "b.jsonl"])
    assert metrics["duplicates"] == len(first)
    kept = [r["text"] for r in second if int(r["text"].split()[1]) >= 3000 or int(r["text"].split()[1]) % 3]
    direct = tmp_path / "direct.parquet"
    docs.write_shard(docs.docs_table([ingest.content_hash(t) for t in kept], kept, ["unknown"] * len(kept)), direct)
    shard = tmp_path / "docs/part-00001.parquet"
    assert pq.ParquetFile(shard).metadata.num_row_groups == 2
    assert shard.read_bytes() == direct.read_bytes()


def test_strict_mode_stops_at_the_first_bad_record(tmp_path):
    write(tmp_path / "x.jsonl", jsonl_bytes(GOOD[:1]) + b'{"text": 1}\n')
    with pytest.raises(InputError, match=r"x.jsonl:2: text field 'text' is int"):
        run_ingest(tmp_path, ["x.jsonl"], strict=True)
    assert not (tmp_path / "docs").exists()


def test_empty_corpus_is_an_error_with_counts_and_report(tmp_path):
    write(tmp_path / "x.jsonl", b'{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(InputError, match=r"empty corpus.*read 2, rejected 2, duplicates 0"):
        run_ingest(tmp_path, ["x.jsonl"])
    assert pq.read_table(tmp_path / "rejects.parquet").num_rows == 2
    assert not (tmp_path / "docs").exists()


def test_missing_input_path_names_the_parameter(tmp_path):
    with pytest.raises(ParamError, match=r"ingest.inputs: 'nowhere/\*.jsonl' matches no file"):
        run_ingest(tmp_path, ["nowhere/*.jsonl"])


def test_unsupported_format_names_the_file(tmp_path):
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(ParamError, match=r"x.csv' is not a supported format"):
        run_ingest(tmp_path, ["x.csv"])


def test_rerun_replaces_output_and_is_byte_identical(tmp_path):
    write(tmp_path / "x.jsonl", jsonl_bytes(GOOD))
    run_ingest(tmp_path, ["x.jsonl"])
    first = (tmp_path / "docs" / "part-00000.parquet").read_bytes()
    run_ingest(tmp_path, ["x.jsonl"])
    assert (tmp_path / "docs" / "part-00000.parquet").read_bytes() == first
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["part-00000.parquet"]


def test_a_folder_input_means_its_supported_files(tmp_path):
    (tmp_path / "in").mkdir()
    write(tmp_path / "in" / "a.jsonl", jsonl_bytes(GOOD[:1]))
    write(tmp_path / "in" / "b.jsonl.zst", jsonl_bytes(GOOD[1:]))
    (tmp_path / "in" / "notes.txt").write_text("not a shard")
    metrics = run_ingest(tmp_path, ["in"])
    assert (metrics["files"], metrics["kept"]) == (2, 3)


def test_truncated_file_counts_add_up_through_the_stage(tmp_path):
    many = [{"text": f"record {i} " * 30, "meta": {"source": "s"}} for i in range(3000)]
    full = write(tmp_path / "full.jsonl.zst", jsonl_bytes(many))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.jsonl.zst").write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    write(tmp_path / "in" / "ok.jsonl", jsonl_bytes(GOOD))
    metrics = run_ingest(tmp_path, ["in"])
    assert metrics["rejected"] == 1 and metrics["rejected_by_reason"] == {"truncated or corrupt compressed file": 1}
    assert 3 < metrics["kept"] < 3003
    assert metrics["read"] == metrics["kept"] + metrics["rejected"] + metrics["duplicates"]


def test_non_string_inputs_name_the_parameter(tmp_path):
    with pytest.raises(ParamError, match=r"ingest.inputs = \[1\]: expected a list of paths"):
        run_ingest(tmp_path, [1])


def test_stale_temporary_output_of_a_killed_run_is_cleared(tmp_path):
    write(tmp_path / "x.jsonl", jsonl_bytes(GOOD))
    stale = tmp_path / "docs.99999.tmp"
    stale.mkdir()
    (stale / "part-00000.parquet").write_bytes(b"half written")
    run_ingest(tmp_path, ["x.jsonl"])
    assert not stale.exists()
    assert pq.read_table(tmp_path / "docs").num_rows == 3


def test_stage_data_takes_file_urls_and_refuses_object_stores(tmp_path):
    write(tmp_path / "x.jsonl", jsonl_bytes(GOOD))
    metrics = run_ingest(tmp_path, ["x.jsonl"], output=f"file://{tmp_path / 'urls'}")
    assert metrics["kept"] == 3 and pq.read_table(tmp_path / "urls").num_rows == 3
    with pytest.raises(ParamError, match=r"ingest.output = 's3://bucket/docs': expected a path or file:// URL on a "
                                         r"filesystem every worker mounts; s3:// works for the inputs"):
        run_ingest(tmp_path, ["x.jsonl"], output="s3://bucket/docs")
