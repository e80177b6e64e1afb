"""The fail-closed admission chain (DESIGN §10), generic over the context it admits.

Every run request and every bridge tool call passes an ordered chain of policies. A policy returns
:class:`Allow`, :class:`Deny` (a stable code and a reason for the caller) or :class:`Mutate` (a new
context, e.g. budgets clamped to the room's maxima). The chain never lets an error through as an
allow: an exception in a policy is a ``policy_error`` deny, and a chain that cannot be built is a
single deny-all policy reporting ``policy_chain_unavailable``.

The API and the bridge turn a denied result into the same error with :func:`raise_for_decision`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Generic, Literal, Protocol, TypeAlias, TypeVar, runtime_checkable

from hivemind.errors import (
    BudgetExceeded,
    HivemindError,
    InsufficientCredit,
    PolicyDenied,
    RateLimited,
    Unauthenticated,
)
from hivemind.models import StrictModel

logger = logging.getLogger(__name__)

ContextT = TypeVar("ContextT")

EXTRA_POLICIES_ENV = "HIVEMIND_ADMISSION_EXTRA_POLICIES"
"""Environment variable the control plane reads operator-appended policy specs from."""

_CODE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_POLICY_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class DenyCode(StrEnum):
    """The deny codes the product's own policies use. Operator policies may add their own codes."""

    CREDENTIAL_INVALID = "credential_invalid"
    CREDENTIAL_EXPIRED = "credential_expired"
    CREDENTIAL_REVOKED = "credential_revoked"
    ROOM_INACTIVE = "room_inactive"
    ROOM_ENVELOPE_INVALID = "room_envelope_invalid"
    CALLER_NOT_ALLOWED = "caller_not_allowed"
    QUERY_AGENT_NOT_ALLOWED = "query_agent_not_allowed"
    PROVIDER_NOT_ALLOWED = "provider_not_allowed"
    BUDGET_EXCEEDED = "budget_exceeded"
    INSUFFICIENT_CREDIT = "insufficient_credit"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    PROMPT_TOO_LARGE = "prompt_too_large"
    POLICY_ERROR = "policy_error"
    POLICY_CHAIN_UNAVAILABLE = "policy_chain_unavailable"


# --- decisions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Allow:
    """Let the request continue to the next policy unchanged."""

    note: str = ""


@dataclass(frozen=True, slots=True)
class Deny:
    """Stop: ``code`` is stable (clients match on it), ``reason`` is shown to the caller."""

    code: str
    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, str) or not _CODE.fullmatch(self.code):
            raise ValueError(f"deny code must match {_CODE.pattern}, got {self.code!r}")
        if not isinstance(self.reason, str) or not self.reason:
            raise ValueError("a deny needs a reason")
        # A DenyCode member becomes its plain value, so audit records and comparisons see one type.
        object.__setattr__(self, "code", str(self.code))


@dataclass(frozen=True, slots=True)
class Mutate(Generic[ContextT]):
    """Continue with ``context`` in place of the current one; ``note`` says what changed (audited)."""

    context: ContextT
    note: str


Decision: TypeAlias = Allow | Deny | Mutate[ContextT]

ALLOW = Allow()


@runtime_checkable
class Policy(Protocol[ContextT]):
    """One link of the chain. ``name`` appears in the audit trail; ``evaluate`` must not mutate ``ctx``."""

    name: str

    def evaluate(self, ctx: ContextT) -> Decision[ContextT]: ...


class TrailEntry(StrictModel):
    """What one policy decided, for the audit record. Exception text is never recorded."""

    policy: str
    outcome: Literal["allow", "deny", "mutate"]
    code: str | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class AdmissionResult(Generic[ContextT]):
    """The chain's answer: the context after every mutation, and each policy's decision in order."""

    allowed: bool
    context: ContextT
    trail: tuple[TrailEntry, ...]
    denial: Deny | None = None

    def __post_init__(self) -> None:
        if self.allowed == (self.denial is not None):
            raise ValueError("an admission result is allowed exactly when it has no denial")

    @property
    def deny_code(self) -> str | None:
        return self.denial.code if self.denial else None

    @property
    def reason(self) -> str | None:
        return self.denial.reason if self.denial else None


# --- the chain -----------------------------------------------------------------------------------


def _policy_name(policy: object) -> str:
    name = getattr(policy, "name", None)
    if not isinstance(name, str) or not _POLICY_NAME.fullmatch(name):
        raise ValueError(f"policy {type(policy).__name__} needs a name matching {_POLICY_NAME.pattern}")
    if not callable(getattr(policy, "evaluate", None)):
        raise ValueError(f"policy {name} has no evaluate method")
    return name


