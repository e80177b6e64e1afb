"""Row filters: the small SQL predicate grammar of a ScopePolicy's ``where`` (docs/policy.md).

A row filter parses with sqlglot (SQLite dialect) into a syntax tree that may hold only what
``_ALLOWED_ARGS`` lists: comparisons, ``AND``/``OR``/``NOT``, ``IN``, ``BETWEEN``, ``LIKE``, ``IS``,
literals and bare column names of the filter's own table. Anything else (functions, subqueries,
qualified names, comments, several statements) is refused with a message naming it, before SQLite
ever sees the text; the runner filters with :attr:`RowFilter.sql`, re-generated from the checked tree.
Sizes are bounded before parsing (length, nesting, prefix-operator runs) so the recursive parser
stays far from the interpreter's stack limit.

:mod:`hivemind.policy` imports this module on the first row filter it checks (sqlglot is a large
import).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.tokens import TokenType

from hivemind.policy import MAX_NAME_LENGTH

MAX_PREDICATE_LENGTH = 4096
MAX_PREDICATE_NODES = 256
MAX_PREDICATE_DEPTH = 16
MAX_PREFIX_RUN = 4


@dataclass(frozen=True)
class RowFilter:
    """A checked row filter: its normalized SQLite SQL, the columns it references and the normalized
    SQL of each top-level ``AND`` operand (to compare filters conjunct by conjunct)."""

    sql: str
    columns: frozenset[str]
    conjuncts: frozenset[str]


@functools.lru_cache(maxsize=256)
def check_row_filter(where: str) -> RowFilter:
    """Parse and check ``where``; ValueError names what is not allowed. Cached: a policy's filters are
    checked when it is parsed and read again for narrowing and for the runner's SQL."""
    tree, columns = _parse_predicate(where)
    return RowFilter(
        sql=_normalized_sql(tree),
        columns=columns,
        conjuncts=frozenset(_normalized_sql(part) for part in _conjuncts(tree)),
    )


_COMPARISONS: tuple[type[exp.Expression], ...] = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)
# Argument keys each node type may carry. A key sqlglot sets that is not listed here means syntax
# this grammar does not know, and is refused rather than ignored.
_ALLOWED_ARGS: dict[type[exp.Expression], frozenset[str]] = {
    exp.And: frozenset({"this", "expression"}),
    exp.Or: frozenset({"this", "expression"}),
    exp.Not: frozenset({"this"}),
    exp.Paren: frozenset({"this"}),
    exp.In: frozenset({"this", "expressions"}),
    exp.Between: frozenset({"this", "low", "high"}),
    exp.Like: frozenset({"this", "expression", "negate"}),
    exp.Is: frozenset({"this", "expression", "negate"}),
    exp.Column: frozenset({"this"}),
    exp.Identifier: frozenset({"this", "quoted"}),
    exp.Literal: frozenset({"this", "is_string"}),
    exp.Null: frozenset(),
    exp.Boolean: frozenset({"this"}),
    exp.Neg: frozenset({"this"}),
    **{comparison: frozenset({"this", "expression"}) for comparison in _COMPARISONS},
}


def _describe(node: exp.Expression) -> str:
    return f"{node.key.upper()} ({node.sql(dialect='sqlite')[:60]})"


_COLUMN_NAME = re.compile(rf"[a-z0-9_]{{1,{MAX_NAME_LENGTH}}}")


