"""Every parameter's default, defined once.

`params.yaml` at the repository root is exactly this table (a test keeps them equal, and the README's
configuration table too), so a key left out of a user's params.yaml means what the shipped file says. The sections
of the offline stages and `ray` are their dataclasses' defaults (`dgamix.core.sections`, read with
`dgamix.core.config.load`); the `train` section is spelled here, and `dgamix.core.params.require` looks its
defaults up in this table.

Paths are relative to the project (where `dvc repro` runs). The defaults of `ingest.inputs` and `targets.sets`
are the embedded sample, so that a fresh clone runs end to end.
"""
from __future__ import annotations

import copy
from typing import Any

from .config import defaults
from .sections import (AssignConfig, BasesConfig, ClusterConfig, EmbedConfig, IngestConfig, RayConfig, StatsConfig,
                       TargetsConfig, TokenizeConfig)

STRATEGIES = ["uniform", "natural", "importance", "dga", "dga_ema", "inbatch", "inbatch_domains", "odm", "doge"]

DEFAULTS: dict[str, dict[str, Any]] = {
    "ingest": defaults(IngestConfig),
    "embed": defaults(EmbedConfig),
    "cluster": defaults(ClusterConfig),
    "assign": defaults(AssignConfig),
    "stats": defaults(StatsConfig),
    "tokenize": defaults(TokenizeConfig),
    "targets": defaults(TargetsConfig),
    "bases": defaults(BasesConfig),
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
    "ray": defaults(RayConfig),
}


def default(section: str, key: str) -> Any:
    """The default of `section.key` (a fresh copy: callers may mutate lists). KeyError for an unknown key."""
    return copy.deepcopy(DEFAULTS[section][key])

