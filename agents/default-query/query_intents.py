"""The default query agent's intent grammar: a question in, one aggregate SQL query out.

The grammar is small on purpose (docs/default-agents.md lists it). It only ever builds single
SELECTs over the schema the bridge shows this stage (the allowed projection), with aggregate functions
the room allows, so the SQL it emits is the kind the runner accepts.

Forms, after leading fillers ("what is", "show me", "the", ...) are dropped:

- ``how many <rows|records|people|...|table>`` and ``how many <noun> by <col>``: COUNT(*)
- ``how many <col>`` / ``how many different <col>``: COUNT(DISTINCT col)
- ``count by <col>``, ``count of <noun> by <col>``, ``number of <noun> per <col>``, ``breakdown by <col>``
- ``top N <col> [by count]``, ``most common <col>``, ``which <col> has the most <noun>``
- ``top N <col> by <function> <col>``, ``which <col> has the highest <function> <col>``
- ``<average|sum|min|max ...> [of] <col> [by <col>[, <col>]]``
- ``list <col>, <col>`` (only where the room does not require aggregation)

Column names match fuzzily: case, spaces/hyphens vs underscores, singular vs plural, and a close
spelling when exactly one column is that close.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from hivemind_agent import Schema, Table

FUNCTIONS = ("COUNT", "SUM", "AVG", "MIN", "MAX")
FUNCTION_WORDS = {
    "average": "AVG",
    "avg": "AVG",
    "mean": "AVG",
    "sum": "SUM",
    "total": "SUM",
    "minimum": "MIN",
    "min": "MIN",
    "lowest": "MIN",
    "smallest": "MIN",
    "maximum": "MAX",
    "max": "MAX",
    "highest": "MAX",
    "largest": "MAX",
    "biggest": "MAX",
}
FUNCTION_LABELS = {"COUNT": "count", "SUM": "total", "AVG": "average", "MIN": "minimum", "MAX": "maximum"}
# Nouns that mean "rows of the (only) table" in "how many <noun>".
GENERIC_NOUNS = frozenset(
    {
        "row", "record", "entry", "line", "person", "people", "employee", "user", "customer", "member",
        "individual", "item", "thing", "observation", "staff", "data", "result", "case", "patient",
        "order", "transaction", "event",
    }
)  # fmt: skip
NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "twenty": 20,
}  # fmt: skip
DEFAULT_TOP_N = 5
NUMERIC_TYPE_MARKS = ("INT", "REAL", "FLOA", "DOUB", "NUM", "DEC")
# A close spelling counts as a match only when this similar (difflib ratio) and unambiguous.
FUZZY_CUTOFF = 0.84

_FILLERS = re.compile(
    r"^(?:please|can you|could you|would you|tell me|show me|give me|i want to know|i'd like to know|"
    r"what is|what's|whats|what are|what were|what was|find|compute|calculate|get me|the)\s+"
)
_BY = r"(?:by|per|for each|for every|in each|grouped by|broken down by|across|split by)"
_COUNT_TAIL = re.compile(
    r"\s+(?:are there|are in (?:the|this) (?:data|table|room)|in (?:the|this) (?:data|table|room)|"
    r"do we have|do you have|exist|in total|there are|is there|overall|total|altogether)$"
)
_NUMBER = rf"(?:\d+|{'|'.join(NUMBER_WORDS)})"
_FUNCTION = f"(?:{'|'.join(FUNCTION_WORDS)})"
_EXTREME = r"(?:highest|largest|biggest|lowest|smallest)"
# (kind, form), tried in order; the first form whose reading resolves against the schema wins.
_FORMS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("count_by", re.compile(
        rf"^(?:counts?|breakdown|distribution|split|headcount)(?: of (?P<what>.+?))? {_BY} (?P<by>.+)$")),
    ("count_by", re.compile(rf"^(?P<what>.+?) counts? {_BY} (?P<by>.+)$")),
    ("count_by", re.compile(r"^(?:breakdown|distribution) of (?P<by>.+)$")),
    ("how_many", re.compile(
        rf"^(?:how many|number of|count of|total number of|count) (?P<what>.+?)(?: {_BY} (?P<by>.+))?$")),
    ("top", re.compile(rf"^(?:top|first)(?: (?P<n>{_NUMBER}))? (?P<col>.+?)(?: by (?P<metric>.+))?$")),
    ("most_common", re.compile(r"^most (?:common|frequent|popular)(?: (?P<n>\d+))? (?P<col>.+?)$")),
    ("which", re.compile(
        r"^which (?P<col>.+?) (?:has|have) (?:the )?(?:most|largest number of|highest count of)(?: .+)?$")),
    ("which", re.compile(rf"^which (?P<col>.+?) (?:has|have) (?:the )?(?P<metric>{_EXTREME} .+)$")),
    ("aggregate", re.compile(rf"^(?P<fn>{_FUNCTION})(?: of)?(?: the)? (?P<col>.+?)(?: {_BY} (?P<by>.+))?$")),
    ("list", re.compile(
        r"^(?:list|show|display|print|get|give)(?: me)?(?: (?:all|every|each|the))* (?P<cols>.+)$")),
)  # fmt: skip
_LIST_TAIL = re.compile(r"\s+(?:of|for|from|in) (?:all |every |each |the )*\w+$")
_SPLIT = re.compile(r"\s*(?:,|\band\b|&)\s*")


@dataclass(frozen=True, slots=True)
class Intent:
    """One question the grammar understood. ``function`` is None for a plain listing."""

    kind: str  # "count", "distinct", "aggregate" (grouped or overall), "top", "list"
    table: str
    function: str | None
    column: str | None  # the measured column (None for COUNT(*))
    group_by: tuple[str, ...] = ()
    limit: int | None = None
    descending: bool = True
    noun: str | None = None  # what the question counts ("people"), for the sentence


@dataclass(frozen=True, slots=True)
class Unmatched:
    """The question is outside the grammar, or names something the schema does not have."""

    reason: str | None = None


# --- names ---------------------------------------------------------------------------------------


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith(("sses", "xes", "ches", "shes")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def name_key(text: str) -> str:
    """Case, spaces, hyphens and plurals folded: "Job Titles" and "job_title" give the same key."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return "_".join(_singular(word) for word in words)


