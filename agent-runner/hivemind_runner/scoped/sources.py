"""Streaming readers that turn tabular items into batches of typed rows.

Nothing here reads a whole item into memory: CSV and JSON lines are read one bounded line at a time
through a byte counter, and SQLite items are copied in chunks to a workspace file that SQLite reads
from. Each reader yields only the columns it is asked for, so a hidden column that no row filter
needs is never even converted.

Values are typed as they are read (:func:`csv_value`, :func:`json_value`), so a row filter such as
``age >= 18`` compares numbers with numbers while rows are staged.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import sqlite3
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from hivemind_runner.scoped.errors import DataLimitExceeded, DataLoadError
from hivemind_runner.scoped.items import RoomItem
from hivemind_runner.scoped.limits import MiB, ScopedLimits
from hivemind_runner.scoped.names import ColumnNamer, column_names

Value = int | float | str | bytes | None

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
SQLITE_MAGIC = b"SQLite format 3\x00"

_NUMBER_START = frozenset("-0123456789")
_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")
_REAL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def csv_value(cell: str) -> Value:
    """A CSV cell as a value: empty is NULL; a canonical integer that fits 64 bits is INTEGER; a
    decimal number is REAL; anything else (``007``, ``1,5``, `` 3``, ``NaN``) stays text."""
    if not cell:
        return None
    if cell[0] not in _NUMBER_START:
        return cell  # both patterns start with a sign or a digit: most text is settled here, cheaply
    if _INTEGER.fullmatch(cell):
        number = int(cell)
        return number if INT64_MIN <= number <= INT64_MAX else cell
    if _REAL.fullmatch(cell):
        real = float(cell)
        return real if math.isfinite(real) else cell
    return cell


def json_value(value: Any) -> Value:
    """A JSON value as a column value: booleans are 1/0, integers outside 64 bits and nested arrays
    or objects become text (compact JSON); ``null`` is NULL."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value if INT64_MIN <= value <= INT64_MAX else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("number out of range")
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class ByteBudget:
    """Plaintext bytes all items may still yield together."""

    def __init__(self, total: int):
        self.total = total
        self.remaining = total


class _CountingReader(io.RawIOBase):
    """A raw reader over an item stream that enforces the per-item and total byte limits."""

    def __init__(self, stream: BinaryIO, *, item_id: str, item_cap: int, budget: ByteBudget):
        super().__init__()
        self._stream = stream
        self._item_id = item_id
        self._item_cap = item_cap
        self._budget = budget
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        readinto = getattr(self._stream, "readinto", None)
        if readinto is not None:
            count = readinto(view) or 0
        else:
            data = self._stream.read(len(view))
            count = len(data)
            view[:count] = data
        self.count += count
        self._budget.remaining -= count
        if self.count > self._item_cap:
            raise DataLimitExceeded(
                "item_bytes", f"item {self._item_id} is larger than the {self._item_cap}-byte item limit"
            )
        if self._budget.remaining < 0:
            raise DataLimitExceeded(
                "total_bytes", f"the room's tabular items exceed the {self._budget.total}-byte load limit"
            )
        return count


def _counted(stream: BinaryIO, item: RoomItem, limits: ScopedLimits, budget: ByteBudget) -> io.BufferedReader:
    raw = _CountingReader(stream, item_id=item.info.id, item_cap=limits.max_item_bytes, budget=budget)
    return io.BufferedReader(raw, buffer_size=256 * 1024)


def _lines(reader: io.BufferedReader, *, where: str, max_line_bytes: int) -> Iterator[str]:
    """Decoded lines (ending ``\\n`` or ``\\r\\n`` kept), each at most ``max_line_bytes`` long."""
    number = 0
    while True:
        line = reader.readline(max_line_bytes + 1)
        if not line:
            return
        number += 1
        if len(line) > max_line_bytes:
            raise DataLimitExceeded(
                "line_too_long", f"{where}: line {number} is longer than {max_line_bytes} bytes"
            )
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            raise DataLoadError("bad_encoding", f"{where}: line {number} is not valid UTF-8") from None


@dataclass(frozen=True)
class Batch:
    """Rows read from a source; every row has one value per column, in ``columns`` order."""

    columns: tuple[str, ...]
    rows: list[tuple[Value, ...]]


