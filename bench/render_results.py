"""Render RESULTS.md's tables and plots from the experiments' metrics files: no number is typed by hand.

    .venv/bin/python bench/render_results.py

Reads results/<experiment>/<target>/<variant>/seed<k>/<method>/{metrics.json,log.csv} (bench/experiments.py),
writes results/<experiment>/<target>/<variant>/table.md (mean ± std over seeds, per method), the plots of seed 0
(`dgamix plot`: losses.png and each method's weights.png) and the mean specialized-loss curves over seeds
(spec_curves.png), then fills the marked blocks of RESULTS.md (`<!-- table:EXPERIMENT/TARGET/VARIANT -->` ...
`<!-- end -->`) with those tables.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl

from common import ROOT

from dgamix.trainer.plot import plot_runs

RESULTS = ROOT / "results"
REPORT = ROOT / "RESULTS.md"


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def collect(variant_dir: Path) -> dict[str, list[dict]]:
    by_method: dict[str, list[dict]] = {}
    for path in sorted(variant_dir.glob("seed*/*/metrics.json")):
        metrics = json.loads(path.read_text())
        summary = path.with_name("summary.json")  # seconds, steps, ... (runs recorded before it hold them inline)
        metrics = (json.loads(summary.read_text()) if summary.exists() else {}) | metrics
        metrics["seed"] = path.parent.parent.name
        by_method.setdefault(path.parent.name, []).append(metrics)
    return by_method


def paired(runs: list[dict], baseline: list[dict], key: str) -> str:
    """Mean ± std over seeds of (method - baseline) within each seed. The seed also draws the evaluation batches,
    so within-seed differences remove that source of variance."""
    base = {m["seed"]: m[key] for m in baseline}
    diffs = [m[key] - base[m["seed"]] for m in runs if m["seed"] in base]
    if not diffs or runs is baseline:
        return "–"
    return f"{np.mean(diffs):+.3f}" + (f" ± {np.std(diffs, ddof=1):.3f}" if len(diffs) > 1 else "")


def table(by_method: dict[str, list[dict]]) -> str:
    baseline = "uniform" if "uniform" in by_method else next(iter(by_method))
    lines = [f"| method | seeds | final specialized loss | Δ spec vs {baseline} (paired) | best specialized loss | "
             f"final generic loss (held out) | Δ generic vs {baseline} (paired) | seconds per run |",
             "|---|---|---|---|---|---|---|---|"]
    best = min(np.mean([m["final_spec_loss"] for m in runs]) for runs in by_method.values())
    for method, runs in by_method.items():
        spec = mean_std([m["final_spec_loss"] for m in runs])
        if np.isclose(np.mean([m["final_spec_loss"] for m in runs]), best):
            spec = f"**{spec}**"
        lines.append(f"| {method} | {len(runs)} | {spec} | {paired(runs, by_method[baseline], 'final_spec_loss')} | "
                     f"{mean_std([m['best_spec_loss'] for m in runs])} | "
                     f"{mean_std([m['final_generic_loss'] for m in runs])} | "
                     f"{paired(runs, by_method[baseline], 'final_generic_loss')} | "
                     f"{np.mean([m['seconds'] for m in runs]):.0f} |")
    return "\n".join(lines)


# Experiments whose variants are compared, seed by seed, with another experiment's runs (same data, same seeds).
PAIRED_WITH = {"distribution_eta": "distribution", "ablation": "token_limited"}


def variants_table(target_dir: Path) -> str:
    """One row per (variant, method) across the variants of an experiment (the ablations), with paired
    differences against the reference experiment's uniform and importance runs when there is one."""
    reference_dir = RESULTS / PAIRED_WITH.get(target_dir.parent.name, "") / target_dir.name / "default"
    reference = collect(reference_dir) if reference_dir.is_dir() else {}
    refs = [r for r in ("uniform", "importance") if r in reference]
    lines = ["| variant | method | seeds | final specialized loss | best specialized loss | final generic loss | "
             + "".join(f"Δ spec vs {r} | Δ generic vs {r} | " for r in refs) + "seconds per run |",
             "|---|---|---|---|---|---|" + "---|---|" * len(refs) + "---|"]
    for variant_dir in sorted(p for p in target_dir.iterdir() if p.is_dir()):
        for method, runs in collect(variant_dir).items():
            deltas = "".join(f"{paired(runs, reference[r], 'final_spec_loss')} | "
                             f"{paired(runs, reference[r], 'final_generic_loss')} | " for r in refs)
            lines.append(f"| {variant_dir.name} | {method} | {len(runs)} | "
                         f"{mean_std([m['final_spec_loss'] for m in runs])} | "
                         f"{mean_std([m['best_spec_loss'] for m in runs])} | "
                         f"{mean_std([m['final_generic_loss'] for m in runs])} | {deltas}"
                         f"{np.mean([m['seconds'] for m in runs]):.0f} |")
    if refs:
        lines.append(f"\nΔ: paired differences, seed by seed, against `{reference_dir.relative_to(RESULTS)}`.")
    return "\n".join(lines)


def clusters_of(variant: str) -> int:
    """Number of fine clusters of a granularity variant named by its levels, e.g. '16x16' -> 256."""
    return int(np.prod([int(k) for k in variant.split("x")]))


