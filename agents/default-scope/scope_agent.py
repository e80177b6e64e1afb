"""The default scope agent: the room's rules in, a ScopePolicy out (docs/default-agents.md).

Steps, each of which can only narrow what the previous one produced:

1. **Compile** the rules' policy block (docs/rules.md) into a ScopePolicy; without a block, take the
   most restrictive policy over the room's schema (every table and column, aggregate-only, COUNT only,
   groups of at least 10, no document items). A malformed block fails the stage: the run fails closed.
2. **Bound** it by the room's ``data_policy`` when the manifest sets one (their intersection).
3. **LLM** (only when the room allows a provider): ask for a narrower policy from the rules' prose and
   keep it only if the runner finds it valid and narrower; otherwise keep step 2's.
4. **Least privilege from inspection**: when the query agent's files are inspectable and never call
   the SQL tool (or the item tools), its policy shows no tables (or no items).
5. **Simulation**: when the prompt is visible and the policy has output deny patterns, run the query
   agent under the candidate; if its raw answer would be denied, drop the columns that produced the
   match, or every table when that cannot be told.

The agent never judges a policy itself: validity, narrowing and the intersection with the room's
``data_policy`` come from the bridge (``ctx.check_policy``), which uses the runner's own policy code.
What stays here only removes things from a policy (tables, columns, items).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from hivemind_agent import BridgeError, Context, InvalidRequest, PolicyCheck, Schema
from hivemind_agent.rules import RulesError, load_policy_block

LLM_MAX_TOKENS = 1500
# Marks of a tool call in an agent's source, for the SDK, raw HTTP and MCP clients alike.
SQL_TOOL_MARKS = ("sql(", "tools/sql", "/mcp")
ITEM_TOOL_MARKS = ("item(", "items(", "tools/items", "/mcp")
# A matched value shorter than this is too common ("5", "HR") to blame one column for a denial.
MIN_BLAMED_VALUE_CHARS = 3

LLM_INSTRUCTIONS = """You narrow the data scope of a data clean room run.
You get the room's rules (prose), the schema, and the current ScopePolicy as JSON.
Return ONLY a JSON object: a ScopePolicy that is the current one or narrower, following the rules' prose.
Allowed changes: remove tables or columns; raise aggregate.min_group_size; remove aggregate.functions;
set aggregate.required to true; lower max_rows; remove items.allow rules; add regexes to items.redact,
output.deny or output.redact. Never change a table's "where". Never add tables, columns or functions.
If the prose asks for nothing narrower, return the current policy unchanged."""


def note(ctx: Context, message: str, *, level: str = "info", **fields: Any) -> None:
    """A log line for the run's diagnostics. Logging must never decide a stage's fate."""
    try:
        ctx.log(message, level=level, **fields)
    except BridgeError:
        return


class PolicyError(ValueError):
    """The runner refused a policy this agent built: a bug here, and the stage must not go on."""


def schema_tables(schema: Schema | None) -> dict[str, list[str]]:
    """Table name -> column names of the room's data (the scope stage sees the full schema)."""
    if schema is None:
        return {}
    return {table.name: list(table.column_names) for table in schema.tables}


def most_restrictive(schema: Mapping[str, list[str]]) -> dict[str, Any]:
    """Every table and column, every other section omitted: the runner reads omitted sections at their
    strictest (aggregate-only, COUNT over groups of 10+, 100 rows, no items, no output patterns)."""
    return {"tables": {table: {"columns": list(columns)} for table, columns in schema.items()}}


def _problems(check: PolicyCheck) -> str:
    return "; ".join(str(problem) for problem in check.errors)


def compile_rules(ctx: Context) -> tuple[dict[str, Any], str]:
    """Steps 1 and 2: the policy the room's texts ask for, within the room's ``data_policy``, and where
    it came from. One bridge call judges the policy and intersects it with the room's bound.

    Raises :class:`RulesError` for a block the rules format or the runner refuses.
    """
    loaded = load_policy_block(ctx.input.rules, ctx.input.policy)
    if loaded is None:
        check = ctx.check_policy(most_restrictive(schema_tables(ctx.input.schema)))
        if check.within_room is None:
            raise PolicyError(f"the most restrictive policy over the schema was refused: {_problems(check)}")
        return check.within_room, "no policy block: the most restrictive policy over the schema"
    block, data = loaded
    check = ctx.check_policy(data)
    if check.within_room is None:
        raise RulesError(f"{block.where}: the policy block is not a valid ScopePolicy: {_problems(check)}")
    return check.within_room, f"the policy block at {block.where}"


