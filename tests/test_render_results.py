"""bench/render_results.py's long-run comparison: the table's paired columns and the statements read the numbers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import ROOT


@pytest.fixture()
def render(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import render_results

    return render_results


def write_run(run_dir: Path, strategy: str, spec: list[float], generic: list[float], weights: list[float],
              bases: list[str], repeated: int = 0) -> None:
    """One run as bench/experiments.py records it: evaluations every 100 steps in log.csv, the final ones in
    metrics.json, the rest in summary.json."""
    run_dir.mkdir(parents=True)
    rows = ["step,train_loss,spec_loss,generic_loss," + ",".join(f"w:{b}" for b in bases)]
    for i, (s, g) in enumerate(zip(spec, generic)):
        rows.append(f"{i * 100 + 98},7.0,,," + ",".join(str(w) for w in weights))
        rows.append(f"{i * 100 + 99},7.0,{s},{g}," + ",".join(str(w) for w in weights))
    (run_dir / "log.csv").write_text("\n".join(rows) + "\n")
    (run_dir / "metrics.json").write_text(json.dumps({
        "bases": bases, "final_spec_loss": spec[-1], "final_generic_loss": generic[-1], "final_weights": weights}))
    (run_dir / "summary.json").write_text(json.dumps({
        "best_spec_loss": min(spec), "clusters_repeated": repeated, "seconds": 10.0, "steps": 100 * len(spec),
        "strategy": strategy}))


def make_results(variant_dir: Path, dga_final: float) -> None:
    bases = ["importance", "uniform", "coarse:0", "coarse:1"]
    for seed in range(3):
        d = variant_dir / f"seed{seed}"
        noise = 0.01 * seed
        write_run(d / "uniform", "uniform", [7.0, 6.8, 6.6 + noise], [7.0, 6.5, 6.2 + noise], [0.25] * 4, bases)
        # importance sampling: best at step 300, then rises by 0.2 (its clusters repeat)
        write_run(d / "importance", "importance", [6.9, 6.5, 6.3 + noise, 6.4, 6.5 + noise],
                  [7.2, 7.0, 6.9, 6.9, 6.9 + noise], [0.25] * 4, bases, repeated=40)
        write_run(d / "dga_ema", "dga_ema", [6.9, 6.6, 6.4, 6.35, dga_final + noise],
                  [7.0, 6.6, 6.4, 6.35, 6.3 + noise], [0.55, 0.15, 0.15, 0.15], bases)


def test_statements_follow_the_numbers(tmp_path, render):
    variant_dir = tmp_path / "long" / "token_limited" / "medical" / "default"
    make_results(variant_dir, dga_final=6.3)
    by_method = render.collect_curves(variant_dir)
    assert list(by_method) == ["uniform", "importance", "dga_ema"]  # the long runs' order, not alphabetical

    table = render.comparison_table(by_method).splitlines()
    assert len(table) == 2 + 3 and all(row.count("|") == table[0].count("|") for row in table)
    dga_row = next(r for r in table if r.startswith("| dga_ema |"))
    assert "| −0.200" not in dga_row and "| -0.200 ± 0.000 |" in dga_row  # Δ spec vs importance at the end
    assert "| +0.090 ± 0.010 |" in dga_row  # ... and at step 300 (6.4 against 6.3, 6.31, 6.32)
    imp_row = next(r for r in table if r.startswith("| importance |"))
    assert "| 0.200 ± 0.000 (300/300/300) |" in imp_row and "| 40 ± 0 |" in imp_row  # the rise; clusters repeated
    assert "0.300 ± 0.000" in dga_row  # TV of (0.55, 0.15, 0.15, 0.15) from uniform over 4 bases

    statements = "\n".join(render.long_statements(by_method))
    assert "Best online method on the specialized loss: `dga_ema`" in statements
    assert "lower in all 3 seeds" in statements
    assert "`importance` ends 0.200 above its best specialized loss on average (by more than 0.05 in 3 of 3" \
        in statements
    assert "`dga_ema` ends 0.000 above its best" in statements and "in 0 of 3 seeds" in statements
    assert "was +0.090 ± 0.010 at step 300 and is -0.200 ± 0.000 at the end" in statements
    assert "`dga_ema` TV 0.30 (importance basis 0.55)" in statements and "barely moves" not in statements


def test_statements_say_when_the_online_method_loses(tmp_path, render):
    variant_dir = tmp_path / "default"
    make_results(variant_dir, dga_final=6.8)  # above importance's 6.5 in every seed
    statements = "\n".join(render.long_statements(render.collect_curves(variant_dir)))
    assert "Δ spec +0.300 ± 0.000, higher in all 3 seeds" in statements
