"""Operator routes (admin ``hma_`` keys only; any other key gets 403 ``admin_key_required``).

- credit codes: create (the admin's CLI generates the ``hmcc_`` secret and sends only its auth hash),
  list, revoke;
- prices: token prices per provider model and the runner fee (a missing price is never "free");
- tenants: list, create (the way in when self-serve signup is off), suspend, reactivate, and reset-key
  (swap a tenant's auth hash for a new key when the tenant lost its secret);
- billing: accounts, the ledger (JSON or CSV), verification of every chain and balance, grants.

Amounts are integer micro-USD. See docs/billing.md.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from pydantic import Field

from hivemind.errors import (
    Conflict,
    InvalidInput,
    LedgerError,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from hivemind.ledger import MAX_AMOUNT, LedgerEntry, LedgerRef
from hivemind.manifest import ProviderName
from hivemind.models import Ed25519PublicB64, Sha256Hex, StrictModel, UnixSeconds, X25519PublicB64
from hivemind.store.billing import CreditCode
from hivemind.store.credentials import CredentialKind, CredentialRecord
from hivemind.store.prices import RunnerFee, TokenPrice
from hivemind.store.tenants import TenantRecord, TenantStatus
from hivemind_functions.api.deps import AdminCaller, ServicesDep
from hivemind_functions.services.billing import (
    AccountView,
    LedgerFormat,
    VerificationReport,
    entries_csv,
    verify_accounts,
)
from hivemind_functions.services.tenants import register_tenant

router = APIRouter(tags=["admin"])

CURSOR_HEADER = "X-Hivemind-Cursor"
# A day's ledger is served inline up to this many entries; beyond that, use the daily CSV export.
MAX_DAY_ENTRIES = 10_000
ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")]
TenantIdPath = Annotated[str, Path(pattern=r"^[a-z][a-z0-9]*_[a-z0-9]{1,64}$", max_length=80)]
Cursor = Annotated[str | None, Query(max_length=2048)]
Limit = Annotated[int, Query(ge=1, le=100)]


def _operator(caller: AdminCaller) -> str:
    return f"admin:{caller.credential.token_id}"


# --- credit codes -----------------------------------------------------------------------------------


class CreateCreditCode(StrictModel):
    code_hash: Sha256Hex = Field(description="hivemind.keys.auth_hash of the hmcc_ secret; never the secret")
    credit: int = Field(gt=0, le=MAX_AMOUNT, description="micro-USD granted per redemption")
    max_uses: int = Field(default=1, ge=1, le=1_000_000, description="redemptions in total, one per tenant")
    expires_at: UnixSeconds
    note: str | None = Field(default=None, max_length=200)


class CreditCodeView(StrictModel):
    code_id: str = Field(description="first 16 hex digits of the code hash")
    code_hash: Sha256Hex
    credit: int
    max_uses: int
    uses: int
    expires_at: UnixSeconds
    revoked: bool
    created_by: str
    created_at: UnixSeconds
    note: str | None

    @classmethod
    def of(cls, code: CreditCode) -> CreditCodeView:
        return cls(code_id=code.code_hash[:16], **code.model_dump())


class CreditCodeList(StrictModel):
    codes: list[CreditCodeView]
    cursor: str | None


@router.post("/v1/admin/credit-codes", status_code=201, summary="Register a credit code by its hash")
def create_credit_code(body: CreateCreditCode, caller: AdminCaller, services: ServicesDep) -> CreditCodeView:
    now = services.now()
    if body.expires_at <= now:
        raise InvalidInput("expires_at must be in the future")
    code = services.store.billing.create_credit_code(
        CreditCode(
            code_hash=body.code_hash,
            credit=body.credit,
            max_uses=body.max_uses,
            expires_at=body.expires_at,
            created_by=_operator(caller),
            created_at=now,
            note=body.note,
        )
    )
    services.logger.info("credit code created", code_id=code.code_hash[:16], credit=code.credit)
    return CreditCodeView.of(code)


@router.get("/v1/admin/credit-codes", summary="List credit codes")
def list_credit_codes(
    caller: AdminCaller, services: ServicesDep, cursor: Cursor = None, limit: Limit = 100
) -> CreditCodeList:
    page = services.store.billing.list_credit_codes(cursor=cursor, limit=limit)
    return CreditCodeList(codes=[CreditCodeView.of(code) for code in page.items], cursor=page.cursor)


@router.post("/v1/admin/credit-codes/{code_hash}/revoke", summary="Revoke a credit code")
def revoke_credit_code(
    code_hash: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")], caller: AdminCaller, services: ServicesDep
) -> CreditCodeView:
    code = services.store.billing.revoke_credit_code(code_hash)
    services.logger.info("credit code revoked", code_id=code_hash[:16])
    return CreditCodeView.of(code)


# --- prices -----------------------------------------------------------------------------------------


class SetPrice(StrictModel):
    provider: ProviderName
    model: ModelName
    prompt_per_million: int = Field(ge=0, le=MAX_AMOUNT, description="micro-USD per million prompt tokens")
    completion_per_million: int = Field(
        ge=0, le=MAX_AMOUNT, description="micro-USD per million completion tokens"
    )


class SetRunnerFee(StrictModel):
    per_second: int = Field(ge=0, le=MAX_AMOUNT, description="micro-USD per second of runner time")


class PriceList(StrictModel):
    prices: list[TokenPrice]
    runner_fee: RunnerFee | None = Field(description="null: not set, so no run can be held or settled")


class PriceRemoved(StrictModel):
    provider: str
    model: str
    removed: bool


@router.get("/v1/admin/prices", summary="Token prices and the runner fee")
def list_prices(caller: AdminCaller, services: ServicesDep) -> PriceList:
    prices = services.store.prices
    try:
        fee: RunnerFee | None = prices.runner_fee()
    except ServiceUnavailable as exc:
        if exc.code != "price_missing":
            raise
        fee = None
    return PriceList(prices=prices.list_prices(), runner_fee=fee)


@router.put("/v1/admin/prices", summary="Set the price of one provider model")
def set_price(body: SetPrice, caller: AdminCaller, services: ServicesDep) -> TokenPrice:
    price = services.store.prices.set_price(
        body.provider,
        body.model,
        prompt_per_million=body.prompt_per_million,
        completion_per_million=body.completion_per_million,
        updated_by=_operator(caller),
    )
    services.logger.info("price set", provider=body.provider, model=body.model)
    return price


@router.delete("/v1/admin/prices", summary="Remove the price of one provider model")
def remove_price(
    caller: AdminCaller,
    services: ServicesDep,
    provider: Annotated[str, Query(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")],
    model: Annotated[str, Query(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")],
) -> PriceRemoved:
    if not services.store.prices.remove_price(provider, model):
        raise NotFound(f"no price for {provider}/{model}", code="price_not_found")
    services.logger.info("price removed", provider=provider, model=model)
    return PriceRemoved(provider=provider, model=model, removed=True)


@router.put("/v1/admin/prices/runner-fee", summary="Set the runner fee (micro-USD per second)")
def set_runner_fee(body: SetRunnerFee, caller: AdminCaller, services: ServicesDep) -> RunnerFee:
    fee = services.store.prices.set_runner_fee(body.per_second, updated_by=_operator(caller))
    services.logger.info("runner fee set", per_second=body.per_second)
    return fee


# --- tenants ----------------------------------------------------------------------------------------


class CreateTenant(StrictModel):
    auth_hash: Sha256Hex = Field(description="hivemind.keys.auth_hash of the tenant's hmk_ secret")
    name: str = Field(min_length=1, max_length=200)
    owner_sign_pub: Ed25519PublicB64
    owner_box_pub: X25519PublicB64


class ResetKey(StrictModel):
    """A new key for a tenant that lost its secret. Its public keys change with it: rooms signed and
    wrapped under the lost key stay unreadable (nothing on the server can open them)."""

    auth_hash: Sha256Hex
    owner_sign_pub: Ed25519PublicB64
    owner_box_pub: X25519PublicB64


class AdminTenantView(StrictModel):
    tenant_id: str
    name: str
    status: TenantStatus
    owner_sign_pub: str
    owner_box_pub: str
    created_at: UnixSeconds
    updated_at: UnixSeconds

    @classmethod
    def of(cls, tenant: TenantRecord) -> AdminTenantView:
        return cls(**tenant.model_dump())


class TenantList(StrictModel):
    tenants: list[AdminTenantView]
    cursor: str | None


class KeyReset(StrictModel):
    tenant: AdminTenantView
    token_id: str = Field(description="public id of the new key")


@router.get("/v1/admin/tenants", summary="List tenants")
def list_tenants(
    caller: AdminCaller, services: ServicesDep, cursor: Cursor = None, limit: Limit = 50
) -> TenantList:
    page = services.store.tenants.list_all(cursor=cursor, limit=limit)
    return TenantList(tenants=[AdminTenantView.of(tenant) for tenant in page.items], cursor=page.cursor)


@router.post("/v1/admin/tenants", status_code=201, summary="Create a tenant for a key hash")
def create_tenant(body: CreateTenant, caller: AdminCaller, services: ServicesDep) -> AdminTenantView:
    tenant = register_tenant(
        services.store,
        auth_hash=body.auth_hash,
        name=body.name,
        owner_sign_pub=body.owner_sign_pub,
        owner_box_pub=body.owner_box_pub,
    )
    services.logger.info("tenant created by admin", tenant_id=tenant.tenant_id, operator=_operator(caller))
    return AdminTenantView.of(tenant)


def _set_status(
    services: ServicesDep, tenant_id: str, status: TenantStatus, caller: AdminCaller
) -> AdminTenantView:
    tenant = services.store.tenants.set_status(tenant_id, status)
    services.logger.info(
        "tenant status set", tenant_id=tenant_id, status=status.value, operator=_operator(caller)
    )
    return AdminTenantView.of(tenant)


@router.post("/v1/admin/tenants/{tenant_id}/suspend", summary="Suspend a tenant (its keys stop working)")
def suspend_tenant(tenant_id: TenantIdPath, caller: AdminCaller, services: ServicesDep) -> AdminTenantView:
    return _set_status(services, tenant_id, TenantStatus.SUSPENDED, caller)


@router.post("/v1/admin/tenants/{tenant_id}/reactivate", summary="Reactivate a suspended tenant")
def reactivate_tenant(tenant_id: TenantIdPath, caller: AdminCaller, services: ServicesDep) -> AdminTenantView:
    return _set_status(services, tenant_id, TenantStatus.ACTIVE, caller)


def _tenant_keys(services: ServicesDep, tenant_id: str) -> list[CredentialRecord]:
    keys: list[CredentialRecord] = []
    cursor: str | None = None
    while True:
        page = services.store.credentials.list_by_tenant(tenant_id, cursor=cursor, limit=100)
        keys += [
            record for record in page.items if record.kind is CredentialKind.TENANT and not record.revoked
        ]
        if page.cursor is None:
            return keys
        cursor = page.cursor


@router.post("/v1/admin/tenants/{tenant_id}/reset-key", summary="Swap a tenant's key for a new one")
def reset_tenant_key(
    tenant_id: TenantIdPath, body: ResetKey, caller: AdminCaller, services: ServicesDep
) -> KeyReset:
    store = services.store
    store.tenants.require(tenant_id)
    current = _tenant_keys(services, tenant_id)
    if any(record.auth_hash == body.auth_hash for record in current):
        # A retried reset: the new key is already the tenant's.
        new_record = next(record for record in current if record.auth_hash == body.auth_hash)
    elif store.credentials.get(body.auth_hash) is not None:
        raise Conflict("this key is already registered", code="key_already_registered")
    elif current:
        new_record = store.credentials.rotate(current[0].auth_hash, body.auth_hash)
        for stale in current[1:]:
            store.credentials.revoke(stale.auth_hash)
    else:
        new_record = store.credentials.put(
            CredentialRecord(
                auth_hash=body.auth_hash,
                kind=CredentialKind.TENANT,
                token_id=body.auth_hash[:16],
                tenant_id=tenant_id,
                created_at=services.now(),
            )
        )
    tenant = store.tenants.set_public_keys(
        tenant_id, owner_sign_pub=body.owner_sign_pub, owner_box_pub=body.owner_box_pub
    )
    services.logger.info("tenant key reset", tenant_id=tenant_id, operator=_operator(caller))
    return KeyReset(tenant=AdminTenantView.of(tenant), token_id=new_record.token_id)


# --- billing ----------------------------------------------------------------------------------------


class AccountList(StrictModel):
    accounts: list[AccountView]
    cursor: str | None


class LedgerPage(StrictModel):
    entries: list[LedgerEntry]
    cursor: str | None


class Grant(StrictModel):
    tenant_id: str = Field(pattern=r"^[a-z][a-z0-9]*_[a-z0-9]{1,64}$", max_length=80)
    amount: int = Field(gt=0, le=MAX_AMOUNT, description="micro-USD to add")
    note: LedgerRef = Field(default="grant", description="recorded as the entry's ref")
    idempotency_key: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.:-]{1,128}$", description="a retry with the same key grants once"
    )


class Granted(StrictModel):
    entry: LedgerEntry
    account: AccountView


@router.get("/v1/admin/billing/accounts", summary="Every tenant's account")
def list_accounts(
    caller: AdminCaller, services: ServicesDep, cursor: Cursor = None, limit: Limit = 100
) -> AccountList:
    page = services.store.billing.list_accounts(cursor=cursor, limit=limit)
    return AccountList(accounts=[AccountView.of(account) for account in page.items], cursor=page.cursor)


@router.get(
    "/v1/admin/billing/ledger",
    summary="Ledger entries of one tenant (paged) or of one UTC day, as JSON or CSV",
    response_model=LedgerPage,
    responses={
        200: {
            "content": {"text/csv": {}},
            "description": f"JSON page, or CSV with the cursor in the {CURSOR_HEADER} header",
        }
    },
)
def get_ledger(
    *,
    caller: AdminCaller,
    services: ServicesDep,
    tenant: Annotated[str | None, Query(pattern=r"^[a-z][a-z0-9]*_[a-z0-9]{1,64}$", max_length=80)] = None,
    day: Annotated[
        date | None, Query(description="UTC day (YYYY-MM-DD) when no tenant is given; default today")
    ] = None,
    format: Annotated[LedgerFormat, Query()] = "json",
    cursor: Cursor = None,
    limit: Limit = 100,
) -> Any:
    billing = services.store.billing
    if tenant is not None:
        if day is not None:
            raise InvalidInput("pass either tenant or day, not both")
        page = billing.list_ledger(tenant, cursor=cursor, limit=limit)
        entries, next_cursor = page.items, page.cursor
    else:
        if cursor is not None:
            raise InvalidInput("a day's ledger is not paged; cursors belong to one tenant's ledger")
        chosen = day or datetime.fromtimestamp(services.now(), tz=UTC).date()
        entries = billing.day_entries(chosen)
        if len(entries) > MAX_DAY_ENTRIES:
            raise PayloadTooLarge(
                f"{chosen} has {len(entries)} entries; read the daily export exports/ledger/{chosen}.csv "
                "or page one tenant at a time"
            )
        next_cursor = None
    if format == "csv":
        headers = {CURSOR_HEADER: next_cursor} if next_cursor else {}
        return Response(content=entries_csv(entries), media_type="text/csv; charset=utf-8", headers=headers)
    return LedgerPage(entries=entries, cursor=next_cursor)


@router.get(
    "/v1/admin/billing/verify",
    summary="Recompute every ledger chain and balance",
    responses={409: {"description": "ledger_invalid: details hold the full report"}},
)
def verify_ledger(
    caller: AdminCaller, services: ServicesDep, cursor: Cursor = None, limit: Limit = 100
) -> VerificationReport:
    report: VerificationReport = verify_accounts(services.store, cursor=cursor, limit=limit)
    if report.ok:
        return report
    failed = [line.tenant_id for line in report.tenants if not line.ok]
    services.logger.error("ledger verification failed", failed_tenants=failed)
    raise LedgerError(
        f"{report.tenants_failed} of {report.tenants_checked} tenant ledgers do not verify: "
        + ", ".join(failed),
        details=report.model_dump(mode="json"),
    )


@router.post("/v1/admin/billing/grant", summary="Grant credit to a tenant")
def grant_credit(body: Grant, caller: AdminCaller, services: ServicesDep) -> Granted:
    store = services.store
    store.tenants.require(body.tenant_id)
    entry = store.billing.grant(
        body.tenant_id, body.amount, ref=body.note, idempotency_key=body.idempotency_key
    )
    services.logger.info(
        "credit granted",
        tenant_id=body.tenant_id,
        amount=body.amount,
        seq=entry.seq,
        operator=_operator(caller),
    )
    return Granted(entry=entry, account=AccountView.of(store.billing.account(body.tenant_id)))
