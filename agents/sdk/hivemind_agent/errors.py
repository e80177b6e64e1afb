"""Exceptions for bridge calls. Every one carries the bridge's stable ``code`` and its message.

The bridge answers errors as JSON ``{"error": code, "message": text}`` (docs/agents.md). The mapping
from status and code to class lives in :func:`error_from_response`, in one place.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error the SDK raises for a bridge call.

    ``code`` is the bridge's machine-readable code (match on it), ``status`` the HTTP status
    (0 when no response arrived), ``message`` the bridge's explanation.
    """

    def __init__(self, message: str, *, code: str = "bridge_error", status: int = 0):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BridgeUnavailable(BridgeError):
    """No bridge to talk to: the environment is not set up, or the socket is missing or refuses."""

    def __init__(self, message: str):
        super().__init__(message, code="bridge_unavailable", status=0)


class ProtocolError(BridgeError):
    """The bridge's answer broke the contract: not JSON, wrong shape, or larger than allowed."""

    def __init__(self, message: str, *, status: int = 0):
        super().__init__(message, code="protocol_error", status=status)


class Denied(BridgeError):
    """The bridge refused the call (HTTP 401/403): a scope policy, the room's rules or the session."""


class NotAllowedForRole(Denied):
    """This route is not open to the agent's role (for example ``simulate`` outside the scope stage)."""


class BudgetExhausted(Denied):
    """A run budget (LLM calls, tokens, tool calls, time) is used up; retrying will not help."""


class InvalidRequest(BridgeError):
    """The bridge rejected the request itself (HTTP 400, 409, 413, 422): fix the call, do not retry."""


class NotFound(InvalidRequest):
    """The named object (an item, a route) does not exist or is not visible to this role (HTTP 404)."""


def error_from_response(status: int, code: str, message: str) -> BridgeError:
    """The exception for a bridge error response. Codes win over statuses where both say something."""
    if code == "not_allowed_for_role":
        return NotAllowedForRole(message, code=code, status=status)
    if code == "budget_exceeded" or status == 429:
        return BudgetExhausted(message, code=code, status=status)
    if status in (401, 403):
        return Denied(message, code=code, status=status)
    if status == 404:
        return NotFound(message, code=code, status=status)
    if 400 <= status < 500:
        return InvalidRequest(message, code=code, status=status)
    return BridgeError(message, code=code, status=status)
