"""`dgamix plot`: losses and weight trajectories of training runs, like the paper's Figure 3.

As a stage (`run`), it plots the runs of `train.strategies` in `train.paths.output`. Writes, from each
runs/NAME/log.csv:
- runs/plots/spec_loss.csv and runs/plots/generic_loss.csv: the evaluation losses, one row per evaluated step and
  one column per strategy. DVC's plot templates draw one line per y column of a file, so each of these is one
  `dvc plots show` chart with a line per strategy (a long table with a `strategy` column would be drawn as one line);
- runs/plots/losses.png: both losses per strategy (the same data, as an image);
- runs/plots/weights_NAME.png: the weights of the largest bases over training (basis names differ between projects,
  so a fixed DVC plot definition could not name their columns; the image shows them, and log.csv holds every `w:`
  column);
- runs/plots/alignment_NAME.png, for in-batch runs (runs/NAME/alignment.parquet): the clusters whose sequences were
  most and least aligned with the specialized gradient over the run.
Everything goes to the one folder runs/plots, so the DVC stage's output does not name the strategies.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402

from ..core.atomic import atomic_path  # noqa: E402
from ..core.config import load  # noqa: E402
from .config import TrainSettings  # noqa: E402

LOSSES = {"spec_loss": "specialized eval loss", "generic_loss": "generic loss"}


def run(params: dict[str, Any]) -> dict[str, Any]:
    """The plot stage: the runs dvc.yaml trains (`train.strategies`, in `train.paths.output`)."""
    train = load(TrainSettings, params.get("train"), "train")
    return {"written": [str(p) for p in plot_runs(train.paths.output, train.strategies)]}


def plot_runs(runs_dir: str | Path, strategies: list[str] | None = None, top_bases: int = 8) -> list[Path]:
    """Plot the runs in `runs_dir` (the given strategies, in that order, or every runs_dir/*/log.csv).
    Returns the files written."""
    runs_dir = Path(runs_dir)
    logs = {name: pl.read_csv(path, infer_schema_length=None) for name, path in find_logs(runs_dir, strategies)}
    evals = eval_losses(logs)
    written = [write_wide(evals, loss, runs_dir / "plots" / f"{loss}.csv") for loss in LOSSES]
    written.append(plot_losses(evals, runs_dir / "plots" / "losses.png"))
    written += [plot_weights(frame, runs_dir / "plots" / f"weights_{name}.png", name, top_bases)
                for name, frame in logs.items()]
    written += [plot_alignment(pl.read_parquet(runs_dir / name / "alignment.parquet"),
                               runs_dir / "plots" / f"alignment_{name}.png", name)
                for name in logs if (runs_dir / name / "alignment.parquet").exists()]
    return written


def cluster_alignment(records: pl.DataFrame) -> pl.DataFrame:
    """Pure: per cluster, over the whole run, the sequence-weighted mean alignment and the sequences seen."""
    return (records.group_by("cluster")
            .agg((pl.col("mean_alignment") * pl.col("sequences")).sum().alias("weighted"),
                 pl.col("sequences").sum())
            .with_columns((pl.col("weighted") / pl.col("sequences")).alias("mean_alignment"))
            .select("cluster", "mean_alignment", "sequences").sort("mean_alignment", "cluster", descending=[True, False]))


def plot_alignment(records: pl.DataFrame, path: Path, title: str, top: int = 15) -> Path:
    """The `top` clusters that helped the target most (largest mean alignment) and the `top` that hurt it most."""
    per_cluster = cluster_alignment(records)
    shown = pl.concat([per_cluster.head(top), per_cluster.tail(top)]).unique("cluster", keep="first").sort(
        "mean_alignment", descending=True)
    fig, ax = plt.subplots(figsize=(8, 0.22 * shown.height + 1.5))
    values = shown["mean_alignment"].to_numpy()
    ax.barh(range(shown.height), values, color=["#4472c4" if v > 0 else "#c0504d" for v in values])
    ax.set_yticks(range(shown.height), [f"{c} ({n} seq)" for c, n in zip(shown["cluster"], shown["sequences"])],
                  fontsize=6)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_xlabel("mean alignment <grad l(x), g_spe> of the cluster's sequences")
    ax.set_title(f"{title}: clusters that help (blue) and hurt (red) the target")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def find_logs(runs_dir: Path, strategies: list[str] | None) -> list[tuple[str, Path]]:
    if strategies is None:
        found = [(path.parent.name, path) for path in sorted(runs_dir.glob("*/log.csv"))]
        if not found:
            raise FileNotFoundError(f"{runs_dir} holds no */log.csv (expected the output folder of `dgamix train`)")
        return found
    missing = [s for s in strategies if not (runs_dir / s / "log.csv").exists()]
    if missing or not strategies:
        raise FileNotFoundError(f"no log.csv for the strategies {missing or strategies} in {runs_dir} "
                                "(run `dgamix train --strategy NAME` for each, or `dvc repro`)")
    return [(s, runs_dir / s / "log.csv") for s in strategies]


def eval_losses(logs: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Pure: the evaluated steps of every run, long: step, strategy, spec_loss, generic_loss."""
    return pl.concat([frame.filter(pl.col("spec_loss").is_not_null())
                      .select(pl.col("step"), pl.lit(name).alias("strategy"),
                              pl.col("spec_loss").cast(pl.Float64), pl.col("generic_loss").cast(pl.Float64))
                      for name, frame in logs.items()])


def wide(evals: pl.DataFrame, loss: str) -> pl.DataFrame:
    """Pure: one loss, one column per strategy (in the runs' order), one row per step that any run evaluated."""
    strategies = list(dict.fromkeys(evals["strategy"]))
    return evals.pivot(on="strategy", index="step", values=loss).select("step", *strategies).sort("step")


def write_wide(evals: pl.DataFrame, loss: str, path: Path) -> Path:
    with atomic_path(path) as tmp:
        wide(evals, loss).write_csv(tmp)
    return path


def plot_losses(evals: pl.DataFrame, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(LOSSES), figsize=(11, 4))
    for ax, (loss, title) in zip(axes, LOSSES.items()):
        for (name,), run in evals.group_by("strategy", maintain_order=True):
            ax.plot(run["step"], run[loss], marker="o", label=name)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)
    return path


def plot_weights(frame: pl.DataFrame, path: Path, title: str, top: int) -> Path:
    columns = [c for c in frame.columns if c.startswith("w:")]
    final = frame.select(columns).row(-1)
    keep = [c for _, c in sorted(zip(final, columns), reverse=True)[:top]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for column in keep:
        ax.plot(frame["step"], frame[column], label=column[2:])
    ax.set_xlabel("step")
    ax.set_ylabel("weight")
    ax.set_title(f"{title}: weights of the {len(keep)} largest bases")
    ax.legend(fontsize=6)
    fig.tight_layout()
    save(fig, path)
    return path


def save(fig: plt.Figure, path: Path) -> None:
    # Written then renamed, like every stage output: a killed `dvc repro` leaves no half-written image.
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
