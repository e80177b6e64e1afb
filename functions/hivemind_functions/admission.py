"""The run admission chain (DESIGN §10): the fixed head of ``POST /v1/rooms/{id}/runs``, then the
operator's policies from ``HIVEMIND_ADMISSION_EXTRA_POLICIES``.

Head, in order (each a policy of :mod:`hivemind.admission`, so an exception is a ``policy_error`` deny
and a chain that cannot be built denies everything with ``policy_chain_unavailable``):

1. ``credential_valid``: a tenant key or an invite, not revoked, not expired, uses left;
2. ``room_active``: the room exists, is active, and its signed manifest verifies;
3. ``caller_may_run``: the owner's tenant key, or an invite of this very room;
4. ``query_agent_allowed``: the room's fixed query agent, or in an uploadable room an active agent
   uploaded for it with the visibility the room demands;
5. ``providers_allowed``: every LLM provider the room allows is one this deployment can reach;
6. ``budgets_clamped``: the requested budgets (or the room's defaults) capped by the room's maxima and
   the invite's own caps (a mutation);
7. ``payer_hold``: the payer is resolved (the tenant caller, the ``X-Hivemind-Payer`` tenant, or the
   room owner for invites), the hold is priced (``store.prices.hold_for``), and with credits enforced
   the payer has that much available (a mutation carrying payer and amount);
8. ``rate_limit``: at most ``HIVEMIND_RUN_RATE_LIMIT_PER_MINUTE`` admitted runs per caller per minute.

The chain only reads, except the rate-limit counter. The hold itself is taken atomically right after
the chain allowed the request (:mod:`hivemind_functions.services.runs`): so no later policy's denial can
leave a hold behind, and two concurrent requests that both passed the credit check still cannot
overdraw (the ledger transaction refuses the second with ``insufficient_credit``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from hivemind.admission import (
    ALLOW,
    AdmissionChain,
    AdmissionResult,
    Decision,
    Deny,
    DenyCode,
    Mutate,
    Policy,
    PolicyFactory,
    build_chain,
    standard_registry,
)
from hivemind.errors import HivemindError, RateLimited
from hivemind.manifest import RoomManifest, SignedManifest, verify_manifest
from hivemind.models import Budgets, QueryMode
from hivemind.store import Store
from hivemind.store.agents import AgentState
from hivemind.store.credentials import CredentialKind, CredentialRecord
from hivemind.store.rooms import RoomRecord, RoomStatus
from hivemind.store.tenants import TenantRecord, TenantStatus
from hivemind_functions.settings import FunctionSettings

RATE_LIMIT_WINDOW_S = 60
_DAY_S = 86_400


@dataclass(frozen=True, slots=True)
class RunAdmission:
    """What the chain admits: who asks, for which room, with what, and what the policies found.

    The policies fill ``room`` .. ``hold`` through mutations; ``budgets``, ``payer_tenant_id`` and
    ``hold`` are set once the chain has allowed the request.
    """

    credential: CredentialRecord
    room_id: str
    envelope_bytes: int
    requested_budgets: Budgets | None
    query_agent_id: str | None
    # The tenant named by X-Hivemind-Payer, already authenticated; None when the header is absent.
    payer_override: TenantRecord | None = None
    room: RoomRecord | None = None
    manifest: RoomManifest | None = None
    budgets: Budgets | None = None
    payer_tenant_id: str | None = None
    hold: int | None = None

    @property
    def caller_id(self) -> str:
        """The bearer id: the tenant id for tenant keys, the invite id for invites (rate limits, quotas)."""
        if self.credential.kind is CredentialKind.TENANT and self.credential.tenant_id is not None:
            return self.credential.tenant_id
        return self.credential.token_id

    @property
    def prompt_bytes(self) -> int:
        """Size of the sealed run envelope (the prompt is inside it; the control plane cannot read it)."""
        return self.envelope_bytes


def _need(value: Any, what: str) -> Any:
    # A policy placed before the one that fills ``what`` is a wiring bug; raising makes it policy_error.
    if value is None:
        raise RuntimeError(f"{what} is not resolved yet")
    return value


# --- the head ---------------------------------------------------------------------------------------


class CredentialValid:
    name = "credential_valid"

    def __init__(self, clock: Callable[[], int]) -> None:
        self._clock = clock

    def evaluate(self, ctx: RunAdmission) -> Decision[RunAdmission]:
        credential = ctx.credential
        if credential.kind not in (CredentialKind.TENANT, CredentialKind.INVITE):
            return Deny(
                DenyCode.CREDENTIAL_INVALID, "runs are asked with a tenant (hmk_) or invite (hmq_) key"
            )
        if credential.revoked:
            return Deny(DenyCode.CREDENTIAL_REVOKED, f"credential {credential.token_id} was revoked")
        if credential.expires_at is not None and credential.expires_at <= self._clock():
            return Deny(DenyCode.CREDENTIAL_EXPIRED, f"credential {credential.token_id} has expired")
        if credential.max_uses is not None and credential.uses >= credential.max_uses:
            return Deny(
                "credential_exhausted",
                f"invite {credential.token_id} has used all {credential.max_uses} of its uses",
            )
        return ALLOW


class RoomActive:
    name = "room_active"

    def __init__(self, store: Store) -> None:
        self._store = store

    def evaluate(self, ctx: RunAdmission) -> Decision[RunAdmission]:
        room = self._store.rooms.get(ctx.room_id)
        if room is None:
            return Deny(DenyCode.ROOM_INACTIVE, f"no room {ctx.room_id}")
        if room.status is not RoomStatus.ACTIVE or room.envelope is None:
            return Deny(DenyCode.ROOM_INACTIVE, f"room {ctx.room_id} was deleted")
        try:
            signed = SignedManifest.model_validate(room.envelope)
            # The signing key is the manifest's own (a rotated tenant key keeps its rooms working);
            # what binds it to the room is the owner's tenant id, the room id and the stored revision.
            manifest = verify_manifest(
                signed, expected_owner_sign_pub=None, expected_room_id=ctx.room_id, min_revision=room.revision
            )
        except (ValidationError, HivemindError):
            return Deny(
                DenyCode.ROOM_ENVELOPE_INVALID, f"the stored manifest of room {ctx.room_id} does not verify"
            )
        if (
            manifest.tenant_id != room.tenant_id
            or signed.manifest_hash != room.manifest_hash
            or manifest.revision != room.revision
        ):
            return Deny(
                DenyCode.ROOM_ENVELOPE_INVALID,
                f"the stored manifest of room {ctx.room_id} does not match the room's record",
            )
        return Mutate(
            replace(ctx, room=room, manifest=manifest), note=f"manifest revision {manifest.revision}"
        )


class CallerMayRun:
    name = "caller_may_run"

    def evaluate(self, ctx: RunAdmission) -> Decision[RunAdmission]:
        room: RoomRecord = _need(ctx.room, "room")
        credential = ctx.credential
        if credential.kind is CredentialKind.TENANT:
            if credential.tenant_id != room.tenant_id:
                return Deny(
                    DenyCode.CALLER_NOT_ALLOWED,
                    "only the room's owner runs it with a tenant key; participants use their invite",
                )
        elif credential.room_id != room.room_id:
            return Deny(DenyCode.CALLER_NOT_ALLOWED, "this invite is for another room")
        return ALLOW


class QueryAgentAllowed:
    name = "query_agent_allowed"

    def __init__(self, store: Store) -> None:
        self._store = store

    def evaluate(self, ctx: RunAdmission) -> Decision[RunAdmission]:
        manifest: RoomManifest = _need(ctx.manifest, "manifest")
        rule = manifest.query
        if rule.mode is QueryMode.FIXED:
            if ctx.query_agent_id is not None and ctx.query_agent_id != rule.agent_id:
                return Deny(
                    DenyCode.QUERY_AGENT_NOT_ALLOWED,
                    f"room {manifest.room_id} runs only its fixed query agent {rule.agent_id}",
                )
            return ALLOW
        if ctx.query_agent_id is None:
            return Deny(
                DenyCode.QUERY_AGENT_NOT_ALLOWED,
                f"room {manifest.room_id} needs a query agent: upload one and name it in query_agent_id",
            )
        agent = self._store.agents.get(ctx.query_agent_id)
        if agent is None or agent.state is not AgentState.ACTIVE or agent.room_id != manifest.room_id:
            return Deny(
                DenyCode.QUERY_AGENT_NOT_ALLOWED,
                f"{ctx.query_agent_id} is not an active query agent uploaded for room {manifest.room_id}",
            )
        if agent.visibility is not rule.visibility:
            return Deny(
                DenyCode.QUERY_AGENT_NOT_ALLOWED,
                f"room {manifest.room_id} accepts only {rule.visibility.value} query agents",
            )
        return ALLOW


class ProvidersAllowed:
    name = "providers_allowed"

    def __init__(self, deployment_providers: tuple[str, ...]) -> None:
        self._allowed = frozenset(deployment_providers)

    def evaluate(self, ctx: RunAdmission) -> Decision[RunAdmission]:
        manifest: RoomManifest = _need(ctx.manifest, "manifest")
        missing = sorted(set(manifest.egress.llm_providers) - self._allowed)
        if missing:
            return Deny(
                DenyCode.PROVIDER_NOT_ALLOWED,
                f"the room allows LLM providers this deployment does not offer: {', '.join(missing)}",
            )
        return ALLOW


class BudgetsClamped:
    name = "budgets_clamped"

    def evaluate(self, ctx: RunAdmission) -> Decision[RunAdmission]:
        manifest: RoomManifest = _need(ctx.manifest, "manifest")
        budgets = manifest.budgets.clamp(ctx.requested_budgets)
        cap = ctx.credential.budgets
        if cap is not None:
            # An invite's caps narrow the room's maxima further (a derived invite only ever shrinks).
            budgets = Budgets(
                **{name: min(getattr(budgets, name), getattr(cap, name)) for name in Budgets.model_fields}
            )
        requested = ctx.requested_budgets
        clamped = (
            []
            if requested is None
            else [
                f"{name} {getattr(requested, name)}->{getattr(budgets, name)}"
                for name in Budgets.model_fields
                if getattr(requested, name) != getattr(budgets, name)
            ]
        )
        note = "room defaults" if requested is None else ("clamped " + ", ".join(clamped) if clamped else "")
        return Mutate(replace(ctx, budgets=budgets), note=note)


class PayerHold:
    name = "payer_hold"

    def __init__(self, store: Store, *, enforce_credits: bool) -> None:
        self._store = store
        self._enforce = enforce_credits

    def evaluate(self, ctx: RunAdmission) -> Decision[RunAdmission]:
        room: RoomRecord = _need(ctx.room, "room")
        manifest: RoomManifest = _need(ctx.manifest, "manifest")
        budgets: Budgets = _need(ctx.budgets, "budgets")
        if ctx.payer_override is not None:
            payer_id = ctx.payer_override.tenant_id
        elif ctx.credential.kind is CredentialKind.TENANT:
            payer_id = _need(ctx.credential.tenant_id, "tenant")
        else:
            # The owner sponsors its invites; their constraints cap uses and budgets.
            payer_id = room.tenant_id
        payer = self._store.tenants.get(payer_id)
        if payer is None or payer.status is not TenantStatus.ACTIVE:
            return Deny("payer_unavailable", f"the paying tenant {payer_id} is suspended or unknown")
        try:
            amount = self._store.prices.hold_for(
                providers=manifest.egress.llm_providers,
                token_budget=budgets.tokens,
                timeout_s=budgets.timeout_s,
            )
        except HivemindError as exc:
            if exc.code != "price_missing":
                raise
            return Deny("price_missing", exc.message)
        if self._enforce:
            available = self._store.billing.account(payer_id).available
            if available < amount:
                return Deny(
                    DenyCode.INSUFFICIENT_CREDIT,
                    f"this run holds up to {amount} micro-USD; "
                    f"tenant {payer_id} has {max(available, 0)} available",
                )
        return Mutate(
            replace(ctx, payer_tenant_id=payer_id, hold=amount), note=f"payer {payer_id} hold {amount}"
        )


class RateLimit:
    name = "rate_limit"

    def __init__(self, store: Store, *, per_minute: int) -> None:
        self._store = store
        self._limit = per_minute

    def evaluate(self, ctx: RunAdmission) -> Decision[RunAdmission]:
        try:
            self._store.rate_limits.hit(
                f"runs|{ctx.caller_id}", limit=self._limit, window_s=RATE_LIMIT_WINDOW_S
            )
        except RateLimited as exc:
            return Deny(DenyCode.RATE_LIMITED, exc.message)
        return ALLOW


# --- operator policies ------------------------------------------------------------------------------


class StoreRunCounter:
    """The :class:`hivemind.admission.RunCounter` behind ``daily_run_quota``: the rate-limit table's
    atomic conditional counters, one window per UTC day (the quota's key already names the day)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def consume(self, key: str, limit: int) -> bool:
        try:
            self._store.rate_limits.hit(key, limit=limit, window_s=_DAY_S)
        except RateLimited:
            return False
        return True


def head_policies(store: Store, settings: FunctionSettings) -> list[Policy[RunAdmission]]:
    return [
        CredentialValid(store.clock),
        RoomActive(store),
        CallerMayRun(),
        QueryAgentAllowed(store),
        ProvidersAllowed(settings.allowed_llm_providers),
        BudgetsClamped(),
        PayerHold(store, enforce_credits=settings.billing_enforce_credits),
        RateLimit(store, per_minute=settings.run_rate_limit_per_minute),
    ]


def extra_policy_registry(store: Store) -> dict[str, PolicyFactory]:
    """The policies operators may append by name: ``max_prompt_bytes:N``, ``daily_run_quota:N``."""
    return standard_registry(StoreRunCounter(store))


def build_run_chain(store: Store, settings: FunctionSettings) -> AdmissionChain[RunAdmission]:
    """The head followed by ``settings.admission_extra_policies`` resolved through
    :func:`extra_policy_registry`; a spec that does not build gives the deny-all chain."""
    return build_chain(
        head_policies(store, settings), settings.admission_extra_policies, extra_policy_registry(store)
    )


def admit(chain: AdmissionChain[RunAdmission], ctx: RunAdmission) -> AdmissionResult[RunAdmission]:
    """Evaluate ``chain``; an allowed result always carries budgets, payer and hold."""
    result = chain.evaluate(ctx)
    if result.allowed:
        admitted = result.context
        for value, what in (
            (admitted.budgets, "budgets"),
            (admitted.payer_tenant_id, "payer"),
            (admitted.hold, "hold"),
        ):
            _need(value, what)
    return result
