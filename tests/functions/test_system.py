"""System routes and authentication: healthz, whoami, the attestation relay, signup, every 401/403."""

from __future__ import annotations

import pytest

from hivemind.encoding import b64encode
from hivemind.keys import auth_hash, auth_token, owner_box_key, owner_sign_key, public_bytes
from hivemind.store.runners import RunnerRecord, RunnerStatus
from hivemind.store.tenants import TenantStatus
from hivemind.tokens import Secret, TokenKind
from hivemind_functions import __version__
from hivemind_functions.settings import FunctionSettings


def test_healthz_needs_no_key(api) -> None:
    body = api.get("/v1/healthz").ok()
    assert body == {"status": "ok", "version": __version__}


def test_whoami_for_a_tenant(api, hm) -> None:
    alice = hm.tenant("Alice Ünïcødé 🐝")
    body = api.get("/v1/whoami", token=alice.token).ok()
    assert body["kind"] == "tenant"
    assert body["tenant_id"] == alice.tenant_id == body["bearer_id"]
    assert body["tenant_name"] == "Alice Ünïcødé 🐝"
    assert (body["owner_sign_pub"], body["owner_box_pub"]) == (alice.sign_pub, alice.box_pub)
    assert body["token_id"] == alice.auth_hash[:16]
    assert body["room_id"] is None and body["invite_id"] is None


def test_whoami_for_an_invite_names_its_room_and_limits(api, hm, clock) -> None:
    alice = hm.tenant()
    room = hm.room(alice)
    expires = clock() + 3600
    bob = hm.invite(room, uses=3, expires_at=expires)
    body = api.get("/v1/whoami", token=bob.token).ok()
    assert body["kind"] == "invite"
    assert body["room_id"] == room.room_id
    assert body["invite_id"] == bob.invite_id == body["bearer_id"]
    assert (body["max_uses"], body["uses"], body["expires_at"]) == (3, 0, expires)
    assert body["tenant_id"] == alice.tenant_id  # the tenant that issued it
    assert body["owner_sign_pub"] is None


def test_whoami_for_an_admin(api, hm) -> None:
    admin = hm.admin()
    body = api.get("/v1/whoami", token=admin.token).ok()
    assert body["kind"] == "admin"
    assert body["tenant_id"] is None


# --- authentication refusals ----------------------------------------------------------------------


def test_missing_credentials(api) -> None:
    response = api.get("/v1/whoami")
    assert (response.status, response.error) == (401, "credentials_missing")


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic dXNlcjpwYXNz",
        "Bearer hmk_not-base32",
        "Bearer hmk_" + "a" * 10,
        "Bearer xyz_" + "a" * 52,
        "Bearer hmk_" + "A" * 52,
    ],
)
def test_malformed_credentials(lambda_api, authorization: str) -> None:
    response = lambda_api.get("/v1/whoami", headers={"authorization": authorization})
    assert (response.status, response.error) == (401, "credential_malformed")


def test_a_credit_code_is_not_a_credential(lambda_api) -> None:
    code = auth_token(Secret.generate(TokenKind.CREDIT_CODE))
    response = lambda_api.get("/v1/whoami", token=code)
    assert (response.status, response.error) == (401, "credential_malformed")


def test_unknown_key(api) -> None:
    response = api.get("/v1/whoami", token=auth_token(Secret.generate(TokenKind.TENANT)))
    assert (response.status, response.error) == (401, "credential_unknown")


def test_a_key_registered_as_another_kind_is_unknown(lambda_api, hm) -> None:
    # The same 32 bytes under another prefix hash the same way; the kind must match too.
    alice = hm.tenant()
    as_invite = auth_token(Secret(TokenKind.INVITE, alice.secret.raw))
    response = lambda_api.get("/v1/whoami", token=as_invite)
    assert (response.status, response.error) == (401, "credential_unknown")


def test_revoked_and_expired_invites(lambda_api, hm, store, clock) -> None:
    room = hm.room(hm.tenant())
    revoked = hm.invite(room)
    store.credentials.revoke(revoked.auth_hash)
    response = lambda_api.get("/v1/whoami", token=revoked.token)
    assert (response.status, response.error) == (401, "credential_revoked")

    short = hm.invite(room, expires_at=clock() + 60)
    lambda_api.get("/v1/whoami", token=short.token).ok()
    clock.advance(61)
    response = lambda_api.get("/v1/whoami", token=short.token)
    assert (response.status, response.error) == (401, "credential_expired")


def test_suspended_tenant(api, hm, store) -> None:
    alice = hm.tenant()
    store.tenants.set_status(alice.tenant_id, TenantStatus.SUSPENDED)
    response = api.get("/v1/whoami", token=alice.token)
    assert (response.status, response.error) == (403, "tenant_suspended")


