"""Issue 5's experiments on the development corpus: one command per experiment, every run from a recorded seed.

    .venv/bin/python bench/prepare_corpus.py                      # once: ingest + embed ../shared/corpus/generic
    .venv/bin/python bench/experiments.py prepare --target medical_abstracts [--levels 16 16] [--spec-docs N]
    .venv/bin/python bench/experiments.py run token_limited --target medical_abstracts --seeds 0 1 2
    .venv/bin/python bench/experiments.py run granularity --seeds 0 1 2 [--variants 4x4 32x32]  # levels per variant
    .venv/bin/python bench/experiments.py verify token_limited --seed 0 --method dga_ema   # re-run, compare
    OMP_NUM_THREADS=1 .venv/bin/python bench/experiments.py run inbatch --target T --seeds 0 --threads 1  # 1 per core
    .venv/bin/python bench/render_results.py                      # RESULTS.md tables + plots from the metrics

`prepare` runs the project's own stages (cluster -> assign -> tokenize -> bases) on the embedded corpus, into a
folder per clustering under the git-ignored scratch folder (clusters, token store with held-out generic documents)
and, inside it, a folder per target (bases, the target's spec and eval stores). `run` trains the reference GPT (trainer/train.py) once per method and
seed and writes results/<experiment>/<target>/<variant>/seed<k>/<method>/{metrics.json,log.csv} (committed: the
evidence). The methods never see meta.domain: the bases are importance, natural, uniform and coarse clusters only
(no reference bases, which would be built from the ground-truth labels).
"""
from __future__ import annotations

import argparse
import copy
import io
import logging
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import zstandard  # noqa: E402
from common import CORPUS, ROOT, WORK  # noqa: E402

from dgamix.pipeline import assign, bases, cluster, embed, ingest, tokens  # noqa: E402
from dgamix.pipeline.targets import run_stage  # noqa: E402
from dgamix.trainer import train  # noqa: E402

GENERIC = WORK / "generic"
RESULTS = ROOT / "results"

# The reference GPT at the size where one run takes one to two minutes on 2 CPU cores.
TRAIN = {"steps": 300, "seq_len": 64, "batch_size": 16, "lr": 3e-3, "n_layer": 2, "n_head": 4, "n_embd": 128,
         "eval_every": 50, "eval_batches": 8, "checkpoint_every": 100000, "token_cap": None, "basis_names": None,
         "eta": 0.3, "beta": 0.1, "every": 20, "dga_batch_size": 8, "dga_target_batch_size": 16,
         "estimator": "exact"}

