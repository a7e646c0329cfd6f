"""The static frontier section of RESULTS.md: does DGA beat what a user gets for free?

Reads results/frontier/<regime>/<target>/default/seed<k>/<method>/metrics.json (experiments.py's frontier_*
experiments) and writes, per regime and target, a figure (final generic loss against final specialized loss, each
method a point with its seed spread as error bars, the static blends joined as the frontier) and a table (paired
differences within seeds, each method's distance to the frontier at its own generic loss, how far its weights
moved), then statements generated from those numbers. results/frontier/all_data_check (the longer check) gets
its loss curves and each online method paired with each static one it was run with. The frontier math is pure
(`frontier_spec_at`, `frontier_distance`); rendering reads files and draws.

The static frontier of one seed: the points (generic loss, specialized loss) of uniform, the blends
lambda * importance + (1 - lambda) * uniform at lambda 0.25, 0.5, 0.75, and importance, joined in the order of lambda
by straight segments: what a user gets by choosing lambda, for free. A method's distance is its specialized loss
minus the frontier's at the method's own generic loss (negative: below the frontier, better than any static blend at
that generic loss). Computed seed by seed against that seed's frontier (the same model initialisation and evaluation
batches), then mean ± std over seeds; "below the frontier by more than the seed spread" means mean + std < 0.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

STATIC_ORDER = ("uniform", "blend25", "blend50", "blend75", "importance")  # lambda = 0, 0.25, 0.5, 0.75, 1
LAMBDAS = dict(zip(STATIC_ORDER, ("λ 0 (uniform)", "λ 0.25", "λ 0.5", "λ 0.75", "λ 1 (importance)")))
ONLINE_ORDER = ("doge", "dga_paper", "dga_anchored", "inbatch", "inbatch_domains")
# Not on the frontier: where the online methods reweight the coarse clusters (the token limit), their own starting
# mixture, uniform over those clusters with no importance share; `uniform` is uniform over all the bases.
START = "uniform_coarse"
LABELS = {"uniform": "uniform", "blend25": "blend λ 0.25", "blend50": "blend λ 0.5", "blend75": "blend λ 0.75",
          "importance": "importance", "doge": "DoGE (every step)", "dga_paper": "exact DGA, paper rule (η 10)",
          "dga_anchored": "exact DGA, anchored", "inbatch": "in-batch DGA, bases",
          "inbatch_domains": "in-batch DGA, fine clusters", START: "uniform over the coarse clusters (their start)"}
ANCHORED = ("dga_anchored", "inbatch")  # the anchored DGA over the bases the goals name
STATIC_STRATEGIES = ("uniform", "importance", "blend")
# results/frontier/<regime>: how a heading names it. The all-data regimes ask whether DGA lies below the frontier,
# the token-limited one whether it beats importance and uniform sampling.
# Headings add the runs' own step count (summary.json), so a rerun at another length is never mislabelled.
REGIMES = {"all_data": "all the data", "all_data_long": "all the data",
           "token_limited": "token limit 4,000 per fine cluster",
           "token_limited_long": "token limit 4,000 per fine cluster"}
ALL_DATA = ("all_data", "all_data_long")
TOKEN_LIMITED = ("token_limited", "token_limited_long")


# ---- the frontier (pure) ------------------------------------------------------------------------------------------
def frontier_spec_at(static: list[tuple[float, float]], generic: float) -> float | None:
    """The static frontier's specialized loss at generic loss `generic`. `static`: (generic, specialized) points in
    the order of lambda, joined by straight segments; where several segments span `generic`, the lowest (the best
    static choice at that generic loss). Below every static generic loss: the specialized loss of the static point
    with the lowest generic loss (the frontier would rise further left, so this bar is the harder one to beat).
    Above every static generic loss: None (a generic loss worse than every static mixture's is not comparable)."""
    if not static:
        return None
    xs = [g for g, _ in static]
    if generic < min(xs):
        return min(static)[1]
    if generic > max(xs):
        return None
    candidates = [s for g, s in static if g == generic]
    for (g0, s0), (g1, s1) in zip(static, static[1:]):
        low, high = min(g0, g1), max(g0, g1)
        if low <= generic <= high and high > low:
            candidates.append(s0 + (s1 - s0) * (generic - g0) / (g1 - g0))
    return min(candidates)


def frontier_distance(static: list[tuple[float, float]], generic: float, spec: float) -> float | None:
    """spec minus the frontier's specialized loss at `generic` (negative: below the frontier); None where the
    frontier does not reach `generic`."""
    bar = frontier_spec_at(static, generic)
    return None if bar is None else spec - bar


def below_by_more_than_spread(distances: list[float]) -> bool:
    """mean + std < 0 over seeds (with one seed: the distance itself < 0 is not enough, no spread is known)."""
    return len(distances) > 1 and float(np.mean(distances) + np.std(distances, ddof=1)) < 0


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:+.{digits}f} (1 seed)"
    return f"{np.mean(values):+.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def plain(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


