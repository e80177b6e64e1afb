"""ScopePolicy: the declarative data scope a run's query stage gets (DESIGN §8, §16.4-6).

A ScopePolicy is JSON, never code. It names the tables and columns the query stage may see, an
optional row filter per table written in a small SQL predicate grammar, aggregation rules, a row cap,
which document items pass and what is redacted from them, and deny/redact patterns for the output.

Everything a policy carries is checked when it is parsed: identifiers are normalized names, row
filters parse into an allow-listed predicate grammar (:mod:`hivemind.predicates`) that can
reference only bare column names of their own table (listed or hidden: the runner filters before it
projects), and regexes compile, are short, and avoid backtracking constructs that are cheap to
recognise as catastrophic.
:func:`parse_policy` is the boundary: it turns any failure into :class:`hivemind.errors.InvalidPolicy`
with the JSON path of the offending value. :func:`check_policy` is the whole verdict on a candidate
(valid for the data, widenings, :func:`intersect` with the room's bound): the runner answers the
scope stage's ``POST /v1/policy/check`` with it, so agents never restate these rules.

The query stage never receives a policy: it gets :func:`public_view` (tables, columns, aggregation
rules, row cap), never the row filters or the redaction lists (§16.5).
"""

from __future__ import annotations

import json
import re
import re._constants as sre_constants  # the stdlib's regex parser: used to inspect pattern shape
import re._parser as sre_parser
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import (
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from hivemind.canonical import canonical_sha256
from hivemind.errors import InvalidPolicy
from hivemind.models import Identifier, StrictModel

if TYPE_CHECKING:
    from hivemind.predicates import RowFilter

# --- limits --------------------------------------------------------------------------------------

MAX_NAME_LENGTH = 64
MAX_TABLES = 256
MAX_COLUMNS = 1024
MAX_PATTERN_LENGTH = 256
MAX_PATTERNS = 64
MAX_ITEM_RULES = 4096
MAX_META_KEYS = 16
MAX_META_TEXT = 256
MAX_ROWS_LIMIT = 1_000_000
MAX_MIN_GROUP_SIZE = 1_000_000
DEFAULT_MIN_GROUP_SIZE = 10
DEFAULT_MAX_ROWS = 100

REDACTED = "[REDACTED]"

Name = Annotated[
    str,
    Field(
        pattern=r"^[a-z0-9_]+$",
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        description="normalized identifier: lowercase ASCII letters, digits and underscores",
    ),
]
MetaText = Annotated[str, Field(min_length=1, max_length=MAX_META_TEXT)]


class AggregateFunction(StrEnum):
    COUNT = "COUNT"
    SUM = "SUM"
    AVG = "AVG"
    MIN = "MIN"
    MAX = "MAX"


def _no_duplicates(values: Sequence[Any], what: str) -> None:
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"duplicate {what} {value!r}")
        seen.add(value)


# --- regexes -------------------------------------------------------------------------------------

_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT}
_LEAVES = {
    sre_constants.LITERAL,
    sre_constants.NOT_LITERAL,
    sre_constants.IN,
    sre_constants.ANY,
    sre_constants.AT,
}


def _regex_shape_problem(items: Iterable[tuple[Any, Any]], inside_repeat: bool) -> str | None:
    """The first construct known to backtrack catastrophically, or ``None``.

    Cheap and conservative: a variable quantifier or an alternation inside a repeated group, and
    backreferences, are refused. Ambiguity is not analysed, so some safe patterns are refused too.
    """
    for op, av in items:
        if op in _REPEATS:
            low, high, body = av
            if inside_repeat and high != low:
                return "nested quantifier (a variable repeat inside a repeated group)"
            problem = _regex_shape_problem(body, inside_repeat or high > 1)
        elif op is sre_constants.SUBPATTERN:
            problem = _regex_shape_problem(av[3], inside_repeat)
        elif op is sre_constants.ATOMIC_GROUP:
            problem = _regex_shape_problem(av, inside_repeat)
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            problem = _regex_shape_problem(av[1], inside_repeat)
        elif op is sre_constants.BRANCH:
            if inside_repeat:
                return "alternation inside a repeated group"
            problem = next(
                (found for branch in av[1] if (found := _regex_shape_problem(branch, False))), None
            )
        elif op in (sre_constants.GROUPREF, sre_constants.GROUPREF_EXISTS):
            return "backreference or conditional group"
        elif op in _LEAVES:
            problem = None
        else:
            return f"unsupported construct {op}"
        if problem is not None:
            return problem
    return None


