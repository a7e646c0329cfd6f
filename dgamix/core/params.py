"""Loading params.yaml and validating parameters at the boundary, with messages that name the parameter.

A key missing from params.yaml (or null where null is not a value of its own) takes its default from
`dgamix.core.defaults`, the one place defaults are defined.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .defaults import DEFAULTS
from .errors import InputError, ParamError  # noqa: F401  (InputError: callers import both from here too)


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamError(f"params file {path} does not exist (expected a YAML file with one section per stage)")
    with path.open() as fh:
        params = yaml.safe_load(fh) or {}
    if not isinstance(params, dict):
        raise ParamError(f"{path} must hold a mapping of stage sections, got {type(params).__name__}")
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    value = params.get(name)
    if not isinstance(value, dict):
        raise ParamError(f"params.yaml has no '{name}' section (expected a mapping of the {name} stage's options)")
    return value


def require(cfg: dict[str, Any], stage: str, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """Return cfg[key] checked against `kind`. A missing or null key takes `default` when one is given, else the
    one defined in `dgamix.core.defaults` for `stage.key`; a key with neither is an error naming `stage.key`."""
    if key not in cfg or cfg[key] is None:
        if default is ...:
            default = copy.deepcopy(DEFAULTS.get(stage, {}).get(key, ...))
        if default is ...:
            raise ParamError(f"{stage}.{key} is missing (expected {_kind_name(kind)})")
        return default
    value = cfg[key]
    # bool is an int in Python; a flag where a count is expected is almost surely a typo.
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ParamError(f"{stage}.{key} = {value!r}: expected {_kind_name(kind)}")
    if not isinstance(value, kind):
        raise ParamError(f"{stage}.{key} = {value!r}: expected {_kind_name(kind)}")
    return value


def local_path(cfg: dict[str, Any], stage: str, key: str, default: Any = ...) -> Path | None:
    """A stage's data folder or file: a path or a file:// URL (None only where null is the default). Stage data is
    memory-mapped and renamed into place, so it must live on a filesystem (one that every worker mounts, with the
    Ray engine), not in an object store."""
    value = require(cfg, stage, key, str, default)
    if value is None:
        return None
    if "://" not in value:
        return Path(value)
    protocol, rest = value.split("://", 1)
    if protocol in ("file", "local"):
        return Path(rest)
    raise ParamError(f"{stage}.{key} = '{value}': expected a path or file:// URL on a filesystem every worker "
                     f"mounts; {protocol}:// works for the inputs (ingest.inputs, targets.sets), not for stage data")


def positive_int(cfg: dict[str, Any], stage: str, key: str, default: Any = ...) -> int:
    value = require(cfg, stage, key, int, default)
    if value < 1:
        raise ParamError(f"{stage}.{key} = {value}: expected a positive integer")
    return value


def non_negative_int(cfg: dict[str, Any], stage: str, key: str, default: Any = ...) -> int:
    value = require(cfg, stage, key, int, default)
    if value < 0:
        raise ParamError(f"{stage}.{key} = {value}: expected a non-negative integer")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__
