"""Small shared vocabulary used across manifests, envelopes, runs and receipts (DESIGN §5-§7).

Signed documents hold no floats (§16.12): durations are integer seconds or milliseconds, times are
integer Unix seconds. Bytes travel as canonical unpadded base64url of a checked size (:func:`b64url_bytes`).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from hivemind.encoding import b64decode, b64encode
from hivemind.errors import InvalidInput

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lowercase hex SHA-256")]
Identifier = Annotated[str, Field(pattern=r"^[a-z][a-z0-9]*_[a-z0-9]{1,64}$", max_length=80)]
UnixSeconds = Annotated[int, Field(ge=0, description="integer seconds since the Unix epoch")]


# --- base64url fields ----------------------------------------------------------------------------


def b64url_bytes(min_bytes: int, max_bytes: int, what: str) -> Callable[[str], str]:
    """A pydantic validator: canonical unpadded base64url holding ``min_bytes..max_bytes`` bytes."""

    def check(value: str) -> str:
        try:
            raw = b64decode(value)
        except InvalidInput:
            raise ValueError(f"{what} is not unpadded base64url") from None
        # One byte string, one text: a re-encoding must give the same text back.
        if b64encode(raw) != value:
            raise ValueError(f"{what} is not canonical unpadded base64url")
        if not min_bytes <= len(raw) <= max_bytes:
            size = str(min_bytes) if min_bytes == max_bytes else f"{min_bytes} to {max_bytes}"
            raise ValueError(f"{what} must be {size} bytes, got {len(raw)}")
        return value

    return check


Base64Url = Annotated[str, AfterValidator(b64url_bytes(1, 1 << 30, "value"))]
X25519PublicB64 = Annotated[str, AfterValidator(b64url_bytes(32, 32, "an X25519 public key"))]
Ed25519PublicB64 = Annotated[str, AfterValidator(b64url_bytes(32, 32, "an Ed25519 public key"))]
Ed25519SignatureB64 = Annotated[str, AfterValidator(b64url_bytes(64, 64, "an Ed25519 signature"))]
Key256B64 = Annotated[str, AfterValidator(b64url_bytes(32, 32, "a 256-bit key"))]


class StrictModel(BaseModel):
    """Base for wire models: unknown fields are an error, values are validated, models are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class Visibility(StrEnum):
    """Whether an agent's source may be read by room participants, or only by the attested runner."""

    INSPECTABLE = "inspectable"
    SEALED = "sealed"


class QueryMode(StrEnum):
    FIXED = "fixed"
    UPLOADABLE = "uploadable"


class OutputVisibility(StrEnum):
    QUERIER_ONLY = "querier_only"
    OWNER_AND_QUERIER = "owner_and_querier"


class Stage(StrEnum):
    SCOPE = "scope"
    QUERY = "query"
    MEDIATOR = "mediator"


class RunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.EXPIRED)


class TeeKind(StrEnum):
    TDX = "tdx"
    SIMULATED = "simulated"


class ObjectKind(StrEnum):
    """What an HMS1 sealed object is; part of its key-derivation context (§4, §16.14)."""

    ITEM = "item"
    AGENT_SOURCE = "agent_source"
    OUTPUT = "output"
    ARTIFACT = "artifact"
    PROVIDER_KEY = "provider_key"


class Budgets(StrictModel):
    """Per-run resource budgets. All integers (signed documents carry them)."""

    timeout_s: int = Field(ge=1, le=3600)
    llm_calls: int = Field(ge=0, le=10_000)
    tokens: int = Field(ge=0, le=100_000_000)
    memory_mb: int = Field(ge=64, le=65_536)


class BudgetLimits(StrictModel):
    """A room's budget defaults and maxima; requests are clamped to the maxima."""

    defaults: Budgets
    maxima: Budgets

    @model_validator(mode="after")
    def _defaults_within_maxima(self) -> Self:
        for name in Budgets.model_fields:
            if getattr(self.defaults, name) > getattr(self.maxima, name):
                raise ValueError(f"budget default {name} exceeds its maximum")
        return self

    def clamp(self, requested: Budgets | None) -> Budgets:
        """The budgets a run gets: the request (or the defaults) capped field by field at the maxima."""
        base = requested or self.defaults
        capped = {name: min(getattr(base, name), getattr(self.maxima, name)) for name in Budgets.model_fields}
        return Budgets(**capped)


DEFAULT_BUDGET_LIMITS = BudgetLimits(
    defaults=Budgets(timeout_s=120, llm_calls=0, tokens=0, memory_mb=256),
    maxima=Budgets(timeout_s=600, llm_calls=50, tokens=200_000, memory_mb=1024),
)


class StageUsage(StrictModel):
    """What one stage consumed; recorded in telemetry and signed into receipts."""

    stage: Stage
    duration_ms: int = Field(ge=0)
    tool_calls: dict[str, int] = Field(default_factory=dict)
    llm_calls: int = Field(default=0, ge=0)
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