# --- LLM narrowing -------------------------------------------------------------------------------


def _json_object(text: str) -> Any:
    """The JSON object in an LLM reply, which may wrap it in a code fence or a sentence."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError("the reply holds no JSON object")
    return json.loads(text[start : end + 1])


def llm_narrow(ctx: Context, policy: dict[str, Any], schema: Mapping[str, list[str]]) -> dict[str, Any]:
    """The LLM's narrower proposal if it is one, else ``policy`` unchanged. Never raises for LLM trouble."""
    request = {
        "rules": ctx.input.rules,
        "policy_text": ctx.input.policy,
        "question": ctx.prompt,
        "schema": schema,
        "current_policy": policy,
    }
    messages = [
        {"role": "system", "content": LLM_INSTRUCTIONS},
        {"role": "user", "content": json.dumps(request)},
    ]
    try:
        completion = ctx.llm.chat(messages, temperature=0, max_tokens=LLM_MAX_TOKENS)
        proposal = _json_object(completion.text or "")
        if not isinstance(proposal, dict):
            raise ValueError("the reply's JSON is not an object")
        check = ctx.check_policy(proposal, bound=policy)
    except (BridgeError, ValueError, RecursionError) as exc:
        # JSON errors are ValueErrors: an unusable proposal, not a failed run.
        note(ctx, "llm proposal not used", level="warning", reason=f"{type(exc).__name__}: {exc}"[:500])
        return policy
    if check.policy is None:
        note(ctx, "llm proposal not used", level="warning", reason=_problems(check)[:500])
        return policy
    found = [f"{widening.against}: {widening.message}" for widening in check.widenings]
    # The LLM may not touch row filters: the rules' filters are the owner's words, kept verbatim.
    found += [
        f"tables.{table}.where: changed"
        for table, spec in check.policy["tables"].items()
        if table in policy["tables"] and spec["where"] != policy["tables"][table]["where"]
    ]
    if found:
        note(
            ctx,
            "llm proposal is not narrower; kept the compiled policy",
            level="warning",
            widenings=found[:10],
        )
        return policy
    note(ctx, "llm proposal accepted", tables=sorted(check.policy["tables"]))
    return check.policy


# --- least privilege from the query agent's source ------------------------------------------------


def least_privilege(
    policy: dict[str, Any], query_agent: Mapping[str, Any] | None
) -> tuple[dict[str, Any], list[str]]:
    """Drop the tables or items an inspectable query agent never asks for. Sealed agents keep everything."""
    files = (query_agent or {}).get("files")
    if not isinstance(files, Mapping) or not files:
        return policy, []
    source = "\n".join(text for text in files.values() if isinstance(text, str))
    notes = []
    narrowed = dict(policy)
    if policy["tables"] and not any(mark in source for mark in SQL_TOOL_MARKS):
        narrowed["tables"] = {}
        notes.append("the query agent's source never calls the SQL tool: no tables")
    if policy["items"]["allow"] and not any(mark in source for mark in ITEM_TOOL_MARKS):
        narrowed["items"] = {"allow": [], "redact": list(policy["items"]["redact"])}
        notes.append("the query agent's source never reads items: no items")
    return narrowed, notes


# --- simulation ----------------------------------------------------------------------------------


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _output_text(output: str | Mapping[str, Any] | None) -> str:
    if output is None:
        return ""
    return output if isinstance(output, str) else json.dumps(dict(output), default=str)


def _first_denied(text: str, patterns: list[str]) -> tuple[str, str] | None:
    for pattern in patterns:
        found = re.search(pattern, text)
        if found:
            return pattern, found.group(0)
    return None


