"""Every parameter's default, defined once.

`params.yaml` at the repository root is exactly this table (a test keeps them equal, and the README's
configuration table too), so a key left out of a user's params.yaml means what the shipped file says. Stage code
never spells a default itself: `dgamix.core.params.require` looks it up here.

Paths are relative to the project (where `dvc repro` runs). The defaults of `ingest.inputs` and `targets.sets`
are the embedded sample, so that a fresh clone runs end to end.
"""
from __future__ import annotations

import copy
from typing import Any

STRATEGIES = ["uniform", "natural", "importance", "dga", "dga_ema", "inbatch", "inbatch_domains", "odm", "doge"]
BASIS_FAMILIES = ["importance", "reference", "natural", "uniform", "coarse"]

DEFAULTS: dict[str, dict[str, Any]] = {
    "ingest": {
        "inputs": ["data/sample/generic/*.jsonl.zst"],
        "text_field": "text",
        "source_field": "meta.source",
        "strict": False,
        "output": "data/docs",
        "rejects": "data/ingest/rejects.parquet",
        "report": "data/ingest/report.json",
        "metrics": "metrics/ingest.json",
        "engine": "local",
    },
    "embed": {
        "docs": "data/docs",
        "output": "data/embeddings",
        "model": "all-MiniLM-L6-v2",
        "max_tokens": 128,
        "batch_size": 64,
        "device": "auto",
        "backend": "torch",
        "encoder_from": None,
        "verify": False,
        "verify_docs": 2000,
        "verify_levels": [8, 8],
        "verify_min_cosine": 0.99,
        "verify_min_agreement": 0.95,
        "calibration_docs": 512,
        "seed": 0,
        "engine": "local",
    },
    "cluster": {
        "embeddings": "data/embeddings",
        "docs": "data/docs",
        "output": "data/clusters",
        "levels": [16, 16],
        "points_per_centroid": 256,
        "max_fit_docs": 262144,
        "iterations": 20,
        "seed": 0,
        "backend": "auto",
    },
    "assign": {
        "docs": "data/docs",
        "embeddings": "data/embeddings",
        "clusters": "data/clusters",
        "output": "data/domains",
        "backend": "auto",
        "engine": "local",
    },
    "stats": {
        "domains": "data/domains",
        "output": "data/stats",
        "metrics": "metrics/stats.json",
        "keywords": 8,
        "keyword_sample_docs": 20000,
        "keyword_terms": 30000,
        "seed": 0,
    },
    "tokenize": {
        "domains": "data/domains",
        "docs": None,
        "output": "data/tokens",
        "tokenizer": None,
        "vocab_size": 8192,
        "train_docs": 20000,
        "eos_token": None,
        "holdout_fraction": 0.02,
        "seed": 0,
        "engine": "local",
    },
    "targets": {
        "sets": {
            "spec": ["data/sample/target/spec.jsonl.zst"],
            "eval": ["data/sample/target/eval.jsonl.zst"],
        },
        "text_field": "text",
        "output": "data/targets",
        "metrics": "metrics/targets",
    },
    "bases": {
        "target": "data/targets/spec/domains",
        "families": list(BASIS_FAMILIES),
        "smoothing": 0.0,
        "reference_column": "source",
        "domains": "data/domains",
        "clusters": "data/clusters",
        "tokens": "data/tokens",
        "output": "data/bases",
        "metrics": "metrics/bases.json",
    },
    "train": {
        "strategies": ["uniform", "importance", "dga_ema"],
        "steps": 200,
        "seq_len": 64,
        "batch_size": 16,
        "lr": 0.003,
        "n_layer": 2,
        "n_head": 4,
        "n_embd": 128,
        "eval_every": 50,
        "eval_batches": 4,
        "checkpoint_every": 100,
        "token_cap": None,
        "basis_names": None,
        "eta": 0.3,
        "beta": 0.1,
        "every": 20,
        "dga_batch_size": 8,
        "dga_target_batch_size": None,
        "estimator": "exact",
        "inbatch_eta": 0.02,
        "inbatch_every": 1,
        "inbatch_score_every": 1,
        "inbatch_refresh": 20,
        "inbatch_decay": None,
        "inbatch_min_sequences": 8,
        "inbatch_scale": "snr",
        "inbatch_rank": None,
        "weight_floor": 0.001,
        "doge_mu": 0.05,
        "doge_clip_min": 0.0,
        "doge_clip_max": 5.0,
        "doge_grad_clip": 1.0,
        "seed": 0,
        "eval_seed": None,
        "precision": None,
        "compile": False,
        "threads": None,
        "adamw_impl": None,
        "tokens": "data/tokens",
        "bases": "data/bases",
        "target": "data/targets/spec/tokens",
        "target_eval": "data/targets/eval/tokens",
        "output": "runs",
    },
    "ray": {
        "address": None,
        "num_cpus": None,
        "max_retries": 3,
        "concurrency": None,
        "runtime_env": None,
    },
}


def default(section: str, key: str) -> Any:
    """The default of `section.key` (a fresh copy: callers may mutate lists). KeyError for an unknown key."""
    return copy.deepcopy(DEFAULTS[section][key])

