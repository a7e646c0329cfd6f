"""Shared fixtures: a small real corpus cut from data/sample, embedded once per session with the real MiniLM."""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

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