class TableSource(ABC):
    """One table inside one item. ``start()`` before ``batches()``; always ``close()``."""

    def __init__(self, item: RoomItem, table: str):
        self.item = item
        self.table = table
        self.where = f"item {item.info.id} (table {table})"
        self._exit = contextlib.ExitStack()

    @abstractmethod
    def start(self) -> tuple[str, ...] | None:
        """Open the source; return its columns when the format declares them up front (CSV header,
        SQLite schema), ``None`` when only reading every row tells (JSON lines)."""

    @abstractmethod
    def batches(self, wanted: tuple[str, ...] | None, batch_rows: int) -> Iterator[Batch]:
        """Rows with the ``wanted`` columns (``None``: every column, which for JSON lines may grow
        from one batch to the next). A wanted column the source lacks reads as NULL."""

    @abstractmethod
    def columns(self) -> tuple[str, ...]:
        """Every column of the source; complete once ``batches()`` is exhausted."""

    def close(self) -> None:
        self._exit.close()

    def __enter__(self) -> TableSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class CsvSource(TableSource):
    """CSV (RFC 4180, comma) or TSV with a header line; UTF-8 with or without BOM."""

    def __init__(
        self, item: RoomItem, table: str, *, delimiter: str, limits: ScopedLimits, budget: ByteBudget
    ):
        super().__init__(item, table)
        self._delimiter = delimiter
        self._limits = limits
        self._budget = budget
        self._columns: tuple[str, ...] = ()
        self._reader: Any = None

    def start(self) -> tuple[str, ...]:
        stream = self._exit.enter_context(self.item.open())
        lines = _lines(
            _counted(stream, self.item, self._limits, self._budget),
            where=self.where,
            max_line_bytes=self._limits.max_line_bytes,
        )
        self._reader = csv.reader(lines, delimiter=self._delimiter, strict=True)
        header = self._record()
        while header == []:
            header = self._record()
        if header is None:
            raise DataLoadError("bad_csv", f"{self.where}: empty file, a header line is required")
        if len(header) > self._limits.max_columns:
            raise DataLoadError(
                "too_many_columns", f"{self.where}: more than {self._limits.max_columns} columns"
            )
        self._columns = column_names(header, where=self.where)
        return self._columns

    def _record(self) -> list[str] | None:
        try:
            return next(self._reader, None)
        except csv.Error as exc:
            raise DataLoadError("bad_csv", f"{self.where}: line {self._reader.line_num}: {exc}") from None

    def batches(self, wanted: tuple[str, ...] | None, batch_rows: int) -> Iterator[Batch]:
        columns = self._columns if wanted is None else wanted
        positions = [self._columns.index(column) if column in self._columns else None for column in columns]
        width = len(self._columns)
        rows: list[tuple[Value, ...]] = []
        while (record := self._record()) is not None:
            if not record:
                continue  # a blank line
            if len(record) != width:
                raise DataLoadError(
                    "bad_csv",
                    f"{self.where}: line {self._reader.line_num} has {len(record)} fields, "
                    f"the header has {width}",
                )
            rows.append(tuple(None if pos is None else csv_value(record[pos]) for pos in positions))
            if len(rows) >= batch_rows:
                yield Batch(columns, rows)
                rows = []
        if rows:
            yield Batch(columns, rows)

    def columns(self) -> tuple[str, ...]:
        return self._columns


class JsonLinesSource(TableSource):
    """One JSON object per line; keys are columns (their union over all lines), blank lines skipped."""

    def __init__(self, item: RoomItem, table: str, *, limits: ScopedLimits, budget: ByteBudget):
        super().__init__(item, table)
        self._limits = limits
        self._budget = budget
        self._namer = ColumnNamer(self.where, limits.max_columns)
        self._lines: Iterator[str] = iter(())

    def start(self) -> None:
        stream = self._exit.enter_context(self.item.open())
        self._lines = _lines(
            _counted(stream, self.item, self._limits, self._budget),
            where=self.where,
            max_line_bytes=self._limits.max_line_bytes,
        )

    def _objects(self) -> Iterator[dict[str, Any]]:
        for number, line in enumerate(self._lines, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line, parse_constant=_refuse_constant)
            except (ValueError, RecursionError):
                raise DataLoadError("bad_json", f"{self.where}: line {number} is not valid JSON") from None
            if not isinstance(value, dict):
                raise DataLoadError("bad_json", f"{self.where}: line {number} is not a JSON object")
            yield value

    def batches(self, wanted: tuple[str, ...] | None, batch_rows: int) -> Iterator[Batch]:
        wanted_set = frozenset(wanted or ())
        pending: list[dict[str, Value]] = []
        for number, record in enumerate(self._objects(), start=1):
            row: dict[str, Value] = {}
            for key, value in record.items():
                name = self._namer.name(key)
                if wanted is None or name in wanted_set:
                    try:
                        row[name] = json_value(value)
                    except ValueError:
                        raise DataLoadError(
                            "bad_json", f"{self.where}: object {number}: a number is out of range"
                        ) from None
            pending.append(row)
            if len(pending) >= batch_rows:
                yield self._batch(wanted, pending)
                pending = []
        if pending:
            yield self._batch(wanted, pending)

    def _batch(self, wanted: tuple[str, ...] | None, pending: list[dict[str, Value]]) -> Batch:
        columns = self._namer.names if wanted is None else wanted
        return Batch(columns, [tuple(row.get(column) for column in columns) for row in pending])

    def columns(self) -> tuple[str, ...]:
        return self._namer.names


