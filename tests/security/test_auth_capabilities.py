"""Authentication and capabilities through the API: wrong, expired, revoked and derived invites, an
invite used on another room, owner-only routes with invite keys, admin routes with tenant and invite keys,
tenant routes with admin keys, and who sees which runs and outputs (a run is submitted through the API and
executed by the runner's real lifecycle with a fake pipeline)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from runner_scenarios import make_test_runner
from security_support import deployment_snapshot, snapshot_difference
from support.runner_harness import FakePipeline, HarnessRunner

from hivemind.envelope import HpkeSuite, RunEnvelope, seal_run_envelope
from hivemind.keys import auth_token, public_bytes, wrap_key
from hivemind.store.runners import RunnerRecord
from hivemind.tokens import Secret, TokenKind

pytestmark = pytest.mark.moto_server


def _status(response: Any) -> tuple[int, str | None]:
    return response.status, response.error


def test_unknown_expired_and_revoked_keys_are_401_with_their_codes(hm_lambda: Any, clock: Any) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    room = hm.room(alice)
    expiring = hm.invite(room, expires_at=clock() + 60)
    revoked = hm.invite(room)
    hm.api.delete(f"/v1/rooms/{room.room_id}/invites/{revoked.invite_id}", token=alice.token).ok()
    unknown = auth_token(Secret.generate(TokenKind.INVITE))
    path = f"/v1/rooms/{room.room_id}"
    assert _status(hm.api.get(path, token=unknown)) == (401, "credential_unknown")
    assert _status(hm.api.get(path, token=revoked.token)) == (401, "credential_revoked")
    assert hm.api.get(path, token=expiring.token).status == 200
    clock.advance(120)
    assert _status(hm.api.get(path, token=expiring.token)) == (401, "credential_expired")
    # The raw secret is not a bearer token: only its derived auth token is.
    assert _status(hm.api.get(path, token=revoked.secret.token())) == (401, "credential_unknown")
    assert _status(hm.api.get(path, token="hmq_" + "a" * 10)) == (401, "credential_malformed")


def test_an_invite_of_one_room_does_not_exist_for_another(hm_lambda: Any) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    room, other = hm.room(alice), hm.room(alice)
    invite = hm.invite(room)
    for method, suffix in (("GET", ""), ("GET", "/attest"), ("GET", "/key"), ("POST", "/invites")):
        kwargs: dict[str, Any] = {"token": invite.token}
        if method == "POST":
            kwargs["json"] = hm.invite_body(hm.invite_key(other), other.dek)
        response = hm.api.request(method, f"/v1/rooms/{other.room_id}{suffix}", **kwargs)
        assert _status(response) == (404, "room_not_found"), (suffix, response.body[:200])


def test_a_derived_invite_cannot_widen_its_expiry_or_outlive_its_parent(hm_lambda: Any, clock: Any) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    room = hm.room(alice)
    parent = hm.invite(room, uses=2, expires_at=clock() + 3600)
    child_key = hm.invite_key(room, parent=parent)
    later = hm.invite_body(child_key, room.dek, expires_at=clock() + 7200)
    refused = hm.api.post(f"/v1/rooms/{room.room_id}/invites", token=parent.token, json=later)
    assert _status(refused) == (403, "invite_widens")
    child = hm.invite(room, by=parent)
    assert hm.api.get("/v1/whoami", token=child.token).ok()["expires_at"] <= clock() + 3600
    clock.advance(3601)
    assert _status(hm.api.get(f"/v1/rooms/{room.room_id}", token=child.token)) == (401, "credential_expired")


OWNER_ONLY = [
    ("GET", "/invites"),
    ("GET", "/data"),
    ("POST", "/data"),
    ("GET", "/audit"),
    ("POST", "/trust"),
    ("DELETE", ""),
]


def test_owner_only_routes_refuse_invite_keys_and_change_nothing(hm_lambda: Any) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    room = hm.room(alice)
    invite = hm.invite(room)
    before = deployment_snapshot(hm.store)
    for method, suffix in OWNER_ONLY:
        kwargs: dict[str, Any] = {"token": invite.token}
        if method == "POST":
            kwargs["json"] = {}
        response = hm.api.request(method, f"/v1/rooms/{room.room_id}{suffix}", **kwargs)
        assert response.status == 403, (method, suffix, response.body[:200])
        assert response.error in {"owner_only", "tenant_key_required"}, (method, suffix, response.error)
    assert snapshot_difference(before, deployment_snapshot(hm.store)) == {}


ADMIN_ROUTES = [
    ("GET", "/v1/admin/tenants"),
    ("POST", "/v1/admin/credit-codes"),
    ("PUT", "/v1/admin/prices/runner-fee"),
    ("POST", "/v1/admin/billing/grant"),
    ("GET", "/v1/admin/billing/verify"),
]


def test_admin_routes_refuse_tenant_and_invite_keys_and_tenant_routes_refuse_admin_keys(
    hm_lambda: Any,
) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    invite = hm.invite(hm.room(alice))
    admin = hm.admin()
    before = deployment_snapshot(hm.store)
    for token in (alice.token, invite.token):
        for method, path in ADMIN_ROUTES:
            response = hm.api.request(
                method, path, token=token, json={"tenant_id": alice.tenant_id, "amount": 10**9}
            )
            assert _status(response) == (403, "admin_key_required"), (method, path)
    for method, path in (("GET", "/v1/billing"), ("GET", "/v1/rooms"), ("POST", "/v1/room-agents")):
        response = hm.api.request(method, path, token=admin.token, json={})
        assert response.status == 403, (method, path, response.body[:200])
    assert snapshot_difference(before, deployment_snapshot(hm.store)) == {}


# --- runs and outputs across callers ------------------------------------------------------------


def _live(hm: Any, runner: HarnessRunner) -> None:
    now = hm.store.clock()
    hm.store.runners.publish(
        RunnerRecord(
            runner_id=runner.runner_id,
            tee=runner.document.tee,
            compose_hash=runner.document.compose_hash,
            version=runner.document.version,
            attestation=runner.document.model_dump(mode="json"),
            started_at=now,
            heartbeat_at=now,
        )
    )


def _ask(hm: Any, room: Any, bearer: Any, runner: HarnessRunner) -> str:
    envelope = RunEnvelope.create(
        room_id=room.room_id,
        manifest_hash=room.manifest_hash,
        bearer_id=bearer.bearer_id,
        wrap_key=wrap_key(bearer.secret, room.room_id),
        prompt="how many rows?",
        reply_pub=public_bytes(X25519PrivateKey.generate()),
        budgets=room.manifest.budgets.defaults,
        now=hm.store.clock(),
    )
    sealed = seal_run_envelope(runner.keys.hpke_public_keys, envelope, suite=HpkeSuite.X25519)
    body = {
        "envelope": sealed.model_dump(mode="json"),
        "runner_id": runner.runner_id,
        "prompt_sha256": envelope.prompt_sha256(),
        "idempotency_key": uuid.uuid4().hex,
    }
    created = hm.api.post(f"/v1/rooms/{room.room_id}/runs", token=bearer.token, json=body).ok(201)
    runner.lifecycle.execute(created["run_id"], receive_count=1)
    return created["run_id"]


def test_runs_and_outputs_are_visible_only_to_who_may_see_them(hm_lambda: Any, tmp_path: Any) -> None:
    hm = hm_lambda
    store = hm.store
    store.prices.set_runner_fee(1, updated_by="test")
    alice, mallory = hm.tenant("alice"), hm.tenant("mallory")
    store.billing.grant(alice.tenant_id, 10_000_000)
    runner = make_test_runner(store, tmp_path, FakePipeline(store=store))
    _live(hm, runner)
    room = hm.room(alice)
    ann, bob = hm.invite(room), hm.invite(room)
    ann_run = _ask(hm, room, ann, runner)
    assert store.runs.require(ann_run).status.value == "completed"

    run_path, output_path = f"/v1/runs/{ann_run}", f"/v1/runs/{ann_run}/output"
    assert hm.api.get(run_path, token=ann.token).status == 200
    assert hm.api.get(output_path, token=ann.token).status == 200
    assert hm.api.get(run_path, token=alice.token).status == 200  # the owner sees metadata
    owner_output = hm.api.get(output_path, token=alice.token)
    assert owner_output.status in (403, 404) and owner_output.error == "output_not_visible"
    for stranger in (bob, mallory):
        for path in (run_path, output_path):
            assert _status(hm.api.get(path, token=stranger.token)) == (404, "run_not_found"), path
    listed = {run["run_id"] for run in hm.api.get("/v1/runs", token=bob.token).ok()["runs"]}
    assert ann_run not in listed
