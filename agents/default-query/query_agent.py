"""The default query agent: answer the prompt with scoped, aggregate SQL (docs/default-agents.md).

With an LLM allowed by the room, a bounded tool loop answers; on any LLM trouble, and always without
an LLM, a small intent grammar maps the question to one SQL query and answers with a sentence and a
Markdown table, or explains what can be asked.
"""

from __future__ import annotations

from query_answer import deterministic_answer
from query_llm import LlmUnavailable, llm_answer

from hivemind_agent import BridgeError, Context, Schema


def _note(ctx: Context, message: str, **fields: str) -> None:
    """A diagnostics line; logging must never decide a stage's fate."""
    try:
        ctx.log(message, **fields)
    except BridgeError:
        return


def answer(ctx: Context) -> str:
    """The query stage: the raw answer to the prompt (the mediator sees it next)."""
    schema: Schema = ctx.input.schema if ctx.input.schema is not None else ctx.schema()
    question = ctx.prompt or ""
    if ctx.input.llm_available and question.strip():
        try:
            return llm_answer(ctx, schema, question)
        except LlmUnavailable as exc:
            _note(ctx, "llm mode failed; answering deterministically", reason=str(exc)[:500])
    return deterministic_answer(question, schema, ctx.sql)
