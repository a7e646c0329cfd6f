"""experiments/render_results.py's long-run comparison: the table's paired columns and the statements read the
numbers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import ROOT


@pytest.fixture()
def render(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import render_results

    return render_results


def write_run(run_dir: Path, strategy: str, spec: list[float], generic: list[float], weights: list[float],
              bases: list[str], repeated: int = 0) -> None:
    """One run as experiments/experiments.py writes it: evaluations every 100 steps in log.csv, the final ones in
    metrics.json, the rest in summary.json."""
    run_dir.mkdir(parents=True)
    rows = ["step,train_loss,spec_loss,generic_loss," + ",".join(f"w:{b}" for b in bases)]
    for i, (s, g) in enumerate(zip(spec, generic)):
        rows.append(f"{i * 100 + 98},7.0,,," + ",".join(str(w) for w in weights))
        rows.append(f"{i * 100 + 99},5.0,{s},{g}," + ",".join(str(w) for w in weights))
    (run_dir / "log.csv").write_text("\n".join(rows) + "\n")
    (run_dir / "metrics.json").write_text(json.dumps({
        "bases": bases, "final_spec_loss": spec[-1], "final_generic_loss": generic[-1], "final_weights": weights}))
    (run_dir / "summary.json").write_text(json.dumps({
        "best_spec_loss": min(spec), "clusters_repeated": repeated, "seconds": 10.0, "steps": 100 * len(spec),
        "strategy": strategy}))


def make_results(variant_dir: Path, dga_final: float, seeds: int = 3) -> None:
    """500-step runs evaluated every 100 steps: importance is best at step 200 and then rises; dga_ema keeps
    improving to `dga_final`."""
    bases = ["importance", "uniform", "coarse:0", "coarse:1"]
    for seed in range(seeds):
        d = variant_dir / f"seed{seed}"
        n = 0.01 * seed
        write_run(d / "uniform", "uniform", [7.0, 6.8, 6.7, 6.6, 6.6 + n], [7.0, 6.5, 6.3, 6.25, 6.2 + n],
                  [0.25] * 4, bases, repeated=110)
        write_run(d / "importance", "importance", [6.9, 6.3 + n, 6.4, 6.5, 6.6 + n], [7.2, 7.0, 6.9, 6.9, 6.9 + n],
                  [0.25] * 4, bases, repeated=40)
        write_run(d / "doge", "doge", [6.9, 6.6, 6.5, 6.5, 6.5 + n], [7.0, 6.6, 6.4, 6.3, 6.25 + n],
                  [0.26, 0.24, 0.25, 0.25], bases)
        write_run(d / "dga_ema", "dga_ema", [6.9, 6.6, 6.45, 6.35, dga_final + n], [7.0, 6.6, 6.4, 6.35, 6.3 + n],
                  [0.55, 0.15, 0.15, 0.15], bases)


def test_table_and_statements_follow_the_numbers(tmp_path, render):
    variant_dir = tmp_path / "default"
    make_results(variant_dir, dga_final=6.3)
    by_method = render.collect_curves(variant_dir)
    assert list(by_method) == ["uniform", "importance", "doge", "dga_ema"]  # the long runs' order

    table = render.comparison_table(by_method).splitlines()
    assert len(table) == 2 + 4 and all(row.count("|") == table[0].count("|") for row in table)
    dga_row = next(r for r in table if r.startswith("| dga_ema |"))
    assert "| -0.300 ± 0.000 | +0.050 ± 0.000 |" in dga_row  # Δ spec vs importance: at the end, at step 300
    assert "| -0.230 ± 0.003 (500/500/500) |" in dga_row  # the last 3 evaluations − the best before them
    assert "| 0.300 ± 0.000 | 0.550 ± 0.000 |" in dga_row  # TV of (0.55, 0.15, 0.15, 0.15); importance weight
    imp_row = next(r for r in table if r.startswith("| importance |"))
    assert "| +0.193 ± 0.007 (200/200/200) | 6.000 ± 0.000 |" in imp_row  # the rise; training loss (5s and 7s)
    assert "| 40 ± 0 |" in imp_row and "| – | – |" in imp_row  # clusters read to the end; no Δ against itself
    uni_row = next(r for r in table if r.startswith("| uniform |"))
    assert "| 0.000 ± 0.000 | – |" in uni_row  # a static method: TV 0, no importance weight

    statements = "\n".join(render.long_statements(by_method))
    assert "**Length:** 500 steps; uniform's held-out generic loss is 6.30 at step 300 and 6.21 at the end" \
        in statements
    assert "Best DGA variant on the specialized loss: `dga_ema`.** Against importance sampling: Δ spec " \
        "-0.300 ± 0.000, lower in all 3 seeds; against uniform: -0.300 ± 0.000, lower in all 3 seeds" in statements
    assert "**DoGE** (`doge`) against importance sampling: Δ spec -0.100 ± 0.000, lower in all 3 seeds; " \
        "`dga_ema` − `doge`: -0.200 ± 0.000, lower in all 3 seeds; DoGE's generic loss against uniform: " \
        "+0.050 ± 0.000" in statements
    assert "`importance` +0.193 (rose by more than 0.1 in 3 of 3 seeds)" in statements
    assert "`dga_ema` -0.230 (rose by more than 0.1 in 0 of 3 seeds)" in statements
    assert "was +0.050 ± 0.000 at step 300 and is -0.300 ± 0.000 at the end" in statements
    assert "uniform − importance went from +0.300 ± 0.000 to +0.000 ± 0.000" in statements
    assert "changed by +0.210 (`importance`), -0.140 (`dga_ema`), -0.090 (`uniform`)" in statements
    assert "`doge` TV 0.01 (importance basis 0.26) — barely moves, `dga_ema` TV 0.30 (importance basis 0.55)." \
        in statements


def test_statements_say_when_the_online_method_loses(tmp_path, render):
    make_results(tmp_path / "default", dga_final=6.8)  # above importance's 6.6 in every seed
    statements = "\n".join(render.long_statements(render.collect_curves(tmp_path / "default")))
    assert "Δ spec +0.200 ± 0.000, higher in all 3 seeds" in statements


def test_a_step_that_was_not_evaluated_and_missing_seeds(tmp_path, render):
    make_results(tmp_path / "default", dga_final=6.3)
    (tmp_path / "default" / "seed2" / "importance" / "metrics.json").unlink()  # a run that did not finish
    by_method = render.collect_curves(tmp_path / "default", early=250)  # no evaluation at step 250
    table = render.comparison_table(by_method, early=250)
    assert "| -0.300 ± 0.000 (2 of 3 seeds paired) | – |" in table  # dga_ema against the 2 importance seeds
    statements = "\n".join(render.long_statements(by_method, early=250))
    assert "generic loss is 6.21 at the end" in statements and "nan" not in statements
    assert "Run length" not in statements


def test_sign_count_reads_ties(render):
    assert render.sign_count([0.0, 1e-9, -1e-9]) == "equal in all 3 seeds"
    assert render.sign_count([-0.1, 0.0, 0.2]) == "mixed: lower in 1, higher in 1, equal in 1 of 3 seeds"
    assert render.sign_count([-0.1]) == "lower in the one seed paired"


def test_long_section_writes_tables_plots_and_links(tmp_path, render):
    make_results(tmp_path / "long" / "token_limited" / "medical" / "default", dga_final=6.3)
    section = render.long_section(tmp_path / "long")
    variant_dir = tmp_path / "long" / "token_limited" / "medical" / "default"
    assert section.startswith("### token_limited, medical (500 steps)")
    assert (variant_dir / "table.md").read_text().startswith("| method | seeds |")
    for png in ("spec_curves.png", "generic_loss_curves.png"):
        assert (variant_dir / png).stat().st_size > 0
        assert f"](token_limited/medical/default/{png})" in section  # outside the repository: shown()'s path
    markdown = render.long_markdown("x", render.collect_curves(variant_dir), "results/long/x/default")
    assert "![specialized loss](results/long/x/default/spec_curves.png)" in markdown  # relative to RESULTS.md


def test_anchored_pilot_scores_each_setting_by_its_mean_paired_sum(tmp_path, render):
    """The pilot's table: differences from uniform within each target, their sum, and each setting's mean over the
    targets; the lowest mean is named per strategy."""
    bases = ["uniform", "importance"]
    for target, (eta2, eta4) in {"a": ((7.0, 6.0), (6.5, 6.5)), "b": ((7.2, 6.1), (6.9, 6.4))}.items():
        seed = tmp_path / target / "default" / "seed0"
        write_run(seed / "uniform", "uniform", [7.0], [6.0], [0.5, 0.5], bases)
        write_run(seed / "inbatch_eta2", "inbatch", [eta2[0]], [eta2[1]], [0.4, 0.6], bases)
        write_run(seed / "inbatch_eta4", "inbatch", [eta4[0]], [eta4[1]], [0.2, 0.8], bases)
    section = render.anchored_pilot_section(tmp_path)
    # a: both sums 0; b: both +0.3. Then eta4 improves on b (sum -0.2): its mean falls to -0.1 and it is named
    assert "| a | inbatch_eta4 | 6.5000 | -0.500 | 6.5000 | +0.500 | +0.000 | 0.300 | 0.800 |" in section
    assert "| inbatch | eta2 | +0.150 | 2 |" in section and "| inbatch | eta4 | +0.150 | 2 |" in section
    (tmp_path / "b" / "default" / "seed0" / "inbatch_eta4" / "metrics.json").write_text(json.dumps({
        "bases": bases, "final_spec_loss": 6.8, "final_generic_loss": 6.0, "final_weights": [0.2, 0.8]}))
    section = render.anchored_pilot_section(tmp_path)
    assert "| inbatch | eta4 | -0.100 | 2 |" in section
    assert "- inbatch: lowest mean Δ sum at eta4 (-0.100; eta2 +0.150, eta4 -0.100)." in section


# ---- the static frontier (render_frontier.py) ---------------------------------------------------------------------
@pytest.fixture()
def frontier(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import render_frontier

    return render_frontier


def test_the_frontier_interpolates_takes_the_lowest_segment_and_refuses_worse_generic_losses(frontier):
    # uniform (7.0, 7.0) ... importance (7.6, 6.0), in the order of lambda; the middle blend is noisy (left of 0.25's)
    static = [(7.0, 7.0), (7.2, 6.6), (7.1, 6.4), (7.4, 6.2), (7.6, 6.0)]
    assert frontier.frontier_spec_at(static, 7.5) == pytest.approx(6.1)
    # 7.15 is spanned by (7.0-7.2), (7.2-7.1) and (7.1-7.4) segments: the lowest static choice counts
    assert frontier.frontier_spec_at(static, 7.15) == pytest.approx(min(6.8, 6.5, 6.4 - 0.2 * 0.05 / 0.3))
    assert frontier.frontier_spec_at(static, 6.5) == 7.0  # left of every static point: the leftmost one's
    assert frontier.frontier_spec_at(static, 7.7) is None  # a worse generic loss than every static mixture
    assert frontier.frontier_distance(static, 7.5, 5.9) == pytest.approx(-0.2)
    assert frontier.below_by_more_than_spread([-0.2, -0.1, -0.15])
    assert not frontier.below_by_more_than_spread([-0.2, 0.1, -0.15])
    assert not frontier.below_by_more_than_spread([-0.2])  # one seed: no spread known


def test_the_frontier_section_reads_the_runs_and_says_what_they_show(frontier, tmp_path):
    """Three seeds of a target with all the data: a method below every seed's frontier is said to lie below it;
    one above it is said not to; a 256-cluster run whose largest weight stays below 0.5 with a lower specialized
    loss than uniform meets that question."""
    bases = ["importance", "natural", "uniform"]
    variant = tmp_path / "results" / "frontier" / "all_data" / "medical_abstracts" / "default"
    for k in range(3):
        noise = 0.01 * k
        points = {"uniform": (7.0, 7.0), "blend25": (7.1, 6.7), "blend50": (7.2, 6.4), "blend75": (7.3, 6.2),
                  "importance": (7.5, 6.0), "dga_anchored": (7.2, 6.2 + noise), "inbatch": (7.2, 6.5 + noise),
                  "inbatch_domains": (7.1, 6.9 + noise)}
        for method, (generic, spec) in points.items():
            static = method in frontier.STATIC_ORDER
            weights = [0.5, 0.25, 0.25] if method != "inbatch_domains" else [0.4, 0.3, 0.3]
            write_run(variant / f"seed{k}" / method, "blend" if static else method, [spec + 0.2, spec + 0.1, spec],
                      [generic + 0.2, generic + 0.1, generic], weights, bases)  # evaluated at 100, 200, 300 steps
    # the same target at 1,000 steps, where exact DGA sits above the frontier: counted as its own question
    long_variant = tmp_path / "results" / "frontier" / "all_data_long" / "medical_abstracts" / "default"
    for k in range(3):
        points = {"uniform": (7.0, 7.0), "blend50": (7.2, 6.4), "importance": (7.5, 6.0),
                  "dga_anchored": (7.2, 6.6 + 0.01 * k)}
        for method, (generic, spec) in points.items():
            write_run(long_variant / f"seed{k}" / method, "blend" if method in frontier.STATIC_ORDER else method,
                      [spec] * 10, [generic] * 10, [0.5, 0.25, 0.25], bases)  # 1,000 steps
    # the token limit at 1,000 steps: exact DGA below importance and uniform on the specialized loss in every seed
    limited = tmp_path / "results" / "frontier" / "token_limited_long" / "legal_opinions" / "default"
    for k in range(3):
        for method, spec in (("uniform", 7.0), ("importance", 7.2), ("dga_anchored", 6.8 + 0.01 * k)):
            write_run(limited / f"seed{k}" / method, "blend" if method in frontier.STATIC_ORDER else method,
                      [spec] * 10, [6.0] * 10, [0.5, 0.25, 0.25], bases)
    # the anchored method's logged scores of the importance basis (the trainer's a:<basis> columns)
    log = variant / "seed1" / "dga_anchored" / "log.csv"
    # the first weight column as scores, and an update that had none for it yet (in-batch DGA logs "nan")
    log.write_text(log.read_text().replace("w:importance", "a:importance", 1) + "300,5.0,,,nan,0.25,0.25\n")
    section = frontier.write_frontier_section(tmp_path / "results")
    assert ("exact DGA, anchored: the importance basis's score (log.csv, a:importance) at the last update +0.500 "
            "(1 seed), averaged over every update +0.500.") in section
    assert "in-batch DGA, bases: the importance basis's score" not in section  # its logs have no scores
    assert ("**All the data, 300 steps: anchored DGA (exact or in-batch over the bases) lies below the static "
            "frontier by more than the seed spread**: 1 of 1 (goal: 2 of 3); yes: medical_abstracts.") in section
    assert ("**All the data, 1,000 steps: anchored DGA (exact or in-batch over the bases) lies below the static "
            "frontier by more than the seed spread**: 0 of 1 (goal: 2 of 3); no: medical_abstracts.") in section
    assert ("**Token limit, 1,000 steps: anchored DGA (exact or in-batch over the bases) beats importance and "
            "uniform sampling on the specialized loss by more than the seed spread**: 1 of 1 (goal: 3 of 3); yes: "
            "legal_opinions.") in section
    assert "Token limit, 300 steps" not in section  # no 300-step token-limited runs: that question is not asked
    assert ("](results/frontier/all_data_long/medical_abstracts/default/frontier.png)" in section)  # from RESULTS.md
    assert section.index("### medical_abstracts, all the data, 300 steps") < section.index(
        "### medical_abstracts, all the data, 1,000 steps")
    assert "exact DGA, anchored lies below the static frontier by more than the seed spread" in section
    assert ("Closest to (or furthest below) the frontier among the online methods: exact DGA, anchored (distance "
            "-0.190 ± 0.010; below it by more than the seed spread)") in section
    assert "in-batch DGA, bases does not lie below the static frontier" in section
    assert "largest cluster weight in any seed 0.400 (below 0.5)" in section
    assert (variant / "frontier.png").stat().st_size > 0
    assert (tmp_path / "results" / "frontier" / "RESULTS_section.md").read_text() == section


def test_the_token_limit_also_measures_the_online_methods_from_their_own_start(frontier, tmp_path):
    """Where the online methods reweight the coarse clusters, their start (uniform over those clusters) is run too:
    a method above uniform (over all the bases, with an importance share) but below its own start is said to beat its
    start and not uniform, each seed paired, and the start is never a point of the frontier."""
    limited = tmp_path / "results" / "frontier" / "token_limited_long" / "code_python" / "default"
    for k in range(3):
        n = 0.01 * k
        for method, spec, bases in (("uniform", 6.9 + n, ["importance", "coarse:0"]),
                                    ("importance", 8.0 + n, ["importance", "coarse:0"]),
                                    ("uniform_coarse", 7.2 + n, ["coarse:0", "coarse:1"]),
                                    ("dga_anchored", 7.0 + 2 * n, ["coarse:0", "coarse:1"])):
            strategy = "uniform" if method.startswith("uniform") else method
            write_run(limited / f"seed{k}" / method, strategy, [spec] * 10, [6.0] * 10, [0.5, 0.5], bases)
    section = frontier.write_frontier_section(tmp_path / "results")
    assert ("exact DGA, anchored does not beat uniform sampling on the specialized loss by more than the seed spread "
            "(Δ +0.110 ± 0.010)") in section
    assert ("exact DGA, anchored beats its own start, uniform over the coarse clusters (their start), on the "
            "specialized loss by more than the seed spread (Δ -0.190 ± 0.010).") in section
    assert "beats importance and uniform sampling on the specialized loss by more than the seed spread**: 0 of 1" \
        in section
    assert ("measured from the online methods' own start instead of uniform: anchored DGA beats importance sampling "
            "and uniform over the coarse clusters (their start) on the specialized loss by more than the seed "
            "spread**: 1 of 1; yes: code_python.") in section
    assert "| uniform over the coarse clusters (their start) | 3 |" in section
    # the start is not a static point: this frontier is uniform and importance only
    runs = frontier.load_runs(limited)
    assert frontier.static_points(runs, "seed0") == [(6.0, 6.9), (6.0, 8.0)]


def test_the_longer_check_pairs_the_winner_with_the_static_blend_seed_by_seed(frontier, tmp_path):
    """The 3,000-step check: a method lower on the specialized loss in every seed at the same generic loss beats the
    blend; one whose generic loss is worse by more than the seed spread does not, whatever its specialized loss."""
    bases = ["importance", "natural", "uniform"]
    variant = tmp_path / "results" / "frontier" / "all_data_check" / "code_python" / "default"
    for k in range(3):
        for method, spec, generic in (("blend50", 6.0 + 0.1 * k, 5.5 + 0.1 * k),
                                      ("dga_anchored", 5.8 + 0.1 * k + 0.01 * k, 5.5 + 0.1 * k),
                                      ("inbatch", 5.7 + 0.1 * k, 5.8 + 0.1 * k + 0.01 * k)):
            write_run(variant / f"seed{k}" / method, "blend" if method == "blend50" else method,
                      [spec + 0.5] * 29 + [spec], [generic + 0.5] * 29 + [generic], [0.5, 0.25, 0.25], bases)
    # a seed the blend does not have: not paired
    write_run(variant / "seed3" / "dga_anchored", "dga_anchored", [1.0] * 30, [1.0] * 30, [0.5, 0.25, 0.25], bases)
    # the check alone, with no frontier regime beside it: no questions to count
    section = frontier.frontier_section(tmp_path / "results" / "frontier")
    assert section.startswith("### The longer check: code_python, all the data, 3,000 steps")
    assert ("exact DGA, anchored against blend λ 0.5 (3 paired seed(s)): Δ specialized -0.190 ± 0.010, Δ generic "
            "+0.000 ± 0.000; beats it.") in section
    assert ("in-batch DGA, bases against blend λ 0.5 (3 paired seed(s)): Δ specialized -0.300 ± 0.000, Δ generic "
            "+0.310 ± 0.010; does not beat it: its generic loss is worse by more than the seed spread.") in section
    # one static point: left of it its specialized loss is the bar (seed 3, with no blend, is not compared)
    assert "| exact DGA, anchored | 4 | 4.682 ± 2.457 | 4.450 ± 2.301 | -0.190 ± 0.010 |" in section
    assert "](results/frontier/all_data_check/code_python/default/check_curves.png)" in section  # from RESULTS.md
    assert (variant / "check_curves.png").stat().st_size > 0


def test_the_check_gives_no_verdict_without_a_spread_and_refuses_runs_of_different_lengths(frontier, tmp_path):
    assert frontier.check_statement("dga_anchored", "uniform", [-0.5], [0.0]).endswith(
        "no verdict, fewer than two seeds in common (no spread is known).")
    assert frontier.check_statement("dga_anchored", "uniform", [-0.5, -0.4], [0.05, -0.01]).endswith(
        "beats it (its generic loss is higher on average, within the seed spread).")
    variant = tmp_path / "frontier" / "all_data_check" / "code_python" / "default"
    write_run(variant / "seed0" / "uniform", "uniform", [6.0] * 30, [5.0] * 30, [0.5, 0.5], ["a", "b"])
    write_run(variant / "seed0" / "dga_anchored", "dga_anchored", [6.0] * 10, [5.0] * 10, [0.5, 0.5], ["a", "b"])
    with pytest.raises(ValueError, match=r"code_python/default: every run must record the same train steps"):
        frontier.frontier_section(tmp_path / "frontier")


def test_the_check_refuses_seeds_evaluated_at_different_steps(frontier, tmp_path):
    """Curves averaged over seeds need the same evaluation steps in every seed: a log with one evaluation missing is
    refused by name, not averaged out of step."""
    variant = tmp_path / "frontier" / "all_data_check" / "code_python" / "default"
    for k in range(2):
        for method in ("uniform", "dga_anchored"):
            write_run(variant / f"seed{k}" / method, method, [6.0, 5.5, 5.0], [5.0, 4.5, 4.0], [0.5, 0.5], ["a", "b"])
    log = variant / "seed1" / "dga_anchored" / "log.csv"
    log.write_text("\n".join(line for line in log.read_text().splitlines() if not line.startswith("199,")) + "\n")
    with pytest.raises(ValueError, match=r"code_python/default: the seeds of dga_anchored were evaluated at different"):
        frontier.frontier_section(tmp_path / "frontier")
