"""Declarative validation of TOML tables into frozen dataclasses.

Used by the daemon configuration (config.py) and by model.toml (inference/repository.py). A schema
is a dataclass whose field types say what a key holds (str, int, float, bool, Path, lists of those,
nested dataclasses, lists of dataclasses, ``X | None`` for optional keys) and whose field metadata may
add a ``check`` (a function returning a problem or None), ``path=True`` (resolve relative to the file)
and ``must_exist=True``. Every problem raises the error class given by the caller, naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

Check = Callable[[Any], "str | None"]
#: Builds the caller's error from (dotted key, reason).
ErrorFactory = Callable[[str, str], Exception]


def meta(check: Check | None = None, *, path: bool = False, must_exist: bool = False) -> dict[str, Any]:
    """Field metadata for :func:`build`."""
    return {"check": check, "path": path, "must_exist": must_exist}


def in_range(lo: float | None = None, hi: float | None = None) -> Check:
    def check(value: Any) -> str | None:
        if lo is not None and value < lo:
            return f"must be >= {lo}, got {value!r}"
        if hi is not None and value > hi:
            return f"must be <= {hi}, got {value!r}"
        return None

    return check


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"

    return check


def non_empty(value: Any) -> str | None:
    return None if str(value).strip() else "must not be empty"


def _describe(tp: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", Path: "a path string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _scalar(key: str, value: Any, tp: Any, err: ErrorFactory) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp in (str, Path):
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - schema programming error
        raise TypeError(f"unsupported schema type {tp!r} for {key}")
    raise err(key, f"must be {_describe(tp)}, got {value!r}")


class Builder:
    """Turns parsed TOML into schema dataclasses, resolving relative paths against ``base``."""

    def __init__(self, err: ErrorFactory, base: Path) -> None:
        self.err = err
        self.base = base

    def convert(self, key: str, value: Any, tp: Any, md: Mapping[str, Any]) -> Any:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp, origin = args[0], typing.get_origin(args[0])
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, key)  # type: ignore[arg-type]
        if origin is list:
            (item_tp,) = typing.get_args(tp)
            if not isinstance(value, list):
                raise self.err(key, f"must be a list, got {value!r}")
            return [self.convert(f"{key}[{i}]", v, item_tp, {}) for i, v in enumerate(value)]
        value = _scalar(key, value, tp, self.err)
        if tp is Path or md.get("path"):
            if not value:
                raise self.err(key, "must be a non-empty path")
            p = Path(value).expanduser()
            if not p.is_absolute():
                p = (self.base / p).resolve()
            if md.get("must_exist") and not p.is_file():
                raise self.err(key, f"file not found or not a regular file: {p}")
            return p
        return value

    def build(self, cls: type, table: Any, prefix: str = "") -> Any:
        if not isinstance(table, Mapping):
            raise self.err(prefix or "(top level)", f"must be a table, got {table!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        for name in table:
            if name not in fields:
                known = ", ".join(sorted(fields))
                raise self.err(f"{prefix}.{name}" if prefix else name, f"unknown key (known: {known})")
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            key = f"{prefix}.{name}" if prefix else name
            tp = hints[name]
            if name not in table:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise self.err(key, "is required")
                if dataclasses.is_dataclass(tp):  # nested section absent: its own defaults, still validated
                    kwargs[name] = self.build(tp, {}, key)  # type: ignore[arg-type]
                continue
            value = self.convert(key, table[name], tp, f.metadata)
            check = f.metadata.get("check")
            if check is not None and value is not None:
                problem = check(value)
                if problem:
                    raise self.err(key, problem)
            kwargs[name] = value
        return cls(**kwargs)


def to_toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(to_toml_value(v) for v in value) + "]"
    raise TypeError(value)  # pragma: no cover