# ---- reading the runs ---------------------------------------------------------------------------------------------
def load_runs(variant_dir: Path) -> dict[str, dict[str, dict]]:
    """{method: {seed name: metrics (with summary.json's fields)}}."""
    runs: dict[str, dict[str, dict]] = {}
    for path in sorted(variant_dir.glob("seed*/*/metrics.json")):
        metrics = json.loads(path.read_text())
        summary = path.with_name("summary.json")
        metrics = (json.loads(summary.read_text()) if summary.exists() else {}) | metrics
        runs.setdefault(path.parent.name, {})[path.parent.parent.name] = metrics
    return runs


def static_points(runs: dict[str, dict[str, dict]], seed: str) -> list[tuple[float, float]]:
    """One seed's frontier points in the order of lambda (the static methods that seed has)."""
    return [(runs[m][seed]["final_generic_loss"], runs[m][seed]["final_spec_loss"])
            for m in STATIC_ORDER if seed in runs.get(m, {})]


def weight_summary(run: dict) -> tuple[float, float, float | None]:
    """(TV from the starting weights, largest weight, the importance basis's weight or None). Online methods start
    uniform over their bases (or clusters); static methods never move."""
    final = np.asarray(run["final_weights"], dtype=float)
    moved = run.get("strategy") not in STATIC_STRATEGIES
    tv = 0.5 * float(np.abs(final - 1.0 / len(final)).sum()) if moved else 0.0
    names = run.get("bases", [])
    importance = float(final[names.index("importance")]) if "importance" in names else None
    return tv, float(final.max()), importance


def method_rows(runs: dict[str, dict[str, dict]]) -> dict[str, dict[str, list[float]]]:
    """Per method, per-seed lists: losses, paired differences, distance to the frontier, weight moves."""
    out: dict[str, dict[str, list[float]]] = {}
    for method in [m for m in (*STATIC_ORDER, START, *ONLINE_ORDER) if m in runs]:
        row: dict[str, list[float]] = {k: [] for k in ("spec", "generic", "d_spec_uniform", "d_spec_importance",
                                                       "d_spec_start", "d_generic_uniform", "distance", "tv",
                                                       "largest", "importance_weight")}
        row["outside"] = []
        for seed, run in sorted(runs[method].items()):
            row["spec"].append(run["final_spec_loss"])
            row["generic"].append(run["final_generic_loss"])
            for base, key in (("uniform", "d_spec_uniform"), ("importance", "d_spec_importance"),
                              (START, "d_spec_start")):
                if seed in runs.get(base, {}):
                    row[key].append(run["final_spec_loss"] - runs[base][seed]["final_spec_loss"])
            if seed in runs.get("uniform", {}):
                row["d_generic_uniform"].append(run["final_generic_loss"] - runs["uniform"][seed]["final_generic_loss"])
            if method not in STATIC_ORDER and static_points(runs, seed):  # a seed with no static run: no frontier
                distance = frontier_distance(static_points(runs, seed), run["final_generic_loss"],
                                             run["final_spec_loss"])
                (row["distance"] if distance is not None else row["outside"]).append(distance or 0.0)
            tv, largest, importance = weight_summary(run)
            row["tv"].append(tv), row["largest"].append(largest)
            if importance is not None:
                row["importance_weight"].append(importance)
        out[method] = row
    return out


