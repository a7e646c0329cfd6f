"""Do the reference trainer's speed options change what it learns? fp32 eager against every option on, over seeds.

    .venv/bin/python experiments/precision_agreement.py [--steps 300] [--seeds 0 1 2] [--target medical_abstracts]
    # writes bench/results/precision_agreement.json; needs experiments.py's prepared 16x16 corpus

bench/train_speed.py times the options on synthetic batches; this runs the real experiment instead
(experiments.py's `long_distribution` uniform run, on the development corpus) in two configurations, side by
side (one process and one thread each; the jobs alternate fp32 and fast, so the two cores are shared until the
last fp32 run, which ends alone):

- `fp32`: precision fp32, eager, torch's default AdamW (what sections 1–6 of RESULTS.md ran);
- `fast`: the long runs' settings (experiments.LONG_SETTINGS: bf16 autocast where the CPU has it, torch.compile,
  fused AdamW).

Both evaluate on the same fixed batches (eval_seed), so at every evaluation the paired difference fast − fp32 of a
seed can be set against the seed-to-seed spread of fp32 itself: the options agree "within seed noise" when the mean
paired difference is smaller than that spread. Also reports seconds per run (the speed-up on the real run, with
evaluation and the stream included).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # bench/common.py, shared with benchmarks

import numpy as np  # noqa: E402
from common import print_table, write_result  # noqa: E402

CONFIGS = {"fp32": {"speed.precision": "fp32", "speed.compile": False, "optim.adamw_impl": None},
           "fast": {}}  # fast: LONG_SETTINGS as they are


def one_run(args: tuple[str, int, int, str, str]) -> dict:
    """Train one configuration for one seed in this (fresh) process; its evaluations and seconds."""
    name, seed, steps, target, out = args
    os.environ["OMP_NUM_THREADS"] = "1"
    import polars as pl
    import torch

    torch.set_num_threads(1)
    import experiments
    from dgamix.trainer import train

    spec = experiments.EXPERIMENTS["long_distribution"]
    method = next(m for m in spec.methods if m.label == "uniform")
    run_dir = Path(out) / f"{name}-{seed}"
    cfg = experiments.method_config(spec, "default", method, seed, target, None, run_dir, steps=steps,
                                    extra=CONFIGS[name])
    metrics = train.run({"train": cfg}, method.strategy, out_dir=run_dir)
    log = pl.read_csv(run_dir / "log.csv", infer_schema_length=None).filter(pl.col("spec_loss").is_not_null())
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"config": name, "seed": seed, "steps": (log["step"] + 1).to_list(), "spec": log["spec_loss"].to_list(),
            "generic": log["generic_loss"].to_list(), "seconds": summary["seconds"],
            "final_spec": metrics["final_spec_loss"], "final_generic": metrics["final_generic_loss"]}


def agreement(runs: list[dict]) -> list[dict]:
    """Per evaluation step and loss: fp32's mean and seed std, fast's mean, and the paired fast − fp32 (mean, std)."""
    by = {(r["config"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    steps = by[("fp32", seeds[0])]["steps"]
    rows = []
    for i, step in enumerate(steps):
        for loss in ("spec", "generic"):
            ref = np.array([by[("fp32", s)][loss][i] for s in seeds])
            fast = np.array([by[("fast", s)][loss][i] for s in seeds])
            diff = fast - ref
            spread = float(np.std(ref, ddof=1)) if len(seeds) > 1 else float("nan")
            rows.append({"step": step, "loss": loss, "fp32 mean": float(ref.mean()), "fp32 seed std": spread,
                         "fast mean": float(fast.mean()), "paired diff mean": float(diff.mean()),
                         "paired diff std": float(np.std(diff, ddof=1)) if len(seeds) > 1 else float("nan"),
                         "within seed noise": bool(abs(diff.mean()) < spread) if len(seeds) > 1 else None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", default="medical_abstracts")
    parser.add_argument("--processes", type=int, default=2, help="runs side by side (one thread each)")
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("--seeds: expected at least 2 seeds (the seed-to-seed spread is the yardstick)")
    with tempfile.TemporaryDirectory() as out:
        jobs = [(name, seed, args.steps, args.target, out) for seed in args.seeds for name in CONFIGS]
        with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
            runs = pool.map(one_run, jobs, chunksize=1)
    rows = agreement(runs)
    print_table(rows)
    seconds = {name: float(np.mean([r["seconds"] for r in runs if r["config"] == name])) for name in CONFIGS}
    speed = {"seconds per run": seconds, "speed-up": seconds["fp32"] / seconds["fast"]}
    print(f"\nseconds per run (mean over seeds): fp32 {seconds['fp32']:.0f}, fast {seconds['fast']:.0f} "
          f"({speed['speed-up']:.2f}x)")
    path = write_result("precision_agreement", rows, {"runs": runs, "target": args.target, "steps": args.steps,
                                                      "seeds": args.seeds, "threads_per_run": 1,
                                                      "processes": args.processes, **speed})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