def _keys(text: str) -> set[str]:
    key = name_key(text)
    return {key, key.replace("_", "")}


def resolve_column(phrase: str, columns: tuple[str, ...]) -> str | None:
    """The column ``phrase`` names: exact after folding, else one unambiguous close spelling."""
    wanted = _keys(phrase)
    exact = [column for column in columns if _keys(column) & wanted]
    if len(exact) == 1:
        return exact[0]
    if exact:
        return next((column for column in exact if column == phrase), None)
    folded = {name_key(column): column for column in columns}
    close = difflib.get_close_matches(name_key(phrase), list(folded), n=2, cutoff=FUZZY_CUTOFF)
    return folded[close[0]] if len(close) == 1 else None


def is_numeric(column_type: str) -> bool:
    return any(mark in column_type.upper() for mark in NUMERIC_TYPE_MARKS)


# --- parsing -------------------------------------------------------------------------------------


def normalize_question(question: str) -> str:
    text = re.sub(r"\s+", " ", question.strip().lower())
    text = re.sub(r"[?!.;:]+$", "", text).strip()
    text = re.sub(r"[\"`]", "", text)
    while True:
        shorter = _FILLERS.sub("", text)
        if shorter == text:
            return text
        text = shorter


def _number(text: str | None) -> int | None:
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    return NUMBER_WORDS.get(text)


def _phrases(text: str) -> list[str]:
    return [part for part in _SPLIT.split(text.strip()) if part]


def _strip_article(text: str) -> str:
    return re.sub(r"^(?:the|a|an|all|each|every)\s+", "", text.strip())