def importance_scores(variant_dir: Path, method: str) -> tuple[list[float], float] | None:
    """The importance basis's score (log.csv's a:importance: the anchored rule's averaged, shrunk relative gain) at
    each seed's last update, and its mean over every update of every seed; None where the method logs none. The
    weights are softmax(log α₀ + η s̄): these say how far the measured signal moved them, and where it ended."""
    import polars as pl

    last: list[float] = []
    every: list[float] = []
    for log in sorted(variant_dir.glob(f"seed*/{method}/log.csv")):
        frame = pl.read_csv(log, infer_schema_length=None)
        if "a:importance" in frame.columns:  # "nan": an update with no score for it yet (in-batch, too few seen)
            scores = frame["a:importance"].cast(pl.Float64, strict=False).drop_nulls().drop_nans().to_list()
            if scores:
                last.append(scores[-1])
                every += scores
    return (last, float(np.mean(every))) if last else None


# ---- rendering ----------------------------------------------------------------------------------------------------
def frontier_plot(variant_dir: Path, runs: dict[str, dict[str, dict]], title: str) -> Path:
    """frontier.png: final generic (x) against final specialized loss (y), mean ± std over seeds per method, the
    static methods joined in the order of lambda."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    means = {}
    for method in [m for m in (*STATIC_ORDER, START, *ONLINE_ORDER) if m in runs]:
        gen = [r["final_generic_loss"] for r in runs[method].values()]
        spec = [r["final_spec_loss"] for r in runs[method].values()]
        means[method] = (float(np.mean(gen)), float(np.mean(spec)))
        spread = (np.std(gen, ddof=1), np.std(spec, ddof=1)) if len(gen) > 1 else (0.0, 0.0)
        static = method in STATIC_ORDER
        first_static = static and method == next(m for m in STATIC_ORDER if m in runs)
        label = (f"static blends λ · importance + (1 − λ) · uniform ({len(gen)} seeds)" if first_static
                 else None if static else f"{LABELS.get(method, method)} ({len(gen)} seeds)")
        marker = "s" if static else "D" if method == START else "o"
        ax.errorbar(*means[method], xerr=spread[0], yerr=spread[1], fmt=marker,
                    color="0.45" if static else None, capsize=3, ms=5, label=label)
        if static:
            ax.annotate(LAMBDAS[method], means[method], textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color="0.3")
    line = [means[m] for m in STATIC_ORDER if m in means]
    if len(line) > 1:
        ax.plot(*zip(*line), color="0.45", lw=1, ls="--", zorder=0)
    ax.set_xlabel("final generic loss (held out)")
    ax.set_ylabel("final specialized loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6.5, loc="best")
    fig.tight_layout()
    path = variant_dir / "frontier.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def target_table(rows: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| method | seeds | specialized loss | Δ spec vs uniform | Δ spec vs importance | generic loss | "
             "Δ generic vs uniform | distance to the frontier | TV from start | largest weight | importance weight |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in rows.items():
        distance = "–" if method in STATIC_ORDER else fmt(row["distance"])
        if row["outside"]:
            distance += f" ({len(row['outside'])} seed(s) right of the frontier)"
        lines.append(
            f"| {LABELS.get(method, method)} | {len(row['spec'])} | {plain(row['spec'])} | "
            f"{'–' if method == 'uniform' else fmt(row['d_spec_uniform'])} | "
            f"{'–' if method == 'importance' else fmt(row['d_spec_importance'])} | {plain(row['generic'])} | "
            f"{'–' if method == 'uniform' else fmt(row['d_generic_uniform'])} | {distance} | "
            f"{plain(row['tv']) if method not in STATIC_ORDER else '0'} | {plain(row['largest'])} | "
            f"{plain(row['importance_weight'])} |")
    return "\n".join(lines)


def beats(diffs: list[float]) -> bool:
    """Lower by more than the seed spread: mean + std < 0 over at least two seeds."""
    return below_by_more_than_spread(diffs)


def target_statements(regime: str, rows: dict[str, dict[str, list[float]]]) -> list[str]:
    """Plain statements from one regime and target's numbers."""
    out = []
    online = {m: np.mean(rows[m]["distance"]) for m in ONLINE_ORDER if m in rows and rows[m]["distance"]}
    if online:
        best = min(online, key=online.get)
        below = beats(rows[best]["distance"]) and not rows[best]["outside"]
        out.append(f"Closest to (or furthest below) the frontier among the online methods: {LABELS[best]} (distance "
                   f"{fmt(rows[best]['distance'])}; {'below it by more than' if below else 'not below it by more than'}"
                   f" the seed spread).")
    for method in [m for m in ANCHORED if m in rows]:
        row, name = rows[method], LABELS[method]
        if regime in ALL_DATA:
            if row["outside"]:
                out.append(f"{name}: in {len(row['outside'])} seed(s) its generic loss is worse than every static "
                           "mixture's, so it is not below the frontier there.")
            verdict = ("lies below the static frontier by more than the seed spread"
                       if beats(row["distance"]) and not row["outside"] else
                       "does not lie below the static frontier by more than the seed spread")
            out.append(f"{name} {verdict} (distance {fmt(row['distance'])}).")
        else:
            for base in ("importance", "uniform"):
                diffs = row[f"d_spec_{base}"]
                word = "beats" if beats(diffs) else "does not beat"
                out.append(f"{name} {word} {base} sampling on the specialized loss by more than the seed spread "
                           f"(Δ {fmt(diffs)}).")
            if row["d_spec_start"]:
                diffs = row["d_spec_start"]
                out.append(f"{name} {'beats' if beats(diffs) else 'does not beat'} its own start, "
                           f"{LABELS[START]}, on the specialized loss by more than the seed spread (Δ {fmt(diffs)}).")
    if "inbatch_domains" in rows:
        row = rows["inbatch_domains"]
        largest = max(row["largest"]) if row["largest"] else float("nan")
        no_worse = bool(row["d_spec_uniform"]) and float(np.mean(row["d_spec_uniform"])) <= 0
        out.append(f"In-batch DGA over the fine clusters: largest cluster weight in any seed {largest:.3f} "
                   f"({'below' if largest < 0.5 else 'not below'} 0.5); specialized loss "
                   f"{'no worse than' if no_worse else 'worse than'} uniform's on average "
                   f"(Δ {fmt(row['d_spec_uniform'])}).")
    return out


