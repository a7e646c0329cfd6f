"""ingest: every format, every kind of bad record, duplicates, and counts that add up."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from dgamix.formats import docs
from dgamix.pipeline import dedup, ingest
from dgamix.core.errors import InputError, ParamError
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


# ---- deduplication at scale: 16-byte digests, partitioned by prefix (pipeline/dedup.py) --------------------
def planted_corpus(tmp_path: Path) -> list[str]:
    """Seven files with duplicates within a file, between neighbours, between far files, in three files at once, a
    file of nothing but earlier documents (it keeps none: no shard) and an empty file; one bad record."""
    text = [f"planted document {i} " + "word " * (i % 7) for i in range(400)]
    files = {
        "f0.jsonl": text[0:120] + [text[5], text[5]],
        "f1.jsonl.zst": text[100:220] + [text[7]],
        "f2.jsonl.gz": [text[3], text[150], text[10]],  # nothing new
        "f3.jsonl": [],
        "f4.jsonl": text[200:330] + [text[0], text[219], text[329]],
        "f5.jsonl": text[330:400] + [text[7], text[399], text[120]],
        "f6.jsonl": [text[1], text[250], text[398], "a document of its own"],
    }
    names = []
    for name, texts in files.items():
        payload = jsonl_bytes([{"text": t, "meta": {"source": name[:2]}} for t in texts])
        write(tmp_path / name, payload + (b'{"text": 5}\n' if name == "f4.jsonl" else b""))
        names.append(name)
    return names


def first_copies(tmp_path: Path, names: list[str]) -> tuple[list[dict], list[list[str]]]:
    """What ingest must do, spelled out: per file, its counts and the texts whose first copy (in input order) it
    holds."""
    seen, counts, kept = set(), [], []
    for name in names:
        mine, read, rejected = [], 0, 0
        for item in iter_records(str(tmp_path / name), "text", "meta.source"):
            read += 1
            if isinstance(item, Reject):
                rejected += 1
            elif item.text not in seen:
                seen.add(item.text)
                mine.append(item.text)
        counts.append({"file": name, "read": read, "kept": len(mine), "rejected": rejected,
                       "duplicates": read - len(mine) - rejected})
        kept.append(mine)
    return counts, kept


def shard_bytes(directory: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(directory.glob("part-*.parquet"))]


@pytest.mark.parametrize("partition_docs", [None, 1, 5, 64, 10**9])
def test_partitioned_dedup_keeps_the_first_copy_in_input_order(tmp_path, partition_docs):
    """Any number of partitions (1 digest each .. one for all) gives the shards and counts that the first copy in
    input order gives, byte for byte; a file that keeps nothing writes no shard and the numbering closes up."""
    names = planted_corpus(tmp_path)
    with chdir(tmp_path):
        if partition_docs is None:  # the stage as users run it
            report = ingest.run({"ingest": {"inputs": names, "output": "docs", "rejects": "rejects.parquet",
                                            "report": "report.json", "metrics": "metrics.json"}})
        else:
            step = ingest.StageFile("text", "meta.source", False)
            report = ingest.ingest_files(names, step, ingest.Engine("ingest"), tmp_path / "docs",
                                         partition_docs=partition_docs).details()
    counts, kept = first_copies(tmp_path, names)
    assert report["per_file"] == counts
    assert report["read"] == report["kept"] + report["rejected"] + report["duplicates"]
    assert (report["kept"], report["rejected"], report["shards"]) == (401, 1, 5)
    expected = tmp_path / "expected"
    expected.mkdir()
    for i, texts in enumerate(t for t in kept if t):
        name = next(n for n, k in zip(names, kept) if k is texts)
        docs.write_shard(docs.docs_table([ingest.content_hash(t) for t in texts], texts, [name[:2]] * len(texts)),
                         expected / docs.shard_name(i))
    assert shard_bytes(tmp_path / "docs") == shard_bytes(expected)
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == [docs.shard_name(i) for i in range(5)]


def test_workers_send_no_per_document_data_to_the_driver(tmp_path):
    """The per-file result is counts and rejects: the digests stay on disk for the partitions, never in the driver."""
    import pickle

    small, large = (write(tmp_path / f"{n}.jsonl", jsonl_bytes([{"text": f"doc {i}"} for i in range(n)]))
                    for n in (10, 5000))
    step = ingest.StageFile("text", None, False)
    sizes = []
    for path in (small, large):
        result = step(ingest.StageFileTask(name=path.name, url=str(path), staged=str(tmp_path / f"{path.stem}.parquet"),
                                           digests=str(tmp_path / f"{path.stem}.digests.npy")))
        assert set(result) == {"read", "duplicates", "rejects", "unique"}
        sizes.append(len(pickle.dumps(result)))
    assert sizes[1] - sizes[0] < 8  # larger counts, nothing else: not 500 times the documents
    table = np.load(tmp_path / "5000.digests.npy")
    assert table.shape == (3, 5000) and table.dtype == np.uint64  # 16-byte digest + its row: 24 bytes a document


def test_digest_halves_sort_as_the_digest_bytes_do():
    rng = np.random.default_rng(0)
    raw = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(500)] + [b"\xff" * 16, b"\x00" * 16]
    halves = dedup.digest_array(raw)
    order = np.lexsort((halves[1], halves[0]))
    assert [raw[i] for i in order] == sorted(raw)
    assert (halves[0][-2], halves[1][-1]) == (2**64 - 1, 0)
    with pytest.raises(ValueError, match="16-byte digests"):
        dedup.digest_array([b"short"])


def test_partition_bits_bound_the_digests_a_partition():
    assert dedup.partition_bits(0, 4) == 0 and dedup.partition_bits(4, 4) == 0 and dedup.partition_bits(5, 4) == 1
    assert dedup.partition_bits(10**9, 1 << 22) == 8  # a billion documents: 256 partitions of ~3.9 M
    assert dedup.partition_bits(10**15, 1) == dedup.MAX_PARTITION_BITS
    with pytest.raises(ValueError, match="partition_docs = 0"):
        dedup.partition_bits(10, 0)


def planted_digests(tmp_path: Path, files: int, per_file: int) -> list[list[bytes]]:
    """Random digests per file, every tenth one repeating a digest of some earlier file (or of its own file's
    first rows, which the worker would have dropped: not planted within a file)."""
    rng = np.random.default_rng(1)
    out: list[list[bytes]] = []
    for f in range(files):
        mine = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(per_file)]
        if f:
            for k in range(0, per_file, 10):
                g = int(rng.integers(0, f))
                mine[k] = out[g][int(rng.integers(0, per_file))]
        mine = list(dict.fromkeys(mine))  # within-file unique, as a worker writes them
        dedup.write_digests(mine, dedup.digests_path(tmp_path, f))
        out.append(mine)
    return out


@pytest.mark.parametrize("bits", [0, 1, 3, 8])
def test_partitions_drop_exactly_the_later_copies(tmp_path, bits):
    per_file = planted_digests(tmp_path, files=6, per_file=300)
    holders = np.arange(6)
    task = dedup.DedupPartition(tmp_path, holders, bits)
    dropped = np.zeros(6, dtype=np.int64)
    for p in range(1 << bits):
        part = task(p)
        dropped[part["files"]] += part["dropped"]
    seen: set[bytes] = set()
    for f, digests in enumerate(per_file):
        expected = [row for row, d in enumerate(digests) if d in seen]
        seen.update(digests)
        assert dedup.dropped_rows(tmp_path, f, int(dropped[f])).tolist() == expected
    assert dropped[0] == 0 and dropped.sum() > 100
    with pytest.raises(RuntimeError, match="partitions reported"):
        dedup.dropped_rows(tmp_path, 1, int(dropped[1]) + 1)


def test_a_partition_holds_tens_of_bytes_per_digest(tmp_path):
    """Memory of one partition task (tracemalloc counts numpy's buffers; the files are memory-mapped): about 45
    bytes per digest, against ~150 for a Python set of hex ids."""
    import tracemalloc

    rng = np.random.default_rng(2)
    n, files = 200_000, 4
    for f in range(files):
        raw = rng.integers(0, 256, (n // files, 16), dtype=np.uint8)
        dedup.write_digests([bytes(r) for r in raw], dedup.digests_path(tmp_path, f))
    task = dedup.DedupPartition(tmp_path, np.arange(files), 0)
    tracemalloc.start()
    try:
        part = task(0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert part["digests"] == n
    assert peak / n < 48, f"{peak / n:.1f} bytes per digest"


def test_a_retried_commit_after_success_is_a_no_op(tmp_path):
    write(tmp_path / "a.jsonl", jsonl_bytes(GOOD))
    staging = tmp_path / "staged"
    staging.mkdir()
    ingest.StageFile("text", "meta.source", False)(ingest.StageFileTask(
        name="a.jsonl", url=str(tmp_path / "a.jsonl"), staged=str(staging / "000000.parquet"),
        digests=str(dedup.digests_path(staging, 0))))
    task = ingest.CommitTask(staging=str(staging), file_index=0, unique=3, dropped=0,
                             shard_path=str(tmp_path / "part-00000.parquet"))
    assert ingest.CommitShard()(task) == 3
    first = (tmp_path / "part-00000.parquet").read_bytes()
    assert ingest.CommitShard()(task) == 3  # what a Ray retry of a task killed after committing does
    assert (tmp_path / "part-00000.parquet").read_bytes() == first


@pytest.mark.parametrize("bits", [0, 1, 3, 8])
def test_digests_on_partition_bounds_are_deduplicated_once(tmp_path, bits):
    """Duplicates planted at each partition's first and last prefix value (0 and 2**64 - 1 among them): each digest
    belongs to exactly one partition, whose task drops the later copies; a partition that read a bound of its
    neighbour's, or missed one of its own, would keep a duplicate or drop a first copy."""
    rng = np.random.default_rng(3)
    shift = 64 - bits
    bounds = [v for p in range(1 << bits) for v in (p << shift, ((p + 1) << shift) - 1)]
    assert bounds[0] == 0 and bounds[-1] == 2**64 - 1

    def digest(high: int) -> bytes:
        return high.to_bytes(8, "big") + bytes(rng.integers(0, 256, 8, dtype=np.uint8))

    planted = [digest(v) for v in bounds]
    noise = [[digest(int(rng.integers(0, 2**63)) * 2 + 1) for _ in range(50)] for _ in range(3)]
    files = [planted + noise[0],  # the first copies
             noise[1] + [planted[i] for i in rng.permutation(len(planted))],  # every one again, in another order
             planted[1::2] + noise[2] + noise[0][:5]]  # some a third time, and repeats of file 0's noise
    for f, digests in enumerate(files):
        dedup.write_digests(digests, dedup.digests_path(tmp_path, f))
    task = dedup.DedupPartition(tmp_path, np.arange(len(files)), bits)
    dropped = np.zeros(len(files), dtype=np.int64)
    read = 0
    for p in range(1 << bits):
        part = task(p)
        read += part["digests"]
        dropped[part["files"]] += part["dropped"]
    assert read == sum(map(len, files))  # every digest read by exactly one partition
    seen: set[bytes] = set()
    for f, digests in enumerate(files):
        expected = [row for row, d in enumerate(digests) if d in seen]
        seen.update(digests)
        assert dedup.dropped_rows(tmp_path, f, int(dropped[f])).tolist() == expected, f"file {f}"
    assert dropped.tolist() == [0, len(planted), len(planted[1::2]) + 5]


def test_a_json_error_reads_as_one_sentence():
    """json's messages can end in "at" ("Unterminated string starting at"): the reason must not say "at at"."""
    from dgamix.pipeline.readers import _parse_line

    reject = _parse_line(b'{"text": "no end', "f.jsonl", 3, "text", None)
    assert reject.reason == "invalid JSON: Unterminated string starting at column 10"
    assert " at at " not in reject.reason