# Each experiment: its clustering, the train settings shared by its methods, and its methods as
# (name in the results, trainer strategy, basis set). Basis sets: "coarse" = domain reweighting over the coarse
# clusters; "all" = distribution reweighting over importance, natural, uniform and the coarse clusters.
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "token_limited": {  # paper section 3.1, Fig. 1: few tokens per cluster, the favoured clusters repeat
        "levels": [16, 16], "train": {"token_cap": 4000},
        "methods": [("uniform", "uniform", "coarse"), ("importance", "importance", "all"),
                    ("dga", "dga", "coarse"), ("dga_ema", "dga_ema", "coarse"), ("odm", "odm", "coarse")]},
    "distribution": {  # section 3.2, Fig. 2: a few bases over 256 fine clusters, all the data
        "levels": [16, 16], "train": {},
        "methods": [("natural", "natural", "all"), ("uniform", "uniform", "all"), ("importance", "importance", "all"),
                    ("dga_ema", "dga_ema", "all"), ("odm", "odm", "coarse")]},
    "token_limited_long": {  # experiment 1 run 3x longer (1 seed): does importance sampling overfit later?
        "levels": [16, 16], "train": {"token_cap": 4000, "steps": 1000, "eval_every": 100},
        "methods": [("uniform", "uniform", "coarse"), ("importance", "importance", "all"),
                    ("dga", "dga", "coarse"), ("dga_ema", "dga_ema", "coarse")]},
    "distribution_eta": {  # experiment 2's DGA with larger step sizes: at 15 updates, eta 0.3 barely moves alpha
        "levels": [16, 16], "train": {},
        "methods": [("dga_ema", "dga_ema", "all")],
        "variants": {"eta3": {"eta": 3.0}, "eta10": {"eta": 10.0}}},
    "few_examples": {  # Fig. 4b: spec subsets (run with --spec-docs N); DGA at the step size that moves it at 300 steps
        "levels": [16, 16], "train": {"eta": 10.0},
        "methods": [("importance", "importance", "all"), ("dga_ema", "dga_ema", "all")]},
    "granularity": {  # Fig. 4a: the same comparison as the number of fine clusters grows (variants set the levels;
        # every level uses the 16x16 run's tokenizer, so the losses are in the same units)
        "levels": [16, 16], "train": {"eta": 10.0},
        "methods": [("uniform", "uniform", "all"), ("importance", "importance", "all"),
                    ("dga_ema", "dga_ema", "all")],
        "variants": {"4x4": {"levels": [4, 4]}, "8x8": {"levels": [8, 8]}, "16x16": {"levels": [16, 16]},
                     "32x32": {"levels": [32, 32]}}},
    "ablation": {  # reviewers' ablations on the token-limited setting: beta, eta, T_r, estimators (variants)
        "levels": [16, 16], "train": {"token_cap": 4000},
        "methods": [("dga_ema", "dga_ema", "coarse")],
        # beta = 1 is experiment 1's `dga`; eta 3 and 10 go past the paper's range because at this scale the
        # scores are small (|a| ~ 0.01-0.3) and eta 0.3 barely moves the weights in 15 updates.
        "variants": {"beta0.05": {"beta": 0.05}, "beta0.3": {"beta": 0.3}, "eta0.1": {"eta": 0.1},
                     "eta1": {"eta": 1.0}, "eta3": {"eta": 3.0}, "eta10": {"eta": 10.0}, "every10": {"every": 10},
                     "every50": {"every": 50}, "every100": {"every": 100},
                     "finite_difference": {"estimator": "finite_difference"}, "forward": {"estimator": "forward"}}},
    # In-batch DGA (trainer strategies inbatch / inbatch_domains): every training sequence's alignment with g_spe,
    # no extra backward per basis. Re-runs every method: the reference GPT's attention changed (explicit
    # c_attn/c_proj), so the runs recorded above are not comparable with these. A method's optional 4th element
    # is its own train overrides (here: exact DGA at the step size that moves the weights at 300 steps).
    "inbatch": {
        "levels": [16, 16], "train": {},
        "methods": [("uniform", "uniform", "all"), ("importance", "importance", "all"),
                    ("inbatch", "inbatch", "all"), ("inbatch_domains", "inbatch_domains", "all"),
                    ("dga_ema", "dga_ema", "all", {"eta": 10.0})]},
    # The pilot that chose train.inbatch_scale for `inbatch` (150 steps, seed 0, every target): snr against
    # standardized at the default inbatch_eta, with uniform at the same length for the generic-loss bar.
    "inbatch_pilot": {  # written under results/inbatch/pilot/ (`dir`: the folder under results/, else the name)
        "dir": "inbatch/pilot", "levels": [16, 16], "train": {"steps": 150},
        "methods": [("uniform", "uniform", "all"),
                    ("inbatch_snr", "inbatch", "all", {"inbatch_scale": "snr"}),
                    ("inbatch_standardized", "inbatch", "all", {"inbatch_scale": "standardized"})]},
}


def levels_dir(levels: list[int]) -> Path:
    return WORK / "exp" / "x".join(map(str, levels))


def target_dir(levels: list[int], target: str, spec_docs: int | None) -> Path:
    return levels_dir(levels) / (target if spec_docs is None else f"{target}-{spec_docs}")