def run_steps(runs: dict[str, dict[str, dict]], where: Path) -> str:
    """The step count every run of a folder trained for, as a heading writes it ("1,000 steps"); refuses a folder
    whose runs disagree (their losses would not be comparable)."""
    steps = {run.get("steps") for seeds in runs.values() for run in seeds.values()}
    if len(steps) != 1 or None in steps:
        raise ValueError(f"{where}: every run must record the same train steps in summary.json, found "
                         f"{sorted(steps, key=str)}")
    return f"{steps.pop():,} steps"


def sentence(text: str) -> str:
    """text with its first letter upper-cased (str.capitalize would lower-case the rest)."""
    return text[:1].upper() + text[1:]


def frontier_section(frontier_dir: Path) -> str:
    """The whole section: per regime and target a figure, a table and statements; then the goals, counted."""
    parts: list[str] = []
    goals: dict[str, list[tuple[str, bool]]] = {**{f"below_{r}": [] for r in ALL_DATA},
                                                **{f"beats_{r}": [] for r in TOKEN_LIMITED},
                                                **{f"start_{r}": [] for r in TOKEN_LIMITED}, "clusters": []}
    regime_steps: dict[str, str] = {}
    root = frontier_dir.parent.parent  # the figures' links are relative to RESULTS.md, at the repository root
    for regime in REGIMES:
        regime_dir = frontier_dir / regime
        if not regime_dir.is_dir():
            continue
        for target_dir in sorted(p for p in regime_dir.iterdir() if (p / "default").is_dir()):
            variant_dir = target_dir / "default"
            runs = load_runs(variant_dir)
            if "uniform" not in runs:
                continue
            steps = run_steps(runs, variant_dir)
            regime_steps.setdefault(regime, steps)
            rows = method_rows(runs)
            name = f"{REGIMES[regime]}, {steps}"
            title = f"{target_dir.name}, {name} (mean ± std over seeds)"
            plot = frontier_plot(variant_dir, runs, title)
            statements = target_statements(regime, rows)
            for method in [m for m in ANCHORED if m in rows]:
                scores = importance_scores(variant_dir, method)
                if scores is not None:
                    statements.append(f"{LABELS[method]}: the importance basis's score (log.csv, a:importance) at "
                                      f"the last update {fmt(scores[0])}, averaged over every update "
                                      f"{scores[1]:+.3f}.")
            parts += [f"### {target_dir.name}, {name}", "",
                      f"![{title}]({plot.relative_to(root).as_posix()})", "",
                      target_table(rows), "", *(f"- {s}" for s in statements), ""]
            anchored = [rows[m] for m in ANCHORED if m in rows]
            if regime in ALL_DATA and anchored:
                goals[f"below_{regime}"].append((target_dir.name, any(beats(r["distance"]) and not r["outside"]
                                                                      for r in anchored)))
            if regime in TOKEN_LIMITED and anchored:
                goals[f"beats_{regime}"].append((target_dir.name, any(
                    beats(r["d_spec_importance"]) and beats(r["d_spec_uniform"]) for r in anchored)))
                if START in runs:
                    goals[f"start_{regime}"].append((target_dir.name, any(
                        beats(r["d_spec_importance"]) and beats(r["d_spec_start"]) for r in anchored)))
            if "inbatch_domains" in rows:
                r = rows["inbatch_domains"]
                goals["clusters"].append((f"{target_dir.name} ({name})",
                                          bool(r["largest"]) and max(r["largest"]) < 0.5
                                          and float(np.mean(r["d_spec_uniform"] or [np.inf])) <= 0))
    summary = []
    for key, question, goal in (
            *((f"below_{r}", f"{sentence(REGIMES[r])}, {regime_steps.get(r, '')}: anchored DGA (exact or in-batch "
                             "over the bases) lies below the static frontier by more than the seed spread",
               "goal: 2 of 3") for r in ALL_DATA),
            *((f"beats_{r}", f"Token limit, {regime_steps.get(r, '')}: anchored DGA (exact or in-batch over the "
                             "bases) beats importance and uniform sampling on the specialized loss by more than the "
                             "seed spread", "goal: 3 of 3") for r in TOKEN_LIMITED),
            *((f"start_{r}", f"Token limit, {regime_steps.get(r, '')}, measured from the online methods' own start "
                             f"instead of uniform: anchored DGA beats importance sampling and {LABELS[START]} on the "
                             "specialized loss by more than the seed spread", "") for r in TOKEN_LIMITED),
            ("clusters", "In-batch DGA over the 256 fine clusters keeps every cluster below 0.5 of the weight with a "
                         "specialized loss no worse than uniform's (mean paired difference ≤ 0)", "")):
        answered = goals[key]
        if not answered:
            continue
        yes = [name for name, ok in answered if ok]
        no = [name for name, ok in answered if not ok]
        summary.append(f"- **{question}**: {len(yes)} of {len(answered)}{f' ({goal})' if goal else ''}"
                       f"{'; yes: ' + ', '.join(yes) if yes else ''}{'; no: ' + ', '.join(no) if no else ''}.")
    if summary:
        summary = ["### The questions, answered from these runs", "", *summary, ""]
    check_dir = frontier_dir / "all_data_check"
    if check_dir.is_dir():
        parts += check_section(check_dir, root)
    return "\n".join(summary + parts).rstrip() + "\n"


