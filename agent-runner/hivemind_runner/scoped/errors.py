"""Errors of the scoped-data engine.

Two families:

- :class:`SqlRejected`: a query the gate refused. ``code`` is the bridge contract's code
  (``sql_invalid`` 400, ``sql_denied`` 403, docs/agents.md); ``reason`` is the specific rule
  (``aggregate_required``, ``function_not_allowed``...), repeated at the start of the message and in
  ``details["reason"]`` so an agent can read and act on it.
- :class:`DataLoadError`: room data that cannot become tables (bad CSV, name collisions, limits).
  Messages name items by id, columns by normalized name and lines by number; never a cell value.
"""

from __future__ import annotations

from typing import ClassVar

from hivemind.errors import HivemindError


class SqlRejected(HivemindError):
    """A SQL query the gate did not run. Use the subclasses; catch this one."""

    code: ClassVar[str] = "sql_denied"
    status: ClassVar[int] = 403

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}", details={"reason": reason})
        self.reason = reason


class SqlInvalid(SqlRejected):
    """Not one parseable SELECT statement (bridge code ``sql_invalid``, HTTP 400)."""

    code = "sql_invalid"
    status = 400


class SqlDenied(SqlRejected):
    """A SELECT the scope rules refuse, or one that exceeded the query budget (``sql_denied``, 403)."""

    code = "sql_denied"
    status = 403


class DataLoadError(HivemindError):
    """Room data that cannot be loaded as the policy asks; the run fails closed."""

    code: ClassVar[str] = "data_invalid"
    status: ClassVar[int] = 422

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}", details={"reason": reason})
        self.reason = reason


class DataLimitExceeded(DataLoadError):
    """Room data over one of the load limits (bytes, rows, database size)."""

    code = "data_too_large"
    status = 413
