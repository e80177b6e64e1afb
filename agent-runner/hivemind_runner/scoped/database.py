"""A stage's data: the SQLite database its SQL runs against, and its document items.

The query stage's database is in memory; the scope stage's full read may be a file in the run's
tmpfs workspace (see :mod:`hivemind_runner.scoped.loader`), deleted when the database closes.

A :class:`ScopedDatabase` is bound to one role when it is built: the scope stage's full read
(:func:`~hivemind_runner.scoped.loader.full_read_database`) or the query stage's scoped projection
(:func:`~hivemind_runner.scoped.loader.build_scoped_database`). Every tool method takes the caller's
role and refuses any other, so a database wired to the wrong session fails closed instead of
answering. It answers the bridge routes ``/v1/tools/schema``, ``/v1/tools/sql`` and
``/v1/tools/items[/{id}]`` with exactly the shapes docs/agents.md gives.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from hivemind.errors import Forbidden, Gone
from hivemind.models import Stage, StrictModel
from hivemind.policy import AggregateFunction, AggregatePolicy, QueryView
from hivemind_runner.scoped.items import DocumentShelf, ItemContent, ItemInfo
from hivemind_runner.scoped.limits import ScopedLimits
from hivemind_runner.scoped.sql import (
    FULL_READ_FUNCTIONS,
    Authorizer,
    GateRules,
    QueryBudget,
    SqlResult,
    execute,
    prepare,
    query_functions,
)

ColumnType = Literal["INTEGER", "REAL", "TEXT", "BLOB"]


class ColumnSchema(StrictModel):
    name: str
    type: ColumnType


class TableSchema(StrictModel):
    name: str
    columns: tuple[ColumnSchema, ...]
    row_count: int | None


class AggregateRules(StrictModel):
    required: bool
    min_group_size: int
    functions: tuple[AggregateFunction, ...]


class SchemaView(StrictModel):
    """``GET /v1/tools/schema``: tables, typed columns, row counts, and the query stage's rules.

    Never row filters, redaction lists or hidden columns (DESIGN §16.5): it is built from the
    database's own tables and the policy's :class:`~hivemind.policy.QueryView`.
    """

    tables: tuple[TableSchema, ...]
    aggregate: AggregateRules | None
    max_rows: int | None


@dataclass(frozen=True)
class LoadedTable:
    """A table as it exists in the database: normalized name, typed columns, rows, origin item."""

    name: str
    columns: tuple[tuple[str, ColumnType], ...]
    row_count: int
    item_id: str


class ScopedDatabase:
    """The SQL and items tools of one stage. Thread-safe; close it when the stage ends."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        *,
        role: Stage,
        tables: Sequence[LoadedTable],
        view: QueryView | None,
        documents: DocumentShelf,
        limits: ScopedLimits,
        file: Path | None = None,
    ):
        """``file``: the database's own file (in the run's workspace), deleted when it closes."""
        if role not in (Stage.SCOPE, Stage.QUERY) or (role is Stage.QUERY) != (view is not None):
            raise ValueError("a scope database has no query view; a query database has one")
        self._connection = connection
        self._role = role
        self._tables = tuple(tables)
        self._view = view
        self._documents = documents
        self._limits = limits
        self._file = file
        self._lock = threading.Lock()
        self._closed = False
        visible = {table.name: tuple(name for name, _ in table.columns) for table in self._tables}
        if view is None:
            self._rules = GateRules(
                tables=visible, functions=FULL_READ_FUNCTIONS, aggregate=None, max_rows=limits.max_result_rows
            )
        else:
            aggregate = AggregatePolicy(
                required=view.aggregate_required, min_group_size=view.min_group_size, functions=view.functions
            )
            self._rules = GateRules(
                tables=visible,
                functions=query_functions(aggregate),
                aggregate=aggregate if aggregate.required else None,
                max_rows=min(view.max_rows, limits.max_result_rows),
            )
        self._authorizer = Authorizer(self._rules)
        connection.set_authorizer(self._authorizer)

    @property
    def role(self) -> Stage:
        return self._role

    # --- the tools ---

    def schema(self, *, role: Stage) -> SchemaView:
        self._check(role)
        aggregate_required = self._view is not None and self._view.aggregate_required
        tables = tuple(
            TableSchema(
                name=table.name,
                columns=tuple(ColumnSchema(name=name, type=kind) for name, kind in table.columns),
                # A small exact count is itself a fact about few rows; aggregate-only scopes withhold it.
                row_count=None if aggregate_required else table.row_count,
            )
            for table in self._tables
        )
        if self._view is None:
            return SchemaView(tables=tables, aggregate=None, max_rows=None)
        return SchemaView(
            tables=tables,
            aggregate=AggregateRules(
                required=self._view.aggregate_required,
                min_group_size=self._view.min_group_size,
                functions=self._view.functions,
            ),
            max_rows=self._view.max_rows,
        )

    def query(self, sql: str, *, role: Stage) -> SqlResult:
        """Check, rewrite and run one SELECT; raises :class:`~hivemind_runner.scoped.errors.SqlRejected`."""
        self._check(role)
        statement = prepare(sql, self._rules, max_sql_chars=self._limits.max_sql_chars)
        budget = QueryBudget(
            timeout_ms=self._limits.query_timeout_ms,
            max_steps=self._limits.query_max_steps,
            max_result_bytes=self._limits.max_result_bytes,
        )
        with self._lock:
            self._check_open()
            return execute(
                self._connection, self._authorizer, statement, max_rows=self._rules.max_rows, budget=budget
            )

    def list_items(self, *, role: Stage) -> list[ItemInfo]:
        self._check(role)
        return self._documents.list()

    def read_item(self, item_id: str, *, role: Stage) -> ItemContent:
        self._check(role)
        return self._documents.read(item_id)

    # --- for the pipeline and audits ---

    def snapshot(self) -> bytes:
        """The whole database image (``sqlite3_serialize``): exactly what this stage's SQL can reach,
        free pages included. For audits and tests; never hand it to an agent."""
        with self._lock:
            self._check_open()
            # SQLite serializes by reading the sqlite_dbpage virtual table, which the gate denies.
            self._connection.set_authorizer(None)
            try:
                return self._connection.serialize()
            finally:
                self._connection.set_authorizer(self._authorizer)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._connection.close()
                if self._file is not None:
                    self._file.unlink(missing_ok=True)

    def __enter__(self) -> ScopedDatabase:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _check(self, role: Stage) -> None:
        if role is not self._role:
            raise Forbidden(
                f"this database serves the {self._role.value} stage, not {role!s}",
                code="not_allowed_for_role",
            )
        self._check_open()

    def _check_open(self) -> None:
        if self._closed:
            raise Gone("the stage's database is closed")
