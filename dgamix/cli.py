"""`dgamix <command>`: run one pipeline stage with its section of params.yaml (what dvc.yaml calls), a reference
training run, or the plots. Dispatch only: the work is in dgamix.pipeline and dgamix.trainer."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from .core.errors import InputError, ParamError, StageFailed
from .core.params import load_params

STAGES = {
    "ingest": "read RedPajama-layout files into normalized Parquet shards",
    "embed": "embed every document with a sentence-transformers model",
    "cluster": "fit hierarchical spherical k-means on a sample of the embeddings",
    "assign": "assign every document to its fine cluster and group documents by cluster",
    "tokenize": "tokenize every cluster into a memory-mapped token store",
    "stats": "cluster statistics (documents, tokens, sources, keywords), clustering metrics and plots",
    "bases": "basis distributions over the clusters (importance, reference, natural, uniform, coarse)",
}
MODULES = {"tokenize": "tokens"}  # `tokenize` would shadow the standard library module
TARGET_STAGES = ("ingest", "embed", "assign", "tokenize")
# `pip install dgamix` installs the mixer only; a command that needs one of these packages names its extra.
EXTRAS = {"ray": "ray", "openvino": "openvino", "nncf": "openvino"}
DEFAULT_EXTRA = "pipeline"  # the offline stages and the plots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dgamix", description="dgamix offline pipeline stages")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, help_text in STAGES.items():
        stage = sub.add_parser(name, help=help_text)
        if name in TARGET_STAGES:
            stage.add_argument("--target", metavar="SET", help="run the stage on the specialized set SET of "
                               "targets.sets (spec, eval), the corpus's way: its encoder, tree and tokenizer")
    train = sub.add_parser("train", help="reference training run of the small GPT under one strategy")
    train.add_argument("--strategy", required=True,
                       help="uniform, natural, importance, dga, dga_ema, inbatch, inbatch_domains, odm or doge")
    plot = sub.add_parser("plot", help="loss curves (CSV for dvc plots, PNG) and weight trajectories of the runs")
    plot.add_argument("runs", nargs="?", default=None,
                      help="folder of runs (default: the runs of train.strategies in train.paths.output)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Never reach for a model hub at run time unless the user asked for it: the default model is packaged.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.stage == "plot":
            from .trainer import plot

            result = (plot.run(load_params(args.params)) if args.runs is None
                      else {"written": [str(p) for p in plot.plot_runs(args.runs)]})
        elif args.stage == "train":
            from .trainer.train import run as train_run

            result = train_run(load_params(args.params), args.strategy)
        else:
            params = load_params(args.params)
            stage = importlib.import_module(f"dgamix.pipeline.{MODULES.get(args.stage, args.stage)}")
            if getattr(args, "target", None):
                from .pipeline.targets import run_stage

                result = run_stage(params, args.target, args.stage, stage)
            else:
                result = stage.run(params)
    except (ParamError, InputError, FileNotFoundError, StageFailed, ModuleNotFoundError) as err:
        message = missing_extra(err) if isinstance(err, ModuleNotFoundError) else str(err)
        if message is None:
            raise  # a module of dgamix itself is missing: a broken install or a bug, keep the traceback
        target = f" --target {args.target}" if getattr(args, "target", None) else ""
        print(f"dgamix {args.stage}{target}: error: {message}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in result.items() if k != "per_file"}
    print(json.dumps(summary, indent=None, default=str))
    return 0


def missing_extra(err: ModuleNotFoundError) -> str | None:
    """The install hint for a third-party package a command needs and this installation lacks, or None when the
    missing module is part of dgamix (or unnamed)."""
    top = (err.name or "").split(".")[0]
    if not top or top == "dgamix":
        return None
    extra = EXTRAS.get(top, DEFAULT_EXTRA)
    return f"this command needs '{top}', which `pip install dgamix` leaves out: pip install 'dgamix[{extra}]'"


if __name__ == "__main__":
    sys.exit(main())
