"""The SQL gate: what an agent's query must be before it runs, and how it runs.

Three layers, each enough to stop a different mistake in the others:

1. **The database itself** holds only the allowed projection (loader.py): hidden columns, filtered
   rows and other tables are not there to be reached.
2. **A parse with sqlglot** (:func:`prepare`): exactly one SELECT, no parameters, no recursive CTEs,
   only tables that exist, and, when the policy requires aggregation, the aggregate-only shape
   (single table, GROUP BY keys or allowed aggregates over plain columns) with
   ``HAVING COUNT(*) >= k`` added. SQLite then runs the SQL **regenerated from the checked tree**,
   never the submitted text, so what runs is what was checked. Identifiers are regenerated in
   backticks, which SQLite never reads as string literals (double quotes fall back to a string when
   no column matches, which would hide a typo).
3. **A SQLite authorizer** (:class:`Authorizer`) consulted while SQLite compiles the statement:
   only SELECT, reads of the visible columns of the visible tables, and an allow-list of functions;
   every PRAGMA, ATTACH, write, transaction, system-table read, virtual table and unknown function
   is denied. A progress handler aborts a query past its time or step budget.

Results are capped at ``max_rows`` and at a JSON byte size; BLOBs come back as base64 strings and
infinite REALs as ``"Infinity"``/``"-Infinity"`` (the bridge's JSON has no infinities).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import sqlglot
from pydantic import Field, StrictFloat, StrictInt, StrictStr
from sqlglot import exp
from sqlglot.dialects.sqlite import SQLite
from sqlglot.errors import ErrorLevel, SqlglotError
from sqlglot.tokens import TokenType

from hivemind.models import StrictModel
from hivemind.policy import AggregateFunction, AggregatePolicy
from hivemind_runner.scoped.errors import SqlDenied, SqlInvalid, SqlRejected


class _DropQuotedStatements(logging.Filter):
    """sqlglot logs the text of a statement it falls back to parsing as a Command. Agent SQL may quote
    room data, and the runner's logs are no place for it; the agent gets the refusal instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Falling back to parsing as a 'Command'" not in record.getMessage()


logging.getLogger("sqlglot").addFilter(_DropQuotedStatements())

MAX_SQL_DEPTH = 64
MAX_SQL_TOKENS = 20_000
PROGRESS_INTERVAL = 10_000  # SQLite VM instructions between two budget checks


class GateSQLite(SQLite):
    """SQLite, except that generated identifiers are quoted with backticks (see the module doc)."""

    class Tokenizer(SQLite.Tokenizer):
        IDENTIFIERS = ["`", '"', ("[", "]")]


# Scalar functions any stage may call, by the name SQLite sees after sqlglot regenerated the query
# (sqlglot writes ifnull as COALESCE and substr as SUBSTRING, so both spellings are listed). None
# of them reads outside its arguments or builds an unbounded value from a small one; the length
# limit set on the connection bounds what replace() and friends can build.
SCALAR_FUNCTIONS = frozenset(
    {
        "abs", "coalesce", "ifnull", "iif", "nullif", "typeof",
        "length", "lower", "upper", "trim", "ltrim", "rtrim", "replace", "substr", "substring", "instr",
        "like", "glob",
        "round", "ceil", "ceiling", "floor", "sign", "sqrt", "power", "pow", "exp", "ln", "log", "log10",
        "log2", "mod",
        "date", "time", "datetime", "julianday", "strftime", "unixepoch",
        "current_date", "current_time", "current_timestamp",
        "json_extract", "json_type", "json_valid", "json_array_length", "->", "->>",
        "min", "max",
    }
)  # fmt: skip
SQLITE_AGGREGATES = frozenset({"count", "sum", "avg", "min", "max", "total", "group_concat", "string_agg"})
# min/max are also scalar functions; whether they may be called follows the aggregate rules.
_SCALAR_ONLY = SCALAR_FUNCTIONS - SQLITE_AGGREGATES
FULL_READ_FUNCTIONS = SCALAR_FUNCTIONS | {"count", "sum", "avg", "total", "group_concat"}
# Functions that can fail on some values: abs() of the smallest integer, JSON on malformed text,
# replace() past the length limit. In aggregate-only scopes the WHERE clause runs on every row,
# including rows of groups that are later suppressed, so an error would tell whether such a row
# exists; these functions are therefore not available there at all.
_VALUE_DEPENDENT_ERRORS = frozenset(
    {"abs", "replace", "json_extract", "json_type", "json_array_length", "->", "->>"}
)

