"""A participant's own query agent: an approximate median through aggregate-only SQL.

Rooms that release aggregates only do not offer MEDIAN, and a median is one row's value anyway. This
agent estimates it from a histogram the room does allow: it counts rows per band of the column
(``("salary" / 10000) * 10000 AS band``, ``COUNT(*)``), which the runner cuts to bands holding at
least the room's minimum group size. From the overall count and the reported bands it finds the band
holding the middle row, and says honestly how uncertain that is when small bands were withheld.

It needs COUNT; it uses AVG (or SUM) to pick a band width and falls back to 1000 without them. The
banding assumes an INTEGER column (integer division).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from hivemind_agent import Context, Schema, SqlResult

NUMERIC_TYPE_MARKS = ("INT", "REAL", "FLOA", "DOUB", "NUM", "DEC")
TARGET_BANDS = 8
FALLBACK_WIDTH = 1000


@dataclass(frozen=True, slots=True)
class Histogram:
    total: int
    bands: tuple[tuple[int, int], ...]  # (band start, rows), ascending
    width: int

    @property
    def withheld(self) -> int:
        return self.total - sum(rows for _, rows in self.bands)


def _fold(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower()).removesuffix("s")


def pick_column(question: str, schema: Schema) -> tuple[str, str] | None:
    """(table, column) the question asks the median of, else the first numeric column."""
    asked = re.search(r"median (?:of )?(?:the )?(?P<col>[\w ]+)", question.lower())
    numeric = [
        (table.name, column.name)
        for table in schema.tables
        for column in table.columns
        if any(mark in column.type.upper() for mark in NUMERIC_TYPE_MARKS)
    ]
    if asked:
        wanted = _fold(asked.group("col").split(" by ")[0])
        for table, column in numeric:
            if _fold(column) == wanted:
                return table, column
    return numeric[0] if numeric else None


def nice_width(mean: float) -> int:
    """A round band width (1, 2 or 5 times a power of ten) near mean / TARGET_BANDS."""
    raw = max(mean / TARGET_BANDS, 1.0)
    power = 10 ** math.floor(math.log10(raw))
    return int(min((step * power for step in (1, 2, 5, 10)), key=lambda width: abs(width - raw)))


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def histogram(ctx: Context, table: str, column: str, functions: tuple[str, ...]) -> Histogram | None:
    t, c = _quote(table), _quote(column)
    width = FALLBACK_WIDTH
    if "AVG" in functions:
        overall: SqlResult = ctx.sql(f"SELECT COUNT(*) AS n, AVG({c}) AS mean FROM {t}")  # noqa: S608
    elif "SUM" in functions:
        overall = ctx.sql(f"SELECT COUNT(*) AS n, SUM({c}) * 1.0 / COUNT(*) AS mean FROM {t}")  # noqa: S608
    else:
        overall = ctx.sql(f"SELECT COUNT(*) AS n FROM {t}")  # noqa: S608
    if not overall.rows:
        return None  # fewer rows than the room's minimum group: nothing may be said
    total = int(overall.rows[0][0] or 0)
    if len(overall.rows[0]) > 1 and isinstance(overall.rows[0][1], int | float):
        width = nice_width(float(overall.rows[0][1]))
    bands = ctx.sql(
        f"SELECT ({c} / {width}) * {width} AS band, COUNT(*) AS n FROM {t} GROUP BY band ORDER BY band"  # noqa: S608
    )
    return Histogram(total=total, bands=tuple((int(b), int(n)) for b, n in bands.rows), width=width)


def median_band_range(h: Histogram) -> tuple[int | None, int | None]:
    """The lowest and highest reported band that can hold the median (None: an unreported band).

    The withheld rows' bands are unknown: all of them below the reported bands moves the middle row
    down the reported list, all of them above moves it up.
    """
    # The middle rows: one for an odd total, the two around the middle for an even one.
    lower_rank, upper_rank = (h.total + 1) // 2, h.total // 2 + 1

    def band_at(rank: int) -> int | None:
        seen = 0
        for start, rows in h.bands:
            seen += rows
            if rank > 0 and seen >= rank:
                return start
        return None

    return band_at(lower_rank - h.withheld), band_at(upper_rank)


def describe_range(low: int | None, high: int | None, width: int) -> str:
    if low is not None and low == high:
        return f"in the band {low:,}-{low + width:,}"
    if low is None and high is None:
        return "in a band too small to report"
    if low is None:
        return f"at most {high + width:,}"  # type: ignore[operator]
    if high is None:
        return f"at least {low:,}"
    return f"between {low:,} and {high + width:,}"


def answer(ctx: Context) -> str:
    schema = ctx.input.schema or ctx.schema()
    functions = tuple(schema.aggregate.functions) if schema.aggregate else ("COUNT", "SUM", "AVG")
    if "COUNT" not in functions:
        return "This room does not allow COUNT, which an approximate median needs."
    picked = pick_column(ctx.prompt or "", schema)
    if picked is None:
        return "This room shows no numeric column to take a median of."
    table, column = picked
    h = histogram(ctx, table, column, functions)
    if h is None or not h.bands:
        return f"The room reports too few rows of {table} to estimate a median of {column}."
    low, high = median_band_range(h)
    where = describe_range(low, high, h.width)
    lines = [f"The median {column} is {where} (from {h.total} rows, in bands of {h.width:,})."]
    if h.withheld:
        lines.append(f"{h.withheld} rows fall in bands too small for the room to report, hence the range.")
    lines += ["", f"| {column} band | count |", "|---|---|"]
    lines += [f"| {start:,}-{start + h.width:,} | {rows} |" for start, rows in h.bands]
    return "\n".join(lines)
