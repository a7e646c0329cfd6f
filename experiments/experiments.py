"""The experiments on the development corpus: one command per experiment, every run from a fixed seed.

    .venv/bin/python bench/prepare_corpus.py            # once: ingest + embed ../shared/corpus/generic
    .venv/bin/python experiments/experiments.py prepare --target medical_abstracts [--levels 16 16] [--spec-docs N]
    .venv/bin/python experiments/experiments.py run token_limited --target medical_abstracts --seeds 0 1 2
    .venv/bin/python experiments/experiments.py run granularity --seeds 0 1 2 [--variants 4x4 32x32]  # levels each
    .venv/bin/python experiments/experiments.py verify token_limited --seed 0 --method dga_ema   # re-run, compare
    OMP_NUM_THREADS=1 .venv/bin/python experiments/experiments.py run inbatch --target T --seeds 0 --threads 1
    OMP_NUM_THREADS=1 .venv/bin/python experiments/experiments.py run frontier_all_data --target T --threads 1
    .venv/bin/python experiments/render_results.py      # RESULTS.md tables + plots from the metrics

(--threads 1 with OMP_NUM_THREADS=1: one process per core, several side by side.)

`prepare` runs the project's own stages (cluster -> assign -> tokenize -> target sets -> bases, through
pipeline.build_corpus) on the embedded corpus, into a folder per clustering under the git-ignored scratch folder
bench/work (clusters, token store with held-out generic documents) and, inside it, a folder per target (bases, the
target's spec and eval stores). `run` trains the reference GPT (dgamix.trainer.train.run) once per method and seed
and writes results/<experiment>/<target>/<variant>/seed<k>/<method>/{metrics.json,log.csv} (committed: the
evidence). The methods never see meta.domain: the bases are importance, natural, uniform and coarse clusters only
(no reference bases, which would be built from the ground-truth labels).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # bench/common.py, shared with benchmarks

import zstandard  # noqa: E402
from common import CORPUS, ROOT, WORK  # noqa: E402
from pipeline import PREPARE_STAGES, build_corpus  # noqa: E402

RESULTS = ROOT / "results"

# Train settings are dotted keys of params.yaml's nested `train` section ("data.seq_len": the trainer's
# train.data.seq_len), applied in order over the trainer's defaults (`nested_train`).
# The reference GPT at the size where one run takes one to two minutes on 2 CPU cores. DGA and DoGE share the
# alignment draw (every 20 steps, 8 sequences per basis, 16 of the target); in-batch DGA refreshes g_spe on 8.
TRAIN = {"steps": 300, "data.seq_len": 64, "data.batch_size": 16, "optim.lr": 3e-3, "model.n_layer": 2,
         "model.n_head": 4, "model.n_embd": 128, "eval.every": 50, "eval.batches": 8, "checkpoint_every": 100000,
         "data.token_cap": None, "data.basis_names": None,
         "strategy.dga.eta": 0.3, "strategy.dga.beta": 0.1, "strategy.dga.every": 20, "strategy.dga.batch_size": 8,
         "strategy.dga.target_batch_size": 16, "strategy.dga.estimator": "exact",
         "strategy.doge.every": 20, "strategy.doge.batch_size": 8, "strategy.doge.target_batch_size": 16,
         "strategy.inbatch.target_batch_size": 8,
         # The committed runs were trained with the paper's compounding rule, in-batch at its step size 0.02 on snr
         # scores with a floor of 0.001; pinned so that `verify` re-runs them as they were.
         "strategy.dga.rule": "paper", "strategy.inbatch.rule": "paper", "strategy.inbatch.eta": 0.02}

# The long runs: every speed option on (BENCHMARKS.md) with one thread per run, so that two runs go side by side on
# two cores (the scalar work between the kernels does not parallelise); a fixed evaluation seed shared by every
# seed and method, and twice the evaluation batches of the 300-step runs.
LONG_STEPS = 1000
LONG_SETTINGS = {"speed.threads": 1, "speed.precision": "auto", "speed.compile": True, "optim.adamw_impl": "fused",
                 "eval.seed": 1000, "eval.batches": 16}

FRONTIER_STEPS = 300
CHECK_STEPS = 3000

# The library's own defaults for the strategies TRAIN pins to the committed runs' settings (the paper's rule, in-batch
# eta 0.02, DoGE every 20 steps on 8 sequences): the experiments run on the anchored rule start from these.
ANCHORED_DEFAULTS = {"strategy.dga.rule": "anchored", "strategy.dga.eta": 4.0, "strategy.inbatch.rule": "anchored",
                     "strategy.inbatch.eta": 2.0, "strategy.doge.every": 1, "strategy.doge.batch_size": None}


@dataclass(frozen=True)
class Method:
    """One trained configuration of an experiment."""

    label: str  # its folder under results/.../seed<k>/ and its name in the tables
    strategy: str  # the trainer strategy (dgamix.trainer.train.run's strategy_name)
    bases: str  # "coarse": domain reweighting over the coarse clusters; "all": importance, natural, uniform, coarse
    train: dict[str, Any] = field(default_factory=dict)  # the method's own train settings (dotted keys), applied last


@dataclass(frozen=True)
class Experiment:
    """An experiment: one clustering, the train settings its methods share, its methods and variants."""

    levels: list[int]  # clusters per level of the tree (a variant may set its own)
    train: dict[str, Any]  # train settings (dotted keys) over TRAIN, shared by every method and variant
    methods: tuple[Method, ...]  # what is trained per variant and seed
    # name -> train settings (dotted keys; "levels": the variant's own clustering)
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"default": {}})
    results_dir: str | None = None  # its folder under results/ (None: the experiment's name)

    def folder(self, name: str) -> str:
        """The folder under results/ of this experiment, registered as `name`."""
        return self.results_dir or name


EXPERIMENTS: dict[str, Experiment] = {
    "token_limited": Experiment(  # paper section 3.1, Fig. 1: few tokens per cluster, the favoured clusters repeat
        levels=[16, 16], train={"data.token_cap": 4000},
        methods=(Method("uniform", "uniform", "coarse"), Method("importance", "importance", "all"),
                 Method("dga", "dga", "coarse"), Method("dga_ema", "dga_ema", "coarse"),
                 Method("odm", "odm", "coarse"))),
    "distribution": Experiment(  # section 3.2, Fig. 2: a few bases over 256 fine clusters, all the data
        levels=[16, 16], train={},
        methods=(Method("natural", "natural", "all"), Method("uniform", "uniform", "all"),
                 Method("importance", "importance", "all"), Method("dga_ema", "dga_ema", "all"),
                 Method("odm", "odm", "coarse"))),
    "token_limited_long": Experiment(  # experiment 1 run 3x longer (1 seed): does importance sampling overfit later?
        levels=[16, 16], train={"data.token_cap": 4000, "steps": 1000, "eval.every": 100},
        methods=(Method("uniform", "uniform", "coarse"), Method("importance", "importance", "all"),
                 Method("dga", "dga", "coarse"), Method("dga_ema", "dga_ema", "coarse"))),
    # Experiment 2's DGA with larger step sizes: at 15 updates, eta 0.3 barely moves alpha.
    "distribution_eta": Experiment(
        levels=[16, 16], train={},
        methods=(Method("dga_ema", "dga_ema", "all"),),
        variants={"eta3": {"strategy.dga.eta": 3.0}, "eta10": {"strategy.dga.eta": 10.0}}),
    # Fig. 4b: spec subsets (run with --spec-docs N); DGA at the step size that moves it at 300 steps.
    "few_examples": Experiment(
        levels=[16, 16], train={"strategy.dga.eta": 10.0},
        methods=(Method("importance", "importance", "all"), Method("dga_ema", "dga_ema", "all"))),
    "granularity": Experiment(  # Fig. 4a: the same comparison as the number of fine clusters grows (variants set the
        # levels; every level uses the 16x16 run's tokenizer, so the losses are in the same units)
        levels=[16, 16], train={"strategy.dga.eta": 10.0},
        methods=(Method("uniform", "uniform", "all"), Method("importance", "importance", "all"),
                 Method("dga_ema", "dga_ema", "all")),
        variants={"4x4": {"levels": [4, 4]}, "8x8": {"levels": [8, 8]}, "16x16": {"levels": [16, 16]},
                  "32x32": {"levels": [32, 32]}}),
    "ablation": Experiment(  # ablations on the token-limited setting: beta, eta, T_r, estimators (variants)
        levels=[16, 16], train={"data.token_cap": 4000},
        methods=(Method("dga_ema", "dga_ema", "coarse"),),
        # beta = 1 is experiment 1's `dga`; eta 3 and 10 go past the paper's range because at this scale the
        # scores are small (|a| ~ 0.01-0.3) and eta 0.3 barely moves the weights in 15 updates.
        variants={"beta0.05": {"strategy.dga.beta": 0.05}, "beta0.3": {"strategy.dga.beta": 0.3},
                  "eta0.1": {"strategy.dga.eta": 0.1}, "eta1": {"strategy.dga.eta": 1.0},
                  "eta3": {"strategy.dga.eta": 3.0}, "eta10": {"strategy.dga.eta": 10.0},
                  "every10": {"strategy.dga.every": 10}, "every50": {"strategy.dga.every": 50},
                  "every100": {"strategy.dga.every": 100},
                  "finite_difference": {"strategy.dga.estimator": "finite_difference"},
                  "forward": {"strategy.dga.estimator": "forward"}}),
    # In-batch DGA (trainer strategies inbatch / inbatch_domains): every training sequence's alignment with g_spe,
    # no extra backward per basis. Every method it compares with is trained here too: the other results/ folders
    # hold runs of an earlier reference GPT (its attention without today's explicit c_attn/c_proj), so only runs
    # within results/inbatch compare with each other. dga_ema: exact DGA at the step size that moves the weights at
    # 300 steps.
    "inbatch": Experiment(
        levels=[16, 16], train={},
        methods=(Method("uniform", "uniform", "all"), Method("importance", "importance", "all"),
                 Method("inbatch", "inbatch", "all"), Method("inbatch_domains", "inbatch_domains", "all"),
                 Method("dga_ema", "dga_ema", "all", {"strategy.dga.eta": 10.0}))),
    # The long runs: the headline comparisons at a length where the generic loss falls well below the 300-step
    # runs' ~7, 3 seeds each, every method on the same fixed evaluation batches (eval_seed), with the trainer's speed
    # options on (LONG_SETTINGS: bf16 autocast where the CPU has it, so compare these runs only with each other). DoGE
    # and the DGA variants reweight the same bases: the coarse clusters when tokens are limited (domain reweighting),
    # all the bases otherwise. Evaluated every 100 steps: the 300-step comparison is read from the same runs' logs.
    "long_token_limited": Experiment(
        results_dir="long/token_limited", levels=[16, 16],
        train={"data.token_cap": 4000, "steps": LONG_STEPS, "eval.every": 100, **LONG_SETTINGS},
        methods=(Method("uniform", "uniform", "coarse"), Method("importance", "importance", "all"),
                 Method("doge", "doge", "coarse"), Method("dga_ema", "dga_ema", "coarse", {"strategy.dga.eta": 10.0}),
                 Method("inbatch", "inbatch", "coarse"))),
    "long_distribution": Experiment(
        results_dir="long/distribution", levels=[16, 16],
        train={"steps": LONG_STEPS, "eval.every": 100, **LONG_SETTINGS},
        methods=(Method("uniform", "uniform", "all"), Method("importance", "importance", "all"),
                 Method("doge", "doge", "all"), Method("dga_ema", "dga_ema", "all", {"strategy.dga.eta": 10.0}),
                 Method("inbatch", "inbatch", "all"))),
    # The pilot that chose train.strategy.inbatch.scale for `inbatch` (150 steps, seed 0, every target): snr against
    # standardized at the default in-batch eta, with uniform at the same length for the generic-loss bar.
    "inbatch_pilot": Experiment(
        results_dir="inbatch/pilot", levels=[16, 16], train={"steps": 150},
        methods=(Method("uniform", "uniform", "all"),
                 Method("inbatch_snr", "inbatch", "all", {"strategy.inbatch.scale": "snr"}),
                 Method("inbatch_standardized", "inbatch", "all", {"strategy.inbatch.scale": "standardized"}))),
    # The pilot that chose the anchored rule's defaults (train.strategy.dga and .inbatch: eta, tau), every target,
    # seed 0, all the data, 300 steps with the long runs' speed options and fixed evaluation batches: exact DGA
    # (dga_ema) and in-batch DGA over the bases at eta 2, 4, 8 (tau 0.25) and tau 0.5 (eta 4), against uniform and
    # importance sampling at the same length.
    "anchored_pilot": Experiment(
        results_dir="anchored/pilot", levels=[16, 16],
        train={"eval.every": 100, **LONG_SETTINGS, "strategy.dga.rule": "anchored",
               "strategy.inbatch.rule": "anchored", "strategy.inbatch.eta": 4.0},
        methods=(Method("uniform", "uniform", "all"), Method("importance", "importance", "all"),
                 *(Method(f"dga_ema_eta{eta:g}", "dga_ema", "all", {"strategy.dga.eta": eta})
                   for eta in (2.0, 4.0, 8.0)),
                 Method("dga_ema_tau0.5", "dga_ema", "all", {"strategy.dga.eta": 4.0, "strategy.dga.tau": 0.5}),
                 *(Method(f"inbatch_eta{eta:g}", "inbatch", "all", {"strategy.inbatch.eta": eta})
                   for eta in (2.0, 4.0, 8.0)),
                 Method("inbatch_tau0.5", "inbatch", "all",
                        {"strategy.inbatch.eta": 4.0, "strategy.inbatch.tau": 0.5}))),
    # The static frontier: does DGA beat what a user gets for free? Each regime's methods on the anchored rule at the
    # library's defaults, against uniform, importance and the static blends lam * importance + (1 - lam) * uniform;
    # DoGE at its reference cadence (an update every step) and exact DGA on the paper's rule at the long runs' eta.
    # Token-limited: the online methods reweight the coarse clusters (domain reweighting, as the long runs), the
    # blends mix the importance basis with the uniform weights over all the bases. FRONTIER_STEPS, not LONG_STEPS:
    # 10 methods x 3 targets x 2 regimes x 3 seeds at 1,000 steps is about 10 hours on 2 cores; at 300 steps the
    # whole grid fits in about 3.
    **{f"frontier_{regime}": Experiment(
        results_dir=f"frontier/{regime}", levels=[16, 16],
        train={**cap, "steps": FRONTIER_STEPS, "eval.every": 100, **LONG_SETTINGS, **ANCHORED_DEFAULTS},
        methods=(Method("uniform", "uniform", "all"), Method("importance", "importance", "all"),
                 *(Method(f"blend{int(share * 100)}", "blend", "all", {"strategy.blend": share})
                   for share in (0.25, 0.5, 0.75)),
                 Method("doge", "doge", online),
                 Method("dga_paper", "dga_ema", online, {"strategy.dga.rule": "paper", "strategy.dga.eta": 10.0}),
                 Method("dga_anchored", "dga_ema", online), Method("inbatch", "inbatch", online),
                 Method("inbatch_domains", "inbatch_domains", "all"),
                 # Where the online methods reweight the coarse clusters, their starting mixture (uniform over
                 # those clusters, no importance share) is not `uniform` (uniform over all the bases): run it too,
                 # so a method's movement is also measured from its own start (the paper's uniform baseline).
                 *((Method("uniform_coarse", "uniform", "coarse"),) if online == "coarse" else ())))
       for regime, cap, online in (("token_limited", {"data.token_cap": 4000}, "coarse"),
                                   ("all_data", {}, "all"))},
}
# The frontier at LONG_STEPS, the planned length, in both regimes (every method). Run so far, in both regimes: every
# method but DoGE and the paper's rule (--methods uniform importance blend25 blend50 blend75 dga_anchored inbatch
# inbatch_domains, and uniform_coarse with the token limit), about 4.5 hours for 3 targets x 3 seeds x 2 regimes on
# 2 cores; DoGE (about 14 minutes a run) and the paper's rule are about 3 hours more, and `run` skips the runs
# already there.
for _regime in ("all_data", "token_limited"):
    EXPERIMENTS[f"frontier_{_regime}_long"] = replace(
        EXPERIMENTS[f"frontier_{_regime}"], results_dir=f"frontier/{_regime}_long",
        train={**EXPERIMENTS[f"frontier_{_regime}"].train, "steps": LONG_STEPS})
# The longer check (3,000 steps, all the data, run on code_python): the method closest to the frontier at 1,000 steps
# (anchored exact DGA, on code_python, the target where it came closest at both lengths) against the static points at
# its generic loss: uniform and the nearest blend.
EXPERIMENTS["frontier_all_data_check"] = replace(
    EXPERIMENTS["frontier_all_data_long"], results_dir="frontier/all_data_check",
    train={**EXPERIMENTS["frontier_all_data_long"].train, "steps": CHECK_STEPS},
    methods=tuple(m for m in EXPERIMENTS["frontier_all_data_long"].methods
                  if m.label in ("uniform", "blend25", "dga_anchored")))


# The clustering whose tokenizer every other clustering reuses: the BPE is trained on a sample of the assigned
# shards, which are ordered by cluster, so a tokenizer per clustering would make losses incomparable across levels.
TOKENIZER_LEVELS = [16, 16]


@dataclass(frozen=True)
class Layout:
    """Where the experiments read the corpus (generic/part-*, targets/NAME/{spec,eval}.jsonl.zst) and write their
    scratch and their results. The defaults are this script's; gpu_suite.py passes its own (another corpus
    copy, another scratch folder, one tokenizer per clustering since it runs a single clustering)."""

    corpus: Path = CORPUS
    work: Path = WORK
    results: Path = RESULTS
    tokenizer_levels: tuple[int, ...] | None = tuple(TOKENIZER_LEVELS)  # None: each clustering trains its own

    @property
    def generic(self) -> Path:
        """The ingested and embedded generic corpus (bench/prepare_corpus.py writes it)."""
        return self.work / "generic"

    def target_set(self, target: str, name: str) -> Path:
        return self.corpus / "targets" / target / f"{name}.jsonl.zst"


DEFAULT_LAYOUT = Layout()


def portable_summary(path: Path) -> None:
    """The trainer names its evaluation stores by path; a committed summary names them relative to the repository
    (the same runs read the same files on any checkout)."""
    if path.exists():
        path.write_text(path.read_text().replace(str(ROOT) + "/", ""))


def levels_dir(levels: list[int], layout: Layout = DEFAULT_LAYOUT) -> Path:
    return layout.work / "exp" / "x".join(map(str, levels))


def target_dir(levels: list[int], target: str, spec_docs: int | None, layout: Layout = DEFAULT_LAYOUT) -> Path:
    return levels_dir(levels, layout) / (target if spec_docs is None else f"{target}-{spec_docs}")


def spec_prefix(target: str, n: int, out: Path, layout: Layout = DEFAULT_LAYOUT) -> Path:
    """The first n records of the target's spec set (spec is in random order: a prefix is a random subset)."""
    with open(layout.target_set(target, "spec"), "rb") as fh:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8", newline="\n")
        kept = [line for _, line in zip(range(n), text)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(zstandard.ZstdCompressor().compress("".join(kept).encode()))
    return out


def shares_tokenizer(levels: list[int], layout: Layout) -> bool:
    """Whether this clustering reuses the tokenizer of layout.tokenizer_levels (rather than training its own)."""
    return layout.tokenizer_levels is not None and list(levels) != list(layout.tokenizer_levels)


def pipeline_params(levels: list[int], target: str, spec_docs: int | None,
                    layout: Layout = DEFAULT_LAYOUT) -> dict[str, Any]:
    base, tdir = levels_dir(levels, layout), target_dir(levels, target, spec_docs, layout)
    generic = layout.generic
    shared_tokenizer = ({"tokenizer": str(levels_dir(list(layout.tokenizer_levels), layout) / "tokens"
                                          / "tokenizer.json")}
                        if shares_tokenizer(levels, layout) else {})
    spec = (spec_prefix(target, spec_docs, tdir / "spec.jsonl.zst", layout) if spec_docs
            else layout.target_set(target, "spec"))
    return {
        "embed": {"output": str(generic / "embeddings")},
        "targets": {"sets": {"spec": [str(spec)], "eval": [str(layout.target_set(target, "eval"))]},
                    "output": str(tdir / "targets"), "metrics": str(tdir / "targets")},
        "cluster": {"embeddings": str(generic / "embeddings"), "docs": str(generic / "docs"),
                    "output": str(base / "clusters"), "levels": levels, "seed": 0},
        "assign": {"docs": str(generic / "docs"), "embeddings": str(generic / "embeddings"),
                   "clusters": str(base / "clusters"), "output": str(base / "domains")},
        "tokenize": {"domains": str(base / "domains"), "output": str(base / "tokens"), "vocab_size": 8192,
                     "holdout_fraction": 0.02, "seed": 0, **shared_tokenizer},
        "bases": {"target": str(tdir / "targets" / "spec" / "domains"),
                  "families": ["importance", "natural", "uniform", "coarse"], "domains": str(base / "domains"),
                  "clusters": str(base / "clusters"), "tokens": str(base / "tokens"), "output": str(tdir / "bases"),
                  "metrics": str(tdir / "bases.json")},
    }


def prepare(levels: list[int], target: str, spec_docs: int | None, layout: Layout = DEFAULT_LAYOUT) -> None:
    """The clustering at `levels` (reused when already there: shared by every target) and the target's sets and
    bases, through pipeline.build_corpus; first the clustering whose tokenizer this one shares, if not there."""
    if shares_tokenizer(levels, layout):
        shared = list(layout.tokenizer_levels)
        if not (levels_dir(shared, layout) / "tokens").exists():
            prepare(shared, target, None, layout)
    build_corpus(pipeline_params(levels, target, spec_docs, layout), PREPARE_STAGES)


def target_stores(tdir: Path) -> dict[str, str]:
    """The trainer's specialized stores for a target folder."""
    return {"target": str(tdir / "targets" / "spec" / "tokens"),
            "target_eval": str(tdir / "targets" / "eval" / "tokens")}


def variant_settings(spec: Experiment, variant: str) -> tuple[list[int], dict[str, Any]]:
    """A variant's clustering levels and its train settings (a variant may override the experiment's levels)."""
    overrides = dict(spec.variants.get(variant, {}))
    return overrides.pop("levels", spec.levels), overrides


def seed_dir(name: str, target: str, spec_docs: int | None, variant: str, seed: int,
             layout: Layout = DEFAULT_LAYOUT, spec: Experiment | None = None) -> Path:
    """results/<experiment dir>/<target>/<variant>/seed<k>: where a seed's runs write their folders."""
    spec = EXPERIMENTS[name] if spec is None else spec
    return (layout.results / spec.folder(name) / (target if spec_docs is None else f"{target}-{spec_docs}")
            / variant / f"seed{seed}")


def method_config(spec: Experiment, variant: str, method: Method, seed: int, target: str,
                  spec_docs: int | None, output: Path, layout: Layout = DEFAULT_LAYOUT,
                  steps: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `train` section of one run (nested, as params.yaml holds it): TRAIN, then the experiment's, the
    variant's and the method's own settings, then the run's data (the prepared clustering and target) and
    train.paths.output (the trainer's default output root; the harness names each run's own folder to train.run),
    then `steps` and `extra` (dotted settings of the caller's own)."""
    levels, overrides = variant_settings(spec, variant)
    tdir = target_dir(levels, target, spec_docs, layout)
    names = json.loads((tdir / "bases" / "names.json").read_text())
    coarse = [n for n in names if n.startswith("coarse:")]
    settings = copy.deepcopy(TRAIN) | spec.train | overrides | method.train
    settings.update({"seed": seed, "paths.tokens": str(levels_dir(levels, layout) / "tokens"),
                     "paths.bases": str(tdir / "bases"), "paths.output": str(output),
                     "data.basis_names": coarse if method.bases == "coarse" else None,
                     **{f"paths.{k}": v for k, v in target_stores(tdir).items()}})
    if steps:
        settings["steps"] = steps
    return nested_train(settings | (extra or {}))


def nested_train(settings: dict[str, Any]) -> dict[str, Any]:
    """Dotted train settings ({"data.seq_len": 64}) as the nested `train` section ({"data": {"seq_len": 64}})."""
    section: dict[str, Any] = {}
    for dotted, value in settings.items():
        node = section
        *parents, key = dotted.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = copy.deepcopy(value)
    return section


def run_experiment(name: str, target: str, seeds: list[int], spec_docs: int | None, variants: list[str] | None,
                   steps: int | None, methods: list[str] | None = None, layout: Layout = DEFAULT_LAYOUT,
                   spec: Experiment | None = None) -> None:
    """Train every (variant, seed, method) of an experiment whose metrics.json is not there yet, each into
    <seed dir>/<method label>. `spec`: an experiment defined by the caller, stored under results/<its folder>."""
    # Imported here: torch loads only once a run trains (gpu_suite.py hides CUDA before that for a CPU run).
    from dgamix.trainer import train

    spec = EXPERIMENTS[name] if spec is None else spec
    for variant in variants or list(spec.variants):
        levels, _ = variant_settings(spec, variant)
        tdir = target_dir(levels, target, spec_docs, layout)
        if not (tdir / "bases").exists():
            prepare(levels, target, spec_docs, layout)
        for seed in seeds:
            for method in spec.methods:
                if methods and method.label not in methods:
                    continue
                out = seed_dir(name, target, spec_docs, variant, seed, layout, spec)
                if (out / method.label / "metrics.json").exists():
                    continue
                cfg = method_config(spec, variant, method, seed, target, spec_docs, out, layout, steps)
                started = time.perf_counter()
                metrics = train.run({"train": cfg}, method.strategy, out_dir=out / method.label)
                portable_summary(out / method.label / "summary.json")
                print(f"{name}/{variant}/seed{seed}/{method.label}: spec {metrics['final_spec_loss']:.4f} "
                      f"generic {metrics['final_generic_loss']:.4f} ({time.perf_counter() - started:.0f} s)",
                      flush=True)


def verify(name: str, target: str, seed: int, method: str, variant: str = "default") -> dict[str, Any]:
    """Re-run one committed run of results/ into the scratch folder and compare its losses and final weights with
    its metrics.json; writes results/<experiment dir>/reproduced.json."""
    from dgamix.trainer import train

    spec = EXPERIMENTS[name]
    committed_dir = RESULTS / spec.folder(name) / target / variant / f"seed{seed}"
    recorded = json.loads((committed_dir / method / "metrics.json").read_text())
    summary = committed_dir / method / "summary.json"  # best_spec_loss, seconds... (some runs keep them inline)
    recorded = (json.loads(summary.read_text()) if summary.exists() else {}) | recorded
    scratch = WORK / "reproduce" / name
    shutil.rmtree(scratch, ignore_errors=True)
    chosen = next(m for m in spec.methods if m.label == method)
    cfg = method_config(spec, variant, chosen, seed, target, None, scratch)
    again = train.run({"train": cfg}, chosen.strategy, out_dir=scratch / chosen.label)
    keys = ["final_spec_loss", "best_spec_loss", "final_generic_loss", "final_weights"]
    # metrics.json rounds losses to 6 decimals (some committed files keep more): compare at that precision.
    same = all(round(again[k], 6) == round(recorded[k], 6) for k in keys[:3]) and again[keys[3]] == recorded[keys[3]]
    report = {"run": f"{name}/{target}/{variant}/seed{seed}/{method}",
              "identical": same,
              **{f"recorded_{k}": recorded[k] for k in keys[:3]}, **{f"rerun_{k}": again[k] for k in keys[:3]}}
    (RESULTS / spec.folder(name) / "reproduced.json").write_text(json.dumps(report, indent=2) + "\n")
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
    again = sub.add_parser("verify", help="re-run one committed run and compare its metrics")
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