_AGGREGATE_CLASSES: dict[type[exp.Expression], AggregateFunction] = {
    exp.Count: AggregateFunction.COUNT,
    exp.Sum: AggregateFunction.SUM,
    exp.Avg: AggregateFunction.AVG,
    exp.Min: AggregateFunction.MIN,
    exp.Max: AggregateFunction.MAX,
}
_STATEMENTS: tuple[type[exp.Expression], ...] = (
    exp.DML,
    exp.Create,
    exp.Drop,
    exp.Alter,
    exp.Command,
    exp.Pragma,
    exp.Attach,
    exp.Detach,
    exp.Transaction,
    exp.Commit,
    exp.Rollback,
    exp.Into,
    exp.Set,
)
_AGGREGATE_SELECT_ARGS = frozenset(
    {"expressions", "from_", "where", "group", "having", "order", "limit", "offset", "distinct"}
)


def query_functions(aggregate: AggregatePolicy) -> frozenset[str]:
    """SQLite functions the query stage may call under ``aggregate``.

    Aggregates are exactly the policy's; ``count`` is always compiled when aggregation is required,
    because the gate's own ``HAVING COUNT(*) >= k`` calls it (the parse still refuses a COUNT the
    policy does not list). Aggregation also removes the functions whose errors depend on values.
    """
    names = set(_SCALAR_ONLY) | {function.value.lower() for function in aggregate.functions}
    if aggregate.required:
        names.add("count")
        names -= _VALUE_DEPENDENT_ERRORS
    return frozenset(names)


@dataclass(frozen=True)
class GateRules:
    """What one stage's SQL may do."""

    tables: Mapping[str, tuple[str, ...]]  # table -> its columns, exactly what the database holds
    functions: frozenset[str]  # SQLite function names the authorizer lets through
    aggregate: AggregatePolicy | None  # the aggregate-only rules, or None when not required
    max_rows: int


# --- parsing and checking ------------------------------------------------------------------------


