"""The defaults of the offline stages' sections and `ray`, as one table.

Each section's defaults are its dataclass's (`dgamix.core.sections`, read with `dgamix.core.config.load`); this
module gathers them for what reads them by name. The `train` section's are the trainer's own dataclasses
(`dgamix.trainer.config`, whose strategy parts are the mixer's settings). `params.yaml` at the repository root is
exactly these defaults and the trainer's (a test keeps them equal, and the README's configuration table too), so a
key left out of a user's params.yaml means what the shipped file says.

Paths are relative to the project (where `dvc repro` runs). The defaults of `ingest.inputs` and `targets.sets`
are the embedded sample, so that a fresh clone runs end to end.
"""
from __future__ import annotations

from typing import Any

from .config import defaults
from .sections import (AssignConfig, BasesConfig, ClusterConfig, EmbedConfig, IngestConfig, RayConfig, StatsConfig,
                       TargetsConfig, TokenizeConfig)

DEFAULTS: dict[str, dict[str, Any]] = {
    "ingest": defaults(IngestConfig),
    "embed": defaults(EmbedConfig),
    "cluster": defaults(ClusterConfig),
    "assign": defaults(AssignConfig),
    "stats": defaults(StatsConfig),
    "tokenize": defaults(TokenizeConfig),
    "targets": defaults(TargetsConfig),
    "bases": defaults(BasesConfig),
    "ray": defaults(RayConfig),
}

