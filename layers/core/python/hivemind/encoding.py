"""Text encodings used on the wire: lowercase unpadded base32 for secrets, unpadded base64url for bytes."""

from __future__ import annotations

import base64
import binascii
import hashlib

from hivemind.errors import InvalidInput


def b32encode(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def b32decode(text: str) -> bytes:
    if not text or text != text.lower() or not text.isascii() or "=" in text:
        raise InvalidInput("base32 text must be non-empty lowercase ASCII without padding")
    padded = text.upper() + "=" * (-len(text) % 8)
    try:
        return base64.b32decode(padded, casefold=False)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"not valid base32: {exc}") from None


def b64encode(data: bytes) -> str:
    """Unpadded base64url, the form every binary field in our JSON uses."""
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def b64decode(text: str) -> bytes:
    if not isinstance(text, str) or not text.isascii() or "=" in text:
        raise InvalidInput("expected unpadded base64url text")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"not valid base64url: {exc}") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
