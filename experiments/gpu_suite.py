"""The main experiments at GPU scale in one command: corpus -> embed -> k-means -> tokens -> bases -> seeds x methods.

    python experiments/gpu_suite.py --corpus DIR                 # one H100/H200, sized for <= 10 minutes
    python experiments/gpu_suite.py --corpus DIR --toy           # toy size on the CPU (the smoke test, ~2 minutes)
    python experiments/gpu_suite.py --corpus data/sample --toy   # the embedded sample (its single target: `sample`)

DIR holds generic/part-*.jsonl.zst and targets/NAME/{spec,eval}.jsonl.zst (default: ../shared/corpus beside the
repository; the embedded sample's layout, target/{spec,eval}.jsonl.zst, is read as the target `sample`).

What it runs, with the project's own stages (pipeline.build_corpus, as experiments.py's `prepare` runs them):
ingest and embed the generic corpus (MiniLM, torch backend, fp16 on CUDA), fit the 64 x 64 = 4,096-cluster tree,
assign, tokenize (8,192-token BPE), the target's stages and the bases; then the reference GPT (8 layers, 8 heads,
512 wide: 29.7 M parameters; sequences of 512 tokens, bf16 autocast) under the methods of experiments.py's
frontier experiments: uniform, importance, the static blends lambda * importance + (1 - lambda) * uniform at lambda
0.25, 0.5, 0.75, DoGE at its reference cadence (every step), exact DGA on the paper's rule (eta 10), anchored exact
DGA, anchored in-batch DGA over the bases and over the 4,096 fine clusters, all at the library's defaults
(experiments.ANCHORED_DEFAULTS), seeds 0 1 2, every run evaluated on the same fixed batches (train.eval.seed).
Before training it times each method's step after a warm-up and prints the estimate; it stops
there when the estimate does not fit --budget-minutes (--force runs anyway).

Outputs: results/gpu_suite/<target>/default/seed<k>/<method>/{metrics.json,summary.json,log.csv,...} (as
experiments.py writes them), the table (default/table.md, render_results.py's comparison: paired Δ
against importance and uniform at the end and halfway, how far each method's weights moved), its plain statements
(default/statements.md) and curves (default/spec_curves.png, default/generic_loss_curves.png), the static
frontier's figure, table and statements (default/frontier.png, default/frontier.md: render_frontier.py), and the GPU
figures (<target>/figures.{json,md}: embedding documents/s, k-means seconds, training tokens/s per method, each
method's time over uniform's: the overhead of exact and in-batch DGA). --toy writes under its scratch folder
(bench/work/gpu_suite_toy/results) unless --results says otherwise.
Re-running resumes: stages whose outputs exist and runs whose metrics.json exists are skipped.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import shutil
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # bench/common.py, shared with benchmarks

from common import CORPUS, ROOT, WORK, machine  # noqa: E402
import experiments  # noqa: E402
from experiments import ANCHORED_DEFAULTS, Experiment, Method  # noqa: E402
from pipeline import build_corpus  # noqa: E402

NAME = "gpu_suite"
# The all-data frontier experiment's methods (experiments.py): every online method over the same bases (importance,
# natural, uniform and the 64 coarse clusters), inbatch_domains over the 4,096 fine clusters.
METHODS: tuple[Method, ...] = experiments.EXPERIMENTS["frontier_all_data"].methods
EVAL_SEED = 1000  # one set of evaluation batches for every seed and method: the spread over seeds is training's

# GPU size. Sizing (one H100/H200, bf16): a step is 32 x 512 = 16,384 tokens, ~6 x 29.7 M x 16,384 = 2.9 TFLOP
# forward + backward, tens of ms eagerly; exact DGA adds (67 bases x 8 + 16) sequences of fwd+bwd every 20 steps
# = 552 / (20 x 32) ~ 0.86 of the training compute; DoGE at every step one sequence per basis and the target's,
# 68 / 32 ~ 2.1; the in-batch strategies ~0.4-0.8 (the second dot product of the anchored rule). 400 steps x
# (5 x 1 + 3.1 + 2 x 1.86 + 2 x ~1.6) ~ 15 uniform-run equivalents per seed: at ~25 ms/step, 400 x 0.025 x 15 x 3
# ~ 450 s of training, plus ~1-2 min of corpus stages. The measured estimate is what decides.
GPU_TRAIN: dict[str, Any] = {  # dotted keys of the train section, as experiments.py's
    "steps": 400, "data.seq_len": 512, "data.batch_size": 32, "optim.lr": 1e-3, "model.n_layer": 8,
    "model.n_head": 8, "model.n_embd": 512, "eval.every": 100, "eval.batches": 8, "checkpoint_every": 100000,
    "data.token_cap": None, "strategy.dga.eta": 0.3, "strategy.dga.beta": 0.1, "strategy.dga.every": 20,
    "strategy.dga.batch_size": 8, "strategy.dga.target_batch_size": 16, "strategy.dga.estimator": "exact",
    "strategy.doge.every": 20, "strategy.doge.batch_size": 8, "strategy.doge.target_batch_size": 16,
    "strategy.inbatch.target_batch_size": 8, "strategy.dga.rule": "paper", "strategy.inbatch.rule": "paper",
    "strategy.inbatch.eta": 0.02, "eval.seed": EVAL_SEED, "speed.precision": "bf16",
    "speed.compile": False, "optim.adamw_impl": "fused", "speed.threads": None,
    **ANCHORED_DEFAULTS}  # the anchored rule and DoGE's reference cadence, at the library's defaults
# Toy size: every code path of the GPU run (same methods, stages and outputs), small enough for 2 CPU cores.
TOY_TRAIN: dict[str, Any] = GPU_TRAIN | {
    "steps": 12, "data.seq_len": 32, "data.batch_size": 4, "optim.lr": 3e-3, "model.n_layer": 1, "model.n_head": 2,
    "model.n_embd": 32, "eval.every": 6, "eval.batches": 1, "strategy.dga.every": 4, "strategy.dga.batch_size": 2,
    "strategy.dga.target_batch_size": 2, "strategy.doge.target_batch_size": 2,
    "strategy.inbatch.target_batch_size": 2, "strategy.inbatch.refresh": 4,
    "strategy.inbatch.min_sequences": 1, "speed.precision": "fp32", "optim.adamw_impl": None}
GPU_LEVELS, TOY_LEVELS = [64, 64], [4, 4]
TOY_DOCS_PER_SHARD = 150  # 300 documents from the sample's two shards: 16 clusters of ~19 documents
WARMUP_STEPS = 3  # first steps pay for CUDA context, cuBLAS handles and allocator growth: not timed

log = logging.getLogger("gpu_suite")


def suite_spec(toy: bool) -> Experiment:
    """The suite as an experiments.py experiment (its runs go through run_experiment)."""
    return Experiment(levels=TOY_LEVELS if toy else GPU_LEVELS, train=TOY_TRAIN if toy else GPU_TRAIN,
                      methods=METHODS, results_dir=NAME)


# ---- device and corpus -------------------------------------------------------------------------------------------
def check_device(device: str) -> str:
    """The device to run on; exits with a message when CUDA is asked for and absent (before any work)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_suite: --device cuda, but torch sees no CUDA device (torch "
                 f"{torch.__version__}, CUDA build {torch.version.cuda}): run on a GPU machine, or pass --toy "
                 "(toy size on the CPU) or --device cpu")
    return device


