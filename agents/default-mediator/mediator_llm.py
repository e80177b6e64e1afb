"""LLM review for the default mediator: allow or refuse, with a reason, before the deterministic gates.

The review can only make the outcome stricter: a refusal stands, an approval still goes through every
deterministic gate. Any trouble with the model (no provider, budget, a reply that is not the expected
JSON) means no review, and the gates decide alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from hivemind_agent import BridgeError, Context

MAX_TOKENS = 400
MAX_REASON_CHARS = 300

INSTRUCTIONS = """You review an answer before it leaves a data clean room.
The room's rules say what may leave. Refuse when the answer reveals what the rules forbid: data about
identifiable individuals, rows where only aggregates are allowed, groups smaller than allowed,
anything the rules name as secret. Otherwise allow. Do not rewrite the answer.
Reply with ONLY a JSON object: {"decision": "allow" or "refuse", "reason": "<one short sentence for the
person who asked; do not quote the withheld data>"}."""


@dataclass(frozen=True, slots=True)
class Verdict:
    allow: bool
    reason: str


def parse_verdict(text: str) -> Verdict:
    """The model's verdict; ``ValueError`` when the reply is not the expected JSON object."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError("the review holds no JSON object")
    body = json.loads(text[start : end + 1])
    if not isinstance(body, dict) or body.get("decision") not in ("allow", "refuse"):
        raise ValueError('the review must say {"decision": "allow" | "refuse"}')
    reason = body.get("reason")
    reason = reason.strip() if isinstance(reason, str) and reason.strip() else "the reviewer gave no reason"
    return Verdict(allow=body["decision"] == "allow", reason=reason[:MAX_REASON_CHARS])


def llm_review(ctx: Context, prompt: str | None, answer_text: str) -> Verdict | None:
    """The model's verdict on the answer, or None when no review could be had."""
    messages = [
        {"role": "system", "content": f"{INSTRUCTIONS}\n\nThe room's rules:\n{ctx.input.rules}"},
        {"role": "user", "content": json.dumps({"question": prompt, "answer": answer_text})},
    ]
    try:
        completion = ctx.llm.chat(messages, temperature=0, max_tokens=MAX_TOKENS)
        return parse_verdict(completion.text or "")
    except (BridgeError, ValueError, RecursionError) as exc:
        try:
            ctx.log(
                "llm review unavailable; deterministic gates only",
                level="warning",
                reason=f"{type(exc).__name__}: {exc}"[:500],
            )
        except BridgeError:
            pass
        return None