class _PredicateChecker:
    """Walks a parsed predicate and refuses anything outside the grammar in docs/policy.md.

    It records the column names the predicate references; whether they exist is a question about
    the room's data, answered by :func:`check_against_schema`.
    """

    def __init__(self) -> None:
        self.columns: set[str] = set()

    def _args(self, node: exp.Expression) -> None:
        allowed = _ALLOWED_ARGS.get(type(node))
        if allowed is None:
            raise ValueError(self._unsupported(node))
        extra = sorted(
            key for key, value in node.args.items() if value not in (None, False, []) and key not in allowed
        )
        if extra:
            if node.find(exp.Query) is not None:
                raise ValueError(f"subqueries are not allowed: {_describe(node)}")
            raise ValueError(f"{_describe(node)} uses unsupported syntax ({', '.join(extra)})")

    def _unsupported(self, node: exp.Expression) -> str:
        if isinstance(node, exp.Query) or node.find(exp.Query) is not None:
            return f"subqueries are not allowed: {_describe(node)}"
        if isinstance(node, exp.Func):
            return f"function calls are not allowed: {_describe(node)}"
        return f"{_describe(node)} is not allowed in a row filter"

    def predicate(self, node: exp.Expression) -> None:
        self._args(node)
        if isinstance(node, exp.Paren | exp.Not):
            self.predicate(node.this)
        elif isinstance(node, exp.And | exp.Or):
            self.predicate(node.this)
            self.predicate(node.expression)
        elif isinstance(node, _COMPARISONS):
            self.value(node.this)
            self.value(node.expression)
        elif isinstance(node, exp.In):
            self.value(node.this)
            options = node.expressions
            if not options:
                raise ValueError("IN needs a non-empty list of literals")
            for option in options:
                self.literal(option)
        elif isinstance(node, exp.Between):
            self.value(node.this)
            self.value(node.args["low"])
            self.value(node.args["high"])
        elif isinstance(node, exp.Like):
            self.value(node.this)
            self.value(node.expression)
        elif isinstance(node, exp.Is):
            self.value(node.this)
            if not isinstance(node.expression, exp.Null):
                raise ValueError(f"only IS NULL and IS NOT NULL are allowed: {_describe(node)}")
        elif isinstance(node, exp.Boolean):
            return
        else:
            raise ValueError(f"{_describe(node)} is not a condition")

    def value(self, node: exp.Expression) -> None:
        if isinstance(node, exp.Column):
            self.column(node)
        else:
            self.literal(node)

    def literal(self, node: exp.Expression) -> None:
        self._args(node)
        if isinstance(node, exp.Neg):
            inner = node.this
            if not (isinstance(inner, exp.Literal) and not inner.is_string):
                raise ValueError(f"only numbers may be negated: {_describe(node)}")
            self._args(inner)
        elif isinstance(node, exp.Column):
            raise ValueError(f"only literals are allowed here, not the column {node.sql(dialect='sqlite')}")
        elif not isinstance(node, exp.Literal | exp.Null | exp.Boolean):
            raise ValueError(self._unsupported(node))

    def column(self, node: exp.Column) -> None:
        qualifiers = [
            part for part in (node.args.get("table"), node.args.get("db"), node.args.get("catalog")) if part
        ]
        if qualifiers:
            raise ValueError(
                f"column reference {node.sql(dialect='sqlite')} is qualified; write bare column names of "
                "this table (other tables cannot be referenced)"
            )
        self._args(node)
        identifier = node.this
        if not isinstance(identifier, exp.Identifier):
            raise ValueError(f"{_describe(node)} is not a plain column reference")
        self._args(identifier)
        if not _COLUMN_NAME.fullmatch(identifier.name):
            raise ValueError(
                f"column {identifier.name!r} is not a normalized name: columns are lowercase ASCII "
                f"letters, digits and underscores, at most {MAX_NAME_LENGTH} characters"
            )
        self.columns.add(identifier.name)


_PREFIX_OPERATORS = frozenset({TokenType.NOT, TokenType.DASH, TokenType.PLUS, TokenType.TILDE})


def _parse_error_text(exc: SqlglotError) -> str:
    errors = getattr(exc, "errors", None)
    if errors:
        first = errors[0]
        return f"{first.get('description')} near {first.get('highlight')!r} (column {first.get('col')})"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _parse_predicate(where: str) -> tuple[exp.Expression, frozenset[str]]:
    """The checked syntax tree of a row filter and the column names it references."""
    if not where.strip():
        raise ValueError("empty row filter (use null for no filter)")
    if len(where) > MAX_PREDICATE_LENGTH:
        raise ValueError(f"row filter longer than {MAX_PREDICATE_LENGTH} characters")
    try:
        tokens = sqlglot.tokenize(where, read="sqlite")
    except SqlglotError as exc:
        raise ValueError(f"row filter does not tokenize: {_parse_error_text(exc)}") from None
    # The parser recurses per parenthesis and per prefix operator: bounding both keeps it far from
    # the interpreter's stack limit.
    depth = prefix_run = 0
    for token in tokens:
        if token.token_type is TokenType.SEMICOLON:
            raise ValueError("row filter holds a semicolon: exactly one predicate, no statements")
        if token.comments:
            raise ValueError("row filter holds a comment: comments are not allowed")
        depth += {TokenType.L_PAREN: 1, TokenType.R_PAREN: -1}.get(token.token_type, 0)
        if depth > MAX_PREDICATE_DEPTH:
            raise ValueError(f"row filter nests parentheses deeper than {MAX_PREDICATE_DEPTH}")
        prefix_run = prefix_run + 1 if token.token_type in _PREFIX_OPERATORS else 0
        if prefix_run > MAX_PREFIX_RUN:
            raise ValueError(f"row filter chains more than {MAX_PREFIX_RUN} prefix operators")
    try:
        tree = sqlglot.parse_one(where, read="sqlite", into=exp.Condition)
    except SqlglotError as exc:
        raise ValueError(f"row filter is not one SQL predicate: {_parse_error_text(exc)}") from None
    except RecursionError:
        raise ValueError("row filter is nested too deeply") from None
    if sum(1 for _ in tree.walk()) > MAX_PREDICATE_NODES:
        raise ValueError(f"row filter has more than {MAX_PREDICATE_NODES} syntax nodes")
    checker = _PredicateChecker()
    checker.predicate(tree)
    return tree, frozenset(checker.columns)


def _normalized_sql(tree: exp.Expression) -> str:
    # Every identifier quoted: one spelling per predicate, and column names that are SQL keywords work.
    return tree.sql(dialect="sqlite", identify=True)


def _conjuncts(tree: exp.Expression) -> list[exp.Expression]:
    """The top-level AND operands of a predicate, looking through parentheses."""
    while isinstance(tree, exp.Paren):
        tree = tree.this
    if isinstance(tree, exp.And):
        return _conjuncts(tree.this) + _conjuncts(tree.expression)
    return [tree]
