"""One error hierarchy with stable codes, shared by the API, the runner and the CLI.

Every error carries a machine-readable ``code`` (stable: scripts and clients match on it), an HTTP
status for the API, and a human message that says what went wrong and, where possible, what to do.
"""

from __future__ import annotations

from typing import Any, ClassVar


class HivemindError(Exception):
    """Base of every error the product raises on purpose."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500

    def __init__(self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            # Instance-level override of the class code, e.g. a specific reason inside a family.
            self.code = code  # type: ignore[misc]
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# --- caller errors -------------------------------------------------------------------------------


class InvalidInput(HivemindError):
    code = "invalid_input"
    status = 400


class InvalidToken(InvalidInput):
    code = "invalid_token"


class InvalidLink(InvalidInput):
    code = "invalid_link"


class InvalidPolicy(InvalidInput):
    code = "invalid_policy"


class PayloadTooLarge(HivemindError):
    code = "payload_too_large"
    status = 413


class Unauthenticated(HivemindError):
    code = "unauthenticated"
    status = 401


class Forbidden(HivemindError):
    code = "forbidden"
    status = 403


class NotFound(HivemindError):
    code = "not_found"
    status = 404


class Conflict(HivemindError):
    code = "conflict"
    status = 409


class Gone(HivemindError):
    """The object existed and was deleted (a room tombstone, a revoked invite)."""

    code = "gone"
    status = 410


class InsufficientCredit(HivemindError):
    code = "insufficient_credit"
    status = 402


class RateLimited(HivemindError):
    code = "rate_limited"
    status = 429


class PolicyDenied(HivemindError):
    """An admission-chain policy said no. ``code`` is the denying policy's code."""

    code = "policy_denied"
    status = 403


class BudgetExceeded(PolicyDenied):
    code = "budget_exceeded"


# --- integrity errors: something stored or received does not verify ----------------------------


class IntegrityError(HivemindError):
    """Stored or received data failed verification. Never retried, never ignored."""

    code = "integrity_error"
    status = 409


class SealError(IntegrityError):
    """An HMS1 sealed blob is malformed, tampered, truncated, reordered or in the wrong context."""

    code = "seal_invalid"


class WrapError(IntegrityError):
    code = "wrap_invalid"


class SignatureError(IntegrityError):
    code = "signature_invalid"


class ManifestError(IntegrityError):
    code = "manifest_invalid"


class RevisionRollback(ManifestError):
    code = "manifest_rollback"


class EnvelopeError(IntegrityError):
    code = "envelope_invalid"


class ReplayError(EnvelopeError):
    code = "replay_detected"


class ExpiredError(EnvelopeError):
    code = "expired"


class ReceiptError(IntegrityError):
    code = "receipt_invalid"


class LedgerError(IntegrityError):
    code = "ledger_invalid"


class FloatInSignedDocument(InvalidInput):
    """Signed JSON holds no floats: times are integer seconds or RFC 3339 strings."""

    code = "float_in_signed_document"


# --- attestation: one error per verification step ------------------------------------------------


class AttestationError(HivemindError):
    code = "attestation_failed"
    status = 502


class QuoteVerificationError(AttestationError):
    code = "quote_invalid"


class TcbStatusError(AttestationError):
    code = "tcb_status_rejected"


class ReportDataMismatch(AttestationError):
    code = "report_data_mismatch"


class EventLogError(AttestationError):
    code = "event_log_invalid"


class ComposeHashNotTrusted(AttestationError):
    code = "compose_hash_not_trusted"


class SimulatedTeeRefused(AttestationError):
    code = "simulated_tee_refused"


# --- service-side -------------------------------------------------------------------------------


class ServiceUnavailable(HivemindError):
    code = "service_unavailable"
    status = 503


class StoreError(HivemindError):
    code = "store_error"
    status = 500


class CollateralUnavailable(QuoteVerificationError):
    """No usable DCAP collateral (TCB info, QE identity, CRLs) could be fetched or read from the cache."""

    code = "collateral_unavailable"


class InvalidArchive(InvalidInput):
    """An agent archive (or directory) that is unsafe or malformed: the message names the member."""

    code = "invalid_archive"


class KeyRotationError(SignatureError):
    """An owner key-rotation certificate (or a chain of them) does not verify or does not link two keys."""

    code = "key_rotation_invalid"
