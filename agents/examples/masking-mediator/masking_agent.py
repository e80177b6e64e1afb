"""An example mediator that masks email addresses and IBANs, keeping just enough to stay useful.

``jane.doe@acme.example`` becomes ``j***@acme.example`` (the domain says which organisation, not
who), and ``DE89 3704 0044 0532 0130 00`` becomes ``DE** **** 3000`` (country and last four, as on
a bank statement). Anything shaped like an IBAN is masked, valid checksum or not: masking too much is
the safe mistake. Then the room's own output rules apply as in the default mediator: a deny pattern
refuses, redact patterns replace with ``[REDACTED]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from hivemind_agent import Context

EMAIL = re.compile(
    r"\b([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})\b"
)
# Two letters, two check digits, then 11-30 letters/digits, optionally in groups of four.
IBAN = re.compile(r"\b([A-Z]{2})\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
REDACTED = "[REDACTED]"


def mask_iban(found: re.Match[str]) -> str:
    compact = found.group(0).replace(" ", "")
    return f"{found.group(1)}** **** {compact[-4:]}"


def mask(text: str) -> str:
    text = EMAIL.sub(lambda found: f"{found.group(1)}***@{found.group(2)}", text)
    return IBAN.sub(mask_iban, text)


def _walk(value: Any, change: Callable[[str], str]) -> Any:
    """``value`` with ``change`` applied to every string in it (text answers and JSON answers alike)."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, Mapping):
        return {key: _walk(inner, change) for key, inner in value.items()}
    if isinstance(value, list):
        return [_walk(inner, change) for inner in value]
    return value


def release(answer: Mapping[str, Any], output_rules: Mapping[str, Any]) -> str | dict[str, Any]:
    """The masked answer under the room's output rules, or a refusal."""
    masked = _walk(answer["text"] if "text" in answer else dict(answer["json"]), mask)
    readable = masked if isinstance(masked, str) else json.dumps(masked, ensure_ascii=False)
    for number, pattern in enumerate(output_rules.get("deny") or [], start=1):
        if re.search(pattern, readable):
            return {"refusal": f"The answer was withheld: it matches deny rule {number} of the room."}
    redact = [re.compile(pattern) for pattern in output_rules.get("redact") or []]

    def redacted(text: str) -> str:
        for pattern in redact:
            text = pattern.sub(REDACTED, text)
        return text

    return _walk(masked, redacted)


def mediate(ctx: Context) -> str | dict[str, Any]:
    stage = ctx.input.stage
    answer = stage.get("answer")
    if not isinstance(answer, Mapping) or not ({"text"} == set(answer) or {"json"} == set(answer)):
        raise ValueError('stage.answer must be {"text": ...} or {"json": ...}')
    return release(answer, stage.get("output_rules") or {})
