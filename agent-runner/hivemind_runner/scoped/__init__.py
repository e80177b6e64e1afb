"""The runner's scoped-data engine: structural data isolation for agent SQL (DESIGN §8, §16.5-7).

Room items become an in-memory SQLite database that contains only what a stage may see, and SQL
reaches it only through a gate (sqlglot parse, aggregate rules, SQLite authorizer). See
docs/scoped-data.md.

- :func:`build_scoped_database` (query stage) and :func:`full_read_database` (scope stage) return a
  :class:`ScopedDatabase` whose ``schema``, ``query``, ``list_items`` and ``read_item`` answer the
  bridge's tool routes;
- :func:`simulate` and :func:`resolve_policy` serve ``POST /v1/simulate``.
"""

from hivemind_runner.scoped.database import (
    AggregateRules,
    ColumnSchema,
    LoadedTable,
    SchemaView,
    ScopedDatabase,
    TableSchema,
)
from hivemind_runner.scoped.errors import DataLimitExceeded, DataLoadError, SqlDenied, SqlInvalid, SqlRejected
from hivemind_runner.scoped.items import ItemContent, ItemInfo, ItemKind, RoomItem, item_kind
from hivemind_runner.scoped.limits import ScopedLimits
from hivemind_runner.scoped.loader import build_scoped_database, column_type, full_read_database
from hivemind_runner.scoped.names import normalize_name
from hivemind_runner.scoped.simulate import resolve_policy, simulate
from hivemind_runner.scoped.sql import SqlResult

__all__ = [
    "AggregateRules",
    "ColumnSchema",
    "DataLimitExceeded",
    "DataLoadError",
    "ItemContent",
    "ItemInfo",
    "ItemKind",
    "LoadedTable",
    "RoomItem",
    "SchemaView",
    "ScopedDatabase",
    "ScopedLimits",
    "SqlDenied",
    "SqlInvalid",
    "SqlRejected",
    "SqlResult",
    "TableSchema",
    "build_scoped_database",
    "column_type",
    "full_read_database",
    "item_kind",
    "normalize_name",
    "resolve_policy",
    "simulate",
]
