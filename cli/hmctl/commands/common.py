"""Options and formatting shared by the command modules."""

from __future__ import annotations

import time
from decimal import Decimal, InvalidOperation
from typing import Annotated

import typer

from hmctl.errors import UsageError

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON on stdout (for scripts).")]
YesFlag = Annotated[
    bool, typer.Option("--yes", "-y", help="Do not ask for confirmation (never accepts a room manifest).")
]
MICRO = 1_000_000


def usd(micro: int | None) -> str:
    """Micro-USD as dollars, e.g. ``$1.250000``."""
    if micro is None:
        return "-"
    sign = "-" if micro < 0 else ""
    return f"{sign}${abs(micro) // MICRO}.{abs(micro) % MICRO:06d}"


def parse_usd(text: str) -> int:
    """``12.5`` or ``$12.50`` -> 12_500_000 micro-USD; refuses more than six decimals or non-positive."""
    try:
        amount = Decimal(text.strip().lstrip("$"))
    except InvalidOperation:
        raise UsageError(f"{text!r} is not an amount in USD", hint="write it like 25 or 12.50") from None
    micro = amount * MICRO
    if micro != micro.to_integral_value() or micro <= 0:
        raise UsageError(f"{text!r} must be a positive amount with at most 6 decimals")
    return int(micro)


def when(timestamp: int | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def short(text: str | None, length: int = 16) -> str:
    if not text:
        return "-"
    return text if len(text) <= length else text[:length] + "…"