def test_wrong_kind_of_key_for_a_route(api, hm) -> None:
    room = hm.room(hm.tenant())
    invite = hm.invite(room)
    admin = hm.admin()
    assert api.get("/v1/room-agents", token=admin.token).error == "participant_key_required"
    assert api.post("/v1/rooms", token=invite.token, json={}).error == "tenant_key_required"
    assert api.get("/v1/rooms", token=admin.token).status == 403


# --- attestation relay ----------------------------------------------------------------------------


def test_attestation_relays_live_runners_only(api, hm, store, clock) -> None:
    live = hm.runner()
    stale = hm.runner()
    draining = hm.runner()
    store.runners.set_status(draining.runner_id, RunnerStatus.DRAINING)
    clock.advance(100)
    store.runners.heartbeat(live.runner_id)
    clock.advance(50)  # stale's last heartbeat is now 150 s old, above the 120 s default
    body = api.get("/v1/attestation").ok()
    ids = [runner["runner_id"] for runner in body["runners"]]
    assert ids == [live.runner_id]
    assert stale.runner_id not in ids
    document = body["runners"][0]["document"]
    assert document == live.document.model_dump(mode="json")


def test_attestation_leaves_out_malformed_documents(lambda_api, hm, store, clock) -> None:
    good = hm.runner()
    store.runners.publish(
        RunnerRecord(
            runner_id="runner_broken",
            tee="simulated",
            compose_hash="ab" * 32,
            version="1",
            attestation={"runner_id": "runner_broken", "tee": "simulated"},
            started_at=clock(),
            heartbeat_at=clock(),
        )
    )
    body = lambda_api.get("/v1/attestation").ok()
    assert [runner["runner_id"] for runner in body["runners"]] == [good.runner_id]


# --- signup ---------------------------------------------------------------------------------------


def _signup_body(secret: Secret, name: str = "Bob") -> dict[str, str]:
    return {
        "name": name,
        "owner_sign_pub": b64encode(public_bytes(owner_sign_key(secret))),
        "owner_box_pub": b64encode(public_bytes(owner_box_key(secret))),
    }


def test_signup_registers_the_key_and_its_public_keys(api, store) -> None:
    secret = Secret.generate(TokenKind.TENANT)
    body = api.post("/v1/signup", token=auth_token(secret), json=_signup_body(secret)).ok(201)
    assert body["token_id"] == auth_hash(secret)[:16]
    tenant = store.tenants.require(body["tenant_id"])
    assert tenant.owner_sign_pub == _signup_body(secret)["owner_sign_pub"]
    # The server stored the hash of the auth sub-key only; the new key now authenticates.
    assert store.credentials.get(auth_hash(secret)) is not None
    me = api.get("/v1/whoami", token=auth_token(secret)).ok()
    assert me["tenant_id"] == body["tenant_id"]


def test_signup_retry_returns_the_same_tenant_and_a_different_registration_conflicts(lambda_api) -> None:
    secret = Secret.generate(TokenKind.TENANT)
    first = lambda_api.post("/v1/signup", token=auth_token(secret), json=_signup_body(secret)).ok(201)
    again = lambda_api.post("/v1/signup", token=auth_token(secret), json=_signup_body(secret)).ok(201)
    assert again["tenant_id"] == first["tenant_id"]
    other = lambda_api.post("/v1/signup", token=auth_token(secret), json=_signup_body(secret, "Mallory"))
    assert (other.status, other.error) == (409, "key_already_registered")


def test_signup_refusals(lambda_api) -> None:
    secret = Secret.generate(TokenKind.TENANT)
    assert lambda_api.post("/v1/signup", json=_signup_body(secret)).error == "credentials_missing"
    invite = Secret.generate(TokenKind.INVITE)
    response = lambda_api.post("/v1/signup", token=auth_token(invite), json=_signup_body(secret))
    assert (response.status, response.error) == (400, "tenant_key_required")
    bad = {**_signup_body(secret), "owner_sign_pub": "AAAA"}
    response = lambda_api.post("/v1/signup", token=auth_token(secret), json=bad)
    assert (response.status, response.error) == (400, "invalid_input")
    assert "owner_sign_pub" in response.json()["message"]
    control = {**_signup_body(secret), "name": "Bob\u202eevil"}
    response = lambda_api.post("/v1/signup", token=auth_token(secret), json=control)
    assert response.error == "invalid_input"


class TestSignupDisabled:
    @pytest.fixture
    def function_settings(self, store) -> FunctionSettings:
        return FunctionSettings(store=store.config, self_serve_signup=False)

    def test_signup_is_refused(self, api, store) -> None:
        secret = Secret.generate(TokenKind.TENANT)
        response = api.post("/v1/signup", token=auth_token(secret), json=_signup_body(secret))
        assert (response.status, response.error) == (403, "signup_disabled")
        assert store.credentials.get(auth_hash(secret)) is None
