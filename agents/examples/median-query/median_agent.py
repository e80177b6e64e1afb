"""A participant's own query agent: an approximate median through aggregate-only SQL.

Rooms that release aggregates only do not offer MEDIAN, and a median is one row's value anyway. This
agent estimates it from a histogram the room does allow. The runner's SQL gate groups by plain
columns only (``GROUP BY salary / 10000`` is refused as ``group_by_expression``), so each band is
its own count with a range filter::

    SELECT COUNT(*) AS n FROM "people" WHERE "salary" >= 80000 AND "salary" < 90000

The runner answers such a count only when it reaches the room's minimum group size, so a band
holding fewer rows is withheld, exactly as a grouped histogram would be. The agent walks outwards
from the band holding the mean and stops on each side once fewer than the minimum rows lie beyond
(``"salary" >= 150000``, again a count the runner withholds). From the overall count and the
reported bands it finds the band holding the middle row, and says honestly how uncertain that is
when small bands were withheld. The intermediate counts stay inside the agent; only bands the room
reported leave.

It needs COUNT; it uses AVG (or SUM) to pick a band width and a starting band, and falls back to
bands of 1000 from 0 without them. A refused query is answered with the bridge's reason.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from hivemind_agent import BudgetExhausted, Context, Denied, Schema, SqlResult

NUMERIC_TYPE_MARKS = ("INT", "REAL", "FLOA", "DOUB", "NUM", "DEC")
TARGET_BANDS = 8
FALLBACK_WIDTH = 1000
# Bands queried at most (two counts each): bounds the work when the width is far too small.
MAX_BANDS = 100


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


def count_where(ctx: Context, table: str, condition: str) -> int | None:
    """``COUNT(*)`` of the rows matching ``condition``; None when the room withholds it (too few rows)."""
    result = ctx.sql(f"SELECT COUNT(*) AS n FROM {table} WHERE {condition}")  # noqa: S608
    return int(result.rows[0][0]) if result.rows else None


def histogram(ctx: Context, table: str, column: str, functions: tuple[str, ...]) -> Histogram | None:
    t, c = _quote(table), _quote(column)
    if "AVG" in functions:
        overall: SqlResult = ctx.sql(f"SELECT COUNT({c}) AS n, AVG({c}) AS mean FROM {t}")  # noqa: S608
    elif "SUM" in functions:
        overall = ctx.sql(f"SELECT COUNT({c}) AS n, SUM({c}) * 1.0 / COUNT({c}) AS mean FROM {t}")  # noqa: S608
    else:
        overall = ctx.sql(f"SELECT COUNT({c}) AS n FROM {t}")  # noqa: S608
    if not overall.rows:
        return None  # fewer values than the room's minimum group: nothing may be said
    total = int(overall.rows[0][0] or 0)
    mean = overall.rows[0][1] if len(overall.rows[0]) > 1 else None
    width, anchor = FALLBACK_WIDTH, 0
    if isinstance(mean, int | float) and not isinstance(mean, bool) and math.isfinite(mean):
        width = nice_width(abs(float(mean)))
        anchor = math.floor(mean / width) * width

    def band(start: int) -> int | None:
        return count_where(ctx, t, f"{c} >= {start} AND {c} < {start + width}")

    bands: dict[int, int] = {}
    queried = 0
    # Upwards from the mean's band, while the room reports enough rows above the band just counted.
    start = anchor
    while queried < MAX_BANDS:
        queried += 1
        if rows := band(start):
            bands[start] = rows
        start += width
        if not count_where(ctx, t, f"{c} >= {start}"):
            break
    # Downwards, while the room reports enough rows below the lowest band counted.
    start = anchor
    while queried < MAX_BANDS and count_where(ctx, t, f"{c} < {start}"):
        queried += 1
        start -= width
        if rows := band(start):
            bands[start] = rows
    return Histogram(total=total, bands=tuple(sorted(bands.items())), width=width)


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
    try:
        h = histogram(ctx, table, column, functions)
    except BudgetExhausted:
        raise  # the run is out of budget: the stage fails rather than answer half
    except Denied as refused:
        return f"The room refused a query this agent needs ({refused.message})."
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
