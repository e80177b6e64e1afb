"""The default mediator: the last agent between the raw answer and the requester.

It has no data tools. It reads the raw answer, the room's rules and the output rules of the run's
ScopePolicy, and posts the final answer or a refusal (docs/default-agents.md). With an LLM allowed, a
review comes first; the deterministic gates always apply last.
"""

from __future__ import annotations

from typing import Any

from mediator_gates import Answer, OutputRules, apply_gates, deny_reason, redact, refusal, room_shape
from mediator_llm import llm_review

from hivemind_agent import Context


def _refusal_text(reason: str, rules: OutputRules) -> str:
    """An LLM's reason passes the same gates as an answer: it must not carry what it withholds."""
    if deny_reason(reason, rules) is not None:
        return "the room's reviewer refused it"
    released = redact(Answer(text=reason, data=None), rules).text or ""
    return f"the room's reviewer refused it ({released.rstrip('.')})"


def mediate(ctx: Context) -> str | dict[str, Any]:
    """The mediator stage: the final answer (text or JSON), or ``{"refusal": reason}``."""
    answer = Answer.from_stage(ctx.input.stage)
    rules = OutputRules.from_stage(ctx.input.stage)
    shape = room_shape(ctx.input.rules, ctx.input.policy)
    if ctx.input.llm_available:
        verdict = llm_review(ctx, ctx.prompt, answer.readable())
        if verdict is not None and not verdict.allow:
            return refusal(_refusal_text(verdict.reason, rules))
    return apply_gates(answer, rules, shape)
