"""RFC 8785 (JCS) canonical JSON, through the maintained ``rfc8785`` package.

Signed documents hold no floats (DESIGN §16.12): :func:`canonical_json` refuses them, so a float can
never sneak into a signature where two implementations might render it differently.
"""

from __future__ import annotations

from typing import Any

import rfc8785
from pydantic import BaseModel

from hivemind.encoding import sha256_hex
from hivemind.errors import FloatInSignedDocument, InvalidInput


def _reject_floats(value: Any, path: str) -> None:
    if isinstance(value, float):
        raise FloatInSignedDocument(f"float at ${path}: signed JSON uses integers or RFC 3339 strings")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInput(f"non-string key at {path or '$'}")
            _reject_floats(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _reject_floats(item, f"{path}[{index}]")


def refuse_floats(data: Any) -> Any:
    """Refuse a float anywhere in ``data`` and return it unchanged.

    Used as the body of ``model_validator(mode="before")`` in signed documents, so ``120.0`` is never
    quietly read as ``120`` into a document whose signature would then cover something else than was sent.
    """
    _reject_floats(data, "")
    return data


def canonical_json(value: Any) -> bytes:
    """Canonical bytes of a JSON value or pydantic model (``mode="json"`` dump, ``None`` kept)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    _reject_floats(value, "")
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as exc:
        raise InvalidInput(f"cannot canonicalize: {exc}") from None


def canonical_sha256(value: Any) -> str:
    """Hex SHA-256 of the canonical bytes: the hash of a manifest, policy or receipt."""
    return sha256_hex(canonical_json(value))
