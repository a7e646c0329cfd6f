"""End to end: the real `dvc repro` of this project's dvc.yaml on a small cut of the embedded sample."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import yaml

from .conftest import ROOT, set_train, write_jsonl_zst


def dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(Path(bin_dir) / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_dvc_repro_runs_every_stage(tmp_path, sample_records):
    project = tmp_path / "project"
    (project / "data/sample/generic").mkdir(parents=True)
    for i, records in enumerate(sample_records):
        write_jsonl_zst(records, project / f"data/sample/generic/part-{i:05d}.jsonl.zst")
    shutil.copytree(ROOT / "data/sample/target", project / "data/sample/target")
    shutil.copy(ROOT / "dvc.yaml", project)
    for package in ("dgamix",):  # dvc.yaml's code dependencies
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["cluster"]["levels"] = [4, 4]
    params["tokenize"]["vocab_size"] = 1024
    set_train(params, {"steps": 4, "data.seq_len": 16, "data.batch_size": 4, "model.n_layer": 1, "model.n_embd": 32,
                       "model.n_head": 2, "eval.every": 2, "eval.batches": 1, "strategy.dga.every": 2,
                       "strategy.dga.batch_size": 2, "strategy.inbatch.target_batch_size": 2})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    dvc(["init", "--no-scm", "-q"], project)
    shutil.copy(ROOT / ".dvcignore", project / ".dvcignore")  # the project's, over the one init writes

    dvc(["repro"], project)

    shown = json.loads(dvc(["metrics", "show", "--json"], project).stdout)
    metrics = {path: d["data"] for entry in shown.values() for path, d in entry["data"].items()}
    corpus, spec = metrics["metrics/ingest.json"], metrics["metrics/targets/spec.json"]
    assert corpus["read"] == corpus["kept"] + corpus["rejected"] + corpus["duplicates"] == 240
    assert spec["kept"] == 176 and metrics["metrics/targets/eval.json"]["kept"] == 75
    assert metrics["metrics/stats.json"]["clusters"] == 16 and 0 < metrics["metrics/stats.json"]["nmi_fine"] <= 1
    assert metrics["metrics/bases.json"]["target_clusters"] >= 1
    table = pl.read_parquet(project / "data/stats/clusters.parquet")
    assert table["docs"].sum() == corpus["kept"] and table.height == 16
    for strategy in params["train"]["strategies"]:
        # DVC shows the scalars; the lists (bases, final_weights) stay in the file for scripts.
        assert set(metrics[f"runs/{strategy}/metrics.json"]) == {"final_spec_loss", "final_generic_loss"}
        assert json.loads((project / "runs" / strategy / "summary.json").read_text())["steps"] == 4
    store = json.loads((project / "data/tokens/store.json").read_text())
    assert store["documents"] + store["heldout_documents"] == corpus["kept"] and store["dtype"] == "uint16"
    assert table["tokens"].sum() == store["tokens"]  # stats ran after tokenize: training tokens per cluster
    # Readable: the plain table has one row per metrics file and few columns (the details are in summary files).
    printed = dvc(["metrics", "show"], project).stdout.splitlines()
    assert len(printed) == 1 + 9 and max(map(len, printed)) < 200, "\n".join(printed)
    plots = json.loads(dvc(["plots", "show", "--json"], project).stdout)["data"]
    assert {"runs/plots/spec_loss.csv", "runs/plots/generic_loss.csv", "runs/plots/losses.png",
            "data/bases/plots/entropy.csv"} <= set(plots), sorted(plots)

    status = dvc(["status"], project).stdout
    assert "up to date" in status.lower() or status.strip() == "", status
    # Bytecode in the stages' code folders (what importing the package, e.g. a test run, writes) changes no stage.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "dgamix"], cwd=project, check=True)
    assert any((project / "dgamix/core/__pycache__").iterdir())
    status = dvc(["status"], project).stdout
    assert "up to date" in status.lower() or status.strip() == "", status

    # The README as a user meets it: every Python block runs as written on this project's outputs.
    blocks = readme_python_blocks()
    assert len(blocks) >= 5, "README's Python examples were not found"
    for i, code in enumerate(blocks):
        run = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert run.returncode == 0, f"README Python block {i + 1}:\n{code}\n{run.stderr[-3000:]}"


def readme_python_blocks() -> list[str]:
    """The fenced ```python blocks of README.md, in order."""
    blocks, current = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if current is None and line.strip() == "```python":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks
