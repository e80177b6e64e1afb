"""Deterministic answers: run the intent's SQL and say what came back, or say what can be asked.

Every reply is plain text for a person: a short sentence, and a Markdown table when there are rows.
Replies to questions outside the grammar list example questions built from the schema this stage may
see, using only the aggregate functions the room allows, so every example is one that works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from query_intents import (
    FUNCTION_LABELS,
    FUNCTIONS,
    Intent,
    Unmatched,
    build_sql,
    is_numeric,
    parse_question,
)

from hivemind_agent import BudgetExhausted, Denied, InvalidRequest, Schema, SqlResult, Table

RunSql = Callable[[str], SqlResult]
Cell = str | int | float | bool | None


# --- what the room allows ------------------------------------------------------------------------


def allowed_functions(schema: Schema) -> tuple[str, ...]:
    """Aggregate functions this stage may use (all five when the bridge states no aggregation rule)."""
    if schema.aggregate is None:
        return FUNCTIONS
    return tuple(function.upper() for function in schema.aggregate.functions)


def aggregation_required(schema: Schema) -> bool:
    return schema.aggregate is not None and schema.aggregate.required


def min_group_size(schema: Schema) -> int | None:
    return schema.aggregate.min_group_size if aggregation_required(schema) and schema.aggregate else None


def scope_summary(schema: Schema) -> str:
    """One sentence on what this stage sees and may do."""
    visible = "; ".join(f"{table.name} ({', '.join(table.column_names)})" for table in schema.tables)
    if not visible:
        return "This room shows me no tables."
    functions = ", ".join(allowed_functions(schema)) or "none"
    if aggregation_required(schema):
        rule = f"Only aggregates over groups of at least {min_group_size(schema)} rows, with {functions}."
    else:
        rule = f"Aggregate functions: {functions}; row listings are allowed."
    return f"What I can see: {visible}. {rule}"


def _noun(table: Table, tables: int) -> str:
    if table.name.isalpha():
        return table.name
    return "rows" if tables == 1 else f"rows in {table.name}"


def example_questions(schema: Schema) -> list[str]:
    """Questions the grammar answers on this schema with the functions the room allows."""
    table = next((table for table in schema.tables if table.columns), None)
    if table is None:
        return []
    functions = allowed_functions(schema)
    key = next(
        (column.name for column in table.columns if not is_numeric(column.type)), table.columns[0].name
    )
    measure = next(
        (column.name for column in table.columns if is_numeric(column.type) and column.name != key), None
    )
    examples = []
    if "COUNT" in functions:
        examples += [
            f"how many {_noun(table, len(schema.tables))} are there?",
            f"count by {key}",
            f"top 3 {key} by count",
        ]
    if measure is not None:
        for function in ("AVG", "SUM", "MAX", "MIN"):
            if function in functions:
                label = FUNCTION_LABELS[function]
                examples += [f"{label} {measure} by {key}", f"{label} {measure}"]
    if not aggregation_required(schema):
        examples.append(f"list {key}" + (f", {measure}" if measure else ""))
    return examples


def help_reply(schema: Schema, lead: str | None = None) -> str:
    """An honest "here is what I can do" reply, with concrete questions for this room."""
    examples = example_questions(schema)
    parts = [lead or "I could not match your question to a query I can run."]
    if examples:
        parts.append("I can answer questions like:\n" + "\n".join(f"- {question}" for question in examples))
    parts.append(scope_summary(schema))
    return "\n\n".join(parts)


# --- formatting ----------------------------------------------------------------------------------


def format_value(value: Cell) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() else f"{value:,.2f}"
    return value


def _key_text(value: Cell) -> str:
    """A group key as it is in the data (no thousands separators in a year or a code)."""
    return "(none)" if value is None else str(value)


def _cell(value: Cell) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_cell(header) for header in headers) + " |"]
    lines.append("|" + "---|" * len(headers))
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_header(intent: Intent) -> str:
    if intent.kind == "distinct":
        return f"distinct {intent.column}"
    if intent.function == "COUNT":
        return "count"
    return f"{FUNCTION_LABELS[intent.function or 'COUNT']} {intent.column}"


def _rows(intent: Intent, result: SqlResult) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells: group keys as they are, aggregates as numbers."""
    keys = len(intent.group_by)
    headers = list(intent.group_by)
    if intent.kind != "list":
        headers.append(_metric_header(intent))
        if len(result.columns) > keys + 1:
            headers.append("count")
    rows = [
        [_key_text(value) if index < keys else format_value(value) for index, value in enumerate(row)]
        for row in result.rows
    ]
    return headers, rows


