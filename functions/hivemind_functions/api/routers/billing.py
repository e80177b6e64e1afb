"""A tenant's own billing (DESIGN §11): its account with recent ledger entries, and credit-code redemption.

Amounts are integer micro-USD. A credit code is redeemed by its *auth token*, like a bearer key: the
client derives ``hmcc_<base32(HKDF(secret, "auth"))>`` from the ``hmcc_`` secret it was given, and the
server looks up ``sha256`` of that; the secret itself never reaches the control plane.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import Field

from hivemind.errors import InvalidInput, Unauthenticated
from hivemind.keys import auth_hash_from_bearer
from hivemind.ledger import LedgerEntry
from hivemind.models import StrictModel
from hivemind.tokens import TokenKind
from hivemind_functions.api.deps import ServicesDep, TenantCaller
from hivemind_functions.services.billing import AccountView, recent_entries

router = APIRouter(tags=["billing"])


class BillingOverview(StrictModel):
    account: AccountView
    entries: list[LedgerEntry] = Field(description="the most recent ledger entries, newest first")
    credits_enforced: bool = Field(description="whether runs need available credit for their hold")


class RedeemRequest(StrictModel):
    code: str = Field(
        min_length=8,
        max_length=120,
        description="the credit code's auth token hmcc_<base32(HKDF(secret, 'auth'))>, not the secret",
    )


class Redemption(StrictModel):
    entry: LedgerEntry
    account: AccountView


@router.get("/v1/billing", summary="The caller's account and recent ledger entries")
def get_billing(
    caller: TenantCaller,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BillingOverview:
    tenant_id = caller.require_tenant_id()
    store = services.store
    return BillingOverview(
        account=AccountView.of(store.billing.account(tenant_id)),
        entries=recent_entries(store, tenant_id, limit=limit),
        credits_enforced=services.settings.billing_enforce_credits,
    )


@router.post("/v1/billing/credit-codes/redeem", summary="Redeem a credit code (once per tenant)")
def redeem_credit_code(body: RedeemRequest, caller: TenantCaller, services: ServicesDep) -> Redemption:
    tenant_id = caller.require_tenant_id()
    try:
        kind, code_hash = auth_hash_from_bearer(body.code)
    except Unauthenticated:
        raise InvalidInput("code is not an hmcc_ token", code="credit_code_malformed") from None
    if kind is not TokenKind.CREDIT_CODE:
        raise InvalidInput(f"code must be an hmcc_ token, not {kind.value}_", code="credit_code_malformed")
    store = services.store
    entry = store.billing.redeem_credit_code(tenant_id, code_hash)
    services.logger.info("credit code redeemed", code_id=code_hash[:16], amount=entry.amount)
    return Redemption(entry=entry, account=AccountView.of(store.billing.account(tenant_id)))
