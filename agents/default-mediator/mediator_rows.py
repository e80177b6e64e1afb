"""Heuristics that tell row-level data from aggregates in an answer (docs/default-agents.md).

They run only in rooms that release aggregates only. Each looks at the answer's shape, not at the
room's data (the mediator has none): tables (Markdown, delimited text, JSON lists of objects),
per-line lists and identifiers. They are a second line behind the runner, which already enforces
aggregation and minimum group sizes on the query agent's SQL; they catch an answer that did not come
from such a query (an uploaded agent that leaks what an LLM read, a document excerpt, a bug).

Each check returns a reason a requester can read, or None. False negatives: prose ("Ann earns 90k"),
names that are not Title Case, tables whose headers claim to be aggregates. False positives: group
keys that look like names ("Human Resources: 81,000" without an aggregate word), small counts that
are legitimately small (a COUNT(DISTINCT ...) per group).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
PERSON_NAME = re.compile(r"\b[A-Z][a-z]+(?:[ '-][A-Z][a-z]+){1,2}\b")
LIST_ITEM = re.compile(r"^\s*(?:[-*+\u2022]|\d{1,3}[.)])\s+(?P<body>.+)$")
AGGREGATE_WORDS = re.compile(
    r"(?i)\b(?:count|counts|n|number|num|total|totals|sum|avg|average|mean|median|min|minimum|max|maximum|"
    r"share|percent|percentage|pct|rate|ratio|proportion|frequency|freq|people|persons|employees|rows|"
    r"records|members|groups?|distinct|how many)\b|%"
)
COUNT_HEADERS = frozenset({"count", "n", "number", "how many", "frequency", "freq", "rows", "records"})
# Headers that name a person or a per-person identifier, compared after folding case and separators.
PERSON_HEADERS = frozenset(
    {
        "name", "names", "first name", "last name", "full name", "surname", "given name", "employee",
        "employee name", "person", "patient", "patient name", "customer", "customer name", "client",
        "client name", "user", "username", "user name", "email", "e mail", "email address", "phone",
        "phone number", "ssn", "address", "home address", "id",
    }
)  # fmt: skip
MIN_DELIMITED_LINES = 3
MIN_LISTED_PEOPLE = 2


@dataclass(frozen=True, slots=True)
class TableView:
    """A table found in an answer: where it was, its header cells and its data cells as text."""

    where: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


def _fold(header: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", header.lower()))


# --- finding tables ------------------------------------------------------------------------------


def _markdown_cells(line: str) -> list[str]:
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", body)]


_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(?:\|\s*:?-{3,}:?\s*)*\|?\s*$")


def markdown_tables(text: str) -> list[TableView]:
    """GitHub-style Markdown tables: a header row, a ``---`` separator row, then data rows."""
    lines = text.splitlines()
    tables = []
    index = 0
    while index + 1 < len(lines):
        if "|" in lines[index] and _SEPARATOR.match(lines[index + 1]):
            headers = _markdown_cells(lines[index])
            end = index + 2
            rows = []
            while end < len(lines) and "|" in lines[end] and lines[end].strip():
                rows.append(tuple(_markdown_cells(lines[end])))
                end += 1
            tables.append(TableView(f"the table at line {index + 1}", tuple(headers), tuple(rows)))
            index = end
        else:
            index += 1
    return tables


def _delimiter_count(line: str, delimiter: str) -> int:
    # "81,234" is a number, not two fields.
    return len(re.findall(rf"(?<!\d){re.escape(delimiter)}|{re.escape(delimiter)}(?!\d{{3}}\b)", line))


def delimited_tables(text: str) -> list[TableView]:
    """Runs of 3+ lines with the same number of commas, semicolons or tabs (CSV-like rows)."""
    lines = text.splitlines()
    tables = []
    for delimiter in (",", ";", "\t"):
        start = 0
        while start < len(lines):
            line = lines[start]
            count = _delimiter_count(line, delimiter)
            if count == 0 or "|" in line or LIST_ITEM.match(line):
                start += 1
                continue
            end = start + 1
            while (
                end < len(lines)
                and _delimiter_count(lines[end], delimiter) == count
                and "|" not in lines[end]
            ):
                end += 1
            if end - start >= MIN_DELIMITED_LINES:
                cells = [tuple(cell.strip() for cell in lines[i].split(delimiter)) for i in range(start, end)]
                tables.append(
                    TableView(f"the delimited rows at line {start + 1}", cells[0], tuple(cells[1:]))
                )
            start = end
    return tables


def json_tables(value: Any, where: str = "the answer") -> Iterator[TableView]:
    """Lists of JSON objects, anywhere in a JSON answer, as tables keyed by the objects' keys."""
    if isinstance(value, Mapping):
        for key, inner in value.items():
            yield from json_tables(inner, f"{where}.{key}")
    elif isinstance(value, list):
        objects = [item for item in value if isinstance(item, Mapping)]
        if objects:
            headers = tuple(dict.fromkeys(str(key) for item in objects for key in item))
            rows = tuple(tuple(str(item.get(header, "")) for header in headers) for item in objects)
            yield TableView(f"the list at {where}", headers, rows)
        for index, item in enumerate(value):
            yield from json_tables(item, f"{where}[{index}]")