def check_pattern(pattern: str) -> str:
    """Validate one deny/redact regex; return it unchanged or raise ``ValueError`` saying why."""
    if not pattern:
        raise ValueError("empty pattern")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"pattern longer than {MAX_PATTERN_LENGTH} characters")
    try:
        re.compile(pattern)
        parsed = sre_parser.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"pattern {pattern!r} does not compile: {exc}") from None
    problem = _regex_shape_problem(parsed, inside_repeat=False)
    if problem is not None:
        raise ValueError(f"pattern {pattern!r} refused: {problem} can backtrack catastrophically")
    return pattern


Pattern = Annotated[str, Field(min_length=1, max_length=MAX_PATTERN_LENGTH)]


def _check_patterns(patterns: tuple[str, ...]) -> tuple[str, ...]:
    for pattern in patterns:
        check_pattern(pattern)
    _no_duplicates(patterns, "pattern")
    return patterns


def first_match(text: str, patterns: Iterable[str]) -> str | None:
    """The first pattern that matches anywhere in ``text``, or ``None``."""
    return next((pattern for pattern in patterns if re.search(pattern, text)), None)


def redact_text(text: str, patterns: Iterable[str]) -> str:
    """``text`` with every match of every pattern replaced by ``[REDACTED]``, in list order."""
    for pattern in patterns:
        text = re.sub(pattern, REDACTED, text)
    return text


# --- the model -----------------------------------------------------------------------------------


class TablePolicy(StrictModel):
    """One visible table: its visible columns (explicit, no wildcard) and an optional row filter.

    The row filter may use any column of the table, including columns not in ``columns``: the runner
    applies it before projecting, so the query stage sees neither the filter nor a hidden column.
    """

    columns: tuple[Name, ...] = Field(min_length=1, max_length=MAX_COLUMNS)
    where: str | None = None

    @field_validator("columns")
    @classmethod
    def _unique_columns(cls, columns: tuple[str, ...]) -> tuple[str, ...]:
        _no_duplicates(columns, "column")
        return columns

    @field_validator("where")
    @classmethod
    def _restricted_predicate(cls, where: str | None) -> str | None:
        if where is not None:
            _row_filter(where)
        return where

    def where_sql(self) -> str | None:
        """The row filter as SQLite SQL re-generated from the checked syntax tree.

        The runner filters with this text, not the raw string, so what SQLite executes is exactly
        what the grammar check saw.
        """
        return None if self.where is None else _row_filter(self.where).sql

    def where_columns(self) -> frozenset[str]:
        """Every column name the row filter references (empty without a filter); some may be hidden."""
        return frozenset() if self.where is None else _row_filter(self.where).columns

    def where_conjuncts(self) -> frozenset[str]:
        """Normalized SQL of each top-level AND operand of the row filter (empty without a filter)."""
        return frozenset() if self.where is None else _row_filter(self.where).conjuncts


def _row_filter(where: str) -> RowFilter:
    # Imported on first use: the grammar needs sqlglot, about 100 ms of import that a Lambda handler
    # or an hmctl command without row filters never pays.
    from hivemind.predicates import check_row_filter  # noqa: PLC0415

    return check_row_filter(where)


class AggregatePolicy(StrictModel):
    """Aggregation rules. When ``required``, only aggregate SELECTs over groups of ``min_group_size``+."""

    required: StrictBool = True
    min_group_size: StrictInt = Field(default=DEFAULT_MIN_GROUP_SIZE, ge=1, le=MAX_MIN_GROUP_SIZE)
    functions: tuple[AggregateFunction, ...] = (AggregateFunction.COUNT,)

    @field_validator("functions")
    @classmethod
    def _unique_functions(cls, functions: tuple[AggregateFunction, ...]) -> tuple[AggregateFunction, ...]:
        _no_duplicates(functions, "aggregate function")
        return functions


