"""Building a stage's database from room items, in bounded memory (DESIGN §8, §16.6).

For each table the policy names, rows stream from the item in batches of ``batch_rows``:

1. the batch is inserted into a staging table in a **separate** in-memory database attached as
   ``staging`` (``secure_delete`` on), holding only the columns the policy needs: its visible
   columns plus those its row filter reads;
2. ``INSERT INTO main.<t> SELECT <visible columns> FROM staging.rows WHERE <policy filter>`` copies
   the allowed projection of the allowed rows into the final database;
3. the staging rows are deleted.

So hidden values never touch a page of the final database, and peak memory is about one batch
plus the final projection. When the item is read, each column's type is decided from the values
that reached the final database (:func:`column_type`) and the table is rewritten into its typed form
batch by batch (each batch deleted from the untyped copy as it moves, so freed pages are reused).
Finally ``staging`` is detached, the database becomes read-only, and the SQL gate is installed.

Tables the policy does not name are never opened. The query stage's database is ``:memory:``, so its
size is the projection's. The scope stage's full read is the whole data: with a workspace (tmpfs in the
runner) it lives in a file there, deleted when the database closes, so the runner's own memory holds
one batch and a bounded page cache rather than every row (the workspace's size caps it); without
one it is ``:memory:`` too. SQLite items are copied to a workspace file, read, and deleted.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hivemind.models import Stage
from hivemind.policy import ScopePolicy, TablePolicy, check_against_schema, parse_policy, public_view
from hivemind_runner.scoped.database import ColumnType, LoadedTable, ScopedDatabase
from hivemind_runner.scoped.errors import DataLimitExceeded, DataLoadError
from hivemind_runner.scoped.items import TABLE_METADATA_KEY, DocumentShelf, ItemKind, RoomItem, item_kind
from hivemind_runner.scoped.limits import ScopedLimits
from hivemind_runner.scoped.names import table_name
from hivemind_runner.scoped.sources import (
    ByteBudget,
    CsvSource,
    JsonLinesSource,
    SqliteFile,
    TableSource,
    quote_identifier,
)
from hivemind_runner.scoped.spill import temp_store
from hivemind_runner.scoped.sql import limit_connection

_STAGING = "staging"
_STAGED_ROWS = "rows"
# Page cache of a file-backed database: enough for bulk loading, bounded whatever the data's size.
_FILE_CACHE_KIB = 16 * 1024
# Bits summed (DISTINCT) per column over the loaded values: one SQL pass tells which storage
# classes a column holds.
_TYPE_BITS = (
    "CASE typeof({column}) WHEN 'integer' THEN 1 WHEN 'real' THEN 2 WHEN 'text' THEN 4 "
    "WHEN 'blob' THEN 8 ELSE 0 END"
)


def column_type(storage_classes: int) -> ColumnType:
    """The declared type of a column from the storage classes of its non-NULL values.

    Only integers: INTEGER. Integers and reals: REAL. Any text: TEXT (numbers are converted to
    their text form). Any BLOB (SQLite items only): BLOB. No value at all: TEXT.
    """
    if storage_classes & 8:
        return "BLOB"
    if storage_classes & 4 or storage_classes == 0:
        return "TEXT"
    if storage_classes & 2:
        return "REAL"
    return "INTEGER"


def _columns_sql(columns: Sequence[str]) -> str:
    return ", ".join(quote_identifier(column) for column in columns)


@dataclass
class _Plan:
    """Which item provides which table, decided from item descriptions alone (nothing is opened)."""

    direct: dict[str, tuple[RoomItem, ItemKind]] = field(default_factory=dict)
    sqlite: list[tuple[RoomItem, str]] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)  # table -> item id (Parquet)
    claimed: dict[str, str] = field(default_factory=dict)  # table -> item id

    def claim(self, table: str, item: RoomItem) -> None:
        other = self.claimed.get(table)
        if other is not None:
            raise DataLoadError(
                "table_collision",
                f"items {other} and {item.info.id} both provide table {table!r}; "
                "give one of them a `table` metadata value",
            )
        self.claimed[table] = item.info.id


def _plan(items: Sequence[RoomItem]) -> _Plan:
    plan = _Plan()
    for item in items:
        kind = item_kind(item.info)
        if not kind.tabular:
            continue
        raw = item.info.metadata.get(TABLE_METADATA_KEY) or Path(item.info.name).stem
        name = table_name(raw, item_id=item.info.id)
        if kind is ItemKind.SQLITE:
            plan.sqlite.append((item, name))  # its tables are claimed when the file is opened
            continue
        plan.claim(name, item)
        if kind is ItemKind.PARQUET:
            plan.unsupported[name] = item.info.id
        else:
            plan.direct[name] = (item, kind)
    return plan


class _Loader:
    """One database being built; :meth:`finish` hands the connection over, :meth:`abort` discards it.

    ``in_file``: the database lives in a new file of ``limits.workspace`` (0600, deleted by
    :meth:`abort` or when the :class:`ScopedDatabase` closes) instead of in memory.
    """

    def __init__(self, limits: ScopedLimits, *, in_file: bool = False):
        self.limits = limits
        self.budget = ByteBudget(limits.max_total_bytes)
        self.tables: list[LoadedTable] = []
        self._item_rows: dict[str, int] = defaultdict(int)
        self._raw_tables = 0
        self.file: Path | None = None
        self._max_bytes = limits.max_database_bytes
        if in_file and limits.workspace is not None:
            descriptor, name = tempfile.mkstemp(prefix="hivemind-db-", suffix=".sqlite", dir=limits.workspace)
            os.close(descriptor)
            self.file = Path(name)
            self._max_bytes = limits.max_file_database_bytes
        try:
            self.connection = sqlite3.connect(
                ":memory:" if self.file is None else str(self.file),
                isolation_level=None,
                check_same_thread=False,
            )
        except BaseException:
            self._remove_file()
            raise
        try:
            run = self.connection.execute
            run("PRAGMA trusted_schema = OFF")
            # Big sorts and groupings spill to unlinked tmpfs files once the runner set that up;
            # otherwise to memory, never to a disk (see spill.py).
            run(f"PRAGMA temp_store = {temp_store()}")
            # No rollback is ever needed: a failed load discards the whole database.
            run("PRAGMA main.journal_mode = OFF")
            if self.file is not None:
                # A tmpfs file that dies with the run: no durability wanted, no memory mapping (the
                # pages would count as the runner's), a page cache of bounded size.
                run("PRAGMA main.synchronous = OFF")
                run("PRAGMA mmap_size = 0")
                run(f"PRAGMA main.cache_size = -{_FILE_CACHE_KIB}")
            run(f"ATTACH DATABASE ':memory:' AS {_STAGING}")
            run(f"PRAGMA {_STAGING}.journal_mode = OFF")
            run(f"PRAGMA {_STAGING}.secure_delete = ON")
            self._page_size = int(run("PRAGMA main.page_size").fetchone()[0])
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.connection.close()
        self._remove_file()

    def _remove_file(self) -> None:
        if self.file is not None:
            self.file.unlink(missing_ok=True)

    def finish(self) -> sqlite3.Connection:
        """Detach staging, make the database read-only and bound what one statement may build."""
        self.connection.execute(f"DETACH DATABASE {_STAGING}")
        self.connection.execute("PRAGMA query_only = ON")
        limit_connection(
            self.connection,
            max_value_bytes=self.limits.max_result_bytes,
            max_sql_bytes=8 * self.limits.max_sql_chars,
        )
        return self.connection

    # --- one table ---

    def load(self, source: TableSource, table_policy: TablePolicy | None) -> tuple[str, ...]:
        """Stream ``source`` into its final table under ``table_policy`` (None: every column and row).

        Returns every column the source has (hidden ones included), for the policy's schema check.
        """
        table = source.table
        known = source.start()
        if table_policy is not None:
            if known is not None:
                _check_columns(table, table_policy, known)
            visible: tuple[str, ...] | None = table_policy.columns
            hidden_needed = sorted(table_policy.where_columns() - set(table_policy.columns))
            wanted: tuple[str, ...] | None = table_policy.columns + tuple(hidden_needed)
            where = table_policy.where_sql()
        else:
            visible, wanted, where = known, None, None
        self._raw_tables += 1
        raw = f"__raw_{self._raw_tables}"
        staged: tuple[str, ...] = ()
        raw_columns: tuple[str, ...] = ()
        for batch in source.batches(wanted, self.limits.batch_rows):
            self._count_rows(source.item, len(batch.rows))
            staged = self._grow(_STAGING, _STAGED_ROWS, staged, batch.columns)
            raw_columns = self._grow(
                "main", raw, raw_columns, visible if visible is not None else batch.columns
            )
            self._stage(batch.columns, batch.rows, raw, raw_columns, where)
        all_columns = source.columns()
        if table_policy is not None and known is None:
            _check_columns(table, table_policy, all_columns)
        if staged:
            self.connection.execute(f"DROP TABLE {_STAGING}.{_STAGED_ROWS}")
        final_columns = visible if visible is not None else all_columns
        if final_columns:  # a JSON-lines item without a single key has no table to offer
            raw_columns = self._grow("main", raw, raw_columns, final_columns)
            self._finalize(raw, table, raw_columns, source.item)
        return all_columns

    def _count_rows(self, item: RoomItem, rows: int) -> None:
        self._item_rows[item.info.id] += rows
        if self._item_rows[item.info.id] > self.limits.max_item_rows:
            raise DataLimitExceeded(
                "item_rows", f"item {item.info.id} has more than {self.limits.max_item_rows} rows"
            )

    def _grow(
        self, schema: str, table: str, current: tuple[str, ...], wanted: Sequence[str]
    ) -> tuple[str, ...]:
        """Create ``schema.table`` with ``wanted`` columns (untyped), or add the ones it lacks."""
        target = f"{schema}.{quote_identifier(table)}"
        if not current:
            self.connection.execute(f"CREATE TABLE {target} ({_columns_sql(wanted)})")
            return tuple(wanted)
        added = tuple(column for column in wanted if column not in current)
        for column in added:
            self.connection.execute(f"ALTER TABLE {target} ADD COLUMN {quote_identifier(column)}")
        return current + added

    def _stage(
        self,
        columns: Sequence[str],
        rows: Sequence[tuple[object, ...]],
        raw: str,
        raw_columns: Sequence[str],
        where: str | None,
    ) -> None:
        staging = f"{_STAGING}.{_STAGED_ROWS}"
        placeholders = ", ".join("?" * len(columns))
        transfer = (
            f"INSERT INTO main.{quote_identifier(raw)} ({_columns_sql(raw_columns)}) "  # noqa: S608
            f"SELECT {_columns_sql(raw_columns)} FROM {staging}"
            + (f" WHERE {where}" if where is not None else "")
        )
        # On any error the transaction is left open: the caller discards the whole connection.
        run = self.connection.execute
        run("BEGIN")
        self.connection.executemany(
            f"INSERT INTO {staging} ({_columns_sql(columns)}) VALUES ({placeholders})",  # noqa: S608
            rows,
        )
        run(transfer)
        run(f"DELETE FROM {staging}")  # noqa: S608
        run("COMMIT")
        self._check_size()

    def _check_size(self) -> None:
        pages = int(self.connection.execute("PRAGMA main.page_count").fetchone()[0])
        if pages * self._page_size > self._max_bytes:
            raise DataLimitExceeded(
                "database_bytes",
                f"the scoped database grew past {self._max_bytes} bytes; narrow the policy "
                "(fewer columns, a row filter) or raise the limit",
            )

    def _finalize(self, raw: str, table: str, columns: Sequence[str], item: RoomItem) -> None:
        """Decide column types, move the rows into the typed table in batches, drop the untyped copy."""
        run = self.connection.execute
        raw_table = f"main.{quote_identifier(raw)}"
        bits = ", ".join(f"SUM(DISTINCT {_TYPE_BITS.format(column=quote_identifier(c))})" for c in columns)
        found = run(f"SELECT {bits} FROM {raw_table}").fetchone()  # noqa: S608
        types = [column_type(int(value or 0)) for value in found]
        declared = ", ".join(f"{quote_identifier(c)} {kind}" for c, kind in zip(columns, types, strict=True))
        final = f"main.{quote_identifier(table)}"
        run(f"CREATE TABLE {final} ({declared})")
        casts = ", ".join(
            f"CAST({quote_identifier(c)} AS {kind})" for c, kind in zip(columns, types, strict=True)
        )
        last = run(f"SELECT max(rowid) FROM {raw_table}").fetchone()[0] or 0  # noqa: S608
        step = self.limits.batch_rows
        for low in range(1, last + 1, step):
            high = low + step - 1
            run("BEGIN")
            run(
                f"INSERT INTO {final} ({_columns_sql(columns)}) SELECT {casts} FROM {raw_table} "  # noqa: S608
                "WHERE rowid BETWEEN ? AND ? ORDER BY rowid",
                (low, high),
            )
            run(f"DELETE FROM {raw_table} WHERE rowid BETWEEN ? AND ?", (low, high))  # noqa: S608
            run("COMMIT")
        run(f"DROP TABLE {raw_table}")
        self._check_size()
        count = int(run(f"SELECT count(*) FROM {final}").fetchone()[0])  # noqa: S608
        self.tables.append(
            LoadedTable(
                name=table,
                columns=tuple(zip(columns, types, strict=True)),
                row_count=count,
                item_id=item.info.id,
            )
        )


def _check_columns(table: str, table_policy: TablePolicy, columns: Sequence[str]) -> None:
    """The policy's listed and filter columns exist in the data (InvalidPolicy otherwise)."""
    check_against_schema(ScopePolicy(tables={table: table_policy}), {table: columns})