def quote_identifier(name: str) -> str:
    """A SQLite identifier in double quotes, embedded quotes doubled."""
    return '"' + name.replace('"', '""') + '"'


class SqliteFile:
    """A SQLite item copied to the workspace and opened read-only; deleted on close.

    The file is the room owner's, but it is still treated as untrusted input: it is opened with
    ``mode=ro&immutable=1`` (no journal, no locks, no writes), ``trusted_schema=OFF``,
    ``cell_size_check=ON`` and no memory mapping; only real tables are read (no views, virtual or
    shadow tables), and only with SELECTs the runner writes.
    """

    def __init__(self, item: RoomItem, *, limits: ScopedLimits, budget: ByteBudget):
        self.item = item
        self._limits = limits
        self._budget = budget
        self._exit = contextlib.ExitStack()
        self.connection: sqlite3.Connection | None = None

    def __enter__(self) -> SqliteFile:
        try:
            self._open()
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._exit.close()

    def _open(self) -> None:
        workspace = self._limits.workspace or Path(tempfile.gettempdir())
        descriptor, name = tempfile.mkstemp(prefix="hivemind-item-", suffix=".sqlite", dir=workspace)
        path = Path(name)
        self._exit.callback(path.unlink, missing_ok=True)
        with os.fdopen(descriptor, "wb") as copy, self.item.open() as stream:
            reader = _counted(stream, self.item, self._limits, self._budget)
            while chunk := reader.read(MiB):
                copy.write(chunk)
        with path.open("rb") as check:
            if check.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                raise DataLoadError("bad_sqlite", f"item {self.item.info.id} is not a SQLite database")
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True)
        self._exit.callback(connection.close)
        try:
            # SQLite's advice for files of unknown origin ("defense against the dark arts").
            for pragma in (
                "trusted_schema = OFF",
                "query_only = ON",
                "cell_size_check = ON",
                "mmap_size = 0",
            ):
                connection.execute(f"PRAGMA {pragma}")
        except sqlite3.Error as exc:
            raise self.error(exc) from None
        self.connection = connection

    def error(self, exc: sqlite3.Error) -> DataLoadError:
        return DataLoadError(
            "bad_sqlite", f"item {self.item.info.id}: SQLite cannot read it ({type(exc).__name__}: {exc})"
        )

    def tables(self) -> list[str]:
        """Names of the real tables inside, as SQLite spells them."""
        assert self.connection is not None
        try:
            found = self.connection.execute(
                "SELECT name FROM pragma_table_list WHERE schema = 'main' AND type = 'table' "
                "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
            ).fetchall()
        except sqlite3.Error as exc:
            raise self.error(exc) from None
        return [name for (name,) in found]

    def source(self, raw_table: str, table: str) -> SqliteTableSource:
        """The source for one of :meth:`tables`, loaded as ``table``."""
        return SqliteTableSource(self, raw_table, table, limits=self._limits)


class SqliteTableSource(TableSource):
    """One table of a :class:`SqliteFile`; values keep the storage class SQLite gives them."""

    def __init__(self, file: SqliteFile, raw_table: str, table: str, *, limits: ScopedLimits):
        super().__init__(file.item, table)
        self._file = file
        self._raw_table = raw_table
        self._limits = limits
        self._raw_columns: tuple[str, ...] = ()
        self._columns: tuple[str, ...] = ()

    def start(self) -> tuple[str, ...]:
        assert self._file.connection is not None
        try:
            found = self._file.connection.execute(
                "SELECT name FROM pragma_table_info(?) ORDER BY cid", (self._raw_table,)
            ).fetchall()
        except sqlite3.Error as exc:
            raise self._file.error(exc) from None
        if len(found) > self._limits.max_columns:
            raise DataLoadError(
                "too_many_columns", f"{self.where}: more than {self._limits.max_columns} columns"
            )
        self._raw_columns = tuple(name for (name,) in found)
        self._columns = column_names(self._raw_columns, where=self.where)
        return self._columns

    def batches(self, wanted: tuple[str, ...] | None, batch_rows: int) -> Iterator[Batch]:
        assert self._file.connection is not None
        columns = self._columns if wanted is None else wanted
        by_name = dict(zip(self._columns, self._raw_columns, strict=True))
        selected = ", ".join(
            quote_identifier(by_name[column]) if column in by_name else "NULL" for column in columns
        )
        statement = f"SELECT {selected} FROM main.{quote_identifier(self._raw_table)}"  # noqa: S608
        try:
            cursor = self._file.connection.execute(statement)
            while rows := cursor.fetchmany(batch_rows):
                yield Batch(columns, rows)
        except sqlite3.Error as exc:
            raise self._file.error(exc) from None

    def columns(self) -> tuple[str, ...]:
        return self._columns
