"""A tenant's billing: its account with recent entries, and credit-code redemption by auth token (the
``hmcc_`` secret itself never reaches the server)."""

from __future__ import annotations

from typing import Any

from hivemind.keys import auth_hash, auth_token
from hivemind.store import Store
from hivemind.tokens import Secret, TokenKind

CREDIT = 5_000_000


def new_code(api: Any, admin: Any, store: Store, *, max_uses: int = 1, ttl: int = 3600) -> Secret:
    secret = Secret.generate(TokenKind.CREDIT_CODE)
    api.post(
        "/v1/admin/credit-codes",
        token=admin.token,
        json={
            "code_hash": auth_hash(secret),
            "credit": CREDIT,
            "max_uses": max_uses,
            "expires_at": store.clock() + ttl,
            "note": "welcome",
        },
    ).ok(201)
    return secret


def test_a_tenant_sees_its_account_and_newest_entries_first(api, hm, store: Store) -> None:
    alice, bob_tenant = hm.tenant("alice"), hm.tenant("bob")
    for amount in (100, 200, 300):
        store.billing.grant(alice.tenant_id, amount)
    store.billing.hold(alice.tenant_id, "run_abc", 50, enforce=True)
    store.billing.grant(bob_tenant.tenant_id, 999)

    overview = api.get("/v1/billing", token=alice.token, params={"limit": 2}).ok()

    assert overview["account"] | {"updated_at": 0, "last_hash": ""} == {
        "tenant_id": alice.tenant_id,
        "balance": 600,
        "held": 50,
        "available": 550,
        "last_seq": 4,
        "last_hash": "",
        "updated_at": 0,
    }
    assert [(entry["seq"], entry["kind"]) for entry in overview["entries"]] == [
        (4, "usage_hold"),
        (3, "credit_grant"),
    ]
    assert overview["credits_enforced"] is True


def test_billing_is_for_tenant_keys(api, hm) -> None:
    alice = hm.tenant("alice")
    room = hm.room(alice)
    invite = hm.invite(room)
    for token in (invite.token, hm.admin().token):
        response = api.get("/v1/billing", token=token)
        assert (response.status, response.error) == (403, "tenant_key_required")
    assert api.get("/v1/billing").error == "credentials_missing"


def test_redeeming_a_credit_code(api, hm, store: Store, clock) -> None:
    admin = hm.admin()
    alice, carol, dave = hm.tenant("alice"), hm.tenant("carol"), hm.tenant("dave")
    code = new_code(api, admin, store, max_uses=2)

    def redeem(tenant: Any, text: str) -> Any:
        return api.post("/v1/billing/credit-codes/redeem", token=tenant.token, json={"code": text})

    redeemed = redeem(alice, auth_token(code)).ok()
    assert (redeemed["entry"]["kind"], redeemed["entry"]["amount"]) == ("credit_code_redeem", CREDIT)
    assert redeemed["account"]["balance"] == CREDIT
    assert redeem(alice, auth_token(code)).error == "credit_code_already_redeemed"
    redeem(carol, auth_token(code)).ok()
    exhausted = redeem(dave, auth_token(code))
    assert (exhausted.status, exhausted.error) == (403, "credit_code_exhausted")
    assert store.billing.account(dave.tenant_id).balance == 0

    # The secret itself is not what the server knows: sending it finds nothing.
    other = new_code(api, admin, store)
    assert redeem(dave, other.token()).error == "credit_code_unknown"
    malformed = redeem(dave, alice.token)
    assert (malformed.status, malformed.error) == (400, "credit_code_malformed")

    api.post(f"/v1/admin/credit-codes/{auth_hash(other)}/revoke", token=admin.token).ok()
    revoked = redeem(dave, auth_token(other))
    assert (revoked.status, revoked.error) == (410, "credit_code_revoked")

    expiring = new_code(api, admin, store, ttl=60)
    clock.advance(61)
    expired = redeem(dave, auth_token(expiring))
    assert (expired.status, expired.error) == (410, "credit_code_expired")
    assert store.billing.verify(alice.tenant_id) == 1
