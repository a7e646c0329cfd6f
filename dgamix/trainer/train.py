"""Reference training run: the small GPT on the mixer stream under one strategy, with evaluation and resume.

`dgamix train --strategy NAME` (what dvc.yaml's foreach calls) reads the `train` section of params.yaml
(`config`: nested by part). The trainer is split by concern: `config` (the settings), `hardware` (device,
precision, threads, compile), `loop` (the run's objects, checkpoints and steps; `TrainingRun`), `outputs` (what a
run writes); this module is the entry point. Each random consumer draws from its own seed, derived from `train.seed`
by purpose (`config.seeds_for`).
Strategies: uniform (over the bases), natural, importance (static weight 1 on the importance basis), dga (no EMA),
dga_ema, inbatch (DGA over the bases scored from the training step's own sequences), inbatch_domains (the same over
every fine cluster: domain reweighting), doge (the DoGE baseline: learning-rate-scaled alignment normalized by the
mean gradient norm, clipped, no EMA), and odm (the EXP3 bandit of Online Data Mixing over disjoint domains: the
coarse bases when the bases stage built them, else one domain per cluster). Outputs in runs/NAME/:
- metrics.json: the final and best losses (what `dvc metrics show` tabulates), the bases and the final weights
  (the ones the last step drew with: the strategy does not update after the last step);
- summary.json: how the run went (steps, seconds, parameters, skipped updates, clusters repeated, the seed and each
  purpose's seed derived from it, eval sets);
- log.csv: per step: train loss, evaluation losses when measured, weights `w:`, alignment scores `a:`, tokens
  drawn per basis `t:` (a sequence's tokens split over the bases in proportion to alpha_j P_j(cluster)), skipped
  updates;
- clusters.parquet: (step, cluster, tokens): what was drawn;
- alignment.parquet (in-batch strategies): (step, cluster, sequences, mean_alignment): each update window's mean
  alignment of the sequences drawn from each cluster with the specialized gradient (> 0: they help the target);
- checkpoint.pt while the run is in progress (resumed when present, removed when the run completes): the model,
  the optimizer, the mixer (stream, strategy and target sampler) and the history so far.

Evaluation: the specialized loss on the target's held-out eval set (`train.paths.target_eval`), and the generic loss
on the held-out generic documents (`<train.paths.tokens>/heldout`, tokenize stage), which training never reads.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .config import RunConfig, TrainSettings, read_config
from .loop import TrainingRun, eval_seed
from .outputs import run_metrics, run_summary, write_outputs

__all__ = ["RunConfig", "TrainSettings", "TrainingRun", "read_config", "run"]


def run(params: dict[str, Any], strategy_name: str, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Train one strategy to completion (resuming from OUT/checkpoint.pt when present) and write its outputs into
    `out_dir` (default: `<train.paths.output>/<strategy>`). Returns the run's summary and metrics in one mapping.
    The one entry point for programs that train a whole run (the DVC stage, the experiment harness)."""
    training = TrainingRun(params, strategy_name, out_dir)
    training.out_dir.mkdir(parents=True, exist_ok=True)
    training.resume()
    started = time.perf_counter()
    training.train()
    seconds = time.perf_counter() - started

    objects, history = training.objects, training.history
    metrics = run_metrics(history.rows, objects.mixer.names, objects.mixer.weights)
    summary = run_summary(training.config, history.rows, objects, seconds, eval_seed(training.config))
    write_outputs(training.out_dir, history, objects.mixer.names, metrics, summary)
    training.checkpoint.unlink(missing_ok=True)  # the run is complete; its outputs are the record
    return summary | metrics