class _Resolver:
    """Finds the table in which every phrase names a column, preferring a table the question names."""

    def __init__(self, schema: Schema):
        self.schema = schema

    def table_named(self, phrase: str | None) -> Table | None:
        if not phrase:
            return None
        names = {table.name: table for table in self.schema.tables}
        found = resolve_column(phrase, tuple(names))
        return names[found] if found else None

    def columns(self, phrases: list[str], preferred: Table | None) -> tuple[Table, list[str]] | Unmatched:
        tables = list(self.schema.tables)
        if preferred is not None:
            tables = [preferred] + [table for table in tables if table is not preferred]
        for table in tables:
            found = [resolve_column(phrase, table.column_names) for phrase in phrases]
            if all(found):
                return table, [column for column in found if column]
        visible = ", ".join(f"{table.name} ({', '.join(table.column_names)})" for table in self.schema.tables)
        missing = [
            phrase
            for phrase in phrases
            if not any(resolve_column(phrase, table.column_names) for table in self.schema.tables)
        ]
        if missing:
            named = ", ".join(repr(phrase) for phrase in missing)
            return Unmatched(f"no column I may see matches {named} (visible: {visible or 'nothing'})")
        return Unmatched(f"no single table has all of {', '.join(map(repr, phrases))} (visible: {visible})")

    def rows_of(self, what: str | None) -> tuple[Table, str | None] | Unmatched:
        """The table that "how many <what>" counts the rows of."""
        phrase = _strip_article(what) if what else None
        named = self.table_named(phrase)
        if named is not None:
            return named, phrase
        if phrase and name_key(phrase).split("_")[-1] not in GENERIC_NOUNS:
            return Unmatched(f"I do not know what {phrase!r} refers to")
        if len(self.schema.tables) == 1:
            return self.schema.tables[0], phrase
        if not self.schema.tables:
            return Unmatched("this room shows me no tables")
        return Unmatched(f"say which table to count: {', '.join(self.schema.table_names)}")


_IN_TABLE = re.compile(r"^(?P<noun>.+?) (?:are there |do we have |are )?(?:in|of) (?:the )?(?P<table>.+)$")


def _how_many(resolver: _Resolver, what: str, by: str | None) -> Intent | Unmatched:
    what = _COUNT_TAIL.sub("", _strip_article(what))
    if by is not None:
        return _count_by(resolver, what, by)
    in_table = _IN_TABLE.match(what)
    if in_table and resolver.table_named(in_table.group("table")):  # "how many rows are there in orders"
        table = resolver.table_named(in_table.group("table"))
        return Intent("count", table.name, "COUNT", None, noun=in_table.group("noun"))  # type: ignore[union-attr]
    distinct = re.match(r"^(?:different|distinct|unique) (?P<col>.+)$", what)
    if distinct or resolver.table_named(what) is None:
        phrase = distinct.group("col") if distinct else what
        found = resolver.columns([phrase], None)
        if isinstance(found, tuple):  # "how many departments": the distinct values of a column
            table, (column,) = found
            return Intent("distinct", table.name, "COUNT", column, noun=phrase)
        if distinct:
            return found
    rows = resolver.rows_of(what)
    if isinstance(rows, Unmatched):
        return rows
    table, noun = rows
    return Intent("count", table.name, "COUNT", None, noun=noun)


def _count_by(resolver: _Resolver, what: str | None, by: str) -> Intent | Unmatched:
    named = resolver.table_named(_strip_article(what)) if what else None
    found = resolver.columns(_phrases(_strip_article(by)), named)
    if isinstance(found, Unmatched):
        return found
    table, group = found
    return Intent(
        "aggregate", table.name, "COUNT", None, tuple(group), noun=_strip_article(what) if what else None
    )


def _metric(text: str) -> tuple[str, str | None] | None:
    """ "count", "number of people", "average salary", "highest average salary" -> (function, phrase)."""
    text = _strip_article(text)
    if re.fullmatch(r"(?:count|counts|number|frequency|size|headcount|rows|records)(?: of .+)?", text):
        return "COUNT", None
    words = text.split(" ", 2)
    if words[0] in ("highest", "largest", "biggest", "lowest", "smallest") and len(words) > 1:
        inner = _metric(" ".join(words[1:]))
        if inner is not None and inner[1] is not None:
            return inner
    function = FUNCTION_WORDS.get(words[0])
    if function is None or len(words) < 2:
        return None
    return function, re.sub(r"^(?:of )?(?:the )?", "", " ".join(words[1:]))


