"""Example query agent for a two-party negotiation: the first slot both parties have free.

Party A (the room owner) put their free slots in the room as a table ``availability(slot)``; party B
(the participant) lists theirs in the prompt. The agent asks one aggregate question of A's data:
which of B's slots are also in A's table, first one only::

    SELECT "slot", COUNT(*) AS n FROM "availability" WHERE "slot" IN (<B's slots>)
    GROUP BY "slot" ORDER BY "slot" LIMIT 1

It never reads A's calendar as a list, and the room's policy caps every result at one row. B may
propose at most ten slots per request, so one request cannot sweep A's whole week.
"""

from __future__ import annotations

import re

from hivemind_agent import Context

SLOT = re.compile(r"\b(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2})\b")
MAX_PROPOSED = 10
SLOT_COLUMN = "slot"
# Replies without digits: they cannot carry a time from A's calendar (the slot mediator checks that).
ASK_FOR_SLOTS = "Send your free slots as YYYY-MM-DD HH:MM, separated by commas."
TOO_MANY = "Propose fewer slots per request (at most ten)."
NO_COMMON = "No common slot."
NO_TABLE = "This room holds no availability table with a slot column."


def proposed_slots(prompt: str) -> list[str]:
    """B's slots from the prompt, normalized to ``YYYY-MM-DD HH:MM``, unique, in time order."""
    return sorted({f"{day} {time}" for day, time in SLOT.findall(prompt)})


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def answer(ctx: Context) -> str:
    slots = proposed_slots(ctx.prompt or "")
    if not slots:
        return ASK_FOR_SLOTS
    if len(slots) > MAX_PROPOSED:
        return TOO_MANY
    schema = ctx.input.schema or ctx.schema()
    table = next((t.name for t in schema.tables if SLOT_COLUMN in t.column_names), None)
    if table is None:
        return NO_TABLE
    result = ctx.sql(
        f'SELECT "{SLOT_COLUMN}", COUNT(*) AS n FROM "{table}" '  # noqa: S608 (literals escaped, names fixed)
        f'WHERE "{SLOT_COLUMN}" IN ({", ".join(_literal(slot) for slot in slots)}) '
        f'GROUP BY "{SLOT_COLUMN}" ORDER BY "{SLOT_COLUMN}" LIMIT 1'
    )
    if not result.rows:
        return NO_COMMON
    return f"Agreed slot: {result.rows[0][0]}"
