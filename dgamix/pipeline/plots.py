"""PNG plots for `dvc plots` (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402


def plot_cluster_sizes(sizes_desc: np.ndarray, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(np.arange(len(sizes_desc)), sizes_desc, width=1.0, color="#4472c4")
    ax.set_yscale("symlog")
    ax.set_xlabel("cluster rank")
    ax.set_ylabel("documents")
    ax.set_title(f"Cluster sizes ({len(sizes_desc)} clusters, {(sizes_desc == 0).sum()} empty)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def source_shares(counts: pl.DataFrame, coarse_col: str, max_sources: int = 30) -> tuple[list[str], np.ndarray]:
    """Pure: the largest sources (ties broken by name, so the result does not depend on row order) and, for each,
    the share of its documents in each coarse cluster (rows sum to 1)."""
    totals = counts.group_by("source").agg(pl.col("docs").sum())
    sources = totals.sort(["docs", "source"], descending=[True, False])["source"][:max_sources].to_list()
    n_coarse = int(counts[coarse_col].max()) + 1
    grid = np.zeros((len(sources), n_coarse))
    index = {s: i for i, s in enumerate(sources)}
    for source, coarse, docs in counts.select("source", coarse_col, "docs").iter_rows():
        if source in index:
            grid[index[source], coarse] += docs
    return sources, grid / np.maximum(grid.sum(axis=1, keepdims=True), 1)


def plot_source_heatmap(counts: pl.DataFrame, coarse_col: str, path: Path, max_sources: int = 30) -> None:
    """Share of each source's documents that falls in each coarse cluster (rows sum to 1)."""
    sources, grid = source_shares(counts, coarse_col, max_sources)
    n_coarse = grid.shape[1]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * n_coarse + 3), 0.3 * len(sources) + 1.5))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(sources)), sources, fontsize=7)
    ax.set_xlabel("coarse cluster")
    if n_coarse <= 32:
        ax.set_xticks(range(n_coarse))
    ax.set_title("Where each source's documents land")
    fig.colorbar(image, ax=ax, label="share of source")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bases(names: list[str], matrix: np.ndarray, directory: Path, top: int = 40) -> None:
    """bases.png: every basis as a row over clusters; importance_top.png: the importance basis's top clusters."""
    fig, ax = plt.subplots(figsize=(9, 0.25 * len(names) + 1.8))
    image = ax.imshow(matrix, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xlabel("fine cluster")
    ax.set_title("Basis distributions over clusters")
    fig.colorbar(image, ax=ax, label="probability")
    fig.tight_layout()
    fig.savefig(directory / "bases.png", dpi=110)
    plt.close(fig)
    if "importance" not in names:
        return
    row = matrix[names.index("importance")]
    best = np.argsort(-row, kind="stable")[:top]
    best = best[row[best] > 0]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.bar(range(len(best)), row[best], color="#c0504d")
    ax.set_xticks(range(len(best)), [str(c) for c in best], rotation=90, fontsize=7)
    ax.set_xlabel("fine cluster")
    ax.set_ylabel("probability")
    ax.set_title(f"Importance basis: top {len(best)} clusters ({(row > 0).sum()} with mass)")
    fig.tight_layout()
    fig.savefig(directory / "importance_top.png", dpi=110)
    plt.close(fig)
