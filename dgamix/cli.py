"""`dgamix <stage>`: run one pipeline stage with its section of params.yaml (what dvc.yaml calls)."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from .pipeline.engine import StageFailed
from .core.params import InputError, ParamError, load_params

STAGES = {
    "ingest": "read RedPajama-layout files into normalized Parquet shards",
    "embed": "embed every document with a sentence-transformers model",
    "cluster": "fit hierarchical spherical k-means on a sample of the embeddings",
    "assign": "assign every document to its fine cluster and group documents by cluster",
    "stats": "cluster statistics, clustering metrics and plots",
    "tokenize": "tokenize every cluster into a memory-mapped token store",
    "bases": "basis distributions over the clusters (importance, reference, natural, uniform, coarse)",
}
MODULES = {"tokenize": "tokens"}  # `tokenize` would shadow the standard library module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dgamix", description="dgamix offline pipeline stages")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, help_text in STAGES.items():
        sub.add_parser(name, help=help_text)
    train = sub.add_parser("train", help="reference training run of the small GPT under one strategy")
    train.add_argument("--strategy", required=True, help="uniform, natural, importance, dga or dga_ema")
    plot = sub.add_parser("plot", help="weight trajectories and losses of training runs (PNG)")
    plot.add_argument("runs", nargs="?", default="runs", help="folder of runs (default: runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Never reach for a model hub at run time unless the user asked for it: the default model is packaged.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.stage == "plot":
            from .trainer.plot import plot_runs

            result = {"written": [str(p) for p in plot_runs(args.runs)]}
        elif args.stage == "train":
            from .trainer.train import run as train_run

            result = train_run(load_params(args.params), args.strategy)
        else:
            params = load_params(args.params)
            stage = importlib.import_module(f"dgamix.pipeline.{MODULES.get(args.stage, args.stage)}")
            result = stage.run(params)
    except (ParamError, InputError, FileNotFoundError, StageFailed) as err:
        print(f"dgamix {args.stage}: error: {err}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in result.items() if k != "per_file"}
    print(json.dumps(summary, indent=None, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