def granularity_table(target_dir: Path) -> str:
    """Fig. 4a as a table: one row per clustering, each method's losses, and DGA's paired differences."""
    variants = sorted((p for p in target_dir.iterdir() if p.is_dir()), key=lambda p: clusters_of(p.name))
    rows = {v.name: collect(v) for v in variants}
    methods = [m for m in ("uniform", "importance", "dga_ema") if any(m in r for r in rows.values())]
    lines = ["| fine clusters | " + "".join(f"{m} spec | " for m in methods)
             + "Δ spec dga_ema − importance | Δ spec dga_ema − uniform | "
             + "".join(f"{m} generic | " for m in methods) + "Δ generic dga_ema − importance | seeds |",
             "|---|" + "---|" * (2 * len(methods) + 4)]
    for variant, runs in rows.items():
        spec = "".join(f"{mean_std([r['final_spec_loss'] for r in runs[m]]) if m in runs else '–'} | "
                       for m in methods)
        generic = "".join(f"{mean_std([r['final_generic_loss'] for r in runs[m]]) if m in runs else '–'} | "
                          for m in methods)
        dga = runs.get("dga_ema", [])
        spec_vs_is, spec_vs_uniform, generic_vs_is = (
            paired(dga, runs[ref], key) if dga and ref in runs else "–"
            for ref, key in (("importance", "final_spec_loss"), ("uniform", "final_spec_loss"),
                             ("importance", "final_generic_loss")))
        seeds = min((len(r) for r in runs.values()), default=0)
        lines.append(f"| {clusters_of(variant)} ({variant}) | {spec}{spec_vs_is} | {spec_vs_uniform} | {generic}"
                     f"{generic_vs_is} | {seeds} |")
    return "\n".join(lines)


def granularity_plot(target_dir: Path) -> Path:
    """Final specialized and generic loss against the number of fine clusters, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted((p for p in target_dir.iterdir() if p.is_dir()), key=lambda p: clusters_of(p.name))
    runs = [(clusters_of(v.name), collect(v)) for v in variants]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in ("uniform", "importance", "dga_ema"):
        for ax, key in zip(axes, ("final_spec_loss", "final_generic_loss")):
            points = [(k, [r[key] for r in by_method.get(method, [])]) for k, by_method in runs]
            points = [(k, vals) for k, vals in points if vals]
            if points:
                ax.errorbar([k for k, _ in points], [np.mean(v) for _, v in points],
                            yerr=[np.std(v, ddof=1) if len(v) > 1 else 0.0 for _, v in points],
                            marker="o", capsize=3, label=method)
    for ax, title in zip(axes, ("specialized eval loss", "held-out generic loss")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fine clusters")
        ax.set_ylabel(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"{target_dir.relative_to(RESULTS)}: final losses by granularity (mean ± std over seeds)")
    fig.tight_layout()
    path = target_dir / "granularity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def spec_curves(variant_dir: Path, methods: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in methods:
        curves = []
        for log in sorted(variant_dir.glob(f"seed*/{method}/log.csv")):
            frame = pl.read_csv(log, infer_schema_length=None).filter(pl.col("spec_loss").is_not_null())
            curves.append(frame["spec_loss"].to_numpy())
            steps = frame["step"].to_numpy() + 1
        curves = np.array(curves)
        ax.plot(steps, curves.mean(axis=0), marker="o", label=f"{method} ({len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(steps, curves.min(axis=0), curves.max(axis=0), alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("specialized eval loss")
    ax.set_title(f"{variant_dir.relative_to(RESULTS)}: mean over seeds (band: min-max)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = variant_dir / "spec_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    tables: dict[str, str] = {}
    for variant_dir in sorted({p.parent.parent.parent for p in RESULTS.glob("*/*/*/seed*/*/metrics.json")}):
        key = str(variant_dir.relative_to(RESULTS))
        by_method = collect(variant_dir)
        tables[key] = table(by_method)
        (variant_dir / "table.md").write_text(tables[key] + "\n")
        spec_curves(variant_dir, list(by_method))
        seed0 = variant_dir / "seed0"
        if seed0.exists():
            plot_runs(seed0)
        print(key)
        print(tables[key])
    for target_dir in sorted({p.parent.parent for p in RESULTS.glob("*/*/*/seed*")}):
        # Several variants, or one variant to be paired with its reference experiment's runs.
        if len([p for p in target_dir.iterdir() if p.is_dir()]) > 1 or target_dir.parent.name in PAIRED_WITH:
            key = str(target_dir.relative_to(RESULTS))
            if target_dir.parent.name == "granularity":
                tables[key] = granularity_table(target_dir)
                granularity_plot(target_dir)
            else:
                tables[key] = variants_table(target_dir)
            (target_dir / "table.md").write_text(tables[key] + "\n")
            print(key)
            print(tables[key])
    reproduced = sorted(RESULTS.glob("*/reproduced.json"))
    if reproduced:
        rows = ["| run | recorded spec | re-run spec | recorded generic | re-run generic | identical (losses and weights) |",
                "|---|---|---|---|---|---|"]
        for path in reproduced:
            r = json.loads(path.read_text())
            rows.append(f"| {r['run']} | {r['recorded_final_spec_loss']!r} | {r['rerun_final_spec_loss']!r} | "
                        f"{r['recorded_final_generic_loss']!r} | {r['rerun_final_generic_loss']!r} | "
                        f"{'yes' if r['identical'] else 'NO'} |")
        tables["reproduced"] = "\n".join(rows)
    if REPORT.exists():
        text = REPORT.read_text()
        for key, rendered in tables.items():
            text = re.sub(rf"(<!-- table:{re.escape(key)} -->\n).*?(<!-- end -->)",
                          lambda m: m.group(1) + rendered + "\n" + m.group(2), text, flags=re.S)
        REPORT.write_text(text)


if __name__ == "__main__":
    main()