def target_source(corpus: Path, target: str) -> tuple[str, Path]:
    """(target name, folder holding its spec/eval sets): targets/NAME/, or the embedded sample's target/."""
    if (corpus / "targets" / target / "spec.jsonl.zst").exists():
        return target, corpus / "targets" / target
    if not (corpus / "targets").exists() and (corpus / "target" / "spec.jsonl.zst").exists():
        return "sample", corpus / "target"
    sys.exit(f"gpu_suite: --corpus {corpus} has no targets/{target}/spec.jsonl.zst (expected generic/*.jsonl.zst "
             "and targets/NAME/{spec,eval}.jsonl.zst)")


def check_corpus(corpus: Path) -> list[Path]:
    shards = sorted((corpus / "generic").glob("*.jsonl.zst"))
    if not shards:
        sys.exit(f"gpu_suite: --corpus {corpus} has no generic/*.jsonl.zst")
    return shards


def toy_corpus(corpus: Path, target: str, out: Path, docs_per_shard: int) -> tuple[str, Path]:
    """A cut of the corpus for the toy run: the first docs_per_shard records of each generic shard (as
    tests/conftest.py cuts the sample) and the target's sets, in the layout the suite reads."""
    import zstandard

    name, source = target_source(corpus, target)
    if not (out / "generic").exists():
        (out / "targets" / name).mkdir(parents=True, exist_ok=True)
        tmp = out / "generic.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        for i, shard in enumerate(check_corpus(corpus)):
            with open(shard, "rb") as fh:
                reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8",
                                          newline="\n")
                kept = "".join(line for _, line in zip(range(docs_per_shard), reader))
            (tmp / f"part-{i:05d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(kept.encode()))
        for split in ("spec", "eval"):
            shutil.copy(source / f"{split}.jsonl.zst", out / "targets" / name / f"{split}.jsonl.zst")
        tmp.rename(out / "generic")
    return name, out


# ---- stages ----------------------------------------------------------------------------------------------------
def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_stages(layout: experiments.Layout, levels: list[int], target: str, device: str) -> dict[str, Any]:
    """Ingest, embed, cluster, assign, tokenize, then the target's stages and the bases, each timed, each through
    pipeline.build_corpus. A stage done by an earlier call is skipped and its figure read back from
    figures_prep.json; a stage without its figure runs again."""
    import prepare_corpus

    from dgamix.pipeline.kmeans import resolve_backend

    record = layout.work / "figures_prep.json"
    figures: dict[str, Any] = json.loads(record.read_text()) if record.exists() else {}
    # Larger batches keep the GPU busy (MiniLM in fp16); on the CPU the stage's default is as fast.
    corpus_params = prepare_corpus.params("torch", layout.corpus, layout.generic,
                                          {"device": device, "batch_size": 256 if device == "cuda" else 64})
    # Every path of the stage in the scratch folder: the report's default is relative (data/ingest/report.json), and
    # run from the repository it replaced the project's own ingest report.
    corpus_params["ingest"]["report"] = str(layout.generic / "report.json")

    def stage(key: str, done: Path, fn: Any) -> None:
        if done.exists() and key in figures:
            log.info("%s: done before (%.1f s then)", key, figures[key]["seconds"])
            return
        sync()
        started = time.perf_counter()
        out = fn()
        sync()
        figures[key] = {"seconds": round(time.perf_counter() - started, 3), **(out or {})}
        record.write_text(json.dumps(figures, indent=2) + "\n")
        log.info("%s: %.1f s %s", key, figures[key]["seconds"], out or "")

    def again(params: dict[str, Any], *names: str) -> dict[str, Any]:
        """The stages run now (resume=False: `stage` has already decided that they must run)."""
        return build_corpus(params, names, resume=False)

    stage("ingest", layout.generic / "docs", lambda: {"documents": again(corpus_params, "ingest")["ingest"]["kept"]})
    stage("embed", layout.generic / "embed.done", lambda: embed_all(corpus_params, layout, device))
    figures["embed"]["docs_per_s"] = round(figures["ingest"]["documents"] / figures["embed"]["seconds"], 1)
    params = experiments.pipeline_params(levels, target, None, layout)
    base = experiments.levels_dir(levels, layout)
    stage("kmeans", base / "clusters",
          lambda: again(params, "cluster")["cluster"] | {"backend": resolve_backend("auto")})
    stage("assign", base / "domains", lambda: again(params, "assign") and None)

    def tokenize() -> dict[str, Any]:
        again(params, "tokenize")
        return {"tokens": json.loads((base / "tokens" / "store.json").read_text())["tokens"]}

    stage("tokenize", base / "tokens", tokenize)
    tdir = experiments.target_dir(levels, target, None, layout)
    stage("target_and_bases", tdir / "bases", lambda: again(params, "targets", "bases") and None)
    record.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def embed_all(params: dict[str, Any], layout: experiments.Layout, device: str) -> dict[str, Any]:
    """The corpus's embedding (resumable shard by shard), then the marker saying it is complete."""
    summary = build_corpus(params, ["embed"])["embed"]
    (layout.generic / "embed.done").write_text("")  # the timed figure belongs to a complete embedding
    return {"shards": summary["shards"], "device": device, "batch_size": params["embed"]["batch_size"]}


# ---- budget -----------------------------------------------------------------------------------------------------
def calibrate(spec: Experiment, target: str, layout: experiments.Layout,
              scratch: Path) -> dict[str, dict[str, float]]:
    """Per method, with the suite's settings (seed 0): seconds to build the run, per training step after
    WARMUP_STEPS (over a window holding one update of every strategy), and per evaluation. Nothing is written."""
    out: dict[str, dict[str, float]] = {}
    for method in spec.methods:
        cfg = experiments.method_config(spec, "default", method, 0, target, None, scratch / method.label, layout)
        out[method.label] = time_steps(cfg, method.strategy)
        log.info("calibrate %s: %.1f ms/step (%d steps after %d warm-up), eval %.2f s, build %.2f s", method.label,
                 1000 * out[method.label]["step_s"], out[method.label]["window_steps"], WARMUP_STEPS,
                 out[method.label]["eval_s"], out[method.label]["build_s"])
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def time_steps(cfg: dict[str, Any], strategy: str) -> dict[str, float]:
    """One method's build, step and evaluation seconds, without writing a run (the trainer's `TrainingRun`, stepped
    here instead of trained to the end)."""
    import torch

    from dgamix.trainer.train import TrainingRun

    sync()
    started = time.perf_counter()
    training = TrainingRun({"train": cfg}, strategy)
    sync()
    build_s = time.perf_counter() - started
    # The window covers one DGA/DoGE update, one in-batch refresh and whole in-batch update periods.
    settings = training.config.train.strategy
    window = max(settings.dga.every, settings.doge.every, settings.inbatch.refresh, settings.inbatch.every)
    for _ in range(WARMUP_STEPS):
        training.step()
    sync()
    started = time.perf_counter()
    for _ in range(window):
        training.step()
    sync()
    step_s = (time.perf_counter() - started) / window
    started = time.perf_counter()
    training.evaluate()
    sync()
    eval_s = time.perf_counter() - started
    del training
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"build_s": round(build_s, 4), "step_s": round(step_s, 5), "eval_s": round(eval_s, 4),
            "window_steps": window}