# --- judging tables ------------------------------------------------------------------------------


def _is_aggregate_header(header: str) -> bool:
    return bool(AGGREGATE_WORDS.search(header))


def _is_count_header(header: str) -> bool:
    folded = _fold(header)
    return folded in COUNT_HEADERS or folded.startswith(("count", "number of"))


def _integer(cell: str) -> int | None:
    cleaned = cell.replace(",", "").strip()
    return int(cleaned) if re.fullmatch(r"\d+", cleaned) else None


def _identifier_reason(table: TableView) -> str | None:
    for column, header in enumerate(table.headers):
        if _fold(header) in PERSON_HEADERS:
            return f"{table.where} has a {header!r} column, which describes individuals"
        values = [row[column] for row in table.rows if column < len(row)]
        if values and sum(bool(EMAIL.fullmatch(value)) for value in values) * 2 >= len(values):
            return f"{table.where} lists email addresses"
    return None


def _small_group_reason(table: TableView, aggregate_columns: list[int], min_group_size: int) -> str | None:
    if len(aggregate_columns) == len(table.headers):  # no group key: one overall figure
        return None
    for column in aggregate_columns:
        if not _is_count_header(table.headers[column]):
            continue
        counts = [_integer(row[column]) for row in table.rows if column < len(row)]
        small = [count for count in counts if count is not None and count < min_group_size]
        if small:
            return (
                f"{table.where} reports groups of fewer than {min_group_size} "
                f"(smallest: {min(small)}), below the room's minimum group size"
            )
    return None


def table_reason(table: TableView, min_group_size: int) -> str | None:
    """Why ``table`` looks like row-level data, or None."""
    if not table.rows:
        return None
    reason = _identifier_reason(table)
    if reason is not None:
        return reason
    aggregate_columns = [index for index, header in enumerate(table.headers) if _is_aggregate_header(header)]
    if not aggregate_columns:
        many = len(table.rows) >= 2
        return f"{table.where} lists rows without any count, total or average column" if many else None
    return _small_group_reason(table, aggregate_columns, min_group_size)


def list_reason(text: str) -> str | None:
    """Per-line lists of individuals: "- Ann Lee: 91,000", one person per line, no aggregate words."""
    people = 0
    for line in text.splitlines():
        item = LIST_ITEM.match(line)
        if item is None:
            continue
        body = item.group("body")
        if EMAIL.search(body):
            people += 1
        elif PERSON_NAME.search(body) and re.search(r"\d", body) and not AGGREGATE_WORDS.search(body):
            people += 1
    if people >= MIN_LISTED_PEOPLE:
        return f"it lists {people} individual entries, one per line"
    return None


def row_level_reason(text: str, structured: Any, min_group_size: int) -> str | None:
    """The first sign of row-level data in an answer (its text, and its JSON when it was JSON)."""
    tables: list[TableView] = markdown_tables(text) + delimited_tables(text)
    if structured is not None:
        tables += list(json_tables(structured))
    for table in tables:
        reason = table_reason(table, min_group_size)
        if reason is not None:
            return reason
    reason = list_reason(text)
    if reason is not None:
        return reason
    if EMAIL.search(text):
        return "it contains an email address, which identifies a person"
    return None


def strings_in(value: Any) -> Sequence[str]:
    """Every string in a JSON value (keys included), for checks that read text."""
    found: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, Mapping):
            found += [str(key) for key in item]
            stack += list(item.values())
        elif isinstance(item, list | tuple):
            stack += list(item)
    return found