# ---- the longer check ---------------------------------------------------------------------------------------------
def paired(runs: dict[str, dict[str, dict]], method: str, reference: str, key: str) -> list[float]:
    """method − reference on `key`, seed by seed over the seeds both have."""
    return [runs[method][seed][key] - runs[reference][seed][key]
            for seed in sorted(runs[method]) if seed in runs[reference]]


def check_curves(variant_dir: Path, runs: dict[str, dict[str, dict]], title: str) -> Path:
    """check_curves.png: the specialized and generic evaluation losses over the steps, mean over the finished seeds
    per method (band: min-max), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, column, name in zip(axes, ("spec_loss", "generic_loss"), ("specialized", "generic (held out)")):
        for method, seeds in runs.items():
            frames = [pl.read_csv(variant_dir / seed / method / "log.csv", infer_schema_length=None)
                      .filter(pl.col(column).is_not_null()) for seed in sorted(seeds)]
            steps = frames[0]["step"].to_numpy()
            if any(not np.array_equal(f["step"].to_numpy(), steps) for f in frames):
                raise ValueError(f"{variant_dir}: the seeds of {method} were evaluated at different steps")
            stacked = np.array([f[column].to_numpy() for f in frames])
            ax.plot(steps + 1, stacked.mean(axis=0), label=f"{LABELS.get(method, method)} ({len(frames)} seeds)")
            ax.fill_between(steps + 1, stacked.min(axis=0), stacked.max(axis=0), alpha=0.15)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{name} eval loss")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = variant_dir / "check_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_statement(online: str, static: str, d_spec: list[float], d_generic: list[float]) -> str:
    """Whether the online method beats a static one, in words: a lower specialized loss by more than the seed spread,
    with a generic loss not worse by more than the seed spread (paired seed by seed; fewer than two seeds: no
    verdict, since no spread is known)."""
    head = (f"{LABELS.get(online, online)} against {LABELS.get(static, static)} ({len(d_spec)} paired seed(s)): "
            f"Δ specialized {fmt(d_spec)}, Δ generic {fmt(d_generic)}; ")
    if len(d_spec) < 2:
        return head + "no verdict, fewer than two seeds in common (no spread is known)."
    generic_worse = float(np.mean(d_generic) - np.std(d_generic, ddof=1)) > 0
    if generic_worse:
        return head + "does not beat it: its generic loss is worse by more than the seed spread."
    if not beats(d_spec):
        return head + "does not beat it: its specialized loss is not lower by more than the seed spread."
    caveat = " (its generic loss is higher on average, within the seed spread)" if np.mean(d_generic) > 0 else ""
    return head + f"beats it{caveat}."


def check_section(check_dir: Path, root: Path) -> list[str]:
    """The longer check: per target, each online method against each static one it was run with, paired; the
    figures linked relative to `root` (where RESULTS.md is)."""
    parts: list[str] = []
    for target_dir in sorted(p for p in check_dir.iterdir() if (p / "default").is_dir()):
        variant_dir = target_dir / "default"
        runs = load_runs(variant_dir)
        static = [m for m in STATIC_ORDER if m in runs]
        online = [m for m in ONLINE_ORDER if m in runs]
        if not static or not online:
            continue
        steps = run_steps(runs, variant_dir)
        title = f"{target_dir.name}, all the data, {steps} (mean over seeds, band min-max)"
        plot = check_curves(variant_dir, {m: runs[m] for m in static + online}, title)
        # the frontier these static points span (the segments between them, as in the figures above)
        rows = method_rows({m: runs[m] for m in static + online})
        lines = ["| method | seeds | specialized loss | generic loss | distance to the static points' frontier | "
                 "TV from start | largest weight |", "|---|---|---|---|---|---|---|"]
        for method in static + online:
            row = rows[method]
            distance = "–" if method in static else fmt(row["distance"])
            if row["outside"]:
                distance += f" ({len(row['outside'])} seed(s) right of the frontier)"
            lines.append(f"| {LABELS.get(method, method)} | {len(runs[method])} | {plain(row['spec'])} | "
                         f"{plain(row['generic'])} | {distance} | {plain(row['tv'])} | {plain(row['largest'])} |")
        statements = [check_statement(o, s, paired(runs, o, s, "final_spec_loss"),
                                      paired(runs, o, s, "final_generic_loss")) for o in online for s in static]
        parts += [f"### The longer check: {target_dir.name}, all the data, {steps}", "",
                  f"![{title}]({plot.relative_to(root).as_posix()})", "", *lines, "",
                  *(f"- {s}" for s in statements), ""]
    return parts


def write_frontier_section(results: Path) -> str | None:
    """Render results/frontier into results/frontier/RESULTS_section.md; None when there are no runs."""
    frontier_dir = results / "frontier"
    if not any(frontier_dir.glob("*/*/default/seed*/*/metrics.json")):
        return None
    section = frontier_section(frontier_dir)
    (frontier_dir / "RESULTS_section.md").write_text(section)
    return section
