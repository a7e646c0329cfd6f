"""End to end: the real `dvc repro` of this project's dvc.yaml on a small cut of the embedded sample."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import yaml

from .conftest import ROOT, write_jsonl_zst


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
    params["train"].update(steps=4, seq_len=16, batch_size=4, n_layer=1, n_embd=32, n_head=2, eval_every=2,
                           eval_batches=1, every=2, dga_batch_size=2)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    dvc(["init", "--no-scm", "-q"], project)

    start = time.time()
    dvc(["repro"], project)
    elapsed = time.time() - start
    assert elapsed < 120, f"dvc repro on the fixture took {elapsed:.0f}s"

    metrics = json.loads(dvc(["metrics", "show", "--json"], project).stdout)
    flat = {k: v for entry in metrics.values() for d in entry["data"].values() for k, v in d["data"].items()}
    assert flat["read"] == flat["kept"] + flat["rejected"] + flat["duplicates"] == 240
    assert flat["documents"] == flat["kept"]
    assert 0 < flat["nmi_fine"] <= 1
    table = pl.read_parquet(project / "data/stats/clusters.parquet")
    assert table["docs"].sum() == flat["kept"] and table.height == 16
    assert flat["target_documents"] == 176 and flat["importance_clusters_covered"] >= 1
    for strategy in params["train"]["strategies"]:
        assert json.loads((project / "runs" / strategy / "metrics.json").read_text())["steps"] == 4
    store = json.loads((project / "data/tokens/store.json").read_text())
    assert store["documents"] + store["heldout_documents"] == flat["kept"] and store["dtype"] == "uint16"

    status = dvc(["status"], project).stdout
    assert "up to date" in status.lower() or status.strip() == "", status
