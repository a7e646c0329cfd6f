"""The reference trainer on the real fixture pipeline: every strategy runs, logs, evaluates and plots."""
from __future__ import annotations

import json

import polars as pl
import pytest

from dgamix.pipeline import assign, bases, cluster, tokens
from dgamix.core.params import ParamError
from dgamix.trainer.plot import plot_runs
from dgamix.trainer.train import run

from .conftest import ROOT, load_params




def test_every_strategy_trains_and_is_plotted(workspace):
    params = load_params(workspace)
    params["tokenize"]["vocab_size"] = 512
    params["bases"]["target"] = [str(ROOT / "data/sample/target/spec.jsonl.zst")]
    params["bases"]["eval"] = [str(ROOT / "data/sample/target/eval.jsonl.zst")]
    for stage in (cluster, assign, tokens, bases):
        stage.run(params)
    params["train"].update(steps=6, seq_len=16, batch_size=4, n_layer=1, n_embd=32, n_head=2, eval_every=3,
                           eval_batches=1, every=3, dga_batch_size=2)
    names = json.loads((workspace / "data/bases/names.json").read_text())
    for strategy in ("uniform", "importance", "dga_ema", "odm"):
        metrics = run(params, strategy)
        assert metrics["steps"] == 6 and metrics["final_spec_loss"] > 0 and metrics["final_generic_loss"] > 0
        frame = pl.read_csv(workspace / "runs" / strategy / "log.csv", infer_schema_length=None)
        assert frame.height == 6 and frame["spec_loss"].drop_nulls().len() == 2
        if strategy == "odm":  # EXP3 over the coarse clusters (disjoint domains)
            assert [c[2:] for c in frame.columns if c.startswith("w:")] == [n for n in names if n.startswith("coarse:")]
            continue
        assert [c[2:] for c in frame.columns if c.startswith("w:")] == names
        # every step's tokens (4 sequences x 17) attributed to the bases, and the same total per cluster
        per_basis = frame.select([c for c in frame.columns if c.startswith("t:")]).sum_horizontal()
        assert per_basis.round(2).to_list() == [68.0] * 6
        drawn = pl.read_parquet(workspace / "runs" / strategy / "clusters.parquet")
        assert drawn.group_by("step").agg(pl.col("tokens").sum()).sort("step")["tokens"].to_list() == [68] * 6
        if strategy == "importance":
            assert frame["w:importance"].to_list() == [1.0] * 6
    dga = pl.read_csv(workspace / "runs/dga_ema/log.csv", infer_schema_length=None)
    assert dga["a:importance"].drop_nulls().len() == 2  # alignment scores at steps 3 and 6
    assert dga.row(0)[5:5 + len(names)] != dga.row(5)[5:5 + len(names)]  # DGA moved the weights
    odm = pl.read_csv(workspace / "runs/odm/log.csv", infer_schema_length=None)
    assert odm.row(0)[5:7] != odm.row(5)[5:7]  # the bandit moved its policy
    params["train"]["estimator"] = "forward"
    run(params, "dga")
    assert pl.read_csv(workspace / "runs/dga/log.csv", infer_schema_length=None)["a:importance"].drop_nulls().len() == 2
    written = plot_runs(workspace / "runs")
    assert all(p.stat().st_size > 0 for p in written) and len(written) == 6
    with pytest.raises(ParamError, match="train.strategy = 'nope'"):
        run(params, "nope")