def spec_prefix(target: str, n: int, out: Path) -> Path:
    """The first n records of the target's spec set (spec is in random order: a prefix is a random subset)."""
    with open(CORPUS / "targets" / target / "spec.jsonl.zst", "rb") as fh:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8", newline="\n")
        kept = [line for _, line in zip(range(n), text)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(zstandard.ZstdCompressor().compress("".join(kept).encode()))
    return out


# The clustering whose tokenizer every other clustering reuses: the BPE is trained on a sample of the assigned
# shards, which are ordered by cluster, so a tokenizer per clustering would make losses incomparable across levels.
TOKENIZER_LEVELS = [16, 16]


def pipeline_params(levels: list[int], target: str, spec_docs: int | None) -> dict[str, Any]:
    base, tdir = levels_dir(levels), target_dir(levels, target, spec_docs)
    shared_tokenizer = ({} if levels == TOKENIZER_LEVELS
                        else {"tokenizer": str(levels_dir(TOKENIZER_LEVELS) / "tokens" / "tokenizer.json")})
    spec = (spec_prefix(target, spec_docs, tdir / "spec.jsonl.zst") if spec_docs
            else CORPUS / "targets" / target / "spec.jsonl.zst")
    return {
        "embed": {"output": str(GENERIC / "embeddings")},
        "targets": {"sets": {"spec": [str(spec)], "eval": [str(CORPUS / "targets" / target / "eval.jsonl.zst")]},
                    "output": str(tdir / "targets"), "metrics": str(tdir / "targets")},
        "cluster": {"embeddings": str(GENERIC / "embeddings"), "docs": str(GENERIC / "docs"),
                    "output": str(base / "clusters"), "levels": levels, "seed": 0},
        "assign": {"docs": str(GENERIC / "docs"), "embeddings": str(GENERIC / "embeddings"),
                   "clusters": str(base / "clusters"), "output": str(base / "domains")},
        "tokenize": {"domains": str(base / "domains"), "output": str(base / "tokens"), "vocab_size": 8192,
                     "holdout_fraction": 0.02, "seed": 0, **shared_tokenizer},
        "bases": {"target": str(tdir / "targets" / "spec" / "domains"),
                  "families": ["importance", "natural", "uniform", "coarse"], "domains": str(base / "domains"),
                  "clusters": str(base / "clusters"), "tokens": str(base / "tokens"), "output": str(tdir / "bases"),
                  "metrics": str(tdir / "bases.json")},
    }


def prepare(levels: list[int], target: str, spec_docs: int | None) -> None:
    if levels != TOKENIZER_LEVELS and not (levels_dir(TOKENIZER_LEVELS) / "tokens").exists():
        prepare(TOKENIZER_LEVELS, target, None)
    params = pipeline_params(levels, target, spec_docs)
    base = levels_dir(levels)
    for stage, done in ((cluster, base / "clusters"), (assign, base / "domains"), (tokens, base / "tokens")):
        if not done.exists():  # shared by every target at this granularity
            stage.run(params)
    for name in ("spec", "eval"):  # the target sets through the corpus's own stages, as dvc.yaml's target_* do
        for stage, module in (("ingest", ingest), ("embed", embed), ("assign", assign), ("tokenize", tokens)):
            run_stage(params, name, stage, module)
    bases.run(params)


def target_stores(tdir: Path) -> dict[str, str]:
    """The trainer's specialized stores for a target folder."""
    return {"target": str(tdir / "targets" / "spec" / "tokens"), "target_eval": str(tdir / "targets" / "eval" / "tokens")}


def variant_settings(spec: dict[str, Any], variant: str) -> tuple[list[int], dict[str, Any]]:
    """A variant's clustering levels and its train settings (a variant may override the experiment's levels)."""
    overrides = dict(spec.get("variants", {}).get(variant, {}))
    return overrides.pop("levels", spec["levels"]), overrides


def run_experiment(name: str, target: str, seeds: list[int], spec_docs: int | None, variants: list[str] | None,
                   steps: int | None, methods: list[str] | None = None) -> None:
    spec = EXPERIMENTS[name]
    for variant in variants or list(spec.get("variants", {"default": {}})):
        levels, overrides = variant_settings(spec, variant)
        tdir = target_dir(levels, target, spec_docs)
        if not (tdir / "bases").exists():
            prepare(levels, target, spec_docs)
        names = __import__("json").loads((tdir / "bases" / "names.json").read_text())
        coarse = [n for n in names if n.startswith("coarse:")]
        for seed in seeds:
            for label, strategy, basis_set, *method_train in spec["methods"]:
                if methods and label not in methods:
                    continue
                out = (RESULTS / spec.get("dir", name) / (target if spec_docs is None else f"{target}-{spec_docs}")
                       / variant / f"seed{seed}")
                if (out / label / "metrics.json").exists():
                    continue
                cfg = copy.deepcopy(TRAIN) | spec["train"] | overrides | (method_train[0] if method_train else {})
                # The trainer writes into <output>/<strategy>: a method labelled otherwise trains in a folder of
                # its own, so that two labels of one strategy (even side by side) never share a folder.
                run_root = out if label == strategy else out / f"_{label}"
                cfg.update(seed=seed, tokens=str(levels_dir(levels) / "tokens"), bases=str(tdir / "bases"),
                           output=str(run_root), basis_names=coarse if basis_set == "coarse" else None,
                           **target_stores(tdir))
                if steps:
                    cfg["steps"] = steps
                started = time.perf_counter()
                metrics = train.run({"train": cfg}, strategy)
                if label != strategy:
                    (run_root / strategy).rename(out / label)
                    run_root.rmdir()
                print(f"{name}/{variant}/seed{seed}/{label}: spec {metrics['final_spec_loss']:.4f} "
                      f"generic {metrics['final_generic_loss']:.4f} ({time.perf_counter() - started:.0f} s)",
                      flush=True)


def verify(name: str, target: str, seed: int, method: str, variant: str = "default") -> dict[str, Any]:
    """Re-run one recorded run into bench/work and compare its losses with the recorded metrics.json."""
    import json
    import shutil

    recorded_dir = RESULTS / EXPERIMENTS[name].get("dir", name) / target / variant / f"seed{seed}"
    recorded = json.loads((recorded_dir / method / "metrics.json").read_text())
    summary = recorded_dir / method / "summary.json"  # best_spec_loss, seconds... (older runs hold them inline)
    recorded = (json.loads(summary.read_text()) if summary.exists() else {}) | recorded
    scratch = WORK / "reproduce" / name
    shutil.rmtree(scratch, ignore_errors=True)
    spec = EXPERIMENTS[name]
    strategy, basis_set, method_train = next((s, b, m[0] if m else {}) for label, s, b, *m in spec["methods"]
                                             if label == method)
    levels, overrides = variant_settings(spec, variant)
    tdir = target_dir(levels, target, None)
    names = json.loads((tdir / "bases" / "names.json").read_text())
    cfg = copy.deepcopy(TRAIN) | spec["train"] | overrides | method_train
    cfg.update(seed=seed, tokens=str(levels_dir(levels) / "tokens"), bases=str(tdir / "bases"), output=str(scratch),
               basis_names=[n for n in names if n.startswith("coarse:")] if basis_set == "coarse" else None,
               **target_stores(tdir))
    again = train.run({"train": cfg}, strategy)
    keys = ["final_spec_loss", "best_spec_loss", "final_generic_loss", "final_weights"]
    # metrics.json rounds losses to 6 decimals (runs recorded before that did not): compare at that precision.
    same = all(round(again[k], 6) == round(recorded[k], 6) for k in keys[:3]) and again[keys[3]] == recorded[keys[3]]
    report = {"run": f"{name}/{target}/{variant}/seed{seed}/{method}",
              "identical": same,
              **{f"recorded_{k}": recorded[k] for k in keys[:3]}, **{f"rerun_{k}": again[k] for k in keys[:3]}}
    (RESULTS / EXPERIMENTS[name].get("dir", name) / "reproduced.json").write_text(json.dumps(report, indent=2) + "\n")
    print(report)
    return report


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("--target", default="medical_abstracts")
    prep.add_argument("--levels", type=int, nargs="+", default=[16, 16])
    prep.add_argument("--spec-docs", type=int, default=None)
    run = sub.add_parser("run")
    run.add_argument("experiment", choices=sorted(EXPERIMENTS))
    run.add_argument("--target", default="medical_abstracts")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--spec-docs", type=int, default=None)
    run.add_argument("--variants", nargs="+", default=None)
    run.add_argument("--steps", type=int, default=None)
    run.add_argument("--methods", nargs="+", default=None, help="a subset of the experiment's methods")
    run.add_argument("--threads", type=int, default=None,
                     help="torch threads for this process (1 per process when running several side by side; "
                          "set OMP_NUM_THREADS to the same number)")
    again = sub.add_parser("verify", help="re-run one recorded run and compare its metrics")
    again.add_argument("experiment", choices=sorted(EXPERIMENTS))
    again.add_argument("--target", default="medical_abstracts")
    again.add_argument("--seed", type=int, default=0)
    again.add_argument("--method", default="dga_ema")
    again.add_argument("--variant", default="default")
    args = parser.parse_args()
    if args.command == "verify":
        verify(args.experiment, args.target, args.seed, args.method, args.variant)
    elif args.command == "prepare":
        prepare(args.levels, args.target, args.spec_docs)
    else:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        run_experiment(args.experiment, args.target, args.seeds, args.spec_docs, args.variants, args.steps,
                       args.methods)


if __name__ == "__main__":
    main()
