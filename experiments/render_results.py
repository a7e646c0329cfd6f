"""Render RESULTS.md's tables and plots from the experiments' metrics files: no number is typed by hand.

    .venv/bin/python experiments/render_results.py
    .venv/bin/python experiments/render_results.py --only inbatch   # just results/inbatch/RESULTS_section.md
    .venv/bin/python experiments/render_results.py --only long      # just the long runs' section (results/long)
    .venv/bin/python experiments/render_results.py --only anchored_pilot   # the pilot of the anchored rule's defaults
    .venv/bin/python experiments/render_results.py --only frontier  # the static frontier (render_frontier.py)

Reads results/<experiment>/<target>/<variant>/seed<k>/<method>/{metrics.json,log.csv} (experiments.py),
writes results/<experiment>/<target>/<variant>/table.md (mean ± std over seeds, per method), the plots of seed 0
(`dgamix plot`: losses.png and each method's weights.png) and the mean specialized-loss curves over seeds
(spec_curves.png), then fills the marked blocks of RESULTS.md (`<!-- table:EXPERIMENT/TARGET/VARIANT -->` ...
`<!-- end -->`) with those tables. The in-batch DGA experiment (`inbatch`) gets its own section, per target, with
paired differences against importance sampling and uniform, how far the weights moved, and whether the bar is
met; it is written to results/inbatch/RESULTS_section.md (and into RESULTS.md between
`<!-- section:inbatch -->` and `<!-- end -->` when RESULTS.md has those markers). The long runs (results/long/
<experiment>/<target>/default, experiments.py's long_*) get a section of their own the same way
(`<!-- section:long -->`): per experiment and target, the losses at the end and at step 300, how far the
specialized loss rose from its best, how far the weights moved, and plain statements generated from those numbers.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # bench/common.py, shared with benchmarks

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from common import ROOT  # noqa: E402

from dgamix.trainer.plot import plot_runs  # noqa: E402
from render_frontier import write_frontier_section  # noqa: E402

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
        summary = path.with_name("summary.json")  # seconds, steps, ... (some runs keep them inline)
        metrics = (json.loads(summary.read_text()) if summary.exists() else {}) | metrics
        metrics["seed"] = path.parent.parent.name
        by_method.setdefault(path.parent.name, []).append(metrics)
    return by_method


def paired(runs: list[dict], baseline: list[dict], key: str) -> str:
    """Mean ± std over seeds of (method - baseline) within each seed. The seed also draws the evaluation batches,
    so within-seed differences remove that source of variance."""
    return "–" if runs is baseline else fmt_diffs(paired_diffs(runs, baseline, key))


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


def shown(path: Path) -> str:
    """A results folder as plots name it: relative to results/, or its last three parts when it lies elsewhere
    (gpu_suite.py --results DIR)."""
    return str(path.relative_to(RESULTS)) if path.is_relative_to(RESULTS) else "/".join(path.parts[-3:])


def spec_curves(variant_dir: Path, methods: list[str]) -> Path:
    """The mean specialized-loss curves over seeds (spec_curves.png)."""
    return loss_curves(variant_dir, methods, "spec_loss", "spec_curves.png")


def loss_curves(variant_dir: Path, methods: list[str], column: str, name: str | None = None) -> Path:
    """One evaluation column of log.csv (spec_loss or generic_loss), mean over seeds per method, band min-max;
    written to variant_dir/`name` (default <column>_curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in methods:
        curves = []
        for log in sorted(variant_dir.glob(f"seed*/{method}/log.csv")):
            frame = pl.read_csv(log, infer_schema_length=None).filter(pl.col(column).is_not_null())
            curves.append(frame[column].to_numpy())
            steps = frame["step"].to_numpy() + 1
        curves = np.array(curves)
        ax.plot(steps, curves.mean(axis=0), marker="o", label=f"{method} ({len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(steps, curves.min(axis=0), curves.max(axis=0), alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel({"spec_loss": "specialized eval loss", "generic_loss": "generic eval loss (held out)"}.get(column,
                                                                                                        column))
    ax.set_title(f"{shown(variant_dir)}: mean over seeds (band: min-max)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = variant_dir / (name or f"{column}_curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the in-batch DGA experiment ----------------------------------------------------------------------------------
INBATCH_METHODS = ["uniform", "importance", "inbatch", "inbatch_domains", "dga_ema"]
STATIC = ("uniform", "natural", "importance", "blend")  # strategies whose weights never move
BAR_SPEC, BAR_GENERIC = 0.1, 0.1  # within 0.1 of importance (or better) on spec; no worse than uniform + 0.1 generic


def weight_moves(run: dict) -> tuple[float, float | None]:
    """(TV distance of the final weights from the initial ones, the importance basis's final weight or None when
    the method's weights are not over the bases). Adaptive strategies start from uniform weights over their bases
    (Mixture.from_bases_dir / Mixture.identity); static ones never move."""
    final = np.asarray(run["final_weights"], dtype=float)
    tv = 0.0 if run.get("strategy") in STATIC else 0.5 * float(np.abs(final - 1.0 / len(final)).sum())
    names = run.get("bases", [])
    return tv, (float(final[names.index("importance")]) if "importance" in names else None)


def inbatch_target(by_method: dict[str, list[dict]]) -> tuple[str, dict[str, dict[str, float]]]:
    """One target's table, and per method the mean paired differences the bar reads."""
    lines = ["| method | seeds | final specialized loss | Δ spec vs importance | Δ spec vs uniform | "
             "final generic loss | Δ generic vs importance | Δ generic vs uniform | TV of weights from initial | "
             "importance basis final weight | seconds per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    deltas: dict[str, dict[str, float]] = {}
    for method in [m for m in INBATCH_METHODS if m in by_method] + [m for m in by_method if m not in INBATCH_METHODS]:
        runs = by_method[method]
        cells = []
        for ref in ("importance", "uniform"):
            for key in ("final_spec_loss", "final_generic_loss"):
                cells.append(paired(runs, by_method[ref], key) if ref in by_method and ref != method else "–")
        moves = [weight_moves(r) for r in runs]
        tv = mean_std([m[0] for m in moves])
        imp = mean_std([m[1] for m in moves]) if moves[0][1] is not None else "– (no importance basis)"
        lines.append(f"| {method} | {len(runs)} | {mean_std([r['final_spec_loss'] for r in runs])} | {cells[0]} | "
                     f"{cells[2]} | {mean_std([r['final_generic_loss'] for r in runs])} | {cells[1]} | {cells[3]} | "
                     f"{tv} | {imp} | {np.mean([r['seconds'] for r in runs]):.0f} |")
        for ref in ("importance", "uniform"):
            if ref in by_method:
                base = {r["seed"]: r for r in by_method[ref]}
                for key, short in (("final_spec_loss", "spec"), ("final_generic_loss", "generic")):
                    diffs = [r[key] - base[r["seed"]][key] for r in runs if r["seed"] in base]
                    if diffs:
                        deltas.setdefault(method, {})[f"{short}_vs_{ref}"] = float(np.mean(diffs))
    return "\n".join(lines), deltas


def inbatch_section(experiment_dir: Path) -> str:
    """The `inbatch` experiment's section: a table per target, then the bar, judged from the paired means."""
    targets = sorted(p for p in experiment_dir.iterdir() if (p / "default").is_dir())
    parts = ["In-batch DGA against importance sampling, uniform and exact DGA (`dga_ema`, eta 10, every 20 steps) "
             f"on the development corpus (16x16 clusters, all the data, {train_steps(experiment_dir)} steps). "
             "Mean ± std over seeds; Δ are paired differences within each seed (method − reference; negative "
             "is a lower loss). TV: total-variation distance of the final mixture weights from the initial (uniform) "
             "weights over the method's bases (0 for static methods); the importance basis's final weight for the "
             "methods over the bases (inbatch_domains reweights the 256 fine clusters directly)."]
    bar: dict[str, dict[str, tuple[bool, float, float]]] = {}
    for tdir in targets:
        text, deltas = inbatch_target(collect(tdir / "default"))
        parts.append(f"\n#### {tdir.name}\n\n{text}")
        for method in [m for m in deltas if m.startswith("inbatch")]:
            d = deltas.get(method, {})
            if "spec_vs_importance" in d and "generic_vs_uniform" in d:
                bar.setdefault(method, {})[tdir.name] = (d["spec_vs_importance"] <= BAR_SPEC
                                                         and d["generic_vs_uniform"] <= BAR_GENERIC,
                                                         d["spec_vs_importance"], d["generic_vs_uniform"])
    lines = [f"\n#### The bar: specialized loss within {BAR_SPEC} of importance sampling or better on at least 2 of "
             f"the 3 targets, with a generic loss no worse than uniform + {BAR_GENERIC}\n",
             "| method | " + " | ".join(t.name for t in targets) + " | met |", "|---|" + "---|" * (len(targets) + 1)]
    for method in ("inbatch", "inbatch_domains") + tuple(m for m in bar if m not in ("inbatch", "inbatch_domains")):
        per = bar.get(method, {})
        cells = [(f"{'yes' if per[t.name][0] else 'no'} (Δ spec vs IS {per[t.name][1]:+.3f}, Δ generic vs uniform "
                  f"{per[t.name][2]:+.3f})") if t.name in per else "not run" for t in targets]
        passed = sum(1 for v in per.values() if v[0])
        met = (f"**yes** ({passed} of {len(targets)})" if passed >= 2
               else f"**no** ({passed} of {len(targets)})" if passed + (len(targets) - len(per)) < 2
               else f"undecided ({passed} of the {len(per)} targets run pass)")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {met} |")
    lines.append("\nA target passes when the mean paired Δ spec vs importance is ≤ "
                 f"{BAR_SPEC} and the mean paired Δ generic vs uniform is ≤ {BAR_GENERIC}.")
    return "\n".join(parts + lines)


# The pilot's runs that the main experiment's runs contain: with a constant learning rate and the same seed, a
# 300-step run is the 150-step run up to step 150 (same draws, same evaluation batches), so its step-150
# evaluation and weights are the 150-step run's final ones (checked where both exist: `from` column).
PILOT_FROM_MAIN = {"uniform": "uniform", "inbatch_snr": "inbatch"}


def run_at_step(run_dir: Path, steps: int) -> dict | None:
    """A run's evaluation and weights after `steps` steps, from its log.csv (None when it was not evaluated then)."""
    log = run_dir / "log.csv"
    if not log.exists():
        return None
    frame = pl.read_csv(log, infer_schema_length=None).filter(pl.col("step") == steps - 1)
    if frame.is_empty() or frame["spec_loss"][0] is None:
        return None
    names = [c[2:] for c in frame.columns if c.startswith("w:")]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"final_spec_loss": frame["spec_loss"][0], "final_generic_loss": frame["generic_loss"][0],
            "final_weights": [frame[f"w:{n}"][0] for n in names], "bases": names, "steps": steps,
            "strategy": summary["strategy"], "seed": run_dir.parent.name}


def pilot_table(pilot_dir: Path) -> str:
    """The scale pilot (experiment inbatch_pilot): per target, seed 0, each run's final losses and weight moves."""
    lines = ["| target | method | steps | from | final specialized loss | Δ spec vs uniform | final generic loss | "
             "Δ generic vs uniform | TV of weights from uniform | importance basis final weight |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    verdicts: list[tuple[str, str, float, dict[str, bool]]] = []
    for tdir in sorted(p for p in pilot_dir.iterdir() if (p / "default").is_dir()):
        by_method = {m: [r | {"from": "pilot run"} for r in runs] for m, runs in collect(tdir / "default").items()}
        if not by_method:
            continue
        steps = next(r["steps"] for runs in by_method.values() for r in runs)
        for method, main_method in PILOT_FROM_MAIN.items():
            main_run = pilot_dir.parent / tdir.name / "default" / "seed0" / main_method
            row = run_at_step(main_run, steps)
            if row is not None:
                total = json.loads((main_run / "summary.json").read_text())["steps"]
                row["from"] = f"step {steps} of the {total}-step run"
                by_method.setdefault(method, []).append(row)
        final = {m: runs[0] for m, runs in by_method.items()}  # the pilot run, else the main run's step
        if {"uniform", "inbatch_snr", "inbatch_standardized"} <= set(final):
            spec = {m: final[m]["final_spec_loss"] for m in ("inbatch_snr", "inbatch_standardized")}
            ok = {m: final[m]["final_generic_loss"] <= final["uniform"]["final_generic_loss"] + BAR_GENERIC
                  for m in spec}
            verdicts.append((tdir.name, min(spec, key=spec.get), spec["inbatch_snr"] - spec["inbatch_standardized"],
                             ok))
        order = ["uniform", "inbatch_snr", "inbatch_standardized"]
        for method in sorted(by_method, key=lambda m: order.index(m) if m in order else len(order)):
            runs = by_method[method]
            for r in runs:
                base = next((u for u in by_method.get("uniform", []) if u["seed"] == r["seed"]), None)
                tv, imp = weight_moves(r)
                d_spec, d_gen = (("–", "–") if base is None or method == "uniform" else
                                 (f"{r['final_spec_loss'] - base['final_spec_loss']:+.3f}",
                                  f"{r['final_generic_loss'] - base['final_generic_loss']:+.3f}"))
                lines.append(f"| {tdir.name} | {method} | {r.get('steps', '?')} | {r['from']} | "
                             f"{r['final_spec_loss']:.4f} | {d_spec} | {r['final_generic_loss']:.4f} | {d_gen} | "
                             f"{tv:.3f} | "
                             f"{'–' if imp is None else f'{imp:.3f}'} |")
    if verdicts:
        lines.append("")
        for target, better, diff, ok in verdicts:
            lines.append(f"- {target}: lower specialized loss with {better.removeprefix('inbatch_')} (snr − "
                         f"standardized {diff:+.3f}); generic loss within uniform + {BAR_GENERIC}: "
                         + ", ".join(f"{m.removeprefix('inbatch_')} {'yes' if v else 'no'}" for m, v in ok.items()))
    return "\n".join(lines)


def train_steps(experiment_dir: Path) -> str:
    steps = {json.loads(p.read_text()).get("steps") for p in experiment_dir.glob("*/default/seed*/*/summary.json")}
    return "/".join(str(s) for s in sorted(x for x in steps if x)) or "?"


def write_inbatch_section() -> str | None:
    experiment_dir = RESULTS / "inbatch"
    if not any(experiment_dir.glob("**/metrics.json")):
        return None
    section = inbatch_section(experiment_dir)
    if (experiment_dir / "pilot").is_dir():
        pilot = pilot_table(experiment_dir / "pilot")
        (experiment_dir / "pilot" / "table.md").write_text(pilot + "\n")
        section += ("\n\n#### Pilot: train.inbatch_scale (150 steps, seed 0, inbatch_eta 0.02)\n\n" + pilot)
    (experiment_dir / "RESULTS_section.md").write_text(section + "\n")
    print(section)
    return section


# ---- the long runs ------------------------------------------------------------------------------------------------
LONG_METHODS = ("uniform", "importance", "doge", "dga_ema", "inbatch")
# the methods whose weights move (dga_paper, dga_anchored: the frontier experiments' exact DGA on each rule)
ONLINE = ("doge", "dga_ema", "dga_paper", "dga_anchored", "inbatch", "inbatch_domains", "dga", "odm")
DGA_VARIANTS = ("dga", "dga_ema", "dga_paper", "dga_anchored", "inbatch", "inbatch_domains")  # the best of these
EARLY_STEP = 300  # the 300-step experiments' length: the comparison at this step is read from the long runs' logs
LAST_EVALS = 3  # the end of a run: the mean of its last evaluations (one evaluation swings by ~0.1)
RISE = 0.1  # the end this far above the run's best evaluation counts as a rise of the specialized loss
TRAIN_TAIL = 100  # the training loss at the end: the mean of the last steps' (one batch each, noisy)
SAME = 5e-7  # paired differences smaller than this are ties (the metrics files keep 6 decimals)


def with_curve(run: dict, run_dir: Path, early: int = EARLY_STEP) -> dict:
    """A run's metrics plus what its log.csv says: the losses at step `early` (None when not evaluated then), the
    best specialized evaluation and its step, the rise (the mean of the last LAST_EVALS evaluations minus the best
    evaluation before them: positive when the specialized loss went back up, negative while it still falls; None
    when the run has too few evaluations) and the training loss over the last TRAIN_TAIL steps (or all of them in a
    shorter run)."""
    log = pl.read_csv(run_dir / "log.csv", infer_schema_length=None)
    frame = log.filter(pl.col("spec_loss").is_not_null())
    at = frame.filter(pl.col("step") == early - 1)
    best = frame.sort("spec_loss").head(1)
    return run | {"early_spec": at["spec_loss"][0] if len(at) else None,
                  "early_generic": at["generic_loss"][0] if len(at) else None,
                  "best_spec": float(best["spec_loss"][0]), "best_step": int(best["step"][0]) + 1,
                  "rise": (float(frame["spec_loss"].tail(LAST_EVALS).mean())
                           - float(frame["spec_loss"].head(len(frame) - LAST_EVALS).min())
                           if len(frame) > LAST_EVALS else None),
                  "train_tail": float(log["train_loss"].tail(TRAIN_TAIL).mean())}


def collect_curves(variant_dir: Path, order: tuple[str, ...] = LONG_METHODS,
                   early: int = EARLY_STEP) -> dict[str, list[dict]]:
    """collect(), each run completed by with_curve, the methods in `order` first."""
    by_method = {m: [with_curve(r, variant_dir / r["seed"] / m, early) for r in runs]
                 for m, runs in collect(variant_dir).items()}
    return {m: by_method[m] for m in sorted(by_method, key=lambda m: order.index(m) if m in order else len(order))}


def paired_diffs(runs: list[dict], baseline: list[dict], key: str) -> list[float]:
    """method − baseline on `key`, seed by seed, over the seeds both have a value for."""
    base = {m["seed"]: m[key] for m in baseline if m.get(key) is not None}
    return [m[key] - base[m["seed"]] for m in runs if m["seed"] in base and m.get(key) is not None]


def fmt_diffs(diffs: list[float], seeds: int | None = None) -> str:
    """Mean ± std of paired differences; '(n pairs)' when fewer than the method's `seeds` were paired."""
    if not diffs:
        return "–"
    text = f"{np.mean(diffs):+.3f}" + (f" ± {np.std(diffs, ddof=1):.3f}" if len(diffs) > 1 else "")
    return text + (f" ({len(diffs)} of {seeds} seeds paired)" if seeds is not None and len(diffs) < seeds else "")


def counts(values: list[int]) -> str:
    """Mean ± std of integer counts, in whole numbers."""
    return f"{np.mean(values):.0f}" + (f" ± {np.std(values, ddof=1):.0f}" if len(values) > 1 else "")


def comparison_table(by_method: dict[str, list[dict]], early: int = EARLY_STEP) -> str:
    """Losses at the end and at step `early`, paired against importance (specialized) and uniform (generic), how
    far the specialized loss rose from its best, the training loss at the end, and how far the weights moved."""
    imp, uni = by_method.get("importance", []), by_method.get("uniform", [])
    header = ["method", "seeds", "final specialized loss", "Δ spec vs importance",
              f"Δ spec vs importance at step {early}",
              f"specialized: last {LAST_EVALS} evals − best before them (step of the overall best)", f"training loss, last {TRAIN_TAIL} steps", "final generic loss", "Δ generic vs uniform",
              f"Δ generic vs uniform at step {early}", "TV of weights from initial",
              "importance basis final weight", "clusters read to the end", "seconds per run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = min(np.mean([m["final_spec_loss"] for m in runs]) for runs in by_method.values())
    for method, runs in by_method.items():
        spec = mean_std([r["final_spec_loss"] for r in runs])
        if np.isclose(np.mean([r["final_spec_loss"] for r in runs]), best):
            spec = f"**{spec}**"
        moves = [weight_moves(r) for r in runs]
        static = runs[0].get("strategy") in STATIC  # its weights are not a mixture over the bases that moves
        imp_w = mean_std([m[1] for m in moves]) if moves[0][1] is not None and not static else "–"
        n = len(runs)
        repeated = [r["clusters_repeated"] for r in runs if r.get("clusters_repeated") is not None]
        cells = [method, str(n), spec,
                 fmt_diffs(paired_diffs(runs, imp, "final_spec_loss"), n) if method != "importance" else "–",
                 fmt_diffs(paired_diffs(runs, imp, "early_spec"), n) if method != "importance" else "–",
                 f"{fmt_diffs([r['rise'] for r in runs if r['rise'] is not None])} ({'/'.join(str(r['best_step']) for r in runs)})",
                 mean_std([r["train_tail"] for r in runs]), mean_std([r["final_generic_loss"] for r in runs]),
                 fmt_diffs(paired_diffs(runs, uni, "final_generic_loss"), n) if method != "uniform" else "–",
                 fmt_diffs(paired_diffs(runs, uni, "early_generic"), n) if method != "uniform" else "–",
                 mean_std([m[0] for m in moves]), imp_w, counts(repeated) if repeated else "–",
                 f"{np.mean([r['seconds'] for r in runs]):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sign_count(diffs: list[float]) -> str:
    """How a paired difference (method − reference, lower is better) reads seed by seed."""
    if not diffs:
        return "not run"
    lower, higher = sum(d < -SAME for d in diffs), sum(d > SAME for d in diffs)
    if lower == len(diffs):
        return f"lower in all {len(diffs)} seeds" if len(diffs) > 1 else "lower in the one seed paired"
    if higher == len(diffs):
        return f"higher in all {len(diffs)} seeds" if len(diffs) > 1 else "higher in the one seed paired"
    tied = len(diffs) - lower - higher
    if tied == len(diffs):
        return f"equal in all {len(diffs)} seeds" if len(diffs) > 1 else "equal in the one seed paired"
    return f"mixed: lower in {lower}, higher in {higher}" + (f", equal in {tied}" if tied else "") + \
        f" of {len(diffs)} seeds"


def mean_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def long_statements(by_method: dict[str, list[dict]], early: int = EARLY_STEP) -> list[str]:
    """Plain statements from the numbers: the run length and the loss reached, the best online method against
    importance sampling (and its generic cost), whether the specialized loss rises from its best and how low the
    training loss falls (memorisation when data repeat), how the comparison changes between step `early` and the
    end, and how far each online method's weights moved."""
    imp, uni = by_method.get("importance"), by_method.get("uniform")
    online = [m for m in by_method if m in ONLINE]
    if not imp or not uni or not online:
        return ["(incomplete: needs importance, uniform and at least one online method)"]
    early_generic = mean_of(uni, "early_generic")
    out = [f"**Length:** {'/'.join(str(n) for n in sorted({r['steps'] for r in uni}))} steps; uniform's held-out generic "
           f"loss is " + (f"{early_generic:.2f} at step {early} and " if early_generic is not None else "")
           + f"{mean_of(uni, 'final_generic_loss'):.2f} at the end."]
    candidates = [m for m in online if m in DGA_VARIANTS] or online
    best = min(candidates, key=lambda m: np.mean([r["final_spec_loss"] for r in by_method[m]]))
    d_spec = paired_diffs(by_method[best], imp, "final_spec_loss")
    d_gen = paired_diffs(by_method[best], uni, "final_generic_loss")
    d_spec_uni = paired_diffs(by_method[best], uni, "final_spec_loss")
    out.append(f"**Best {'DGA variant' if best in DGA_VARIANTS else 'online method'} on the specialized loss: "
               f"`{best}`.** Against importance sampling: Δ spec "
               f"{fmt_diffs(d_spec)}, {sign_count(d_spec)}; against uniform: {fmt_diffs(d_spec_uni)}, "
               f"{sign_count(d_spec_uni)}. Its generic cost: Δ generic {fmt_diffs(d_gen)} against "
               f"uniform ({sign_count(d_gen)}), {fmt_diffs(paired_diffs(by_method[best], imp, 'final_generic_loss'))}"
               " against importance sampling.")
    if "doge" in by_method and best != "doge":
        d_doge = paired_diffs(by_method["doge"], imp, "final_spec_loss")
        d_best = paired_diffs(by_method[best], by_method["doge"], "final_spec_loss")
        out.append(f"**DoGE** (`doge`) against importance sampling: Δ spec {fmt_diffs(d_doge)}, {sign_count(d_doge)}; "
                   f"`{best}` − `doge`: {fmt_diffs(d_best)}, {sign_count(d_best)}; DoGE's generic loss against "
                   f"uniform: {fmt_diffs(paired_diffs(by_method['doge'], uni, 'final_generic_loss'))}.")
    said = []
    for m in ("importance", best, "uniform"):
        rises = [r["rise"] for r in by_method[m] if r["rise"] is not None]
        if rises:
            said.append(f"`{m}` {np.mean(rises):+.3f} (rose by more than {RISE} in {sum(v > RISE for v in rises)} "
                        f"of {len(rises)} seeds), training loss {mean_of(by_method[m], 'train_tail'):.2f} over its "
                        f"last {TRAIN_TAIL} steps")
    if said:
        out.append(f"**Does the specialized loss go back up?** The mean of the last {LAST_EVALS} evaluations minus "
                   "the best one before them (negative: still falling): " + "; ".join(said) + ". A training loss "
                   "far below the evaluation losses, where the data repeat, is a model memorising its training data.")
    d_early = paired_diffs(by_method[best], imp, "early_spec")
    if d_early:
        out.append(f"**Run length:** `{best}` − importance on the specialized loss was {fmt_diffs(d_early)} at step "
                   f"{early} and is {fmt_diffs(d_spec)} at the end; uniform − importance went from "
                   f"{fmt_diffs(paired_diffs(uni, imp, 'early_spec'))} to "
                   f"{fmt_diffs(paired_diffs(uni, imp, 'final_spec_loss'))}. From step {early} to the end the "
                   "specialized loss changed by " + ", ".join(
                       f"{np.mean([r['final_spec_loss'] - r['early_spec'] for r in by_method[m]]):+.3f} (`{m}`)"
                       for m in ("importance", best, "uniform")
                       if all(r["early_spec"] is not None for r in by_method[m])) + ".")
    moved = []
    for m in online:
        moves = [weight_moves(r) for r in by_method[m]]
        tv = float(np.mean([tv for tv, _ in moves]))
        moved.append(f"`{m}` TV {tv:.2f}" + ("" if moves[0][1] is None else
                                             f" (importance basis {np.mean([w for _, w in moves]):.2f})")
                     + (" — barely moves" if tv < 0.05 else ""))
    out.append("**Weights moved** (total variation from the initial weights, mean over seeds): " + ", ".join(moved)
               + ".")
    return out


def long_markdown(name: str, by_method: dict[str, list[dict]], plots: str) -> str:
    """One experiment and target of the long runs: heading, table, statements and the curves (under `plots`,
    relative to RESULTS.md)."""
    steps = "/".join(str(n) for n in sorted({r["steps"] for runs in by_method.values() for r in runs}))
    return (f"### {name} ({steps} steps)\n\n{comparison_table(by_method)}\n\n"
            + "\n".join(f"- {s}" for s in long_statements(by_method))
            + f"\n\n![specialized loss]({plots}/spec_curves.png) ![generic loss]({plots}/generic_loss_curves.png)")


def long_section(long_dir: Path) -> str:
    """The long runs' section: per experiment and target, the table and statements (written to the variant's
    table.md), the mean curves and seed 0's plots."""
    parts = []
    for experiment_dir in sorted(p for p in long_dir.iterdir() if p.is_dir()):
        for target_dir in sorted(p for p in experiment_dir.iterdir() if (p / "default").is_dir()):
            variant_dir = target_dir / "default"
            by_method = collect_curves(variant_dir)
            if not by_method:
                continue
            (variant_dir / "table.md").write_text(comparison_table(by_method) + "\n")
            spec_curves(variant_dir, list(by_method))
            loss_curves(variant_dir, list(by_method), "generic_loss")
            if (variant_dir / "seed0").exists():
                plot_runs(variant_dir / "seed0")
            plots = (str(variant_dir.relative_to(ROOT)) if variant_dir.is_relative_to(ROOT)
                     else shown(variant_dir))
            parts.append(long_markdown(f"{experiment_dir.name}, {target_dir.name}", by_method, plots))
    return "\n\n".join(parts)


def write_long_section() -> str | None:
    """Render results/long into results/long/RESULTS_section.md; None when there are no long runs."""
    long_dir = RESULTS / "long"
    if not any(long_dir.glob("**/metrics.json")):
        return None
    section = long_section(long_dir)
    (long_dir / "RESULTS_section.md").write_text(section + "\n")
    print(section)
    return section


# ---- the anchored rule's pilot -------------------------------------------------------------------------------------
# The criterion: both losses count (a mixer that buys specialized loss with generic loss only
# trades along the line importance sampling already offers), so each setting is scored by the sum of its paired
# differences from uniform, specialized plus generic, averaged over the targets; lower is better.
PILOT_SETTINGS = {"dga_ema": "strategy.dga", "inbatch": "strategy.inbatch"}


def pilot_setting(method: str) -> tuple[str, str] | None:
    """("dga_ema" or "inbatch", its setting label such as "eta4") of a pilot method, None for the baselines."""
    for prefix in PILOT_SETTINGS:
        if method.startswith(prefix + "_"):
            return prefix, method.removeprefix(prefix + "_")
    return None


def anchored_pilot_section(pilot_dir: Path) -> str:
    """Per target (seed 0): each method's final losses, paired differences from uniform, their sum, and how far its
    weights moved; then each setting's mean over the targets and the choice the criterion makes."""
    lines = ["| target | method | specialized loss | Δ spec vs uniform | generic loss | Δ generic vs uniform | "
             "Δ sum | TV from start | largest weight |", "|---|---|---|---|---|---|---|---|---|"]
    sums: dict[tuple[str, str], list[float]] = {}
    targets = []
    for tdir in sorted(p for p in pilot_dir.iterdir() if (p / "default").is_dir()):
        by_method = collect(tdir / "default")
        if "uniform" not in by_method:
            continue
        targets.append(tdir.name)
        base = by_method["uniform"][0]
        for method in sorted(by_method, key=lambda m: (pilot_setting(m) is not None, m)):
            run = by_method[method][0]
            d_spec = run["final_spec_loss"] - base["final_spec_loss"]
            d_gen = run["final_generic_loss"] - base["final_generic_loss"]
            tv, _ = weight_moves(run)
            largest = max(run["final_weights"])
            setting = pilot_setting(method)
            if setting is not None:
                sums.setdefault(setting, []).append(d_spec + d_gen)
            lines.append(f"| {tdir.name} | {method} | {run['final_spec_loss']:.4f} | {d_spec:+.3f} | "
                         f"{run['final_generic_loss']:.4f} | {d_gen:+.3f} | {d_spec + d_gen:+.3f} | {tv:.3f} | "
                         f"{largest:.3f} |")
    lines += ["", "| strategy | setting | mean Δ sum over the targets | targets |", "|---|---|---|---|"]
    for (strategy, label), values in sorted(sums.items()):
        lines.append(f"| {strategy} | {label} | {np.mean(values):+.3f} | {len(values)} |")
    complete = {k: v for k, v in sums.items() if len(v) == len(targets)}
    if complete:
        lines.append("")
        for strategy in PILOT_SETTINGS:
            mine = {label: np.mean(v) for (s, label), v in complete.items() if s == strategy}
            if mine:
                best = min(mine, key=mine.get)
                lines.append(f"- {strategy}: lowest mean Δ sum at {best} ({mine[best]:+.3f}; "
                             + ", ".join(f"{label} {value:+.3f}" for label, value in sorted(mine.items())) + ").")
    return "\n".join(lines)


def write_anchored_pilot_section() -> str | None:
    pilot_dir = RESULTS / "anchored" / "pilot"
    if not any(pilot_dir.glob("**/metrics.json")):
        return None
    section = anchored_pilot_section(pilot_dir)
    (pilot_dir / "RESULTS_section.md").write_text(section + "\n")
    print(section)
    return section


def splice(text: str, name: str, section: str) -> str:
    """RESULTS.md with `section` between `<!-- section:NAME -->` and the next `<!-- end -->`."""
    return re.sub(rf"(<!-- section:{re.escape(name)} -->\n).*?(<!-- end -->)",
                  lambda m: m.group(1) + section + "\n" + m.group(2), text, flags=re.S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["inbatch", "long", "anchored_pilot", "frontier"], default=None,
                        help="inbatch: render only results/inbatch/RESULTS_section.md (RESULTS.md untouched); long: "
                             "only the long runs' section (results/long/RESULTS_section.md, spliced into RESULTS.md "
                             "between <!-- section:long --> and <!-- end -->); no other experiment's tables or plots")
    args = parser.parse_args()
    if args.only == "frontier":
        section = write_frontier_section(RESULTS)
        if section is not None and REPORT.exists():
            REPORT.write_text(splice(REPORT.read_text(), "frontier", section))
        return
    if args.only == "anchored_pilot":
        section = write_anchored_pilot_section()
        if section is not None and REPORT.exists():
            REPORT.write_text(splice(REPORT.read_text(), "anchored_pilot", section))
        return
    if args.only == "long":
        section = write_long_section()
        if section is not None and REPORT.exists():
            REPORT.write_text(splice(REPORT.read_text(), "long", section))
        return
    if args.only == "inbatch":
        runs = (RESULTS / "inbatch").glob("*/*/seed*/*/metrics.json")
        for variant_dir in sorted({p.parent.parent.parent for p in runs}):
            by_method = collect(variant_dir)
            (variant_dir / "table.md").write_text(table(by_method) + "\n")
            spec_curves(variant_dir, list(by_method))
            if (variant_dir / "seed0").exists():
                plot_runs(variant_dir / "seed0")
        write_inbatch_section()
        return
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
    sections = {"inbatch": write_inbatch_section(), "long": write_long_section(),
                "frontier": write_frontier_section(RESULTS)}
    if REPORT.exists():
        text = REPORT.read_text()
        for name, section in sections.items():
            if section is not None:
                text = splice(text, name, section)
        for key, rendered in tables.items():
            text = re.sub(rf"(<!-- table:{re.escape(key)} -->\n).*?(<!-- end -->)",
                          lambda m: m.group(1) + rendered + "\n" + m.group(2), text, flags=re.S)
        REPORT.write_text(text)


if __name__ == "__main__":
    main()
