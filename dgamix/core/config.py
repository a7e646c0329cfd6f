"""Configuration sections as frozen dataclasses: each field has its type, its default and a one-line doc, and
`load(cls, mapping, "section")` reads a params.yaml section into one, with errors that name `section.key`.

Rules, the same for every section:
- a key left out takes the field's default; a key given as `null` is the value None, allowed only where the field's
  type admits None (`int | None`), never "use the default";
- an unknown key is an error (a typo would otherwise be ignored), listing the keys that exist;
- ints are not bools, floats accept ints, `Path` fields take strings, `list[...]` fields take lists, a nested
  dataclass field takes a mapping (its keys are `section.field.key`);
- after the fields, `cls.validate(section)` runs when the class defines it (cross-field checks; it raises
  ValueError naming the keys, which `load` turns into a ParamError).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from .errors import ParamError

T = TypeVar("T")


def setting(default: Any, doc: str) -> Any:
    """A field with its default and its one-line doc (lists and dicts are copied for every instance)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: typing.cast(Any, type(default))(default),
                                 metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def doc_of(cls: type, name: str) -> str:
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}[name]


def load(cls: type[T], mapping: Mapping[str, Any] | None, section: str) -> T:
    """`mapping` (a params.yaml section; None: all defaults) as an instance of the dataclass `cls`."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ParamError(f"{section} = {mapping!r}: expected a mapping of {_keys(cls)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ParamError(f"{section}.{unknown[0]} is not a setting of {section} (expected one of {_keys(cls)})")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(mapping[name], hints[name], f"{section}.{name}")
              for name in fields if name in mapping}
    try:
        instance = cls(**values)
        validate = getattr(instance, "validate", None)
        if callable(validate):
            validate(section)
    except ParamError:
        raise
    except (ValueError, TypeError) as err:
        raise ParamError(str(err) if str(err).startswith(section) else f"{section}: {err}") from err
    return instance


def defaults(cls: type) -> dict[str, Any]:
    """The section's defaults as params.yaml writes them (nested dataclasses as mappings, paths as strings)."""
    return to_yaml(cls())


def to_yaml(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_yaml(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [to_yaml(v) for v in value]
    if isinstance(value, dict):
        return {k: to_yaml(v) for k, v in value.items()}
    return value


def _keys(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls) if f.init)


def _convert(value: Any, kind: Any, key: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if value is None:
            raise ParamError(f"{key} = null: expected {_name(kind)}")
        if len(options) == 1 and (typing.get_origin(options[0]) in (list, tuple)
                                  or dataclasses.is_dataclass(options[0])):
            return _convert(value, options[0], key)  # its own message names the item that is wrong
        errors = []
        for option in options:
            try:
                return _convert(value, option, key)
            except ParamError as err:
                errors.append(err)
        raise ParamError(f"{key} = {value!r}: expected {_name(kind)}")
    if value is None:
        raise ParamError(f"{key} = null: expected {_name(kind)}")
    if dataclasses.is_dataclass(kind):
        return load(kind, value, key)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ParamError(f"{key} = {value!r}: expected a list of {_name(args[0]) if args else 'values'}")
        items = [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamError(f"{key} = {value!r}: expected a mapping")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ParamError(f"{key} = {value!r}: expected one of {list(args)}")
        return value
    if kind is Path:
        if not isinstance(value, str):
            raise ParamError(f"{key} = {value!r}: expected a path")
        return _local_path(value, key)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"{key} = {value!r}: expected a number")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"{key} = {value!r}: expected int")
        return value
    if kind is Any:
        return value
    if not isinstance(value, kind):
        raise ParamError(f"{key} = {value!r}: expected {_name(kind)}")
    return value


def _local_path(value: str, key: str) -> Path:
    """Stage data is memory-mapped and renamed into place: a path or file:// URL, not an object store."""
    if "://" not in value:
        return Path(value)
    protocol, rest = value.split("://", 1)
    if protocol in ("file", "local"):
        return Path(rest)
    raise ParamError(f"{key} = '{value}': expected a path or file:// URL on a filesystem every worker mounts; "
                     f"{protocol}:// works for the inputs (ingest.inputs, targets.sets), not for stage data")


def _name(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _name(a) for a in args)
    if origin is list:
        return f"a list of {_name(args[0])}" if args else "a list"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if dataclasses.is_dataclass(kind):
        return "a mapping"
    return getattr(kind, "__name__", str(kind))
