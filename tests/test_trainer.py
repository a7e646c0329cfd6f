"""The reference trainer on the real fixture pipeline: every strategy runs, logs, evaluates and plots."""
from __future__ import annotations

import json

import polars as pl
import pytest

from pipeline import assign, bases, cluster, tokens
from pipeline.params import ParamError
from trainer.plot import plot_runs
from trainer.train import run

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
    for strategy in ("uniform", "importance", "dga_ema"):
        metrics = run(params, strategy)
        assert metrics["steps"] == 6 and metrics["final_spec_loss"] > 0
        frame = pl.read_csv(workspace / "runs" / strategy / "log.csv", infer_schema_length=None)
        assert frame.height == 6 and frame["spec_loss"].drop_nulls().len() == 2
        assert [c[2:] for c in frame.columns if c.startswith("w:")] == names
        if strategy == "importance":
            assert frame["w:importance"].to_list() == [1.0] * 6
    dga = pl.read_csv(workspace / "runs/dga_ema/log.csv", infer_schema_length=None)
    assert dga["a:importance"].drop_nulls().len() == 2  # alignment scores at steps 3 and 6
    assert dga.row(0)[5:5 + len(names)] != dga.row(5)[5:5 + len(names)]  # DGA moved the weights
    written = plot_runs(workspace / "runs")
    assert all(p.stat().st_size > 0 for p in written) and len(written) == 4
    with pytest.raises(ParamError, match="train.strategy = 'nope'"):
        run(params, "nope")
