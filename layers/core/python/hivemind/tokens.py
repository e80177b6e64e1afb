"""Secret token formats: ``<prefix>_<base32 lowercase, no padding>`` of 32 random bytes (DESIGN §3)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from enum import StrEnum

from hivemind.encoding import b32decode, b32encode
from hivemind.errors import InvalidToken

SECRET_BYTES = 32


class TokenKind(StrEnum):
    """What a secret is; the value is its prefix."""

    TENANT = "hmk"  # account key of an owner or participant; pays for runs
    INVITE = "hmq"  # room capability from an invite link
    CREDIT_CODE = "hmcc"  # prepaid credit code
    ADMIN = "hma"  # operator key


@dataclass(frozen=True, slots=True)
class Secret:
    """A parsed secret. ``repr`` never shows the bytes, so secrets do not leak into logs."""

    kind: TokenKind
    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != SECRET_BYTES:
            raise InvalidToken(f"a {self.kind.value}_ secret is {SECRET_BYTES} bytes, got {len(self.raw)}")

    @classmethod
    def generate(cls, kind: TokenKind) -> Secret:
        return cls(kind, secrets.token_bytes(SECRET_BYTES))

    @classmethod
    def parse(cls, text: str, *, expect: TokenKind | None = None) -> Secret:
        kind, raw = parse_token(text)
        if expect is not None and kind is not expect:
            raise InvalidToken(f"expected a {expect.value}_ token, got a {kind.value}_ token")
        return cls(kind, raw)

    def token(self) -> str:
        return format_token(self.kind, self.raw)

    def __repr__(self) -> str:
        return f"Secret({self.kind.value}_…)"


def format_token(kind: TokenKind, raw: bytes) -> str:
    return f"{kind.value}_{b32encode(raw)}"


def parse_token(text: str) -> tuple[TokenKind, bytes]:
    """Split a token into its kind and 32 bytes; every malformation has its own message."""
    if not isinstance(text, str) or "_" not in text:
        raise InvalidToken("a token looks like hmk_<52 base32 characters>; this one has no prefix")
    prefix, _, body = text.strip().partition("_")
    try:
        kind = TokenKind(prefix)
    except ValueError:
        known = ", ".join(f"{k.value}_" for k in TokenKind)
        raise InvalidToken(f"unknown token prefix {prefix!r}_ (known: {known})") from None
    try:
        raw = b32decode(body)
    except Exception:
        raise InvalidToken(f"the part after {prefix}_ is not lowercase unpadded base32") from None
    if len(raw) != SECRET_BYTES:
        raise InvalidToken(f"a {prefix}_ token carries {SECRET_BYTES} bytes, this one {len(raw)}")
    return kind, raw


def random_id(prefix: str, nbytes: int = 10) -> str:
    """A public identifier such as ``room_…`` or ``run_…`` (not a secret; 80 random bits by default)."""
    return f"{prefix}_{b32encode(os.urandom(nbytes))}"
