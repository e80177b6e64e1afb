"""Operator routes: only admin keys; credit codes, prices, tenants (create, suspend, reset-key), and the
finance view (accounts, ledger as JSON and CSV, verification of every chain, grants)."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest

from hivemind.encoding import b64encode
from hivemind.errors import Conflict
from hivemind.keys import auth_hash, auth_token, owner_box_key, owner_sign_key, public_bytes
from hivemind.store import Store
from hivemind.store.base import Table
from hivemind.store.schema import TableRole
from hivemind.tokens import Secret, TokenKind
from hivemind_functions.bootstrap_admin import create_admin
from hivemind_functions.bootstrap_admin import main as bootstrap_main
from hivemind_functions.services.tenants import register_tenant

ADMIN_ROUTES = [
    ("GET", "/v1/admin/credit-codes"),
    ("POST", "/v1/admin/credit-codes"),
    ("POST", f"/v1/admin/credit-codes/{'0' * 64}/revoke"),
    ("GET", "/v1/admin/prices"),
    ("PUT", "/v1/admin/prices"),
    ("DELETE", "/v1/admin/prices?provider=openai&model=gpt-x"),
    ("PUT", "/v1/admin/prices/runner-fee"),
    ("GET", "/v1/admin/tenants"),
    ("POST", "/v1/admin/tenants"),
    ("POST", "/v1/admin/tenants/tenant_x/suspend"),
    ("POST", "/v1/admin/tenants/tenant_x/reactivate"),
    ("POST", "/v1/admin/tenants/tenant_x/reset-key"),
    ("GET", "/v1/admin/billing/accounts"),
    ("GET", "/v1/admin/billing/ledger"),
    ("GET", "/v1/admin/billing/verify"),
    ("POST", "/v1/admin/billing/grant"),
]


def key_body(secret: Secret, **extra: Any) -> dict[str, Any]:
    return {
        "auth_hash": auth_hash(secret),
        "owner_sign_pub": b64encode(public_bytes(owner_sign_key(secret))),
        "owner_box_pub": b64encode(public_bytes(owner_box_key(secret))),
        **extra,
    }


def test_tenant_and_invite_keys_get_403_on_every_admin_route(lambda_api, hm) -> None:
    alice = hm.tenant("alice")
    invite = hm.invite(hm.room(alice))
    for method, path in ADMIN_ROUTES:
        target, _, query = path.partition("?")
        params = dict(part.split("=") for part in query.split("&")) if query else None
        for token in (alice.token, invite.token):
            kwargs: dict[str, Any] = {"token": token, "params": params}
            if method in ("POST", "PUT"):
                kwargs["json"] = {}
            response = lambda_api.request(method, target, **kwargs)
            assert (response.status, response.error) == (403, "admin_key_required"), (method, path)


def test_prices_and_the_runner_fee(api, hm) -> None:
    admin = hm.admin()
    assert api.get("/v1/admin/prices", token=admin.token).ok() == {"prices": [], "runner_fee": None}

    price = {
        "provider": "openai",
        "model": "gpt-4o/2024",
        "prompt_per_million": 2_500_000,
        "completion_per_million": 10_000_000,
    }
    stored = api.put("/v1/admin/prices", token=admin.token, json=price).ok()
    assert stored["updated_by"].startswith("admin:")
    api.put("/v1/admin/prices/runner-fee", token=admin.token, json={"per_second": 25}).ok()

    listed = api.get("/v1/admin/prices", token=admin.token).ok()
    assert [(p["provider"], p["model"], p["completion_per_million"]) for p in listed["prices"]] == [
        ("openai", "gpt-4o/2024", 10_000_000)
    ]
    assert listed["runner_fee"]["per_second"] == 25
    params = {"provider": "openai", "model": "gpt-4o/2024"}
    assert api.delete("/v1/admin/prices", token=admin.token, params=params).ok()["removed"] is True
    again = api.delete("/v1/admin/prices", token=admin.token, params=params)
    assert (again.status, again.error) == (404, "price_not_found")
    bad = api.put("/v1/admin/prices", token=admin.token, json={**price, "prompt_per_million": -1})
    assert bad.error == "invalid_input"


def test_credit_codes_are_created_from_a_hash_listed_and_revoked(api, hm, store: Store) -> None:
    admin = hm.admin()
    secret = Secret.generate(TokenKind.CREDIT_CODE)
    body = {"code_hash": auth_hash(secret), "credit": 1_000, "max_uses": 3, "expires_at": store.clock() + 60}

    created = api.post("/v1/admin/credit-codes", token=admin.token, json=body).ok(201)

    assert (created["code_id"], created["uses"], created["revoked"]) == (auth_hash(secret)[:16], 0, False)
    listed = api.get("/v1/admin/credit-codes", token=admin.token).ok()["codes"]
    assert [code["code_hash"] for code in listed] == [auth_hash(secret)]
    assert api.post(f"/v1/admin/credit-codes/{auth_hash(secret)}/revoke", token=admin.token).ok()["revoked"]
    past = api.post(
        "/v1/admin/credit-codes", token=admin.token, json={**body, "code_hash": "a" * 64, "expires_at": 1}
    )
    assert past.error == "invalid_input"
    duplicate = api.post("/v1/admin/credit-codes", token=admin.token, json={**body, "credit": 2_000})
    assert duplicate.status == 409
    unknown = api.post(f"/v1/admin/credit-codes/{'b' * 64}/revoke", token=admin.token)
    assert (unknown.status, unknown.error) == (404, "credit_code_unknown")


def test_tenant_lifecycle_create_suspend_reactivate_reset_key(api, hm, store: Store) -> None:
    admin = hm.admin()
    secret = Secret.generate(TokenKind.TENANT)

    created = api.post("/v1/admin/tenants", token=admin.token, json=key_body(secret, name="Acme")).ok(201)
    tenant_id = created["tenant_id"]
    assert api.get("/v1/whoami", token=auth_token(secret)).ok()["tenant_id"] == tenant_id
    assert tenant_id in [
        tenant["tenant_id"] for tenant in api.get("/v1/admin/tenants", token=admin.token).ok()["tenants"]
    ]

    assert api.post(f"/v1/admin/tenants/{tenant_id}/suspend", token=admin.token).ok()["status"] == "suspended"
    assert api.get("/v1/whoami", token=auth_token(secret)).error == "tenant_suspended"
    api.post(f"/v1/admin/tenants/{tenant_id}/reactivate", token=admin.token).ok()
    api.get("/v1/whoami", token=auth_token(secret)).ok()

    # The tenant lost its secret: the operator swaps in the hash of a new one.
    new_secret = Secret.generate(TokenKind.TENANT)
    reset = api.post(
        f"/v1/admin/tenants/{tenant_id}/reset-key", token=admin.token, json=key_body(new_secret)
    ).ok()
    assert reset["token_id"] == auth_hash(new_secret)[:16]
    assert reset["tenant"]["owner_sign_pub"] == b64encode(public_bytes(owner_sign_key(new_secret)))
    assert api.get("/v1/whoami", token=auth_token(secret)).error == "credential_unknown"
    assert api.get("/v1/whoami", token=auth_token(new_secret)).ok()["tenant_id"] == tenant_id
    retried = api.post(
        f"/v1/admin/tenants/{tenant_id}/reset-key", token=admin.token, json=key_body(new_secret)
    ).ok()
    assert retried["token_id"] == reset["token_id"]

    someone = hm.tenant("someone")
    taken = api.post(
        f"/v1/admin/tenants/{tenant_id}/reset-key", token=admin.token, json=key_body(someone.secret)
    )
    assert (taken.status, taken.error) == (409, "key_already_registered")
    missing = api.post("/v1/admin/tenants/tenant_nobody/suspend", token=admin.token)
    assert missing.status == 404


def test_accounts_ledger_json_and_csv(api, hm, store: Store) -> None:
    admin = hm.admin()
    alice, bob = hm.tenant("alice"), hm.tenant("bob")
    for amount in (1, 2, 3):
        store.billing.grant(alice.tenant_id, amount)
    store.billing.adjust(bob.tenant_id, 7, note="-7 refund @finance")

    accounts = api.get("/v1/admin/billing/accounts", token=admin.token).ok()["accounts"]
    assert sorted((account["tenant_id"], account["balance"]) for account in accounts) == sorted(
        [(alice.tenant_id, 6), (bob.tenant_id, 7)]
    )

    first = api.get(
        "/v1/admin/billing/ledger", token=admin.token, params={"tenant": alice.tenant_id, "limit": 2}
    ).ok()
    assert [entry["seq"] for entry in first["entries"]] == [1, 2]
    rest = api.get(
        "/v1/admin/billing/ledger",
        token=admin.token,
        params={"tenant": alice.tenant_id, "limit": 2, "cursor": first["cursor"]},
    ).ok()
    assert [entry["seq"] for entry in rest["entries"]] == [3]

    as_csv = api.get(
        "/v1/admin/billing/ledger", token=admin.token, params={"tenant": bob.tenant_id, "format": "csv"}
    )
    assert as_csv.status == 200 and as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.body.decode())))
    assert [(row["kind"], row["amount"], row["ref"]) for row in rows] == [
        ("adjustment", "7", "'-7 refund @finance")
    ]

    today = api.get("/v1/admin/billing/ledger", token=admin.token).ok()
    assert len(today["entries"]) == 4 and today["cursor"] is None
    both = api.get(
        "/v1/admin/billing/ledger", token=admin.token, params={"tenant": alice.tenant_id, "day": "2026-01-01"}
    )
    assert both.error == "invalid_input"


def test_verify_reports_every_chain_and_names_a_tampered_one(api, hm, store: Store) -> None:
    admin = hm.admin()
    alice, bob = hm.tenant("alice"), hm.tenant("bob")
    store.billing.grant(alice.tenant_id, 100)
    store.billing.hold(alice.tenant_id, "run_one", 40, enforce=True)
    store.billing.settle("run_one", 30)
    store.billing.grant(bob.tenant_id, 5)

    report = api.get("/v1/admin/billing/verify", token=admin.token).ok()
    assert (report["ok"], report["tenants_checked"], report["entries_checked"]) == (True, 2, 5)

    # Someone with table access edits an amount: the chain no longer verifies.
    Table(store.clients, TableRole.LEDGER).update(
        {"tenant_id": alice.tenant_id, "seq": 1}, update="SET amount = :amount", values={":amount": 1_000_000}
    )
    failed = api.get("/v1/admin/billing/verify", token=admin.token)

    assert (failed.status, failed.error) == (409, "ledger_invalid")
    details = failed.json()["details"]
    assert (details["ok"], details["tenants_failed"]) == (False, 1)
    broken = next(line for line in details["tenants"] if not line["ok"])
    assert (broken["tenant_id"], broken["seq"], broken["error"]) == (alice.tenant_id, 1, "ledger_invalid")
    assert next(line for line in details["tenants"] if line["tenant_id"] == bob.tenant_id)["ok"] is True


def test_grants_are_idempotent_with_a_key(api, hm, store: Store) -> None:
    admin = hm.admin()
    alice = hm.tenant("alice")
    body = {
        "tenant_id": alice.tenant_id,
        "amount": 2_500,
        "note": "pilot credit",
        "idempotency_key": "pilot-2026",
    }

    first = api.post("/v1/admin/billing/grant", token=admin.token, json=body).ok()
    second = api.post("/v1/admin/billing/grant", token=admin.token, json=body).ok()

    assert first["entry"] == second["entry"]
    assert second["account"]["balance"] == 2_500
    unknown = api.post(
        "/v1/admin/billing/grant", token=admin.token, json={**body, "tenant_id": "tenant_nobody"}
    )
    assert unknown.status == 404
    negative = api.post("/v1/admin/billing/grant", token=admin.token, json={**body, "amount": -5})
    assert negative.error == "invalid_input"


def test_bootstrap_admin_creates_a_working_admin_key(
    lambda_api, store: Store, store_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    secret = Secret.generate(TokenKind.ADMIN)

    assert bootstrap_main(["--auth-hash", auth_hash(secret), "--label", "first operator"]) == 0

    assert auth_hash(secret)[:16] in capsys.readouterr().out
    assert lambda_api.get("/v1/admin/tenants", token=auth_token(secret)).status == 200
    assert create_admin(store, auth_hash(secret)).token_id == auth_hash(secret)[:16]  # idempotent
    tenant_secret = Secret.generate(TokenKind.TENANT)
    register_tenant(
        store,
        auth_hash=auth_hash(tenant_secret),
        name="t",
        owner_sign_pub=b64encode(public_bytes(owner_sign_key(tenant_secret))),
        owner_box_pub=b64encode(public_bytes(owner_box_key(tenant_secret))),
    )
    with pytest.raises(Conflict) as taken:
        create_admin(store, auth_hash(tenant_secret))
    assert taken.value.code == "key_already_registered"