def run_seconds(timing: dict[str, float], steps: int, eval_every: int) -> float:
    """Pure: one run's estimated seconds: build, steps x step time, and its evaluations (every eval_every steps and
    at the end)."""
    evals = steps // eval_every + (1 if steps % eval_every else 0)
    return timing["build_s"] + steps * timing["step_s"] + evals * timing["eval_s"]


def estimate(timings: dict[str, dict[str, float]], todo: dict[str, int], steps: int,
             eval_every: int) -> dict[str, float]:
    """Pure: estimated seconds per method for its runs still to do (todo: runs per method)."""
    return {label: n * run_seconds(timings[label], steps, eval_every) for label, n in todo.items()}


def steps_that_fit(timings: dict[str, dict[str, float]], todo: dict[str, int], seconds: float,
                   eval_every: int) -> int:
    """Pure: the most steps per run whose estimate fits in `seconds` (0 when not even the fixed costs fit)."""
    fixed = sum(n * timings[m]["build_s"] for m, n in todo.items())
    per_step = sum(n * (timings[m]["step_s"] + timings[m]["eval_s"] / eval_every) for m, n in todo.items())
    return max(0, int((seconds - fixed) / per_step)) if per_step > 0 else 0


# ---- figures ----------------------------------------------------------------------------------------------------
def training_figures(variant_dir: Path, tokens_per_step: int) -> dict[str, dict[str, Any]]:
    """Per method, from the runs' own summary.json: seconds per run, training tokens/s (evaluation included, as
    the run's `seconds` is), and the time over uniform's on the same seed minus 1 (the method's overhead)."""
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(variant_dir.glob("seed*/*/summary.json")):
        summary = json.loads(path.read_text())
        runs.setdefault(path.parent.name, {})[path.parent.parent.name] = summary
    order = [m.label for m in METHODS]
    runs = {m: runs[m] for m in sorted(runs, key=lambda m: order.index(m) if m in order else len(order))}
    uniform = runs.get("uniform", {})
    out: dict[str, dict[str, Any]] = {}
    for label, by_seed in runs.items():
        seconds = [s["seconds"] for s in by_seed.values()]
        tokens_per_s = [s["steps"] * tokens_per_step / s["seconds"] for s in by_seed.values()]
        overhead = [s["seconds"] / uniform[seed]["seconds"] - 1 for seed, s in by_seed.items() if seed in uniform]
        out[label] = {"runs": len(by_seed), "seconds_per_run": round(sum(seconds) / len(seconds), 2),
                      "parameters": next(iter(by_seed.values()))["parameters"],
                      "precision": next(iter(by_seed.values())).get("precision"),
                      "tokens_per_s": round(sum(tokens_per_s) / len(tokens_per_s)) if tokens_per_s else None,
                      "overhead_vs_uniform": round(sum(overhead) / len(overhead), 4) if overhead else None}
    return out


