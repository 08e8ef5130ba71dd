"""Shared pieces of the configuration schemas (pydantic v2): the filter YAML
(:mod:`deepseek_rs.datafilter.config`) and the optimization YAML (:mod:`deepseek_rs.config`).

``validate(model, data, root)`` validates a parsed YAML mapping and turns pydantic's errors into
one ``InvalidValueError`` whose lines each name a field by its path in the file
(``hard_examples.clusters: must be >= 1, got -5``). Every section is validated, enabled or not.
"""

from __future__ import annotations

import re
import typing
from typing import Any, List, Mapping, Optional, Tuple, Type, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import InvalidValueError

M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    """A YAML section: unknown keys refused, no coercion (``true`` is not 1, ``"5"`` not 5)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _model_at(root: Type[BaseModel], loc: Tuple[Any, ...]) -> Optional[Type[BaseModel]]:
    """The model class found by following ``loc`` (field names) from ``root``, if any."""
    current: Any = root
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        current = field.annotation
        for arg in typing.get_args(current) or ():  # Optional[Section]
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
                break
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _message(root: Type[BaseModel], prefix: str, err: Mapping[str, Any]) -> str:
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in (prefix, *loc) if p != "")
    kind, got = err["type"], err.get("input")
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        allowed = sorted(parent.model_fields) if parent is not None else []
        return f"unknown key {path}; allowed keys: {allowed}"
    msg = err["msg"]
    if kind == "value_error":  # raised by our own checks: "Value error, <ours>"
        msg = msg.split(", ", 1)[-1]
        return f"{path}: {msg}" if path else msg
    msg = msg[0].lower() + msg[1:] if msg else msg
    msg = re.sub(r"a valid dictionary or instance of \w+", "a mapping", msg)
    if kind == "missing":
        return f"{path}: required"
    return f"{path}: {msg}, got {got!r}" if path else f"{msg}, got {got!r}"


def validate(model: Type[M], data: Any, prefix: str = "") -> M:
    """``model.model_validate(data)``, its errors as one ``InvalidValueError`` naming each field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        seen: List[str] = []
        for err in e.errors(include_url=False):
            line = _message(model, prefix, err)
            if line not in seen:
                seen.append(line)
        raise InvalidValueError("; ".join(seen)) from None


def json_schema(model: Type[BaseModel]) -> dict:
    """The JSON Schema of a configuration file (``deepseek-rs config schema ...``)."""
    return model.model_json_schema(mode="validation")


__all__ = ["Section", "json_schema", "validate"]
