"""Shared fixtures: a small real corpus cut from data/sample, embedded once per session with the real MiniLM; and a
session guard that fails the run when a test wrote into the checkout (`checkout_is_left_alone`)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import yaml
import zstandard

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample" / "generic"
DOCS_PER_SHARD = 120


def read_jsonl_zst(path: Path) -> list[dict]:
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(path.read_bytes()), read_across_frames=True).read()
    return [json.loads(line) for line in raw.split(b"\n") if line.strip()]


def brute_force_gradient(model, loss_fn, micro: list) -> "torch.Tensor":
    """The flattened gradient of the mean loss over the micro-batches, by plain backward passes: the reference the
    exact-alignment tests compare with."""
    import torch  # here, not at the top: most tests never need it

    model.zero_grad()
    for b in micro:
        (loss_fn(b) / len(micro)).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()


def write_jsonl_zst(records: list[dict], path: Path) -> None:
    payload = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    path.write_bytes(zstandard.ZstdCompressor().compress(payload))


# ---- no test writes into the checkout ----------------------------------------------------------------------------
HASH_LIMIT = 1 << 20  # bytes: files up to this size are hashed, larger ones (corpus shards) compared by size and mtime
GUARD_OFF = "DGAMIX_CHECKOUT_GUARD"  # set to 0 to edit the checkout while the suite runs, knowingly


def _file_stamp(path: Path) -> tuple | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    if stat.st_size > HASH_LIMIT:
        return ("size+mtime", stat.st_size, stat.st_mtime_ns)
    try:
        return ("blake2b", hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest())
    except (FileNotFoundError, IsADirectoryError):
        return None


def dvc_lock_outputs(root: Path) -> list[str]:
    """The outputs dvc.lock records, as paths relative to the root (none without a dvc.lock)."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return []
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return sorted({out["path"] for stage in stages.values() for out in stage.get("outs", [])})


def checkout_snapshot(root: Path) -> dict[str, tuple | None]:
    """Relative path -> stamp of every file git tracks and of every DVC output dvc.lock lists (each file of an output
    folder; None for an output that does not exist, so creating one counts). The stamp is a content hash up to
    HASH_LIMIT bytes and (size, mtime) above: a run of the suite pays a fraction of a second for it."""
    try:
        tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True)
        paths = set(tracked.stdout.decode().split("\0")) - {""} if tracked.returncode == 0 else set()
    except OSError:  # no git (an unpacked source archive): the DVC outputs are still guarded
        paths = set()
    snapshot: dict[str, tuple | None] = {}
    for out in dvc_lock_outputs(root):
        if (root / out).is_dir():
            paths |= {str(p.relative_to(root)) for p in (root / out).rglob("*") if p.is_file()}
        else:
            snapshot[out] = None  # the stamp below replaces it when the file exists
            paths.add(out)
    for rel in paths:
        snapshot[rel] = _file_stamp(root / rel)
    return snapshot


def changed_paths(before: dict[str, tuple | None], after: dict[str, tuple | None]) -> list[str]:
    """Paths whose stamp differs: written, created (an output folder's new file, a missing output) or deleted."""
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


@pytest.fixture(scope="session", autouse=True)
def checkout_is_left_alone() -> Iterator[None]:
    """Fails the run when a test wrote into the checkout: a tracked file, or a DVC output of the project's own
    pipeline (a test run must never replace `dvc repro`'s results with a toy corpus's). Tests write under tmp_path.
    Set DGAMIX_CHECKOUT_GUARD=0 when you edit files of the checkout while the suite runs."""
    if os.environ.get(GUARD_OFF) == "0":
        yield
        return
    before = checkout_snapshot(ROOT)
    yield
    changed = changed_paths(before, checkout_snapshot(ROOT))
    if changed:
        shown = ", ".join(changed[:20]) + (f" and {len(changed) - 20} more" if len(changed) > 20 else "")
        pytest.fail(f"the test run changed files of the checkout (tracked files or DVC outputs): {shown}. Tests must "
                    f"write under tmp_path (if you edited these files yourself meanwhile, {GUARD_OFF}=0 turns this "
                    "check off)", pytrace=False)


@pytest.fixture(scope="session")
def sample_records() -> list[list[dict]]:
    """The first DOCS_PER_SHARD records of each embedded-sample shard (real text, real sources)."""
    return [read_jsonl_zst(p)[:DOCS_PER_SHARD] for p in sorted(SAMPLE.glob("*.jsonl.zst"))]


def make_params(workdir: Path, inputs: list[str], levels: list[int]) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"]["inputs"] = inputs
    params["cluster"]["levels"] = levels
    params["targets"]["sets"] = {name: [str(ROOT / "data/sample/target" / f"{name}.jsonl.zst")]
                                 for name in ("spec", "eval")}
    # Keep every other path relative to the workdir: stages run there as dvc would.
    return params


def run_target_stages(params: dict, names: tuple[str, ...] = ("spec", "eval")) -> None:
    """The target stages of dvc.yaml, in order: each set through ingest, embed, assign and tokenize the corpus's way
    (needs the corpus's embed, cluster and tokenize outputs)."""
    from dgamix.pipeline import assign, embed, ingest, tokens
    from dgamix.pipeline.targets import run_stage

    for name in names:
        for stage, module in (("ingest", ingest), ("embed", embed), ("assign", assign), ("tokenize", tokens)):
            run_stage(params, name, stage, module)


@pytest.fixture(scope="session")
def encoder():
    from dgamix.pipeline.embed import load_encoder

    return load_encoder("all-MiniLM-L6-v2", "cpu", 128)


@pytest.fixture(scope="session")
def embedded_workspace(tmp_path_factory, sample_records) -> Path:
    """A workspace with the fixture corpus ingested and embedded (done once; tests copy it)."""
    from dgamix.pipeline import embed, ingest

    work = tmp_path_factory.mktemp("embedded")
    (work / "raw").mkdir()
    for i, records in enumerate(sample_records):
        write_jsonl_zst(records, work / "raw" / f"part-{i}.jsonl.zst")
    params = make_params(work, ["raw/*.jsonl.zst"], [4, 4])
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    with chdir(work):
        ingest.run(params)
        embed.run(params)
    return work


@pytest.fixture
def workspace(embedded_workspace, tmp_path) -> Path:
    """A private copy of the embedded workspace, with the process inside it."""
    work = tmp_path / "ws"
    shutil.copytree(embedded_workspace, work)
    with chdir(work):
        yield work


class chdir:
    def __init__(self, path: Path):
        self.path, self.old = path, None

    def __enter__(self):
        self.old = os.getcwd()
        os.chdir(self.path)

    def __exit__(self, *exc):
        os.chdir(self.old)


def load_params(work: Path) -> dict:
    return yaml.safe_load((work / "params.yaml").read_text())


def set_train(params: dict, settings: dict) -> dict:
    """Set settings of the nested `train` section by dotted key ({"data.seq_len": 16}); returns params."""
    for dotted, value in settings.items():
        node = params.setdefault("train", {})
        *parents, key = dotted.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
    return params
