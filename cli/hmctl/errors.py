"""Exit codes scripts can rely on, and the errors the CLI raises on its own.

Every failure ends in one :class:`ExitCode` (documented in ``docs/exit-codes.md``; the numbers never
change). Errors from the service arrive as :class:`ApiError` carrying the server's stable ``code``;
errors raised on this machine are the core's :class:`~hivemind.errors.HivemindError` subclasses or the
CLI's own below. :func:`exit_code_for` decides the code from the error's class, code and HTTP status.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import Any

from hivemind.errors import (
    AttestationError,
    Conflict,
    Forbidden,
    Gone,
    HivemindError,
    InsufficientCredit,
    IntegrityError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    PolicyDenied,
    RateLimited,
    ServiceUnavailable,
    StoreError,
    Unauthenticated,
)


class ExitCode(IntEnum):
    """What ``hmctl`` exits with. Stable: scripts branch on these numbers."""

    OK = 0
    ERROR = 1  # unexpected or unclassified failure (including conflicts such as "already exists")
    USAGE = 2  # bad arguments or input, missing or unsafe configuration
    AUTH = 3  # credential missing, unknown, revoked or expired, or the wrong kind of key
    NOT_FOUND = 4  # no such object, or it was deleted
    VERIFICATION = 5  # a signature, manifest, attestation, receipt, hash, seal or ledger did not verify
    DENIED = 6  # refused by policy: admission, budgets, credit, rate limits, invite narrowing
    RUN_FAILED = 7  # the run ended failed or expired (its receipt, when there is one, verified)
    UNAVAILABLE = 8  # the service could not be reached, timed out or had a server error
    NOT_ACCEPTED = 9  # the room's manifest is not accepted by this profile, or the user declined


class CliError(HivemindError):
    """A failure detected by the CLI itself, with the exit code it means and what to do next."""

    code = "cli_error"
    exit_code: ExitCode = ExitCode.ERROR

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        code: str | None = None,
        exit_code: ExitCode | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CliError):
    code = "usage_error"
    exit_code = ExitCode.USAGE


class ProfileError(CliError):
    """The profile file or a profile is missing, malformed or unsafe."""

    code = "profile_error"
    exit_code = ExitCode.USAGE


class NotAccepted(CliError):
    """The room's current manifest has not been accepted by this profile."""

    code = "manifest_not_accepted"
    exit_code = ExitCode.NOT_ACCEPTED


class RunFailed(CliError):
    code = "run_failed"
    exit_code = ExitCode.RUN_FAILED


class ApiError(HivemindError):
    """An error answer of the service: its HTTP ``status`` and its stable ``code`` and message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.http_status = status
        self.request_id = request_id


class ServiceUnreachable(ServiceUnavailable):
    """No answer from the service (connection refused, DNS, TLS, timeout)."""

    code = "service_unreachable"


def _error_classes() -> dict[str, type[HivemindError]]:
    """Every core error class by its code, so a server code maps to the class that defines it."""
    found: dict[str, type[HivemindError]] = {}
    pending: list[type[HivemindError]] = [HivemindError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


# 403 answers that mean "this key may not do that" rather than "a policy refused it".
_AUTH_FORBIDDEN_CODES = frozenset(
    {
        "forbidden",
        "tenant_key_required",
        "admin_key_required",
        "participant_key_required",
        "tenant_suspended",
        "owner_only",
        "not_your_invite",
        "payer_unavailable",
    }
)
# Service codes that are integrity failures although no core class defines them.
_INTEGRITY_CODES = frozenset(
    {
        "upload_mismatch",
        "upload_size_mismatch",
        "upload_checksum_mismatch",
        "object_size_mismatch",
        "object_checksum_mismatch",
        "agent_digest_mismatch",
        "audit_chain_invalid",
        "manifest_mismatch",
    }
)
_DENIED_CODES = frozenset(
    {"provider_not_allowed", "invite_widens", "credential_exhausted", "budget_exceeds_room"}
)


def _by_class(error: HivemindError) -> ExitCode | None:
    classes = _error_classes()
    cls = classes.get(error.code, type(error)) if isinstance(error, ApiError) else type(error)
    ordered: list[tuple[type[HivemindError], ExitCode]] = [
        (IntegrityError, ExitCode.VERIFICATION),
        (AttestationError, ExitCode.VERIFICATION),
        (Unauthenticated, ExitCode.AUTH),
        (InsufficientCredit, ExitCode.DENIED),
        (PolicyDenied, ExitCode.DENIED),
        (RateLimited, ExitCode.DENIED),
        (NotFound, ExitCode.NOT_FOUND),
        (Gone, ExitCode.NOT_FOUND),
        (ServiceUnavailable, ExitCode.UNAVAILABLE),
        (StoreError, ExitCode.UNAVAILABLE),
        (PayloadTooLarge, ExitCode.USAGE),
        (InvalidInput, ExitCode.USAGE),
        (Forbidden, ExitCode.AUTH),
        (Conflict, ExitCode.ERROR),
    ]
    for base, exit_code in ordered:
        if issubclass(cls, base) and cls is not HivemindError:
            return exit_code
    return None


def _by_status(status: int) -> ExitCode:
    if status == 401:
        return ExitCode.AUTH
    if status in (402, 403, 429):
        return ExitCode.DENIED
    if status in (404, 410):
        return ExitCode.NOT_FOUND
    if status in (400, 413, 422):
        return ExitCode.USAGE
    if status >= 500:
        return ExitCode.UNAVAILABLE
    return ExitCode.ERROR


def _api_exit_code(error: ApiError) -> ExitCode:
    if error.http_status >= 500:
        return ExitCode.UNAVAILABLE
    if error.http_status == 403:
        return ExitCode.DENIED
    return _by_class(error) or _by_status(error.http_status)


_CODE_RULES: tuple[tuple[Callable[[str], bool], ExitCode], ...] = (
    (lambda code: code in _INTEGRITY_CODES or code.startswith("seal_"), ExitCode.VERIFICATION),
    (lambda code: code in _DENIED_CODES, ExitCode.DENIED),
    (lambda code: code in _AUTH_FORBIDDEN_CODES, ExitCode.AUTH),
    (lambda code: code.startswith("credential") or code == "payer_invalid", ExitCode.AUTH),
)


def exit_code_for(error: BaseException) -> ExitCode:
    """The exit code an error ends the process with."""
    if isinstance(error, CliError):
        return error.exit_code
    if not isinstance(error, HivemindError):
        return ExitCode.ERROR
    for matches, exit_code in _CODE_RULES:
        if matches(error.code):
            return exit_code
    if isinstance(error, ApiError):
        return _api_exit_code(error)
    return _by_class(error) or ExitCode.ERROR