def figures_markdown(figures: dict[str, Any]) -> str:
    prep, train_figs = figures["stages"], figures["training"]
    gpu = figures["machine"].get("gpu", "no GPU")
    lines = [f"GPU suite figures: {figures['device']} ({gpu}), torch {figures['machine'].get('torch')}, "
             f"{figures['date']}; {figures['mode']} size.", "",
             "| stage | seconds | figure |", "|---|---|---|",
             f"| ingest | {prep['ingest']['seconds']:.1f} | {prep['ingest']['documents']:,} documents |",
             f"| embed (MiniLM, torch, batch {prep['embed']['batch_size']}; loading the encoder included) | {prep['embed']['seconds']:.1f} | "
             f"**{prep['embed']['docs_per_s']:,.0f} documents/s** |",
             f"| k-means {prep['kmeans']['levels']} ({prep['kmeans']['backend']}) | "
             f"**{prep['kmeans']['seconds']:.1f}** | {prep['kmeans']['fit_points']:,} fit points |",
             f"| assign | {prep['assign']['seconds']:.1f} | |",
             f"| tokenize | {prep['tokenize']['seconds']:.1f} | {prep['tokenize']['tokens']:,} tokens |",
             f"| target stages + bases | {prep['target_and_bases']['seconds']:.1f} | |", "",
             "| method | runs | seconds per run | training tokens/s | time over uniform − 1 (overhead) | "
             "calibrated ms/step |", "|---|---|---|---|---|---|"]
    for label, row in train_figs.items():
        calibrated = figures["calibration"].get(label, {}).get("step_s")
        overhead = row["overhead_vs_uniform"]
        lines.append(f"| {label} | {row['runs']} | {row['seconds_per_run']:.1f} | "
                     f"{row['tokens_per_s'] or 0:,} | {'–' if overhead is None else f'{overhead:+.1%}'} | "
                     f"{'–' if calibrated is None else f'{1000 * calibrated:.1f}'} |")
    lines += ["", f"Estimated before training: {figures['estimate_s']:.0f} s for the runs to do; total wall time "
              f"{figures['total_s']:.0f} s (budget {figures['budget_minutes']} min). Overhead: a method's seconds "
              "per run over uniform's on the same seed, minus 1 (dga_paper, dga_anchored and doge: per-basis "
              "gradients; "
              "inbatch, inbatch_domains: in-batch alignment)."]
    return "\n".join(lines)


