"""The values bridge routes return, parsed and checked from their wire JSON (docs/agents.md).

Parsing is strict about the fields the contract defines (a wrong type is a ProtocolError) and ignores
fields it does not know, so a newer bridge can add fields without breaking older agents.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._wire import (
    array,
    count,
    flag,
    frozen,
    obj,
    opt_count,
    opt_string,
    string,
    string_array,
)
from .errors import ProtocolError

ROLES = ("scope", "query", "mediator")

JsonScalar = str | int | float | bool | None


# --- input ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Budgets:
    """The limits this stage runs under (integers, as in the signed run documents)."""

    timeout_s: int
    llm_calls: int
    tokens: int
    memory_mb: int

    @classmethod
    def from_wire(cls, value: Any, where: str = "input.budgets") -> Budgets:
        body = obj(value, where)
        return cls(
            timeout_s=count(body, "timeout_s", where),
            llm_calls=count(body, "llm_calls", where),
            tokens=count(body, "tokens", where),
            memory_mb=count(body, "memory_mb", where),
        )


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    row_count: int | None

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)


@dataclass(frozen=True, slots=True)
class AggregateRule:
    """When ``required``, only aggregate SELECTs pass and groups smaller than ``min_group_size`` are cut."""

    required: bool
    min_group_size: int
    functions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Schema:
    """The tables this role may query (for the query stage: only the allowed projection)."""

    tables: tuple[Table, ...]
    aggregate: AggregateRule | None
    max_rows: int | None

    def table(self, name: str) -> Table:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(f"no table {name!r} in the schema (tables: {', '.join(self.table_names) or 'none'})")

    @property
    def table_names(self) -> tuple[str, ...]:
        return tuple(table.name for table in self.tables)

    @classmethod
    def from_wire(cls, value: Any, where: str = "schema") -> Schema:
        body = obj(value, where)
        tables = []
        for raw_table in array(body, "tables", where):
            table = obj(raw_table, f"{where}.tables[]")
            columns = []
            for raw_column in array(table, "columns", f"{where}.tables[].columns"):
                column = obj(raw_column, f"{where}.tables[].columns[]")
                columns.append(
                    Column(
                        name=string(column, "name", f"{where}.tables[].columns[]"),
                        type=string(column, "type", f"{where}.tables[].columns[]"),
                    )
                )
            tables.append(
                Table(
                    name=string(table, "name", f"{where}.tables[]"),
                    columns=tuple(columns),
                    row_count=opt_count(table, "row_count", f"{where}.tables[]"),
                )
            )
        aggregate = None
        if body.get("aggregate") is not None:
            rule = obj(body["aggregate"], f"{where}.aggregate")
            aggregate = AggregateRule(
                required=flag(rule, "required", f"{where}.aggregate"),
                min_group_size=count(rule, "min_group_size", f"{where}.aggregate"),
                functions=string_array(rule, "functions", f"{where}.aggregate"),
            )
        return cls(tables=tuple(tables), aggregate=aggregate, max_rows=opt_count(body, "max_rows", where))


@dataclass(frozen=True, slots=True)
class AgentInput:
    """What the runner hands this stage (``GET /v1/input``).

    ``prompt`` is None when the room hides the prompt from the scope agent. ``stage`` holds the
    stage-specific fields (for example the mediator's ``answer``), passed through as sent.
    """

    role: str
    prompt: str | None
    rules: str
    policy: str
    schema: Schema | None
    budgets: Budgets
    llm_providers: tuple[str, ...]
    artifacts_allowed: bool
    stage: Mapping[str, Any]

    @property
    def llm_available(self) -> bool:
        """Whether an LLM call can succeed at all: a provider is allowed and the call budget is not zero."""
        return bool(self.llm_providers) and self.budgets.llm_calls > 0

    @classmethod
    def from_wire(cls, value: Any) -> AgentInput:
        where = "GET /v1/input"
        body = obj(value, where)
        role = string(body, "role", where)
        if role not in ROLES:
            raise ProtocolError(f"{where}: unknown role {role!r}")
        schema = None if body.get("schema") is None else Schema.from_wire(body["schema"], f"{where} schema")
        stage = body.get("stage", {})
        return cls(
            role=role,
            prompt=opt_string(body, "prompt", where),
            rules=string(body, "rules", where),
            policy=string(body, "policy", where),
            schema=schema,
            budgets=Budgets.from_wire(body.get("budgets"), f"{where} budgets"),
            llm_providers=string_array(body, "llm_providers", where),
            artifacts_allowed=flag(body, "artifacts_allowed", where),
            stage=frozen(obj(stage, f"{where} stage")),
        )


# --- tools ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SqlResult:
    """Rows of a scoped SQL query. ``truncated`` is true when the bridge cut rows at its row limit."""

    columns: tuple[str, ...]
    rows: tuple[tuple[JsonScalar, ...], ...]
    truncated: bool

    def records(self) -> list[dict[str, JsonScalar]]:
        """The rows as dicts keyed by column name (later duplicate column names win)."""
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    @classmethod
    def from_wire(cls, value: Any) -> SqlResult:
        where = "POST /v1/tools/sql"
        body = obj(value, where)
        columns = string_array(body, "columns", where)
        rows = []
        for raw_row in array(body, "rows", where):
            if not isinstance(raw_row, list) or len(raw_row) != len(columns):
                raise ProtocolError(f"{where}: every row must be a list with one value per column")
            if not all(v is None or isinstance(v, str | int | float | bool) for v in raw_row):
                raise ProtocolError(f"{where}: row values must be JSON scalars")
            rows.append(tuple(raw_row))
        return cls(columns=columns, rows=tuple(rows), truncated=flag(body, "truncated", where))


@dataclass(frozen=True, slots=True)
class ItemInfo:
    """A room item this role may read, without its content (``GET /v1/tools/items``)."""

    id: str
    name: str
    content_type: str
    size: int
    metadata: Mapping[str, Any]

    @classmethod
    def from_wire(cls, value: Any, where: str = "GET /v1/tools/items") -> ItemInfo:
        body = obj(value, where)
        return cls(
            id=string(body, "id", where),
            name=string(body, "name", where),
            content_type=string(body, "content_type", where),
            size=count(body, "size", where),
            metadata=frozen(obj(body.get("metadata", {}), f"{where} metadata")),
        )


@dataclass(frozen=True, slots=True)
class Item:
    """One item's content after the room's allow-list and redaction: ``text`` or, for binary, ``data``."""

    id: str
    name: str
    content_type: str
    metadata: Mapping[str, Any]
    text: str | None
    data: bytes | None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class ChatCompletion:
    """An OpenAI-compatible chat completion. ``text`` is the first choice's content (None for tool calls)."""

    id: str
    model: str
    text: str | None
    message: Mapping[str, Any]
    finish_reason: str | None
    usage: Usage
    raw: Mapping[str, Any]

    @classmethod
    def from_wire(cls, value: Any) -> ChatCompletion:
        where = "POST /v1/llm/chat/completions"
        body = obj(value, where)
        choices = array(body, "choices", where)
        if not choices:
            raise ProtocolError(f"{where}: the completion has no choices")
        first = obj(choices[0], f"{where} choices[0]")
        message = obj(first.get("message"), f"{where} choices[0].message")
        usage = obj(body.get("usage"), f"{where} usage")
        return cls(
            id=string(body, "id", where),
            model=string(body, "model", where),
            text=opt_string(message, "content", f"{where} choices[0].message"),
            message=frozen(message),
            finish_reason=opt_string(first, "finish_reason", f"{where} choices[0]"),
            usage=Usage(
                prompt_tokens=count(usage, "prompt_tokens", f"{where} usage"),
                completion_tokens=count(usage, "completion_tokens", f"{where} usage"),
                total_tokens=count(usage, "total_tokens", f"{where} usage"),
            ),
            raw=frozen(body),
        )


@dataclass(frozen=True, slots=True)
class ArtifactRef:
    """What the bridge stored for ``PUT /v1/artifacts/{name}``; the SDK has checked size and hash."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """The room's query agent run against a candidate policy: its output, or why it failed."""

    output: str | Mapping[str, Any] | None
    error_code: str | None
    error_message: str | None

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @classmethod
    def from_wire(cls, value: Any) -> SimulationResult:
        where = "POST /v1/simulate"
        body = obj(value, where)
        output = body.get("output")
        if isinstance(output, dict):
            output = frozen(output)
        elif output is not None and not isinstance(output, str):
            raise ProtocolError(f"{where}: field 'output' must be a string, an object or null")
        error = body.get("error")
        if error is None:
            if output is None:
                raise ProtocolError(f"{where}: a simulation without an error must have an output")
            return cls(output=output, error_code=None, error_message=None)
        if output is not None:
            raise ProtocolError(f"{where}: a failed simulation has no output")
        error = obj(error, f"{where} error")
        return cls(
            output=None,
            error_code=string(error, "code", f"{where} error"),
            error_message=string(error, "message", f"{where} error"),
        )


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """Why a candidate policy is refused: the JSON path of the offending value and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True, slots=True)
class Widening:
    """One way a candidate allows more than ``against``: ``"bound"`` (the caller's) or ``"data_policy"``."""

    against: str
    message: str


def _string_pairs(
    body: Mapping[str, Any], key: str, fields: tuple[str, str], where: str
) -> list[tuple[str, str]]:
    """A list of objects with two string fields, as ``(first, second)`` tuples."""
    label = f"{where} {key}[]"
    records = [obj(raw, label) for raw in array(body, key, where)]
    return [(string(record, fields[0], label), string(record, fields[1], label)) for record in records]


def _policy_or_none(body: Mapping[str, Any], key: str, where: str) -> dict[str, Any] | None:
    value = body.get(key)
    # A fresh dict decoded from this answer: the caller may change it and post it.
    return None if value is None else dict(obj(value, f"{where} {key}"))


@dataclass(frozen=True, slots=True)
class PolicyCheck:
    """The runner's verdict on a candidate ScopePolicy (``POST /v1/policy/check``, scope stage only).

    ``valid``: it parses and names only tables and columns the room's data has (``errors`` says why
    not). ``policy``: the candidate with every section written out. ``widenings``: against the bound
    given, and against the room's ``data_policy`` when it sets one. ``narrower_than_room``: the runner
    would accept it as the run's policy. ``within_room``: the candidate intersected with the room's
    ``data_policy`` (the candidate itself when already narrower). Both policies are ``None`` unless
    valid, and are plain dicts of this answer's own.
    """

    valid: bool
    errors: tuple[PolicyProblem, ...]
    policy: dict[str, Any] | None
    widenings: tuple[Widening, ...]
    narrower_than_room: bool
    within_room: dict[str, Any] | None

    @property
    def narrower(self) -> bool:
        """Valid, and allowing nothing the bound (when one was given) or the room's data_policy does not."""
        return self.valid and not self.widenings

    @classmethod
    def from_wire(cls, value: Any) -> PolicyCheck:
        where = "POST /v1/policy/check"
        body = obj(value, where)
        errors = [PolicyProblem(*pair) for pair in _string_pairs(body, "errors", ("path", "message"), where)]
        widenings = [
            Widening(*pair) for pair in _string_pairs(body, "widenings", ("against", "message"), where)
        ]
        check = cls(
            valid=flag(body, "valid", where),
            errors=tuple(errors),
            policy=_policy_or_none(body, "policy", where),
            widenings=tuple(widenings),
            narrower_than_room=flag(body, "narrower_than_room", where),
            within_room=_policy_or_none(body, "within_room", where),
        )
        if check.valid and (check.policy is None or check.within_room is None or check.errors):
            raise ProtocolError(f"{where}: a valid policy comes back with policy and within_room, no errors")
        if not check.valid and (check.policy is not None or not check.errors or check.narrower_than_room):
            raise ProtocolError(f"{where}: an invalid policy comes back with errors only")
        return check