class ItemById(StrictModel):
    """Allow the document item with this id."""

    id: Identifier


class ItemByMeta(StrictModel):
    """Allow every document item whose metadata has all of these key/value pairs."""

    meta: dict[Name, MetaText] = Field(min_length=1, max_length=MAX_META_KEYS)

    def matches(self, metadata: Mapping[str, object]) -> bool:
        return all(key in metadata and metadata[key] == value for key, value in self.meta.items())


def _item_rule_kind(value: Any) -> str | None:
    if isinstance(value, ItemById | ItemByMeta):
        return "id" if isinstance(value, ItemById) else "meta"
    if isinstance(value, Mapping) and len(value) == 1:
        key = next(iter(value))
        return key if key in ("id", "meta") else None
    return None


ItemRule = Annotated[
    Annotated[ItemById, Tag("id")] | Annotated[ItemByMeta, Tag("meta")],
    Discriminator(
        _item_rule_kind,
        custom_error_type="invalid_item_rule",
        custom_error_message='an item rule is {"id": "<item id>"} or {"meta": {"<key>": "<value>"}}',
    ),
]


class ItemsPolicy(StrictModel):
    """Which document items the query stage may read, and what is redacted from their text."""

    allow: tuple[ItemRule, ...] = Field(default=(), max_length=MAX_ITEM_RULES)
    redact: tuple[Pattern, ...] = Field(default=(), max_length=MAX_PATTERNS)

    @field_validator("allow")
    @classmethod
    def _unique_rules(cls, allow: tuple[ItemRule, ...]) -> tuple[ItemRule, ...]:
        _no_duplicates(
            [json.dumps(rule.model_dump(mode="json"), sort_keys=True) for rule in allow], "item rule"
        )
        return allow

    @field_validator("redact")
    @classmethod
    def _patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        return _check_patterns(patterns)

    def allows(self, item_id: str, metadata: Mapping[str, object]) -> bool:
        """True iff some allow rule names this item or matches its metadata."""
        for rule in self.allow:
            if isinstance(rule, ItemById) and rule.id == item_id:
                return True
            if isinstance(rule, ItemByMeta) and rule.matches(metadata):
                return True
        return False

    def redact_text(self, text: str) -> str:
        return redact_text(text, self.redact)


class OutputPolicy(StrictModel):
    """Deterministic last gate on the final answer: deny if any ``deny`` matches, then redact."""

    deny: tuple[Pattern, ...] = Field(default=(), max_length=MAX_PATTERNS)
    redact: tuple[Pattern, ...] = Field(default=(), max_length=MAX_PATTERNS)

    @field_validator("deny", "redact")
    @classmethod
    def _patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        return _check_patterns(patterns)

    def denied_by(self, text: str) -> str | None:
        """The first deny pattern found in ``text``, or ``None`` when the output may leave."""
        return first_match(text, self.deny)

    def redact_text(self, text: str) -> str:
        return redact_text(text, self.redact)


class ScopePolicy(StrictModel):
    """The scope a run's query stage gets. Every omitted section takes its most restrictive value.

    Omitted ``tables`` and ``items.allow`` show nothing; omitted ``aggregate`` requires aggregation
    with groups of at least 10 and ``COUNT`` only; omitted ``max_rows`` is 100.
    """

    tables: dict[Name, TablePolicy] = Field(default_factory=dict, max_length=MAX_TABLES)
    aggregate: AggregatePolicy = Field(default_factory=AggregatePolicy)
    max_rows: StrictInt = Field(default=DEFAULT_MAX_ROWS, ge=0, le=MAX_ROWS_LIMIT)
    items: ItemsPolicy = Field(default_factory=ItemsPolicy)
    output: OutputPolicy = Field(default_factory=OutputPolicy)