def render(variant_dir: Path, steps: int, eval_every: int) -> str:
    """render_results.py's comparison (the long runs' table: paired Δ vs importance and uniform, at the end and
    halfway, how far the weights moved) into table.md, its plain statements into statements.md, and the curves."""
    import render_results

    halfway = max(eval_every, steps // 2 // eval_every * eval_every)  # an evaluated step
    by_method = render_results.collect_curves(variant_dir, tuple(m.label for m in METHODS), halfway)
    table = render_results.comparison_table(by_method, halfway)
    statements = render_results.long_statements(by_method, halfway)
    (variant_dir / "table.md").write_text(table + "\n")
    (variant_dir / "statements.md").write_text("".join(f"- {s}\n" for s in statements))
    render_results.spec_curves(variant_dir, list(by_method))
    render_results.loss_curves(variant_dir, list(by_method), "generic_loss")
    frontier = frontier_report(variant_dir)
    return table + "\n\n" + "\n".join(f"- {s}" for s in statements) + "\n\n" + frontier


def frontier_report(variant_dir: Path) -> str:
    """The static frontier as the development runs show it (render_frontier.py, all the data): frontier.png, and
    the table and statements in frontier.md."""
    import render_frontier

    runs = render_frontier.load_runs(variant_dir)
    rows = render_frontier.method_rows(runs)
    render_frontier.frontier_plot(variant_dir, runs, f"{variant_dir.parent.name}, GPU suite (mean ± std over seeds)")
    report = (render_frontier.target_table(rows) + "\n\n"
              + "".join(f"- {s}\n" for s in render_frontier.target_statements("all_data", rows)))
    (variant_dir / "frontier.md").write_text(report)
    return report


# ---- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=CORPUS,
                        help="generic/*.jsonl.zst and targets/NAME/{spec,eval}.jsonl.zst (default ../shared/corpus)")
    parser.add_argument("--target", default="medical_abstracts")
    parser.add_argument("--toy", action="store_true", help="toy size on the CPU: the smoke test")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default=None,
                        help="default: cuda (cpu with --toy); cuda without a GPU stops at once")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None, choices=[m.label for m in METHODS])
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the size's)")
    parser.add_argument("--budget-minutes", type=float, default=10.0,
                        help="stop before training when the measured estimate of the whole suite exceeds this")
    parser.add_argument("--force", action="store_true", help="train even when the estimate exceeds the budget")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder (default bench/work/gpu_suite, or bench/work/gpu_suite_toy)")
    parser.add_argument("--results", type=Path, default=None,
                        help="results root (default results/, or <work>/results with --toy)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = args.device or ("cpu" if args.toy else "cuda")
    if device == "cpu":  # the trainer takes CUDA whenever it sees it: hide it for a CPU run
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    device = check_device(device)
    import torch

    if device == "cuda":
        # The strategies' scoring passes (DGA/DoGE gradients, the in-batch refresh) run outside the training step's
        # autocast, in fp32: TF32 keeps their matrix products on the tensor cores.
        torch.set_float32_matmul_precision("high")

    work = (args.work or WORK / (f"{NAME}_toy" if args.toy else NAME)).resolve()
    results = (args.results or (work / "results" if args.toy else ROOT / "results")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.toy:
        target, corpus = toy_corpus(args.corpus.resolve(), args.target, work / "corpus", TOY_DOCS_PER_SHARD)
    else:
        check_corpus(args.corpus)
        target, source = target_source(args.corpus.resolve(), args.target)
        corpus = args.corpus.resolve()
        if source != corpus / "targets" / target:  # the sample's layout: the target's sets under targets/NAME
            corpus = work / "corpus"
            (corpus / "targets" / target).mkdir(parents=True, exist_ok=True)
            if not (corpus / "generic").exists():
                (corpus / "generic").symlink_to(args.corpus.resolve() / "generic")
            for split in ("spec", "eval"):
                shutil.copy(source / f"{split}.jsonl.zst", corpus / "targets" / target / f"{split}.jsonl.zst")
    # One clustering, so its own tokenizer (experiments.py shares the 16x16 one across its granularities).
    layout = experiments.Layout(corpus=corpus, work=work, results=results, tokenizer_levels=None)
    spec = suite_spec(args.toy)
    steps = args.steps or spec.train["steps"]
    log.info("gpu_suite: %s size on %s, corpus %s, target %s, levels %s, results under %s",
             "toy" if args.toy else "GPU", device, args.corpus, target, spec.levels, results / NAME)

    stages = timed_stages(layout, spec.levels, target, device)

    spec = dataclasses.replace(spec, methods=tuple(m for m in spec.methods
                                                   if not args.methods or m.label in args.methods))
    todo = {m.label: sum(1 for seed in args.seeds
                         if not (experiments.seed_dir(NAME, target, None, "default", seed, layout, spec) / m.label
                                 / "metrics.json").exists())
            for m in spec.methods}
    todo = {label: n for label, n in todo.items() if n}
    timings = calibrate(spec, target, layout, work / "calibration") if todo else {}
    per_method = estimate(timings, todo, steps, spec.train["eval.every"])
    elapsed = time.perf_counter() - started
    total = elapsed + sum(per_method.values())
    print(f"\nBudget estimate: {sum(todo.values())} runs x {steps} steps", flush=True)
    for label, seconds in per_method.items():
        print(f"  {label:16s} {todo[label]} runs x ({steps} x {1000 * timings[label]['step_s']:.1f} ms/step + "
              f"evals + build) = {seconds:.0f} s", flush=True)
    print(f"  stages and calibration so far {elapsed:.0f} s; whole suite ~{total:.0f} s = {total / 60:.1f} min "
          f"(budget {args.budget_minutes:g} min)\n", flush=True)
    if total > 60 * args.budget_minutes and not args.force:
        fits = steps_that_fit(timings, todo, 60 * args.budget_minutes - elapsed, spec.train["eval.every"])
        print(f"gpu_suite: the estimate ({total / 60:.1f} min) exceeds --budget-minutes {args.budget_minutes:g}: "
              f"nothing trained. About {fits} steps per run would fit (--steps {fits}); or raise "
              "--budget-minutes, or pass --force. The stages' outputs are kept: the next call starts from them.",
              file=sys.stderr, flush=True)
        return 2

    experiments.run_experiment(NAME, target, args.seeds, None, None, steps, [m.label for m in spec.methods], layout,
                               spec)

    variant_dir = experiments.seed_dir(NAME, target, None, "default", 0, layout, spec).parent
    report = render(variant_dir, steps, spec.train["eval.every"])
    figures = {"date": date.today().isoformat(), "mode": "toy" if args.toy else "GPU", "device": device,
               "machine": machine(), "levels": spec.levels, "steps": steps, "seeds": args.seeds,
               "train": spec.train, "budget_minutes": args.budget_minutes, "stages": stages,
               "calibration": timings, "estimate_s": round(sum(per_method.values()), 1),
               "training": training_figures(variant_dir, spec.train["data.batch_size"] * spec.train["data.seq_len"]),
               "total_s": round(time.perf_counter() - started, 1)}
    (variant_dir.parent / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    (variant_dir.parent / "figures.md").write_text(figures_markdown(figures) + "\n")
    print(report, "\n\n" + figures_markdown(figures), flush=True)
    print(f"\nwrote {variant_dir}/{{table,statements}}.md and {variant_dir.parent}/figures.{{json,md}}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
