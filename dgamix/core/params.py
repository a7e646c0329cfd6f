"""Loading params.yaml. Each section is then read into its frozen dataclass by `dgamix.core.config.load`
(`dgamix.core.sections` for the offline stages, `dgamix.trainer.config` for `train`), which checks every value and
names `section.key` in its errors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ParamError


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamError(f"params file {path} does not exist (expected a YAML file with one section per stage)")
    with path.open() as fh:
        params = yaml.safe_load(fh) or {}
    if not isinstance(params, dict):
        raise ParamError(f"{path} must hold a mapping of stage sections, got {type(params).__name__}")
    return params