# --- parsing and hashing -------------------------------------------------------------------------


def _error_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for index, part in enumerate(loc):
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif index >= 2 and loc[index - 2] == "allow" and isinstance(loc[index - 1], int):
            # pydantic adds the discriminator tag of an item rule; the user's path does not contain it.
            continue
        elif part == "[key]":
            parts.append(" (name)")
        else:
            parts.append(f".{part}" if parts else str(part))
    return "".join(parts) or "$"


def _error_message(error: Any) -> str:
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    return str(error["msg"])


def parse_policy(source: str | bytes | Mapping[str, Any] | ScopePolicy) -> ScopePolicy:
    """Validate a ScopePolicy given as JSON text or a decoded dict; raise :class:`InvalidPolicy`.

    The message names every offending path, e.g. ``tables.users.where: function calls are not
    allowed``; ``details["errors"]`` lists them as ``{"path", "message"}`` objects.
    """
    if isinstance(source, ScopePolicy):
        return source
    data: Any = source
    if isinstance(source, str | bytes):
        try:
            data = json.loads(source)
        except (ValueError, RecursionError) as exc:
            raise InvalidPolicy(f"policy is not valid JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise InvalidPolicy("policy must be a JSON object")
    try:
        return ScopePolicy.model_validate(dict(data))
    except ValidationError as exc:
        errors = [
            {"path": _error_path(error["loc"]), "message": _error_message(error)} for error in exc.errors()
        ]
        summary = "; ".join(f"{error['path']}: {error['message']}" for error in errors)
        raise InvalidPolicy(f"invalid scope policy: {summary}", details={"errors": errors}) from None
    except RecursionError:
        raise InvalidPolicy("policy is nested too deeply") from None


def policy_hash(policy: ScopePolicy) -> str:
    """Hex SHA-256 of the policy's canonical JSON (RFC 8785): the hash receipts carry."""
    return canonical_sha256(policy)


def most_restrictive_policy(schema: Mapping[str, Sequence[str]] | None = None) -> ScopePolicy:
    """The policy that shows least data.

    Without a schema: no tables, no items. With a schema (table -> columns): every table and column,
    but aggregate-only with ``COUNT``, groups of at least 10, no items. Names must already be
    normalized identifiers. It has no output patterns: to narrow a room policy that has some, add
    the room's ``output`` section.
    """
    tables = {table: {"columns": list(columns)} for table, columns in (schema or {}).items()}
    return parse_policy({"tables": tables})


def _schema_problems(policy: ScopePolicy, schema: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    problems: list[dict[str, str]] = []
    for table, table_policy in policy.tables.items():
        if table not in schema:
            problems.append({"path": f"tables.{table}", "message": "no such table in the room data"})
            continue
        missing = [column for column in table_policy.columns if column not in schema[table]]
        if missing:
            problems.append(
                {"path": f"tables.{table}.columns", "message": f"no such column(s) {', '.join(missing)}"}
            )
        missing = sorted(column for column in table_policy.where_columns() if column not in schema[table])
        if missing:
            problems.append(
                {"path": f"tables.{table}.where", "message": f"no such column(s) {', '.join(missing)}"}
            )
    return problems


def check_against_schema(policy: ScopePolicy, schema: Mapping[str, Sequence[str]]) -> None:
    """Refuse a policy naming a table or column the room's data does not have (the run fails closed).

    Both the listed columns and every column a row filter references must exist in ``schema``. The
    :class:`InvalidPolicy` names every problem; ``details["errors"]`` lists them as ``{"path",
    "message"}`` objects, like :func:`parse_policy`'s.
    """
    problems = _schema_problems(policy, schema)
    if problems:
        summary = "; ".join(f"{problem['path']}: {problem['message']}" for problem in problems)
        raise InvalidPolicy(summary, details={"errors": problems})


# --- narrowing -----------------------------------------------------------------------------------


def _item_rule_covered(rule: ItemRule, bound: Sequence[ItemRule]) -> bool:
    for other in bound:
        if isinstance(rule, ItemById) and isinstance(other, ItemById) and rule.id == other.id:
            return True
        # A metadata rule with more pairs matches fewer items.
        if (
            isinstance(rule, ItemByMeta)
            and isinstance(other, ItemByMeta)
            and other.meta.items() <= rule.meta.items()
        ):
            return True
    return False


def _table_widenings(candidate: ScopePolicy, bound: ScopePolicy) -> list[str]:
    found: list[str] = []
    for table, table_policy in candidate.tables.items():
        bound_table = bound.tables.get(table)
        if bound_table is None:
            found.append(f"tables.{table}: table not allowed by the bound")
            continue
        extra_columns = [column for column in table_policy.columns if column not in bound_table.columns]
        if extra_columns:
            found.append(f"tables.{table}.columns: {', '.join(extra_columns)} not allowed by the bound")
        # Sound because a conjunction that contains all of the bound's conjuncts implies the bound.
        missing = bound_table.where_conjuncts() - table_policy.where_conjuncts()
        if missing:
            found.append(
                f"tables.{table}.where: does not keep the bound's condition(s) {'; '.join(sorted(missing))}"
            )
    return found


def _aggregate_widenings(candidate: ScopePolicy, bound: ScopePolicy) -> list[str]:
    found: list[str] = []
    aggregate, bound_aggregate = candidate.aggregate, bound.aggregate
    if bound_aggregate.required and not aggregate.required:
        found.append("aggregate.required: the bound requires aggregation")
    if aggregate.min_group_size < bound_aggregate.min_group_size:
        found.append(
            f"aggregate.min_group_size: {aggregate.min_group_size} is below the bound's "
            f"{bound_aggregate.min_group_size}"
        )
    extra_functions = [
        function.value for function in aggregate.functions if function not in bound_aggregate.functions
    ]
    if extra_functions:
        found.append(f"aggregate.functions: {', '.join(extra_functions)} not allowed by the bound")
    if candidate.max_rows > bound.max_rows:
        found.append(f"max_rows: {candidate.max_rows} exceeds the bound's {bound.max_rows}")
    return found


def _item_and_output_widenings(candidate: ScopePolicy, bound: ScopePolicy) -> list[str]:
    found = [
        f"items.allow[{index}]: not covered by the bound's allow rules"
        for index, rule in enumerate(candidate.items.allow)
        if not _item_rule_covered(rule, bound.items.allow)
    ]
    pattern_lists = [
        ("output.deny", candidate.output.deny, bound.output.deny),
        ("output.redact", candidate.output.redact, bound.output.redact),
    ]
    if candidate.items.allow:  # with no item visible, item redaction has nothing to act on
        pattern_lists.insert(0, ("items.redact", candidate.items.redact, bound.items.redact))
    for path, ours, theirs in pattern_lists:
        dropped = [pattern for pattern in theirs if pattern not in ours]
        if dropped:
            found.append(f"{path}: drops the bound's pattern(s) {', '.join(map(repr, dropped))}")
    return found


def widenings(candidate: ScopePolicy, bound: ScopePolicy) -> list[str]:
    """Every way ``candidate`` may allow something ``bound`` does not; empty means narrower.

    The check is syntactic and sound: when it returns nothing, ``candidate`` allows no more than
    ``bound``. It may report a widening for a policy that is semantically narrower (for example a row
    filter ``age > 30`` against a bound ``age > 18``): rewrite such a filter as the bound's filter
    AND the extra condition.
    """
    return (
        _table_widenings(candidate, bound)
        + _aggregate_widenings(candidate, bound)
        + _item_and_output_widenings(candidate, bound)
    )


def is_narrower(candidate: ScopePolicy, bound: ScopePolicy) -> bool:
    """True iff ``candidate`` provably allows nothing ``bound`` does not (see :func:`widenings`).

    Every policy is narrower than itself.
    """
    return not widenings(candidate, bound)


def narrow(room_policy: ScopePolicy, proposed: ScopePolicy) -> ScopePolicy:
    """The policy a run uses when the room sets ``data_policy``: ``proposed`` if it is narrower.

    Fails closed: a proposal that may widen the room's policy raises :class:`InvalidPolicy` listing
    each widening; the run must not fall back to anything.
    """
    found = widenings(proposed, room_policy)
    if found:
        raise InvalidPolicy(
            "scope policy is not narrower than the room's data_policy: " + "; ".join(found),
            details={"widenings": found},
        )
    return proposed


def _intersect_where(table: TablePolicy, bound_table: TablePolicy) -> str | None:
    if bound_table.where is None or not (bound_table.where_conjuncts() - table.where_conjuncts()):
        return table.where
    if table.where is None:
        return bound_table.where
    # Both from their checked syntax trees: each side is one balanced predicate, so neither can reach
    # out of its parentheses, and the result's conjuncts include every conjunct of the bound's filter.
    return f"({bound_table.where_sql()}) AND ({table.where_sql()})"


def _pattern_union(own: Sequence[str], added: Sequence[str]) -> list[str]:
    return list(own) + [pattern for pattern in added if pattern not in own]


def intersect(policy: ScopePolicy, bound: ScopePolicy) -> ScopePolicy:
    """The part of ``policy`` that ``bound`` also allows: :func:`widenings` finds nothing against either.

    ``policy`` itself when it is already narrower than ``bound``. Otherwise: tables and columns are
    intersected (a table left without columns is dropped); a row filter that does not keep the bound's
    conditions becomes ``(bound's) AND (own)`` (filters may use hidden columns, so the bound's filter
    holds whatever columns remain); aggregation takes the stricter of each rule; item rules the bound
    does not cover are dropped; redact and deny patterns are the union of both lists.

    Raises :class:`InvalidPolicy` when the intersection breaks a limit of the model (more than
    ``MAX_PATTERNS`` patterns in a list, a combined row filter over the grammar's bounds).
    """
    if is_narrower(policy, bound):
        return policy
    tables: dict[str, dict[str, Any]] = {}
    for table, table_policy in policy.tables.items():
        bound_table = bound.tables.get(table)
        if bound_table is None:
            continue
        columns = [column for column in table_policy.columns if column in bound_table.columns]
        if columns:
            tables[table] = {"columns": columns, "where": _intersect_where(table_policy, bound_table)}
    aggregate, bound_aggregate = policy.aggregate, bound.aggregate
    items, output = policy.items, policy.output
    try:
        return parse_policy(
            {
                "tables": tables,
                "aggregate": {
                    "required": aggregate.required or bound_aggregate.required,
                    "min_group_size": max(aggregate.min_group_size, bound_aggregate.min_group_size),
                    "functions": [
                        function.value
                        for function in aggregate.functions
                        if function in bound_aggregate.functions
                    ],
                },
                "max_rows": min(policy.max_rows, bound.max_rows),
                "items": {
                    "allow": [
                        rule.model_dump(mode="json")
                        for rule in items.allow
                        if _item_rule_covered(rule, bound.items.allow)
                    ],
                    "redact": _pattern_union(items.redact, bound.items.redact),
                },
                "output": {
                    "deny": _pattern_union(output.deny, bound.output.deny),
                    "redact": _pattern_union(output.redact, bound.output.redact),
                },
            }
        )
    except InvalidPolicy as exc:
        raise InvalidPolicy(
            f"the policy cannot be intersected with its bound: {exc.message}", details=exc.details
        ) from None


# --- checking a candidate --------------------------------------------------------------------------


class PolicyProblem(StrictModel):
    """Why a candidate policy is refused: the JSON path of the offending value and what is wrong."""

    path: str
    message: str


class Widening(StrictModel):
    """One way a candidate may allow more than ``against``: the caller's ``bound`` or the room's
    ``data_policy``."""

    against: Literal["bound", "data_policy"]
    message: str


class PolicyCheck(StrictModel):
    """The verdict on a candidate ScopePolicy, as the runner would reach it (the bridge's
    ``POST /v1/policy/check``).

    ``valid``: it parses and names only tables and columns the data has; ``errors`` says why not.
    ``policy``: the candidate with every section written out (``None`` unless valid).
    ``widenings``: against ``bound`` when one was given, and always against the room's ``data_policy``
    when the room sets one. ``narrower_than_room``: valid and nothing wider than the room's
    ``data_policy`` (true when the room sets none): the runner accepts exactly these.
    ``within_room``: :func:`intersect` of the candidate with the room's ``data_policy`` (the candidate
    itself when the room sets none or it is already narrower; ``None`` unless valid).
    """

    valid: bool
    errors: tuple[PolicyProblem, ...] = ()
    policy: ScopePolicy | None = None
    widenings: tuple[Widening, ...] = ()
    narrower_than_room: bool = False
    within_room: ScopePolicy | None = None


def _problems(exc: InvalidPolicy) -> tuple[PolicyProblem, ...]:
    listed = exc.details.get("errors")
    if not listed:
        return (PolicyProblem(path="$", message=exc.message),)
    return tuple(PolicyProblem(path=problem["path"], message=problem["message"]) for problem in listed)


def check_policy(
    candidate: str | bytes | Mapping[str, Any] | ScopePolicy,
    schema: Mapping[str, Sequence[str]],
    *,
    bound: Mapping[str, Any] | ScopePolicy | None = None,
    room_policy: ScopePolicy | None = None,
) -> PolicyCheck:
    """Judge ``candidate`` for a room whose data has ``schema`` and whose ``data_policy`` is
    ``room_policy``: :func:`parse_policy`, :func:`check_against_schema`, :func:`widenings` against
    ``bound`` and the room's policy, and :func:`intersect` with the room's policy.

    A candidate that does not parse or names missing tables or columns is a verdict
    (``valid=False``), not an exception. Raises :class:`InvalidPolicy` when ``bound`` is not a valid
    policy, or when the candidate cannot be intersected with the room's policy (see :func:`intersect`).
    """
    bound_policy: ScopePolicy | None = None
    if bound is not None:
        try:
            bound_policy = parse_policy(bound)
        except InvalidPolicy as exc:
            raise InvalidPolicy(
                f"the bound is not a valid policy: {exc.message}", details=exc.details
            ) from None
    try:
        policy = parse_policy(candidate)
        check_against_schema(policy, schema)
    except InvalidPolicy as exc:
        return PolicyCheck(valid=False, errors=_problems(exc))
    found = [] if bound_policy is None else widenings(policy, bound_policy)
    room_found = [] if room_policy is None else widenings(policy, room_policy)
    return PolicyCheck(
        valid=True,
        policy=policy,
        widenings=tuple(
            [Widening(against="bound", message=message) for message in found]
            + [Widening(against="data_policy", message=message) for message in room_found]
        ),
        narrower_than_room=not room_found,
        within_room=policy if room_policy is None else intersect(policy, room_policy),
    )


# --- what the query stage sees ------------------------------------------------------------------


class QueryView(StrictModel):
    """The part of a policy the query stage may know (§16.5): no row filters, no redaction lists."""

    tables: dict[Name, tuple[Name, ...]]
    aggregate_required: bool
    min_group_size: int
    functions: tuple[AggregateFunction, ...]
    max_rows: int

    @model_validator(mode="after")
    def _columns_present(self) -> Self:
        for table, columns in self.tables.items():
            if not columns:
                raise ValueError(f"table {table} has no columns")
        return self


def visible_schema(policy: ScopePolicy) -> dict[str, list[str]]:
    """Table -> visible columns, in policy order: the only schema the query stage is told about."""
    return {table: list(table_policy.columns) for table, table_policy in policy.tables.items()}


def public_view(policy: ScopePolicy) -> QueryView:
    """What the query stage receives about its scope, and nothing else."""
    return QueryView(
        tables={table: tuple(columns) for table, columns in visible_schema(policy).items()},
        aggregate_required=policy.aggregate.required,
        min_group_size=policy.aggregate.min_group_size,
        functions=policy.aggregate.functions,
        max_rows=policy.max_rows,
    )
