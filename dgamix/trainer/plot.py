"""`dgamix plot RUNS_DIR`: weight trajectories and losses of every run (PNG), like the paper's Figure 3."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402


def plot_runs(runs_dir: str | Path, top_bases: int = 8) -> list[Path]:
    runs_dir = Path(runs_dir)
    logs = sorted(runs_dir.glob("*/log.csv"))
    if not logs:
        raise FileNotFoundError(f"{runs_dir} holds no */log.csv (expected the output folder of `dgamix train`)")
    written = []
    fig, (ax_spec, ax_gen) = plt.subplots(1, 2, figsize=(11, 4))
    for path in logs:
        frame = pl.read_csv(path, infer_schema_length=None)
        evals = frame.filter(pl.col("spec_loss").is_not_null())
        ax_spec.plot(evals["step"], evals["spec_loss"], marker="o", label=path.parent.name)
        ax_gen.plot(evals["step"], evals["generic_loss"], marker="o", label=path.parent.name)
        written.append(plot_weights(frame, path.parent / "weights.png", path.parent.name, top_bases))
    for ax, title in ((ax_spec, "specialized eval loss"), (ax_gen, "generic loss")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(runs_dir / "losses.png", dpi=110)
    plt.close(fig)
    return [runs_dir / "losses.png", *written]


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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