def blamed_columns(
    ctx: Context, policy: Mapping[str, Any], pattern: str, matched: str
) -> dict[str, list[str]]:
    """Columns whose name the deny pattern matches, or whose values overlap the denied text."""
    blamed: dict[str, list[str]] = {}
    for table, spec in policy["tables"].items():
        for column in spec["columns"]:
            if re.search(pattern, column) or column in matched.lower():
                blamed.setdefault(table, []).append(column)
                continue
            if len(matched) < MIN_BLAMED_VALUE_CHARS:
                continue
            value, literal = f"CAST({_quoted(column)} AS TEXT)", _sql_literal(matched)
            # Identifiers are quoted and the text is an escaped literal; the scope stage reads everything
            # anyway, so this query can reveal nothing new to this agent.
            query = (
                f"SELECT 1 FROM {_quoted(table)} "  # noqa: S608
                f"WHERE length({value}) >= {MIN_BLAMED_VALUE_CHARS} "
                f"AND (instr({value}, {literal}) > 0 OR instr({literal}, {value}) > 0) LIMIT 1"
            )
            if ctx.sql(query).rows:
                blamed.setdefault(table, []).append(column)
    return blamed


def without_columns(policy: Mapping[str, Any], blamed: Mapping[str, list[str]]) -> dict[str, Any]:
    """``policy`` minus the blamed columns (a row filter keeps working: it may use hidden columns)."""
    tables = {}
    for table, spec in policy["tables"].items():
        columns = [column for column in spec["columns"] if column not in blamed.get(table, [])]
        if columns:
            tables[table] = {"columns": columns, "where": spec["where"]}
    return {**policy, "tables": tables}


def _simulated_denial(ctx: Context, policy: dict[str, Any], prompt: str) -> tuple[str, str] | None:
    try:
        result = ctx.simulate(policy, prompt)
    except InvalidRequest as exc:
        if exc.code == "invalid_policy":
            raise PolicyError(f"the runner refused the candidate policy: {exc.message}") from None
        raise
    if not result.ok:
        note(ctx, "simulation failed; nothing learned from it", level="warning", code=result.error_code)
        return None
    return _first_denied(_output_text(result.output), policy["output"]["deny"])


def tighten_by_simulation(ctx: Context, policy: dict[str, Any], prompt: str | None) -> dict[str, Any]:
    """Narrow ``policy`` when the query agent's simulated answer would be denied by the output rules."""
    if prompt is None or not policy["tables"] or not policy["output"]["deny"]:
        return policy
    try:
        denial = _simulated_denial(ctx, policy, prompt)
    except BridgeError as exc:
        # Out of simulations or time: the policy stands; the runner's output gate still applies.
        note(ctx, "simulation unavailable; kept the policy", level="warning", code=exc.code)
        return policy
    if denial is None:
        return policy
    no_tables = {**policy, "tables": {}}
    try:
        blamed = blamed_columns(ctx, policy, *denial)
    except BridgeError:
        blamed = {}
    tightened = without_columns(policy, blamed) if blamed else no_tables
    note(
        ctx, "simulated answer would be denied; tightened", blamed=blamed, tables=sorted(tightened["tables"])
    )
    if tightened["tables"]:
        try:
            still_denied = _simulated_denial(ctx, tightened, prompt) is not None
        except BridgeError:
            still_denied = True  # cannot confirm the narrower policy helps: show no tables
        if still_denied:
            note(
                ctx,
                "still denied (or unconfirmed) after dropping the blamed columns; no tables",
                level="warning",
            )
            tightened = no_tables
    return tightened


# --- the stage -----------------------------------------------------------------------------------


def decide(ctx: Context) -> dict[str, Any]:
    """The scope stage: the ScopePolicy for this run (posted as JSON by ``main``)."""
    policy, origin = compile_rules(ctx)
    bounded = ctx.input.stage.get("data_policy") is not None
    note(ctx, "compiled", origin=origin, bounded=bounded, tables=sorted(policy["tables"]))
    if ctx.input.llm_available:
        policy = llm_narrow(ctx, policy, schema_tables(ctx.input.schema))
    policy, notes = least_privilege(policy, ctx.input.stage.get("query_agent"))
    for text in notes:
        note(ctx, text)
    policy = tighten_by_simulation(ctx, policy, ctx.prompt)
    final = ctx.check_policy(policy)
    if final.policy is None or not final.narrower_than_room:
        # Every step above only narrows; reaching this means a bug, and the run must not go on.
        reasons = [str(problem) for problem in final.errors] + [w.message for w in final.widenings]
        raise PolicyError("the scope agent produced a policy the runner would refuse: " + "; ".join(reasons))
    return final.policy