def _top(resolver: _Resolver, kind: str, groups: dict[str, Any]) -> Intent | Unmatched:
    """ "top N <col> [by <metric>]", "most common <col>", "which <col> has the most/highest ..."."""
    n = 1 if kind == "which" else _number(groups.get("n")) or (1 if kind == "most_common" else DEFAULT_TOP_N)
    metric_text = groups.get("metric")
    descending = not (metric_text and re.match(r"^(?:lowest|smallest)", metric_text))
    metric = _metric(metric_text) if metric_text else ("COUNT", None)
    if metric is None:
        return Unmatched(f"I can rank by count or by an aggregate of a column, not by {metric_text!r}")
    function, measured = metric
    phrases = _phrases(_strip_article(groups["col"])) + ([measured] if measured else [])
    found = resolver.columns(phrases, None)
    if isinstance(found, Unmatched):
        return found
    table, columns = found
    group = tuple(columns[:-1] if measured else columns)
    measured_column = columns[-1] if measured else None
    return Intent("top", table.name, function, measured_column, group, limit=n, descending=descending)


def _aggregate(resolver: _Resolver, match: re.Match[str]) -> Intent | Unmatched:
    function = FUNCTION_WORDS[match.group("fn")]
    measured = _strip_article(match.group("col"))
    by = match.group("by")
    phrases = [measured] + (_phrases(_strip_article(by)) if by else [])
    found = resolver.columns(phrases, None)
    if isinstance(found, Unmatched):
        return found
    table, columns = found
    return Intent("aggregate", table.name, function, columns[0], tuple(columns[1:]))


def _listing(resolver: _Resolver, cols: str) -> Intent | Unmatched:
    cols = _LIST_TAIL.sub("", cols)
    found = resolver.columns(_phrases(cols), None)
    if isinstance(found, Unmatched):
        return found
    table, columns = found
    return Intent("list", table.name, None, None, tuple(columns))


def parse_question(question: str, schema: Schema) -> Intent | Unmatched:
    """The intent of ``question`` over ``schema``, or :class:`Unmatched` with a reason when one helps."""
    text = normalize_question(question)
    if not text:
        return Unmatched()
    resolver = _Resolver(schema)
    last: Unmatched = Unmatched()
    for kind, form in _FORMS:
        match = form.match(text)
        if match is None:
            continue
        groups: dict[str, Any] = match.groupdict()
        if kind == "how_many":
            result = _how_many(resolver, groups["what"], groups.get("by"))
        elif kind == "count_by":
            result = _count_by(resolver, groups.get("what"), groups["by"])
        elif kind in ("top", "most_common", "which"):
            result = _top(resolver, kind, groups)
        elif kind == "aggregate":
            result = _aggregate(resolver, match)
        else:
            result = _listing(resolver, groups["cols"])
        if isinstance(result, Intent):
            return result
        # A later form may still read the question (e.g. "top" words inside a listing); keep the reason.
        last = result if result.reason else last
    return last


# --- SQL -----------------------------------------------------------------------------------------


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def needed_functions(intent: Intent) -> tuple[str, ...]:
    return () if intent.function is None else (intent.function,)


def build_sql(intent: Intent, *, with_count: bool) -> str:
    """The single SELECT for ``intent``. ``with_count`` adds ``COUNT(*) AS n`` beside another aggregate."""
    table = quote(intent.table)
    keys = [quote(column) for column in intent.group_by]
    if intent.kind == "list":
        return f"SELECT {', '.join(keys)} FROM {table}"  # noqa: S608 (quoted identifiers from the schema)
    if intent.function == "COUNT":
        metric = f"COUNT(DISTINCT {quote(intent.column)})" if intent.kind == "distinct" else "COUNT(*)"
        select = [*keys, f"{metric} AS n"]
    else:
        select = [*keys, f"{intent.function}({quote(intent.column or '')}) AS value"]
        if with_count:
            select.append("COUNT(*) AS n")
    sql = f"SELECT {', '.join(select)} FROM {table}"  # noqa: S608 (quoted identifiers from the schema)
    if keys:
        sql += f" GROUP BY {', '.join(keys)}"
    if intent.kind == "top":
        order = ("n" if intent.function == "COUNT" else "value") + (" DESC" if intent.descending else " ASC")
        sql += f" ORDER BY {', '.join([order, *keys])} LIMIT {intent.limit}"
    elif keys:
        sql += f" ORDER BY {', '.join(keys)}"
    return sql
