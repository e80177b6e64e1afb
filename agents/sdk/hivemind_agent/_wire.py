"""Readers for the bridge's wire JSON: each checks one field's type and names the route and field."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .errors import ProtocolError


def obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def string(body: Mapping[str, Any], key: str, where: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{where}: field {key!r} must be a string")
    return value


def opt_string(body: Mapping[str, Any], key: str, where: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise ProtocolError(f"{where}: field {key!r} must be a string or null")
    return value


def count(body: Mapping[str, Any], key: str, where: str) -> int:
    value = body.get(key)
    # bool is an int subclass in Python; true/false is not a count.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{where}: field {key!r} must be a non-negative integer")
    return value


def opt_count(body: Mapping[str, Any], key: str, where: str) -> int | None:
    return None if body.get(key) is None else count(body, key, where)


def flag(body: Mapping[str, Any], key: str, where: str) -> bool:
    value = body.get(key)
    if not isinstance(value, bool):
        raise ProtocolError(f"{where}: field {key!r} must be true or false")
    return value


def array(body: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = body.get(key)
    if not isinstance(value, list):
        raise ProtocolError(f"{where}: field {key!r} must be a list")
    return value


def string_array(body: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    values = array(body, key, where)
    if not all(isinstance(v, str) for v in values):
        raise ProtocolError(f"{where}: field {key!r} must be a list of strings")
    return tuple(values)


def frozen(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))