def _sentence(intent: Intent, result: SqlResult, schema: Schema) -> str:
    k = min_group_size(schema)
    only = f" (only groups of at least {k} rows are reported)" if k and intent.group_by else ""
    by = ", ".join(intent.group_by)
    if intent.kind == "count":
        return f"There are {format_value(result.rows[0][0])} {intent.noun or 'rows'}."
    if intent.kind == "distinct":
        return f"There are {format_value(result.rows[0][0])} different {intent.column} values."
    if intent.kind == "list":
        return f"{len(result.rows)} rows of {by}:"
    metric = _metric_header(intent)
    if intent.kind == "top":
        return f"{'Top' if intent.descending else 'Bottom'} {intent.limit} {by} by {metric}{only}:"
    if not intent.group_by:
        sentence = f"The {metric} is {format_value(result.rows[0][0])}"
        if len(result.columns) > 1:
            sentence += f" (over {format_value(result.rows[0][1])} rows)"
        return sentence + "."
    subject = f"Count of {intent.noun or 'rows'}" if intent.function == "COUNT" else metric.capitalize()
    return f"{subject} by {by}{only}:"


def describe(intent: Intent, result: SqlResult, schema: Schema) -> str:
    """A short sentence and a Markdown table for a query result."""
    k = min_group_size(schema)
    if not result.rows:
        if k:
            return (
                f"The room reports nothing for this question: no group has at least {k} rows "
                "(smaller groups are withheld)."
            )
        return "No rows match this question."
    headers, rows = _rows(intent, result)
    text = _sentence(intent, result, schema) + "\n\n" + markdown_table(headers, rows)
    if result.truncated:
        text += f"\n\n(The result was cut at {len(result.rows)} rows.)"
    return text


# --- the deterministic answer --------------------------------------------------------------------


def refusal_of(intent: Intent, schema: Schema) -> str | None:
    """Why the room's rules rule this intent out before it is even tried, or None."""
    if intent.kind == "list" and aggregation_required(schema):
        return (
            "This room answers only aggregate questions (counts, totals, averages) over groups of at "
            f"least {min_group_size(schema)} rows; it does not list individual rows."
        )
    allowed = allowed_functions(schema)
    if intent.function is not None and intent.function not in allowed:
        label = FUNCTION_LABELS[intent.function]
        return (
            f"This room does not allow {label} ({intent.function}); it allows {', '.join(allowed) or 'none'}."
        )
    return None


def deterministic_answer(question: str, schema: Schema, run_sql: RunSql) -> str:
    """The grammar's answer to ``question``: a result, what the rules forbid, or what can be asked."""
    parsed = parse_question(question, schema)
    if isinstance(parsed, Unmatched):
        lead = None if parsed.reason is None else f"I could not answer that: {parsed.reason}."
        return help_reply(schema, lead)
    refusal = refusal_of(parsed, schema)
    if refusal is not None:
        return help_reply(schema, refusal)
    sql = build_sql(parsed, with_count="COUNT" in allowed_functions(schema))
    try:
        result = run_sql(sql)
    except BudgetExhausted:
        raise
    except (Denied, InvalidRequest) as exc:
        # The bridge's reason is about the scope rules, which this stage may know.
        return help_reply(schema, f"The room refused that query: {exc.message}")
    return describe(parsed, result, schema)