class AdmissionChain(Generic[ContextT]):
    """An ordered, immutable list of policies evaluated fail-closed.

    Mutations replace the context for the policies after them; the first deny stops evaluation; any
    exception, or a return value that is not a decision, is a ``policy_error`` deny naming the policy.
    A chain has at least one policy: an empty chain would allow everything by accident.
    """

    def __init__(self, policies: Sequence[Policy[ContextT]]):
        if not policies:
            raise ValueError("an admission chain needs at least one policy")
        self._names = tuple(_policy_name(policy) for policy in policies)
        self._policies = tuple(policies)

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def evaluate(self, ctx: ContextT) -> AdmissionResult[ContextT]:
        trail: list[TrailEntry] = []
        for name, policy in zip(self._names, self._policies, strict=True):
            try:
                decision = policy.evaluate(ctx)
                if isinstance(decision, Mutate) and not isinstance(decision.context, type(ctx)):
                    raise TypeError(f"{name} replaced the context with a {type(decision.context).__name__}")
                if not isinstance(decision, Allow | Deny | Mutate):
                    raise TypeError(f"{name} returned {type(decision).__name__}, not a decision")
            except Exception as exc:
                # The exception text may hold request data (the bridge admits SQL and prompts): only
                # its type is logged, and the caller learns only which policy failed.
                logger.error("admission policy %s raised %s", name, type(exc).__name__)
                decision = Deny(DenyCode.POLICY_ERROR, f"{name} failed")
            if isinstance(decision, Deny):
                trail.append(
                    TrailEntry(policy=name, outcome="deny", code=decision.code, note=decision.reason)
                )
                return AdmissionResult(allowed=False, context=ctx, trail=tuple(trail), denial=decision)
            if isinstance(decision, Mutate):
                trail.append(TrailEntry(policy=name, outcome="mutate", note=decision.note))
                ctx = decision.context
            else:
                trail.append(TrailEntry(policy=name, outcome="allow", note=decision.note))
        return AdmissionResult(allowed=True, context=ctx, trail=tuple(trail))


class DenyAll:
    """Denies everything with one code; installed when the configured chain cannot be built."""

    name = "deny_all"

    def __init__(
        self, code: str = DenyCode.POLICY_CHAIN_UNAVAILABLE, reason: str = "admission is unavailable"
    ):
        self._deny = Deny(code, reason)

    def evaluate(self, ctx: object) -> Deny:
        return self._deny


PolicyFactory: TypeAlias = Callable[[str | None], Policy[Any]]
"""Builds a policy from the argument of a ``name:arg`` spec (``None`` when the spec has no ``:``)."""


def parse_specs(specs: str | Sequence[str] | None) -> list[tuple[str, str | None]]:
    """Split operator policy specs into ``(name, arg)`` pairs.

    A string is a comma-separated list (the form of :data:`EXTRA_POLICIES_ENV`); each spec is ``name``
    or ``name:arg`` (the argument is everything after the first colon). Blank entries are ignored.
    """
    if specs is None:
        return []
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    parsed: list[tuple[str, str | None]] = []
    for raw in items:
        if not isinstance(raw, str):
            raise ValueError(f"policy spec must be text, got {type(raw).__name__}")
        spec = raw.strip()
        if not spec:
            continue
        name, separator, arg = spec.partition(":")
        if not _POLICY_NAME.fullmatch(name):
            raise ValueError(f"policy spec {spec!r}: name must match {_POLICY_NAME.pattern}")
        parsed.append((name, arg if separator else None))
    return parsed


def build_chain(
    head: Sequence[Policy[ContextT]],
    extra_specs: str | Sequence[str] | None,
    registry: Mapping[str, PolicyFactory],
) -> AdmissionChain[ContextT]:
    """The fixed ``head`` followed by the operator's policies, resolved through ``registry``.

    If anything fails (an unknown name, a bad argument, a factory raising or returning something that
    is not a policy, an empty chain) the result is a chain of one :class:`DenyAll` reporting
    ``policy_chain_unavailable``: a misconfigured deployment refuses every request, it never admits one.
    The cause is logged for the operator.
    """
    try:
        policies: list[Policy[ContextT]] = list(head)
        for name, arg in parse_specs(extra_specs):
            factory = registry.get(name)
            if factory is None:
                raise ValueError(f"unknown admission policy {name!r}")
            policy = factory(arg)
            if not isinstance(policy, Policy):
                raise TypeError(f"factory for {name!r} returned {type(policy).__name__}, not a policy")
            policies.append(policy)
        return AdmissionChain(policies)
    except Exception:
        logger.exception("admission chain unavailable; every request will be denied")
        return AdmissionChain([DenyAll()])


# --- reusable policies ---------------------------------------------------------------------------


