"""LLM mode of the default query agent: a bounded tool loop over the bridge's scoped tools.

The model gets the question, the room's rules, and four tools (``sql``, ``schema``, ``list_items``,
``read_item``) that call the bridge, which enforces the scope whatever the model asks. Tool errors
(a refused query, an unknown item) go back to the model as tool results so it can adjust. Anything
else that goes wrong (no provider, budget used up, a malformed reply, no answer within the call
limit) raises :class:`LlmUnavailable`, and the agent answers deterministically instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from query_answer import scope_summary

from hivemind_agent import BudgetExhausted, Context, Denied, InvalidRequest, Schema

MAX_LLM_CALLS = 6
MAX_TOKENS_PER_CALL = 1000
MAX_TOOL_RESULT_CHARS = 8000

SYSTEM_PROMPT = """You answer a question about the data of a data clean room.
Use the tools to query it. The room's rules are enforced by the tools: a refused query returns an
error you can read and adjust to. Prefer one precise SQL query (SQLite dialect, single SELECT).
Answer in a few sentences, with a Markdown table when there are several numbers. Never invent data:
answer only from tool results, and say so when the room does not allow what is asked."""

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "sql",
            "description": "Run one SQLite SELECT against the room data this stage may see.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "schema",
            "description": "The tables and columns this stage may query, and the aggregation rule.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "list_items",
            "description": "The documents this stage may read (id, name, content type, metadata).",
            "parameters": {"type": "object", "properties": {}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read_item",
            "description": "The text of one document, by id (redacted where the room says so).",
            "parameters": {
                "type": "object",
                "properties": {"id": {"type": "string"}},
                "required": ["id"],
            },
        },
    },
]


class LlmUnavailable(Exception):
    """LLM mode could not produce an answer; the caller falls back to the deterministic grammar."""


def _schema_json(schema: Schema) -> dict[str, Any]:
    return {
        "tables": [
            {"name": table.name, "columns": [{"name": c.name, "type": c.type} for c in table.columns]}
            for table in schema.tables
        ],
        "aggregate": None
        if schema.aggregate is None
        else {
            "required": schema.aggregate.required,
            "min_group_size": schema.aggregate.min_group_size,
            "functions": list(schema.aggregate.functions),
        },
        "max_rows": schema.max_rows,
    }


def run_tool(ctx: Context, name: str, arguments: Mapping[str, Any]) -> Any:
    """One tool call through the bridge; the bridge's refusals become results the model can read."""
    try:
        if name == "sql":
            result = ctx.sql(str(arguments.get("query", "")))
            return {
                "columns": list(result.columns),
                "rows": [list(row) for row in result.rows],
                "truncated": result.truncated,
            }
        if name == "schema":
            return _schema_json(ctx.schema())
        if name == "list_items":
            return [
                {
                    "id": item.id,
                    "name": item.name,
                    "content_type": item.content_type,
                    "metadata": dict(item.metadata),
                }
                for item in ctx.items()
            ]
        if name == "read_item":
            item = ctx.item(str(arguments.get("id", "")))
            return {"id": item.id, "name": item.name, "text": item.text, "binary": item.text is None}
    except BudgetExhausted:
        raise
    except (Denied, InvalidRequest, ValueError) as exc:
        return {"error": getattr(exc, "code", "invalid_arguments"), "message": str(exc)}
    return {"error": "unknown_tool", "message": f"there is no tool {name!r}"}


def _tool_message(ctx: Context, call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        result: Any = {"error": "invalid_arguments", "message": "tool arguments must be a JSON object"}
    else:
        result = run_tool(ctx, str(function.get("name", "")), arguments)
    content = json.dumps(result, default=str)
    if len(content) > MAX_TOOL_RESULT_CHARS:
        content = content[:MAX_TOOL_RESULT_CHARS] + " ... (cut)"
    return {"role": "tool", "tool_call_id": str(call.get("id", "")), "content": content}


def llm_answer(ctx: Context, schema: Schema, question: str) -> str:
    """The model's answer after at most ``MAX_LLM_CALLS`` completions. Raises :class:`LlmUnavailable`."""
    calls = min(MAX_LLM_CALLS, ctx.input.budgets.llm_calls)
    context = f"{scope_summary(schema)}\n\nThe room's rules:\n{ctx.input.rules}".strip()
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": f"{SYSTEM_PROMPT}\n\n{context}"},
        {"role": "user", "content": question},
    ]
    try:
        for _ in range(calls):
            completion = ctx.llm.chat(
                messages, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=MAX_TOKENS_PER_CALL
            )
            tool_calls = completion.message.get("tool_calls") or []
            if not tool_calls:
                if not completion.text or not completion.text.strip():
                    raise LlmUnavailable("the model returned an empty answer")
                return completion.text.strip()
            if not isinstance(tool_calls, list) or not all(isinstance(call, dict) for call in tool_calls):
                raise LlmUnavailable("the model returned malformed tool calls")
            messages.append({"role": "assistant", "content": completion.text, "tool_calls": tool_calls})
            messages += [_tool_message(ctx, call) for call in tool_calls]
    except LlmUnavailable:
        raise
    except Exception as exc:
        raise LlmUnavailable(f"{type(exc).__name__}: {exc}") from exc
    raise LlmUnavailable(f"no final answer within {calls} model calls")
