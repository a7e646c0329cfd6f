"""experiments/gpu_suite.py --toy end to end on the embedded sample: every stage, 2 seeds x the frontier
experiments' 10 methods, table, frontier figure and figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import polars as pl
import pytest

from .conftest import ROOT

METHODS = ["uniform", "importance", "blend25", "blend50", "blend75", "doge", "dga_paper", "dga_anchored", "inbatch",
           "inbatch_domains"]


def suite(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "gpu_suite.py"), "--toy", "--corpus",
                           str(ROOT / "data" / "sample"), "--work", str(tmp_path / "work"), "--results",
                           str(tmp_path / "results"), *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_gpu_suite_toy_runs_every_method_and_seed(tmp_path):
    run = suite(tmp_path, "--seeds", "0", "1")  # two seeds: a spread, at two thirds of the suite's time
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Budget estimate: 20 runs x 12 steps" in run.stdout

    out = tmp_path / "results" / "gpu_suite" / "sample"  # the sample's single target is named `sample`
    metrics = sorted(out.glob("default/seed*/*/metrics.json"))
    assert len(metrics) == 2 * len(METHODS)  # one per seed x method, nothing else
    assert {p.parent.name for p in metrics} == set(METHODS)
    assert {p.parent.parent.name for p in metrics} == {"seed0", "seed1"}
    eval_seeds = set()
    for path in metrics:
        summary = json.loads(path.with_name("summary.json").read_text())
        assert summary["steps"] == 12 and summary["precision"] == "fp32"
        eval_seeds.add(summary["eval_seed"])
        log = pl.read_csv(path.with_name("log.csv"), infer_schema_length=None)
        assert log.height == 12 and log["spec_loss"].drop_nulls().len() == 2  # evaluated at steps 6 and 12
    assert eval_seeds == {1000}  # the same evaluation batches for every seed and method

    table = (out / "default" / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(METHODS) and all(f"| {m} | 2 |" in "\n".join(table) for m in METHODS)
    assert "TV of weights from initial" in table[0] and "Δ spec vs importance at step 6" in table[0]  # halfway
    assert "Best DGA variant on the specialized loss" in (out / "default" / "statements.md").read_text()
    assert (out / "default" / "spec_curves.png").exists() and (out / "default" / "generic_loss_curves.png").exists()
    frontier = (out / "default" / "frontier.md").read_text()  # the static frontier, as the development runs show it
    assert (out / "default" / "frontier.png").exists() and "distance to the frontier" in frontier
    assert "exact DGA, anchored" in frontier and "the static frontier by more than the seed spread" in frontier
    figures = json.loads((out / "figures.json").read_text())
    assert figures["stages"]["ingest"]["documents"] == 300 and figures["stages"]["embed"]["docs_per_s"] > 0
    assert figures["stages"]["kmeans"]["levels"] == [4, 4] and figures["stages"]["kmeans"]["seconds"] > 0
    assert list(figures["training"]) == METHODS
    assert all(figures["training"][m]["runs"] == 2 and figures["training"][m]["tokens_per_s"] > 0 for m in METHODS)
    assert figures["training"]["uniform"]["overhead_vs_uniform"] == 0
    assert set(figures["calibration"]) == set(METHODS) and figures["estimate_s"] > 0
    assert "documents/s" in (out / "figures.md").read_text()
    # Every stage wrote in the scratch folder (the checkout's own outputs are the suite-wide guard's, conftest.py).
    assert json.loads((tmp_path / "work" / "generic" / "report.json").read_text())["kept"] == 300

    # Again, asking for far more than the budget: the stages are reused, the estimate stops it before training.
    again = suite(tmp_path, "--seeds", "3", "--steps", "1000000", "--budget-minutes", "1")
    assert again.returncode == 2, again.stdout[-3000:] + again.stderr[-3000:]
    assert "exceeds --budget-minutes 1" in again.stderr and "kmeans: done before" in again.stderr
    assert not list(out.glob("default/seed3/*/metrics.json"))


def test_gpu_suite_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "gpu_suite.py"), "--corpus",
                          str(ROOT / "data/sample"), "--work", str(tmp_path / "work"), "--results",
                          str(tmp_path / "results")],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0 and "no CUDA device" in run.stderr
    assert not (tmp_path / "work").exists()  # refused before any work
