"""Example mediator for the negotiation room: exactly one slot, one the requester proposed, leaves.

The answer passes when it is ``Agreed slot: YYYY-MM-DD HH:MM`` with a slot that appears in the
requester's own prompt (so it reveals only that A is free then, nothing else of A's calendar), or
when it holds no digit at all (a fixed message that cannot carry a time). Anything else is refused.
"""

from __future__ import annotations

import re
from typing import Any

from hivemind_agent import Context

SLOT = re.compile(r"\b(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2})\b")
AGREED = re.compile(r"Agreed slot: (\d{4}-\d{2}-\d{2} \d{2}:\d{2})")


def refusal(reason: str) -> dict[str, str]:
    return {"refusal": f"The answer was withheld: {reason}."}


def release(answer: Any, prompt: str) -> str | dict[str, str]:
    if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
        return refusal("the scheduler must answer in text")
    text = answer["text"].strip()
    if not re.search(r"\d", text):
        return text
    agreed = AGREED.fullmatch(text)
    if agreed is None:
        return refusal("the scheduler's answer is not exactly one agreed slot")
    proposed = {f"{day} {time}" for day, time in SLOT.findall(prompt)}
    if agreed.group(1) not in proposed:
        return refusal("the agreed slot is not one the requester proposed")
    return f"Agreed slot: {agreed.group(1)}"


def mediate(ctx: Context) -> str | dict[str, str]:
    return release(dict(ctx.input.stage.get("answer") or {}), ctx.prompt or "")
