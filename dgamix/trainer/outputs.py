"""A run's outputs: metrics.json, summary.json, log.csv, clusters.parquet and alignment.parquet (the trainer's
docstring describes them), written from its history. Pure functions of what the run recorded, plus the writers."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..core.atomic import atomic_path, write_json
from ..formats import token_store
from ..mixer import Mixture
from .config import RunConfig, seeds_for
from .hardware import CompiledForward

if TYPE_CHECKING:
    from .loop import History, RunObjects

METRIC_DECIMALS = 6  # `dvc metrics show` prints what the file holds: six decimals of a loss are plenty
Drawn = list[tuple[int, dict[int, int]]]  # per step: tokens drawn per cluster


def run_metrics(rows: list[dict[str, Any]], names: list[str], weights: np.ndarray) -> dict[str, Any]:
    """Pure: metrics.json. Its scalars are the columns `dvc metrics show` puts in one table with every other
    stage's, so only the losses are scalars here; the lists (hidden by DVC) are read by bench/."""
    evals = [r for r in rows if "spec_loss" in r]
    return {"final_spec_loss": round(evals[-1]["spec_loss"], METRIC_DECIMALS),
            "final_generic_loss": round(evals[-1]["generic_loss"], METRIC_DECIMALS),
            "bases": list(names), "final_weights": weights.tolist()}


def run_summary(config: RunConfig, rows: list[dict[str, Any]], objects: "RunObjects",
                seconds: float, eval_seed: int) -> dict[str, Any]:
    """summary.json: how the run went, for a reader rather than for the metrics table."""
    evals = [r for r in rows if "spec_loss" in r]
    train = config.train
    return {"strategy": config.strategy, "steps": train.steps, "seconds": seconds,
            "best_spec_loss": round(min(r["spec_loss"] for r in evals), METRIC_DECIMALS),
            "parameters": objects.model.num_params(),
            "skipped_updates": sum(1 for r in rows if r.get("skipped")),
            "clusters_repeated": int((objects.mixer.stream.passes_completed() > 0).sum()),
            "seed": train.seed, "seeds": seeds_for(train.seed)._asdict(), "eval_seed": eval_seed,
            "precision": "fp32" if objects.autocast is None else str(objects.autocast).removeprefix("torch."),
            "compiled": isinstance(objects.forward, CompiledForward) and objects.forward.failed is None,
            "threads": torch.get_num_threads() if train.speed.threads is None else train.speed.threads,
            "spec_eval": f"held-out specialized set {train.paths.target_eval} (train.paths.target_eval)",
            "generic_eval": f"held-out generic documents {train.paths.tokens / token_store.HELDOUT} "
                            "(tokenize.holdout_fraction)"}


def write_outputs(out_dir: Path, history: "History", names: list[str], metrics: dict[str, Any],
                  summary: dict[str, Any]) -> None:
    write_log(history.rows, names, out_dir / "log.csv")
    write_drawn(history.drawn, out_dir / "clusters.parquet")
    if history.alignment:
        write_alignment(history.alignment, out_dir / "alignment.parquet")
    write_json(summary, out_dir / "summary.json")
    write_json(metrics, out_dir / "metrics.json")


def tokens_per_basis(mixture: Mixture, weights: np.ndarray, tokens_per_cluster: dict[int, int]) -> list[float]:
    """Pure: a batch's tokens attributed to the bases, each cluster's tokens split in proportion to alpha_j P_j(c)
    (which basis "sent" them, in expectation). Sums to the batch's tokens."""
    clusters = np.fromiter(tokens_per_cluster, dtype=np.int64)
    counts = np.fromiter(tokens_per_cluster.values(), dtype=np.float64)
    share = mixture.bases[:, clusters].toarray() * np.asarray(weights)[:, None]  # (m, clusters in the batch)
    share /= share.sum(axis=0, keepdims=True)
    return np.round(share @ counts, 3).tolist()


def write_drawn(drawn: Drawn, path: Path) -> None:
    steps = [step for step, per_cluster in drawn for _ in per_cluster]
    clusters = [c for _, per_cluster in drawn for c in per_cluster]
    tokens = [t for _, per_cluster in drawn for t in per_cluster.values()]
    with atomic_path(path) as tmp:
        pq.write_table(pa.table({"step": pa.array(steps, pa.int32()), "cluster": pa.array(clusters, pa.int32()),
                                 "tokens": pa.array(tokens, pa.int64())}), tmp)


def write_alignment(records: list[dict[str, Any]], path: Path) -> None:
    """(step, cluster, sequences, mean_alignment) per update window and cluster drawn in it."""
    table = pa.table({"step": pa.array([r["step"] for r in records], pa.int32()),
                      "cluster": pa.array([r["cluster"] for r in records], pa.int32()),
                      "sequences": pa.array([r["sequences"] for r in records], pa.int32()),
                      "mean_alignment": pa.array([r["mean_alignment"] for r in records], pa.float64())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_log(rows: list[dict[str, Any]], names: list[str], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "train_loss", "spec_loss", "generic_loss", "skipped"]
                        + [f"w:{n}" for n in names] + [f"a:{n}" for n in names] + [f"t:{n}" for n in names])
        for r in rows:
            scores = r.get("scores", [""] * len(names))
            writer.writerow([r["step"], r["train_loss"], r.get("spec_loss", ""), r.get("generic_loss", ""),
                             r.get("skipped", "")] + r["weights"] + scores + r["tokens"])
