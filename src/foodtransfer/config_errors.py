"""Pydantic's validation errors of params.yaml as one line a user can act on: the key, the
bad value, what is allowed and how to fix it (:func:`translate`, used by
:mod:`foodtransfer.config`)."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Literal, Union

import pydantic
from pydantic import BaseModel

from foodtransfer.errors import ConfigError

FIX_HINT = "Fix it in params.yaml, or override it with 'dvc exp run -S {key}=<value>'."


def _strip(annotation: Any) -> Any:
    """The type without its ``Annotated`` constraints."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _describe_type(annotation: Any) -> str:
    annotation = _strip(annotation)
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe_type(arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return " | ".join(repr(value) for value in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"a list of {_describe_type(item)}"
    if annotation is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _bounds(field: pydantic.fields.FieldInfo) -> str:
    """``must be >= 0 and < 1`` from a field's constraints, wherever they were declared."""
    metadata = list(field.metadata)
    for arg in typing.get_args(field.annotation):  # PositiveInt | Literal["all"]
        if typing.get_origin(arg) is Annotated:
            for extra in typing.get_args(arg)[1:]:
                metadata += getattr(extra, "metadata", [extra])
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}  # annotated_types' bounds
    parts = [f"{symbol} {getattr(item, name):g}" for item in metadata
             for name, symbol in symbols.items() if getattr(item, name, None) is not None]
    return "must be " + " and ".join(parts)


def _fail(key: str, value: Any, problem: str) -> ConfigError:
    return ConfigError(f"params: {key} = {value!r} {problem}. {FIX_HINT.format(key=key)}")


def _locate(raw: dict, loc: tuple, root: type[BaseModel]
            ) -> tuple[str, Any, type[BaseModel], str, bool]:
    """Follow an error location through the sections to the field it concerns: (dotted key,
    the raw value given, the section class, the field name, whether the location stops at
    the field itself rather than inside its value)."""
    model: type[BaseModel] = root
    value: Any = raw
    keys: list[str] = []
    for depth, part in enumerate(loc):
        name = str(part)
        keys.append(name)
        value = value.get(name) if isinstance(value, dict) else None
        field = model.model_fields.get(name)
        inner = _strip(field.annotation) if field else None
        at_end = depth == len(loc) - 1
        if isinstance(inner, type) and issubclass(inner, BaseModel) and not at_end:
            model = inner
            continue
        return ".".join(keys), value, model, name, at_end
    return ".".join(keys), value, model, keys[-1] if keys else "", True


def translate(error: pydantic.ValidationError, raw: dict, root: type[BaseModel]
              ) -> ConfigError:
    """The first problem pydantic found, as one line naming the key, the value and the fix."""
    errors = error.errors()
    first = errors[0]
    key, value, model, name, at_end = _locate(raw, first["loc"], root)
    if first["type"] == "extra_forbidden":
        prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
        known = list(model.model_fields)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
        return ConfigError(
            f"params: unknown key '{key}'.{hint} Known keys here: "
            f"{', '.join(prefix + known_name for known_name in known)}. Remove or rename it "
            "in params.yaml (dvc exp run -S adds misspelt keys silently).")
    field = model.model_fields[name]
    annotation = _strip(field.annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _fail(key, value, "must be a section (a mapping of keys to values)")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # as it would have been read: dropout = 1 is 1.0
    # A value may fail every member of a union: report a range problem over a type problem.
    same_field = [e for e in errors if _locate(raw, e["loc"], root)[0] == key]
    kinds = {e["type"] for e in same_field}
    if kinds & {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        return _fail(key, value, f"is out of range: {_bounds(field)}")
    if kinds == {"finite_number"}:
        return _fail(key, value, "must be a finite number")
    if kinds == {"literal_error"} and at_end:
        allowed = typing.get_args(annotation)
        return _fail(key, value, "is not allowed: choose one of "
                     + ", ".join(repr(choice) for choice in allowed))
    if annotation is bool:
        return _fail(key, value, "has the wrong type: expected true or false")
    expected = _describe_type(annotation)
    if kinds & {"too_short", "string_too_short"}:
        expected += " (non-empty)"
    return _fail(key, value, f"has the wrong type: expected {expected}")