def _direct_source(
    item: RoomItem, kind: ItemKind, table: str, limits: ScopedLimits, budget: ByteBudget
) -> TableSource:
    if kind is ItemKind.JSONL:
        return JsonLinesSource(item, table, limits=limits, budget=budget)
    delimiter = "\t" if kind is ItemKind.TSV else ","
    return CsvSource(item, table, delimiter=delimiter, limits=limits, budget=budget)


@contextlib.contextmanager
def _loading(limits: ScopedLimits, *, in_file: bool = False) -> Iterator[_Loader]:
    loader = _Loader(limits, in_file=in_file)
    try:
        yield loader
    except sqlite3.OperationalError as exc:
        loader.abort()
        if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
            raise DataLimitExceeded(
                "workspace_full", "the run's workspace is full; it cannot hold the data's database"
            ) from None
        raise
    except BaseException:
        loader.abort()
        raise


def build_scoped_database(
    items: Sequence[RoomItem], policy: ScopePolicy, limits: ScopedLimits | None = None
) -> ScopedDatabase:
    """The query stage's database: only the policy's tables, columns and rows (DESIGN §16.6).

    Raises :class:`~hivemind.errors.InvalidPolicy` when the policy names a table or column the data
    lacks, :class:`~hivemind_runner.scoped.errors.DataLoadError` (or its ``DataLimitExceeded``) when
    the data cannot be loaded; nothing is returned half-built.
    """
    limits = limits or ScopedLimits()
    policy = parse_policy(policy)
    documents = DocumentShelf(items, policy=policy.items, max_document_bytes=limits.max_document_bytes)
    plan = _plan(items)
    with _loading(limits) as loader:
        discovered: dict[str, tuple[str, ...]] = {}
        for table, (item, kind) in plan.direct.items():
            table_policy = policy.tables.get(table)
            if table_policy is not None:
                with _direct_source(item, kind, table, limits, loader.budget) as source:
                    discovered[table] = loader.load(source, table_policy)
        for item, prefix in plan.sqlite:
            if not any(table.startswith(prefix + "_") for table in policy.tables):
                continue  # no table of this file is in scope: it is never opened
            with SqliteFile(item, limits=limits, budget=loader.budget) as file:
                for raw_table in file.tables():
                    table = table_name(f"{prefix}_{raw_table}", item_id=item.info.id)
                    plan.claim(table, item)
                    if table in policy.tables:
                        with file.source(raw_table, table) as source:
                            discovered[table] = loader.load(source, policy.tables[table])
        for table in policy.tables:
            if table not in discovered and table in plan.unsupported:
                raise DataLoadError(
                    "unsupported_format",
                    f"table {table!r} comes from Parquet item {plan.unsupported[table]}; Parquet is not "
                    "supported (pyarrow is not installed); upload CSV, JSON lines or SQLite",
                )
        check_against_schema(policy, discovered)
        order = list(policy.tables)
        return ScopedDatabase(
            loader.finish(),
            role=Stage.QUERY,
            tables=sorted(loader.tables, key=lambda loaded: order.index(loaded.name)),
            view=public_view(policy),
            documents=documents,
            limits=limits,
        )