class PromptSized(Protocol):
    """A context that knows the size of the request's (sealed) prompt or envelope, in bytes."""

    @property
    def prompt_bytes(self) -> int: ...


class CallerScoped(Protocol):
    """A context that knows who is asking (a tenant id or an invite's token id)."""

    @property
    def caller_id(self) -> str: ...


class MaxPromptBytes:
    """Deny requests whose prompt is larger than ``limit`` bytes (``prompt_too_large``)."""

    name = "max_prompt_bytes"

    def __init__(self, limit: int):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("max_prompt_bytes needs a positive integer limit")
        self.limit = limit

    def evaluate(self, ctx: PromptSized) -> Decision[Any]:
        size = ctx.prompt_bytes
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise TypeError("prompt_bytes must be a non-negative integer")
        if size > self.limit:
            return Deny(DenyCode.PROMPT_TOO_LARGE, f"prompt is {size} bytes; the limit is {self.limit}")
        return ALLOW


class RunCounter(Protocol):
    """Atomic per-key counters (the control plane backs this with a conditional DynamoDB update)."""

    def consume(self, key: str, limit: int) -> bool:
        """Add one to ``key``'s count if it is below ``limit``; True iff the count was increased."""
        ...


class InMemoryRunCounter:
    """A process-local :class:`RunCounter` for the local stack and tests."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def consume(self, key: str, limit: int) -> bool:
        with self._lock:
            count = self._counts.get(key, 0)
            if count >= limit:
                return False
            self._counts[key] = count + 1
            return True


class DailyRunQuota:
    """At most ``limit`` admitted requests per caller per UTC day (``quota_exceeded``).

    A request is counted when it reaches this policy, so put it after the policies that can still
    deny (the fixed head always runs first).
    """

    name = "daily_run_quota"

    def __init__(self, counter: RunCounter, limit: int, clock: Callable[[], float] = time.time):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("daily_run_quota needs a positive integer limit")
        self.counter = counter
        self.limit = limit
        self.clock = clock

    def evaluate(self, ctx: CallerScoped) -> Decision[Any]:
        caller = ctx.caller_id
        if not isinstance(caller, str) or not caller:
            raise TypeError("caller_id must be a non-empty string")
        day = datetime.fromtimestamp(self.clock(), tz=UTC).strftime("%Y-%m-%d")
        if not self.counter.consume(f"daily_run_quota|{caller}|{day}", self.limit):
            return Deny(
                DenyCode.QUOTA_EXCEEDED, f"daily run quota of {self.limit} reached; it resets at 00:00 UTC"
            )
        return ALLOW


def _positive_int_arg(name: str, arg: str | None) -> int:
    if arg is None or not arg.isdecimal():
        raise ValueError(f"{name} needs a positive integer argument, e.g. {name}:100")
    value = int(arg)
    if value < 1:
        raise ValueError(f"{name} needs a positive integer argument, e.g. {name}:100")
    return value


def standard_registry(counter: RunCounter) -> dict[str, PolicyFactory]:
    """Factories for the policies operators can append: ``max_prompt_bytes:N``, ``daily_run_quota:N``."""
    return {
        MaxPromptBytes.name: lambda arg: MaxPromptBytes(_positive_int_arg(MaxPromptBytes.name, arg)),
        DailyRunQuota.name: lambda arg: DailyRunQuota(counter, _positive_int_arg(DailyRunQuota.name, arg)),
    }


# --- errors --------------------------------------------------------------------------------------

_CREDENTIAL_CODES = frozenset(
    {DenyCode.CREDENTIAL_INVALID, DenyCode.CREDENTIAL_EXPIRED, DenyCode.CREDENTIAL_REVOKED}
)


def error_for_denial(denial: Deny) -> HivemindError:
    """The error a deny becomes at the API and the bridge; its ``code`` is the deny code.

    401 for credential codes, 402 for ``insufficient_credit``, 429 for ``rate_limited`` and
    ``quota_exceeded``, 403 (:class:`PolicyDenied`) for everything else.
    """
    code, reason = denial.code, denial.reason
    if code in _CREDENTIAL_CODES:
        return Unauthenticated(reason, code=code)
    if code == DenyCode.INSUFFICIENT_CREDIT:
        return InsufficientCredit(reason, code=code)
    if code in (DenyCode.RATE_LIMITED, DenyCode.QUOTA_EXCEEDED):
        return RateLimited(reason, code=code)
    if code == DenyCode.BUDGET_EXCEEDED:
        return BudgetExceeded(reason, code=code)
    return PolicyDenied(reason, code=code)


def raise_for_decision(result: AdmissionResult[Any]) -> None:
    """Return if the chain allowed the request; otherwise raise the error for its deny."""
    if result.denial is not None:
        raise error_for_denial(result.denial)
