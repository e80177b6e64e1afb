"""The bridge's errors and their wire form ``{"error": code, "message": text}`` (docs/agents.md, "Errors").

Every exception a route raises becomes exactly one status and one stable code. Errors the product
raises on purpose (:class:`~hivemind.errors.HivemindError`) keep their code and status, with the few
renames the bridge contract asks for; anything else is ``500 internal_error`` with no detail, because
an exception's text may hold room data.
"""

from __future__ import annotations

import logging
from typing import Any

from hivemind.errors import Gone, HivemindError

logger = logging.getLogger(__name__)


class InvalidRequest(HivemindError):
    code = "invalid_request"
    status = 400


class MethodNotAllowed(HivemindError):
    code = "method_not_allowed"
    status = 405


class StageFinished(HivemindError):
    """The stage already posted its output or failure, or was stopped: the session is over."""

    code = "stage_finished"
    status = 409


class ArtifactExists(HivemindError):
    code = "artifact_exists"
    status = 409


class SimulationLimit(HivemindError):
    """The run used up its simulations (``POST /v1/simulate``)."""

    code = "budget_exceeded"
    status = 429


# Codes of core errors that the bridge contract spells differently.
_RENAMED = {"invalid_input": "invalid_request"}


def wire_error(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body for ``exc``."""
    if isinstance(exc, Gone):
        # A closed database or store: the stage has ended under the caller.
        return StageFinished.status, {"error": StageFinished.code, "message": "the stage has ended"}
    if isinstance(exc, HivemindError) and 400 <= exc.status < 500:
        code = _RENAMED.get(exc.code, exc.code)
        return exc.status, {"error": code, "message": exc.message}
    if isinstance(exc, HivemindError) and exc.status == 502:
        return 502, {"error": exc.code, "message": exc.message}
    # Only the type is logged: the text may quote room data or agent input.
    logger.error("bridge request failed with %s", type(exc).__name__)
    return 500, {"error": "internal_error", "message": "the bridge failed to handle the request"}