def full_read_database(items: Sequence[RoomItem], limits: ScopedLimits | None = None) -> ScopedDatabase:
    """The scope stage's database: every table of every tabular item, every column and row.

    Read-only and behind the same gate as the query stage's, minus the aggregation rules. Parquet
    items are skipped (not supported); they stay readable raw through the items tool. With a
    ``limits.workspace`` it is kept in a file there (bounded by ``max_file_database_bytes`` and the
    workspace's size, not by the runner's memory), deleted when it closes.
    """
    limits = limits or ScopedLimits()
    documents = DocumentShelf(items, policy=None, max_document_bytes=limits.max_document_bytes)
    plan = _plan(items)
    with _loading(limits, in_file=True) as loader:
        for table, (item, kind) in plan.direct.items():
            with _direct_source(item, kind, table, limits, loader.budget) as source:
                loader.load(source, None)
        for item, prefix in plan.sqlite:
            with SqliteFile(item, limits=limits, budget=loader.budget) as file:
                for raw_table in file.tables():
                    table = table_name(f"{prefix}_{raw_table}", item_id=item.info.id)
                    plan.claim(table, item)
                    with file.source(raw_table, table) as source:
                        loader.load(source, None)
        return ScopedDatabase(
            loader.finish(),
            role=Stage.SCOPE,
            tables=loader.tables,
            view=None,
            documents=documents,
            limits=limits,
            file=loader.file,
        )
