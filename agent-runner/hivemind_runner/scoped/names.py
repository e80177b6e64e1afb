"""How item names, CSV headers, JSON keys and SQLite names become table and column names.

One rule for all of them, so a ScopePolicy (whose names are ``[a-z0-9_]+``, hivemind.policy) can name
anything the loader produces:

1. Unicode NFKD, then combining marks dropped (``Größe`` -> ``Große``, ``café`` -> ``cafe``);
2. lowercase; every character outside ``[a-z0-9]`` becomes ``_``; runs of ``_`` collapse to one;
   leading and trailing ``_`` are dropped;
3. cut to 64 characters (trailing ``_`` dropped again);
4. a name that does not start with a letter, or starts with ``sqlite`` (SQLite reserves
   ``sqlite_*`` table names), gets the prefix ``t_`` (cut again to 64);
5. a name with no letter or digit at all is an error.

Two different source names that normalize to the same name in one table (``Name`` and ``name``,
``e-mail`` and ``e mail``) are an error, as are two sources that produce the same table name.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from hivemind.policy import MAX_NAME_LENGTH
from hivemind_runner.scoped.errors import DataLoadError

_OTHER = re.compile(r"[^a-z0-9]+")


def normalize_name(raw: str) -> str | None:
    """The normalized form of ``raw``, or ``None`` when it has no letter or digit to keep."""
    decomposed = unicodedata.normalize("NFKD", raw)
    folded = "".join(char for char in decomposed if not unicodedata.combining(char)).lower()
    name = _OTHER.sub("_", folded).strip("_")[:MAX_NAME_LENGTH].rstrip("_")
    if not name:
        return None
    if not name[0].isalpha() or name.startswith("sqlite"):
        name = ("t_" + name)[:MAX_NAME_LENGTH].rstrip("_")
    return name


def table_name(raw: str, *, item_id: str) -> str:
    name = normalize_name(raw)
    if name is None:
        raise DataLoadError(
            "bad_name", f"item {item_id}: table name {raw!r} has no letter or digit; set `table` metadata"
        )
    return name


def column_names(raw_names: Iterable[str], *, where: str) -> tuple[str, ...]:
    """Normalize a table's column names in order; an unusable name or a collision is an error.

    ``where`` says which table they belong to, for the message (e.g. ``"item csv_1 (table people)"``).
    """
    names: list[str] = []
    first_source: dict[str, int] = {}
    for position, raw in enumerate(raw_names, start=1):
        name = normalize_name(raw)
        if name is None:
            raise DataLoadError("bad_name", f"{where}: column {position} has no letter or digit in its name")
        if name in first_source:
            raise DataLoadError(
                "column_collision",
                f"{where}: columns {first_source[name]} and {position} both normalize to {name!r}",
            )
        first_source[name] = position
        names.append(name)
    return tuple(names)


class ColumnNamer:
    """Normalizes column names met one at a time (JSON lines): same rules, collisions across lines."""

    def __init__(self, where: str, max_columns: int):
        self._where = where
        self._max_columns = max_columns
        self._by_raw: dict[str, str] = {}
        self._raw_by_name: dict[str, str] = {}

    def name(self, raw: str) -> str:
        known = self._by_raw.get(raw)
        if known is not None:
            return known
        name = normalize_name(raw)
        if name is None:
            raise DataLoadError("bad_name", f"{self._where}: a key has no letter or digit in its name")
        if name in self._raw_by_name:
            raise DataLoadError(
                "column_collision", f"{self._where}: two different keys both normalize to {name!r}"
            )
        if len(self._raw_by_name) >= self._max_columns:
            raise DataLoadError("too_many_columns", f"{self._where}: more than {self._max_columns} keys")
        self._by_raw[raw] = name
        self._raw_by_name[name] = raw
        return name

    @property
    def names(self) -> tuple[str, ...]:
        """Every normalized name met so far, in order of first appearance."""
        return tuple(self._raw_by_name)