def _snippet(node: exp.Expression) -> str:
    text = node.sql(dialect=GateSQLite, comments=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_one(sql: str, max_sql_chars: int) -> exp.Expression:
    if len(sql) > max_sql_chars:
        raise SqlInvalid("too_long", f"the query is longer than {max_sql_chars} characters")
    try:
        tokens = sqlglot.tokenize(sql, read=GateSQLite)
    except SqlglotError as exc:
        raise SqlInvalid("parse_error", f"the query does not tokenize: {_first_line(exc)}") from None
    if len(tokens) > MAX_SQL_TOKENS:
        raise SqlInvalid("too_long", f"the query has more than {MAX_SQL_TOKENS} tokens")
    depth = 0
    for token in tokens:
        depth += {TokenType.L_PAREN: 1, TokenType.R_PAREN: -1}.get(token.token_type, 0)
        if depth > MAX_SQL_DEPTH:
            raise SqlInvalid("too_deep", f"the query nests parentheses deeper than {MAX_SQL_DEPTH}")
    try:
        statements = [tree for tree in sqlglot.parse(sql, read=GateSQLite) if tree is not None]
    except SqlglotError as exc:
        raise SqlInvalid("parse_error", f"the query does not parse: {_first_line(exc)}") from None
    except RecursionError:
        raise SqlInvalid("too_deep", "the query is nested too deeply") from None
    if not statements:
        raise SqlInvalid("empty", "the query holds no statement")
    if len(statements) > 1:
        raise SqlInvalid("too_many_statements", f"send exactly one SELECT statement, not {len(statements)}")
    return statements[0]


def _first_line(exc: SqlglotError) -> str:
    errors = getattr(exc, "errors", None)
    if errors:
        first = errors[0]
        return f"{first.get('description')} (line {first.get('line')}, column {first.get('col')})"
    text = str(exc)
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _statement_kind(tree: exp.Expression) -> str:
    if isinstance(tree, exp.Command):
        return str(tree.this).upper()
    return tree.key.upper()


def _check_common(tree: exp.Expression, rules: GateRules) -> None:
    """Rules for every stage: one SELECT, no parameters, no recursion, only tables that exist."""
    if not isinstance(tree, exp.Query) or isinstance(tree, exp.Subquery):
        raise SqlInvalid(
            "not_a_select", f"{_statement_kind(tree)} statements are not allowed; send one SELECT"
        )
    cte_names = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    for node in tree.walk():
        if isinstance(node, _STATEMENTS):
            raise SqlInvalid("not_a_select", f"{_statement_kind(node)} is not allowed inside a SELECT")
        if isinstance(node, exp.Placeholder | exp.Parameter):
            raise SqlInvalid(
                "parameters_not_supported", "write values into the query; it takes no parameters"
            )
        if isinstance(node, exp.With) and node.args.get("recursive"):
            raise SqlDenied("recursive_not_allowed", "recursive CTEs are not allowed")
        if isinstance(node, exp.Table):
            _check_table(node, rules, cte_names)
        if isinstance(node, exp.Anonymous) and node.name.lower() not in rules.functions:
            raise SqlDenied("function_not_allowed", f"the function {node.name.lower()}() is not allowed here")


def _check_table(node: exp.Table, rules: GateRules, cte_names: set[str]) -> None:
    if node.arg_key == "indexed":
        raise SqlDenied("unsupported_clause", "INDEXED BY is not supported (the database has no indexes)")
    if not isinstance(node.this, exp.Identifier):
        raise SqlDenied("table_function_not_allowed", f"{_snippet(node)}: only tables can be read")
    name = node.name.lower()
    if node.args.get("db") or node.args.get("catalog"):
        raise SqlDenied("unknown_table", f"{_snippet(node)}: write the bare table name, without a schema")
    if name.startswith("sqlite_"):
        raise SqlDenied("system_table", f"{name} is a SQLite system table; it cannot be read")
    if name not in rules.tables and name not in cte_names:
        visible = ", ".join(sorted(rules.tables)) or "none"
        raise SqlDenied("unknown_table", f"no table {name!r}; the tables are: {visible}")


def _is_aggregate_call(node: exp.Expression) -> bool:
    if isinstance(node, exp.AggFunc):
        return True
    return isinstance(node, exp.Anonymous) and node.name.lower() in SQLITE_AGGREGATES


def _integer_literal(node: exp.Expression | None) -> int | None:
    if isinstance(node, exp.Literal) and not node.is_string and node.this.isdigit():
        return int(node.this)
    return None


@dataclass
class _AggregateCheck:
    """The aggregate-only shape of one SELECT (docs/scoped-data.md, "Aggregate-only queries")."""

    select: exp.Select
    rules: GateRules
    aggregate: AggregatePolicy
    table: str = ""
    qualifiers: set[str] = field(default_factory=set)
    columns: frozenset[str] = frozenset()
    keys: set[str] = field(default_factory=set)
    aliases: set[str] = field(default_factory=set)
    contributors: list[str] = field(default_factory=list)  # columns a value-revealing aggregate reads

    def run(self) -> list[str]:
        self._shape()
        self._from()
        self._aliases()
        self._group_by()
        where = self.select.args.get("where")
        if where is not None:
            self._error_free(where)
        for expression in self.select.expressions:
            self._safe(expression.this if isinstance(expression, exp.Alias) else expression, aliases=False)
        having = self.select.args.get("having")
        if having is not None:
            self._safe(having.this, aliases=True)
        order = self.select.args.get("order")
        if order is not None:
            for ordered in order.expressions:
                term = ordered.this
                if isinstance(term, exp.Column) and not term.table and term.name.lower() in self.aliases:
                    continue  # SQLite reads a bare ORDER BY name as a result alias before a column
                self._safe(term, aliases=True)
        for key in ("limit", "offset"):
            clause = self.select.args.get(key)
            if clause is not None and _integer_literal(clause.expression) is None:
                raise SqlDenied("limit_not_literal", f"{key.upper()} takes a whole number, not an expression")
        return self.contributors

    def _shape(self) -> None:
        tree = self.select
        if tree.args.get("with_"):
            raise SqlDenied(
                "cte_not_allowed", "aggregate-only scope: no WITH clauses, one SELECT over one table"
            )
        for node in tree.walk():
            if node is tree:
                continue
            if isinstance(node, exp.Query):
                raise SqlDenied(
                    "subquery_not_allowed", f"aggregate-only scope: no subqueries ({_snippet(node)})"
                )
            if isinstance(node, exp.Window):
                raise SqlDenied("window_not_allowed", "aggregate-only scope: no window functions")
            if isinstance(node, exp.Filter):
                raise SqlDenied(
                    "filter_not_allowed",
                    "aggregate-only scope: no FILTER clauses; use WHERE for the whole query",
                )
        if tree.args.get("joins"):
            raise SqlDenied("join_not_allowed", "aggregate-only scope: read one table, without joins")
        extra = sorted(
            key
            for key, value in tree.args.items()
            if value not in (None, False, []) and key not in _AGGREGATE_SELECT_ARGS
        )
        if extra:
            raise SqlDenied(
                "unsupported_clause", f"aggregate-only scope: unsupported clause(s) {', '.join(extra)}"
            )
        distinct = tree.args.get("distinct")
        if distinct is not None and distinct.args.get("on") is not None:
            raise SqlDenied("unsupported_clause", "DISTINCT ON is not supported")

    def _error_free(self, where: exp.Expression) -> None:
        """WHERE runs on every row, also rows of groups later suppressed: nothing in it may fail on
        some values only (a failure would reveal such a row). The authorizer already withholds the
        functions that can; this refuses the operators that can."""
        for node in where.walk():
            if isinstance(node, exp.DPipe):
                raise SqlDenied(
                    "where_expression",
                    "aggregate-only scope: no || in WHERE (a value too long to build would fail the query)",
                )
            if isinstance(node, exp.Like | exp.Glob | exp.Escape) and not (
                isinstance(node.expression, exp.Literal) and node.expression.is_string
            ):
                raise SqlDenied(
                    "where_expression",
                    "aggregate-only scope: LIKE, GLOB and ESCAPE patterns must be string literals",
                )
            if isinstance(node, exp.Anonymous) and node.name.lower() in ("like", "glob"):
                raise SqlDenied("where_expression", "aggregate-only scope: write LIKE and GLOB as operators")

    def _from(self) -> None:
        source = self.select.args.get("from_")
        table = source.this if source is not None else None
        if not isinstance(table, exp.Table):
            raise SqlDenied(
                "aggregate_required", "aggregate-only scope: the query must read one table (FROM <table>)"
            )
        extra = sorted(key for key, value in table.args.items() if value and key not in ("this", "alias"))
        alias = table.args.get("alias")
        if extra or (alias is not None and alias.args.get("columns")):
            raise SqlDenied("unsupported_clause", f"{_snippet(table)}: only FROM <table> [AS <alias>]")
        self.table = table.name.lower()
        self.columns = frozenset(self.rules.tables[self.table])
        self.qualifiers = {self.table} | ({table.alias.lower()} if table.alias else set())

    def _plain_column(self, node: exp.Expression) -> str | None:
        """The column's name if ``node`` is a plain column of the table, else None."""
        if not isinstance(node, exp.Column) or not isinstance(node.this, exp.Identifier):
            return None
        if node.args.get("db") or node.args.get("catalog"):
            return None
        if node.table and node.table.lower() not in self.qualifiers:
            return None
        name = node.name.lower()
        return name if name in self.columns else None

    def _aliases(self) -> None:
        self.aliases = {
            expression.alias.lower()
            for expression in self.select.expressions
            if isinstance(expression, exp.Alias)
        }

    def _group_by(self) -> None:
        group = self.select.args.get("group")
        if group is None:
            return
        extra = sorted(key for key, value in group.args.items() if value and key != "expressions")
        if extra:
            raise SqlDenied("unsupported_clause", f"GROUP BY {', '.join(extra).upper()} is not supported")
        selected = self.select.expressions
        for item in group.expressions:
            target = item
            position = _integer_literal(item)
            if position is not None and 1 <= position <= len(selected):
                target = selected[position - 1]
            elif isinstance(item, exp.Column) and not item.table and item.name.lower() not in self.columns:
                # GROUP BY an alias of a selected column.
                target = next(
                    (
                        e
                        for e in selected
                        if isinstance(e, exp.Alias) and e.alias.lower() == item.name.lower()
                    ),
                    item,
                )
            if isinstance(target, exp.Alias):
                target = target.this
            name = self._plain_column(target)
            if name is None:
                raise SqlDenied(
                    "group_by_expression",
                    f"GROUP BY {_snippet(item)}: group by plain columns of {self.table} (or their positions)",
                )
            self.keys.add(name)

    def _safe(self, node: exp.Expression, *, aliases: bool) -> None:
        """Every column under ``node`` is a GROUP BY key or the argument of an allowed aggregate."""
        if _is_aggregate_call(node):
            self._aggregate_call(node)
            return
        if isinstance(node, exp.Column):
            name = self._plain_column(node)
            if name is not None and name in self.keys:
                return
            # Inside expressions SQLite prefers a table column to an alias of the same name (in HAVING
            # that would be one arbitrary row's value), so an alias counts only when no column has its name.
            lowered = node.name.lower()
            if aliases and not node.table and lowered in self.aliases and lowered not in self.columns:
                return
            raise SqlDenied(
                "aggregate_required",
                f"{_snippet(node)} is neither a GROUP BY column nor inside an allowed aggregate "
                f"({self._allowed_text()}); this scope returns aggregates over groups only",
            )
        if isinstance(node, exp.Star):
            raise SqlDenied(
                "aggregate_required", "SELECT * is not allowed; this scope returns aggregates only"
            )
        for child in node.iter_expressions():
            self._safe(child, aliases=aliases)

    def _allowed_text(self) -> str:
        return ", ".join(function.value for function in self.aggregate.functions) or "none"

    def _aggregate_call(self, node: exp.Expression) -> None:
        function = _AGGREGATE_CLASSES.get(type(node))
        if function is None or function not in self.aggregate.functions:
            name = node.name.upper() if isinstance(node, exp.Anonymous) else _snippet(node).split("(", 1)[0]
            raise SqlDenied(
                "function_not_allowed",
                f"{name} is not an aggregate this scope allows ({self._allowed_text()})",
            )
        extra = sorted(key for key, value in node.args.items() if value and key not in ("this", "big_int"))
        if extra:
            raise SqlDenied("aggregate_argument", f"{_snippet(node)}: an aggregate takes one plain column")
        argument = node.this
        if isinstance(argument, exp.Star):
            if function is AggregateFunction.COUNT:
                return
            raise SqlDenied("aggregate_argument", f"{function.value}(*) is not valid; name a column")
        if isinstance(argument, exp.Distinct):
            if function is not AggregateFunction.COUNT:
                raise SqlDenied(
                    "distinct_not_allowed",
                    f"{function.value}(DISTINCT ...) is not allowed; only COUNT(DISTINCT column)",
                )
            if len(argument.expressions) != 1:
                raise SqlDenied("aggregate_argument", "COUNT(DISTINCT ...) takes exactly one column")
            argument = argument.expressions[0]
        name = self._plain_column(argument)
        if name is None:
            raise SqlDenied(
                "aggregate_argument",
                f"{_snippet(node)}: aggregate a plain column of {self.table}, not an expression",
            )
        if function is not AggregateFunction.COUNT and name not in self.contributors:
            self.contributors.append(name)


def _minimum_group_condition(k: int, contributors: Sequence[str]) -> exp.Expression:
    """``COUNT(*) >= k AND COUNT(c) >= k ...``: each group has k rows, and each aggregated value
    column k non-NULL values (AVG over one non-NULL salary in a group of k rows would be that one
    salary)."""
    threshold = exp.Literal.number(k)
    condition: exp.Expression = exp.GTE(this=exp.Count(this=exp.Star()), expression=threshold)
    for column in contributors:
        counted = exp.Count(this=exp.column(column, quoted=True))
        condition = exp.and_(condition, exp.GTE(this=counted, expression=threshold.copy()))
    return condition


def _name_result_columns(tree: exp.Query, rules: GateRules) -> None:
    """Alias unnamed computed result columns with their SQLite text (``AVG(salary)``).

    SQLite names such a column after the text it compiled, which is the regenerated text with its
    backtick-quoted identifiers; the agent should see the names it would get from its own query. A
    name that could be mistaken for a column or an alias is left alone.
    """
    first = tree
    while isinstance(first, exp.SetOperation):
        first = first.this
    if not isinstance(first, exp.Select):
        return
    taken = {column for columns in rules.tables.values() for column in columns}
    taken |= {
        expression.alias.lower() for expression in first.expressions if isinstance(expression, exp.Alias)
    }
    for expression in first.expressions:
        if isinstance(expression, exp.Alias | exp.Column | exp.Star):
            continue
        name = expression.sql(dialect=SQLite, comments=False)
        if name.lower() not in taken:
            expression.replace(exp.alias_(expression.copy(), name, quoted=True))


def prepare(sql: str, rules: GateRules, *, max_sql_chars: int) -> str:
    """Check ``sql`` against ``rules``; return the SQL to run (regenerated, minimum group added).

    Raises :class:`SqlInvalid` or :class:`SqlDenied` with a specific reason.
    """
    if not isinstance(sql, str):
        raise SqlInvalid("parse_error", "the query must be a string")
    tree = _parse_one(sql, max_sql_chars)
    _check_common(tree, rules)
    aggregate = rules.aggregate
    if aggregate is not None:
        if not isinstance(tree, exp.Select):
            raise SqlDenied(
                "set_operation_not_allowed", "aggregate-only scope: no UNION, INTERSECT or EXCEPT"
            )
        contributors = _AggregateCheck(tree, rules, aggregate).run()
        minimum = _minimum_group_condition(aggregate.min_group_size, contributors)
        having = tree.args.get("having")
        # The minimum comes first: SQLite stops at the first false AND operand, so the agent's own
        # HAVING never runs on a suppressed group (an error there would reveal it).
        combined = minimum if having is None else exp.and_(minimum, exp.paren(having.this, copy=False))
        tree.set("having", exp.Having(this=combined))
    _name_result_columns(tree, rules)
    try:
        # RAISE: a construct sqlglot cannot write faithfully for SQLite is refused, never approximated.
        return tree.sql(dialect=GateSQLite, identify=True, comments=False, unsupported_level=ErrorLevel.RAISE)
    except SqlglotError as exc:
        raise SqlInvalid("parse_error", f"the query cannot be regenerated: {_first_line(exc)}") from None


# --- the authorizer --------------------------------------------------------------------------------

_ACTION_NAMES = {
    value: name.removeprefix("SQLITE_")
    for name, value in vars(sqlite3).items()
    if name.startswith("SQLITE_")
    and isinstance(value, int)
    and name not in ("SQLITE_OK", "SQLITE_DENY", "SQLITE_IGNORE")
}


@dataclass(frozen=True)
class Denial:
    reason: str
    message: str


_FIXED_DENIALS = {
    sqlite3.SQLITE_PRAGMA: Denial("not_a_select", "PRAGMA is not allowed"),
    sqlite3.SQLITE_ATTACH: Denial("not_a_select", "ATTACH is not allowed"),
    sqlite3.SQLITE_DETACH: Denial("not_a_select", "DETACH is not allowed"),
    sqlite3.SQLITE_RECURSIVE: Denial("recursive_not_allowed", "recursive CTEs are not allowed"),
}


class Authorizer:
    """``Connection.set_authorizer`` callback: SELECT, reads of visible columns, allowed functions.

    It records the first thing it denied so the error can say what and why.
    """

    def __init__(self, rules: GateRules):
        self._columns = {table: frozenset(columns) for table, columns in rules.tables.items()}
        self._functions = rules.functions
        self.denial: Denial | None = None

    def __call__(
        self, action: int, arg1: str | None, arg2: str | None, database: str | None, source: str | None
    ) -> int:
        verdict = self._judge(action, arg1, arg2, database)
        if verdict is None:
            return sqlite3.SQLITE_OK
        if self.denial is None:
            self.denial = verdict
        return sqlite3.SQLITE_DENY

    def _judge(self, action: int, arg1: str | None, arg2: str | None, database: str | None) -> Denial | None:
        if action == sqlite3.SQLITE_SELECT:
            return None
        if action == sqlite3.SQLITE_READ:
            return self._read(arg1 or "", arg2 or "", database)
        if action == sqlite3.SQLITE_FUNCTION:
            name = (arg2 or "").lower()
            if name in self._functions:
                return None
            return Denial("function_not_allowed", f"the function {name}() is not allowed here")
        return _FIXED_DENIALS.get(action) or Denial(
            "not_authorized", f"{_ACTION_NAMES.get(action, str(action))} is not allowed; only SELECT"
        )

    def _read(self, table: str, column: str, database: str | None) -> Denial | None:
        lowered = table.lower()
        if lowered.startswith("sqlite_"):
            return Denial("system_table", f"{table} is a SQLite system table; it cannot be read")
        columns = self._columns.get(lowered)
        if columns is None or database not in (None, "main"):
            return Denial("unknown_table", f"no table {table!r}")
        # An empty column name is a read of the table that extracts no value (COUNT(*)).
        if column and column.lower() not in columns:
            return Denial("unknown_column", f"no column {column!r} in {table}")
        return None


# --- running ---------------------------------------------------------------------------------------

Scalar = StrictInt | StrictFloat | StrictStr | None


class SqlResult(StrictModel):
    """``POST /v1/tools/sql`` response: one list of values per row, in ``columns`` order."""

    columns: list[str]
    rows: list[list[Scalar]]
    truncated: bool = Field(description="rows were cut at max_rows or at the result byte cap")


def json_scalar(value: object) -> Scalar:
    """A SQLite value as a JSON scalar: BLOB -> base64, +-infinity -> "Infinity"/"-Infinity"."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, float) and not math.isfinite(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value is None or isinstance(value, int | float | str):
        return value
    raise TypeError(f"unexpected SQLite value of type {type(value).__name__}")


def _json_size(values: Sequence[Scalar]) -> int:
    return len(json.dumps(values, ensure_ascii=False, allow_nan=False).encode("utf-8")) + 1


@dataclass(frozen=True)
class QueryBudget:
    timeout_ms: int
    max_steps: int
    max_result_bytes: int


_SQLITE_MESSAGES: tuple[tuple[str, Callable[[str], SqlRejected]], ...] = (
    ("no such table", lambda text: SqlDenied("unknown_table", text)),
    ("no such column", lambda text: SqlDenied("unknown_column", text)),
    ("no such function", lambda text: SqlDenied("function_not_allowed", text)),
    (
        "string or blob too big",
        lambda text: SqlDenied("result_too_large", "a value grew past the result size cap"),
    ),
)


def _translate(
    exc: sqlite3.Error, denial: Denial | None, over_budget: bool, budget: QueryBudget
) -> SqlRejected:
    if over_budget:
        return SqlDenied(
            "query_too_expensive",
            f"the query ran past its budget ({budget.timeout_ms} ms or {budget.max_steps} steps)",
        )
    if denial is not None:
        kind = SqlInvalid if denial.reason == "not_a_select" else SqlDenied
        return kind(denial.reason, denial.message)
    text = str(exc)
    for prefix, make in _SQLITE_MESSAGES:
        if text.startswith(prefix):
            return make(text)
    return SqlInvalid("sql_error", f"SQLite refused the query: {text}")


def execute(
    connection: sqlite3.Connection,
    authorizer: Authorizer,
    statement: str,
    *,
    max_rows: int,
    budget: QueryBudget,
) -> SqlResult:
    """Run one prepared statement under the authorizer, the progress budget and the result caps.

    The caller serializes calls on ``connection`` (the authorizer records one query's denial).
    """
    authorizer.denial = None
    deadline = time.monotonic() + budget.timeout_ms / 1000
    steps = 0
    over_budget = False

    def progress() -> int:
        nonlocal steps, over_budget
        steps += PROGRESS_INTERVAL
        over_budget = steps > budget.max_steps or time.monotonic() > deadline
        return 1 if over_budget else 0

    connection.set_progress_handler(progress, PROGRESS_INTERVAL)
    cursor = connection.cursor()
    try:
        cursor.execute(statement)
        columns = [description[0] for description in cursor.description or ()]
        rows: list[list[Scalar]] = []
        size = _json_size(columns)
        truncated = False
        while not truncated and (fetched := cursor.fetchmany(256)):
            for row in fetched:
                if len(rows) >= max_rows:
                    truncated = True
                    break
                values = [json_scalar(value) for value in row]
                row_size = _json_size(values)
                if size + row_size > budget.max_result_bytes:
                    if not rows:
                        raise SqlDenied(
                            "result_too_large",
                            f"the first row alone is over the {budget.max_result_bytes}-byte result cap",
                        )
                    truncated = True
                    break
                rows.append(values)
                size += row_size
    except sqlite3.Error as exc:
        raise _translate(exc, authorizer.denial, over_budget, budget) from None
    finally:
        cursor.close()
        connection.set_progress_handler(None, 0)
    return SqlResult(columns=columns, rows=rows, truncated=truncated)


def limit_connection(connection: sqlite3.Connection, *, max_value_bytes: int, max_sql_bytes: int) -> None:
    """SQLite's own limits on what one statement may build: no attached databases, bounded values,
    expressions and compound SELECTs."""
    connection.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_value_bytes)
    connection.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, max_sql_bytes)
    connection.setlimit(sqlite3.SQLITE_LIMIT_EXPR_DEPTH, 2 * MAX_SQL_DEPTH)
    connection.setlimit(sqlite3.SQLITE_LIMIT_COMPOUND_SELECT, 64)
    connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 0)
