"""Rooms: create, read, list, attest, trust updates, delete, audit; tampering and visibility."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hivemind.encoding import b64encode
from hivemind.keys import public_bytes, unwrap_dek, wrap_key
from hivemind.manifest import SignedManifest, manifest_hash, next_revision, rules_digest, sign_manifest
from hivemind.models import Visibility
from hivemind.store.schema import TableRole
from hivemind.tokens import random_id
from hivemind.trust import RunnerTrust, RunnerTrustMode
from hivemind_functions.settings import FunctionSettings


def _create(api, owner, signed: SignedManifest, wrap: str | None = None, dek: bytes = b"\x01" * 32):
    body = {
        "signed_manifest": signed.model_dump(mode="json"),
        "owner_wrap": wrap or owner.wrap(signed.manifest.room_id, dek),
    }
    return api.post("/v1/rooms", token=owner.token, json=body)


# --- create and read ------------------------------------------------------------------------------


def test_create_then_read_as_owner_and_invite(api, hm) -> None:
    alice = hm.tenant()
    room = hm.room(alice, name="Clinic stats 🏥")
    body = api.get(f"/v1/rooms/{room.room_id}", token=alice.token).ok()
    assert body["role"] == "owner"
    assert body["revision"] == 1 and body["status"] == "active"
    assert body["manifest_hash"] == room.manifest_hash == manifest_hash(room.manifest)
    assert SignedManifest.model_validate(body["signed_manifest"]) == room.signed

    bob = hm.invite(room)
    as_invite = api.get(f"/v1/rooms/{room.room_id}", token=bob.token).ok()
    assert as_invite["role"] == "invite"
    assert as_invite["signed_manifest"] == body["signed_manifest"]

    listing = api.get("/v1/rooms", token=alice.token).ok()
    assert [(entry["room_id"], entry["name"], entry["status"]) for entry in listing["rooms"]] == [
        (room.room_id, "Clinic stats 🏥", "active")
    ]
    assert [entry["room_id"] for entry in api.get("/v1/rooms", token=bob.token).ok()["rooms"]] == [
        room.room_id
    ]

    events = api.get(f"/v1/rooms/{room.room_id}/audit", token=alice.token).ok()
    assert [event["kind"] for event in events["events"]] == ["room_created", "invite_created"]
    assert events["chain"] == {"valid": True, "length": 2, "error": None}


def test_the_owner_wrap_opens_with_the_owner_secret(api, hm) -> None:
    alice = hm.tenant()
    room = hm.room(alice)
    wrap = api.get(f"/v1/rooms/{room.room_id}/key", token=alice.token).ok()
    assert wrap["bearer_id"] == alice.tenant_id
    dek = unwrap_dek(
        wrap_key(alice.secret, room.room_id), wrap["wrapped"], room_id=room.room_id, bearer_id=alice.tenant_id
    )
    assert dek == room.dek


def test_a_retried_create_succeeds_and_a_taken_room_id_conflicts(hm_lambda, lambda_api) -> None:
    alice = hm_lambda.tenant()
    room = hm_lambda.room(alice)
    again = _create(lambda_api, alice, room.signed, wrap=alice.wrap(room.room_id, room.dek))
    assert again.ok(201)["room_id"] == room.room_id
    other = hm_lambda.sign(
        alice, hm_lambda.manifest(alice, room_id=room.room_id, scope=room.agents["scope"], name="x")
    )
    response = _create(lambda_api, alice, other)
    assert (response.status, response.error) == (409, "room_exists")
    mallory = hm_lambda.tenant("mallory")
    theirs = hm_lambda.sign(
        mallory, hm_lambda.manifest(mallory, room_id=room.room_id, scope=hm_lambda.agent(mallory))
    )
    assert _create(lambda_api, mallory, theirs).error == "room_exists"


SEALED = Visibility.SEALED


def _variants(hm, alice) -> dict[str, tuple[Any, str]]:
    """(request body or signed manifest, expected error code) for each refusal of POST /v1/rooms."""
    scope = hm.agent(alice)
    good = hm.manifest(alice, scope=scope)
    mallory = hm.tenant("mallory")
    attacker = Ed25519PrivateKey.generate()
    unsigned = hm.sign(alice, good)
    wrong_signature = unsigned.model_copy(
        update={"signature": b64encode(attacker.sign(good.signing_bytes()))}
    )
    wrong_hash = unsigned.model_copy(update={"manifest_hash": "0" * 64})
    foreign_key = good.model_copy(update={"owner_sign_pub": b64encode(public_bytes(attacker))})
    pending = hm.agent(alice, commit=False)
    theirs = hm.agent(mallory)
    return {
        "signature by another key": (wrong_signature, "signature_invalid"),
        "manifest hash": (wrong_hash, "manifest_invalid"),
        "signed by a key that is not the tenant's": (
            sign_manifest(foreign_key, attacker),
            "signature_invalid",
        ),
        "another tenant's id": (
            hm.sign(alice, good.model_copy(update={"tenant_id": mallory.tenant_id})),
            "manifest_invalid",
        ),
        "another owner box key": (
            hm.sign(alice, good.model_copy(update={"owner_box_pub": mallory.box_pub})),
            "manifest_invalid",
        ),
        "revision 2": (hm.sign(alice, good.model_copy(update={"revision": 2})), "manifest_invalid"),
        "unknown agent": (
            hm.sign(
                alice, hm.manifest(alice, scope=scope.ref().model_copy(update={"agent_id": "agent_nope"}))
            ),
            "agent_not_found",
        ),
        "uncommitted agent": (hm.sign(alice, hm.manifest(alice, scope=pending)), "agent_not_committed"),
        "another tenant's agent": (hm.sign(alice, hm.manifest(alice, scope=theirs)), "agent_not_found"),
        "wrong digest": (
            hm.sign(alice, hm.manifest(alice, scope=scope.ref().model_copy(update={"digest": "ab" * 32}))),
            "agent_digest_mismatch",
        ),
        "wrong visibility": (
            hm.sign(alice, hm.manifest(alice, scope=scope.ref().model_copy(update={"visibility": SEALED}))),
            "agent_visibility_mismatch",
        ),
        "provider not offered": (
            hm.sign(alice, hm.manifest(alice, scope=scope, egress_providers=["openai"])),
            "provider_not_allowed",
        ),
    }


def test_create_refusals_write_nothing(hm_lambda, lambda_api, store) -> None:
    alice = hm_lambda.tenant()
    for name, (signed, code) in _variants(hm_lambda, alice).items():
        response = _create(lambda_api, alice, signed)
        assert (response.status, response.error) == (400, code), (name, response.body)
        assert store.rooms.get(signed.manifest.room_id) is None, name
    assert lambda_api.get("/v1/rooms", token=alice.token).ok()["rooms"] == []


def test_create_refuses_other_callers_and_bad_wraps(api, hm) -> None:
    alice = hm.tenant()
    room = hm.room(alice)
    signed = hm.sign(alice, hm.manifest(alice, scope=room.agents["scope"]))
    invite = hm.invite(room)
    response = _create(api, invite, signed, wrap="A" * 80)
    assert (response.status, response.error) == (403, "tenant_key_required")
    response = api.post(
        "/v1/rooms",
        token=alice.token,
        json={"signed_manifest": signed.model_dump(mode="json"), "owner_wrap": "short"},
    )
    assert (response.status, response.error) == (400, "invalid_input")
    assert response.json()["details"] == {"field": "owner_wrap"}


class TestProvidersOffered:
    @pytest.fixture
    def function_settings(self, store) -> FunctionSettings:
        return FunctionSettings(store=store.config, allowed_llm_providers=("openai", "anthropic"))

    def test_a_room_may_allow_offered_providers(self, hm_lambda) -> None:
        room = hm_lambda.room(hm_lambda.tenant(), egress_providers=["anthropic"])
        assert room.manifest.egress.llm_providers == ["anthropic"]


# --- visibility -----------------------------------------------------------------------------------


def test_rooms_are_invisible_to_other_tenants_and_to_invites_of_other_rooms(api, hm) -> None:
    alice = hm.tenant()
    mallory = hm.tenant("mallory")
    room = hm.room(alice)
    other_room = hm.room(alice)
    stranger = hm.invite(other_room)
    for caller in (mallory, stranger):
        for path in (
            f"/v1/rooms/{room.room_id}",
            f"/v1/rooms/{room.room_id}/attest",
            f"/v1/rooms/{room.room_id}/key",
        ):
            response = api.get(path, token=caller.token)
            assert (response.status, response.error) == (404, "room_not_found"), path
    assert api.get("/v1/rooms", token=mallory.token).ok()["rooms"] == []
    response = api.get("/v1/rooms/room_doesnotexist", token=alice.token)
    assert (response.status, response.error) == (404, "room_not_found")
    response = api.get("/v1/rooms/not-a-room-id", token=alice.token)
    assert (response.status, response.error) == (400, "invalid_input")


def test_owner_only_routes_refuse_invites(api, hm) -> None:
    alice = hm.tenant()
    room = hm.room(alice)
    bob = hm.invite(room)
    for method, path in [
        ("GET", f"/v1/rooms/{room.room_id}/invites"),
        ("GET", f"/v1/rooms/{room.room_id}/data"),
        ("GET", f"/v1/rooms/{room.room_id}/audit"),
        ("DELETE", f"/v1/rooms/{room.room_id}"),
    ]:
        response = api.request(method, path, token=bob.token)
        assert (response.status, response.error) == (403, "tenant_key_required"), path


# --- attest ---------------------------------------------------------------------------------------


def test_attest_returns_the_envelope_agent_digests_and_live_runners(api, hm) -> None:
    alice = hm.tenant()
    mediator = hm.agent(alice, name="mediator")
    room = hm.room(alice, mediator=mediator)
    runner = hm.runner()
    bob = hm.invite(room)
    body = api.get(f"/v1/rooms/{room.room_id}/attest", token=bob.token).ok()
    assert body["room"]["manifest_hash"] == room.manifest_hash
    agents = {agent["role"]: agent for agent in body["agents"]}
    assert set(agents) == {"scope", "query", "mediator"}
    assert agents["mediator"]["digest"] == mediator.digest and agents["mediator"]["available"] is True
    assert [entry["runner_id"] for entry in body["runners"]] == [runner.runner_id]


# --- tampering ------------------------------------------------------------------------------------


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in _leaves(item, (*path, key))]
    if isinstance(value, list):
        return [leaf for index, item in enumerate(value) for leaf in _leaves(item, (*path, index))]
    return [path] if value is not None else []


def _flip(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if value == "":
        return "x"
    # Change the first character to another one of the same kind, so lengths and alphabets still fit.
    first = value[0]
    replacement = "B" if first == "A" else "A" if first.isupper() else "b" if first == "a" else "a"
    if first.isdigit():
        replacement = "1" if first == "0" else "0"
    return replacement + value[1:]


def _set(target: Any, path: tuple[Any, ...], value: Any) -> None:
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value


def _get(target: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        target = target[part]
    return target


@pytest.mark.slow
def test_any_changed_envelope_field_fails_with_409(hm_lambda, lambda_api) -> None:
    """Flip every leaf of the stored envelope, one at a time, directly in DynamoDB."""
    alice = hm_lambda.tenant()
    room = hm_lambda.room(alice, mediator=hm_lambda.agent(alice, name="mediator"))
    original = room.signed.model_dump(mode="json")
    paths = _leaves(original)
    assert len(paths) > 30
    for path in paths:
        hm_lambda.tamper_room(
            room, lambda row, path=path: _set(row["envelope"], path, _flip(_get(row["envelope"], path)))
        )
        response = lambda_api.get(f"/v1/rooms/{room.room_id}", token=alice.token)
        assert response.status == 409, (path, response.body)
        assert response.error in ("manifest_invalid", "signature_invalid"), (path, response.body)
        assert "does not verify" in response.json()["message"]
        hm_lambda.tamper_room(room, lambda row: row.update(envelope=original))
    lambda_api.get(f"/v1/rooms/{room.room_id}", token=alice.token).ok()


def test_row_fields_that_disagree_with_the_envelope_fail(hm_lambda, lambda_api) -> None:
    alice = hm_lambda.tenant()
    room = hm_lambda.room(alice)
    # The row claims a newer revision than the envelope holds: an old envelope was put back.
    hm_lambda.tamper_room(room, lambda row: row.update(revision=2))
    response = lambda_api.get(f"/v1/rooms/{room.room_id}", token=alice.token)
    assert (response.status, response.error) == (409, "manifest_rollback")
    hm_lambda.tamper_room(room, lambda row: row.update(revision=1, manifest_hash="ab" * 32))
    assert lambda_api.get(f"/v1/rooms/{room.room_id}", token=alice.token).error == "manifest_invalid"


def test_a_consistently_re_signed_substitute_is_refused(hm_lambda, lambda_api) -> None:
    """An operator re-signs a changed manifest with its own key: the creation-time owner key pins it."""
    alice = hm_lambda.tenant()
    room = hm_lambda.room(alice)
    attacker = Ed25519PrivateKey.generate()
    forged = room.manifest.model_copy(
        update={
            "owner_sign_pub": b64encode(public_bytes(attacker)),
            "rules": "anything goes",
            "rules_sha256": rules_digest("anything goes"),
        }
    )
    signed = sign_manifest(forged, attacker)
    hm_lambda.tamper_room(
        room,
        lambda row: row.update(envelope=signed.model_dump(mode="json"), manifest_hash=signed.manifest_hash),
    )
    response = lambda_api.get(f"/v1/rooms/{room.room_id}", token=alice.token)
    assert (response.status, response.error) == (409, "signature_invalid")


def _room_routes(room, item_id: str, invite_id: str, agent_body: dict) -> list[tuple[str, str, Any]]:
    rid = room.room_id
    return [
        ("GET", f"/v1/rooms/{rid}", None),
        ("GET", f"/v1/rooms/{rid}/attest", None),
        ("GET", f"/v1/rooms/{rid}/key", None),
        ("GET", f"/v1/rooms/{rid}/invites", None),
        ("POST", f"/v1/rooms/{rid}/invites", "invite"),
        ("DELETE", f"/v1/rooms/{rid}/invites/{invite_id}", None),
        ("GET", f"/v1/rooms/{rid}/data", None),
        ("POST", f"/v1/rooms/{rid}/data", {"content_type": "text/csv", "size": 10, "sha256": "ab" * 32}),
        ("POST", f"/v1/rooms/{rid}/data/{item_id}/commit", None),
        ("DELETE", f"/v1/rooms/{rid}/data/{item_id}", None),
        ("POST", f"/v1/rooms/{rid}/query-agents", agent_body),
        ("GET", f"/v1/rooms/{rid}/audit", None),
        ("POST", f"/v1/rooms/{rid}/trust", "trust"),
        ("DELETE", f"/v1/rooms/{rid}", None),
    ]


def test_every_room_route_refuses_a_tampered_room(api, hm, store) -> None:
    alice = hm.tenant()
    room = hm.room(alice, query_mode="uploadable")
    item_id = hm.add_item(room, b"a,b\n1,2\n", commit=False)
    invite = hm.invite(room)
    agent_body = hm.agent_upload(alice, archive=hm.archive(), name="q").body
    trust = hm.sign(alice, next_revision(room.manifest, {"name": "renamed"})).model_dump(mode="json")
    audit_before = store.audit.verify(room.room_id)
    hm.tamper_room(room, lambda row: _set(row["envelope"], ("manifest", "name"), "Tampered"))
    for method, path, template in _room_routes(room, item_id, invite.invite_id, agent_body):
        body = template
        if template == "invite":
            body = hm.invite_body(hm.invite_key(room), room.dek)
        elif template == "trust":
            body = {"signed_manifest": trust}
        response = (
            api.request(method, path, token=alice.token, json=body)
            if body
            else api.request(method, path, token=alice.token)
        )
        assert (response.status, response.error) == (409, "manifest_invalid"), (method, path, response.body)
    # The invite holder is refused too, and nothing was written anywhere.
    assert api.get(f"/v1/rooms/{room.room_id}", token=invite.token).error == "manifest_invalid"
    assert store.audit.verify(room.room_id) == audit_before
    assert store.rooms.get(room.room_id).status.value == "active"
    assert not store.credentials.get(invite.auth_hash).revoked
    listing = api.get("/v1/rooms", token=alice.token).ok()["rooms"]
    assert [(entry["status"], entry["integrity_error"]["error"]) for entry in listing] == [
        ("invalid", "manifest_invalid")
    ]


# --- trust updates --------------------------------------------------------------------------------


def test_trust_update_moves_to_the_next_revision(api, hm, store) -> None:
    alice = hm.tenant()
    room = hm.room(alice)
    bob = hm.invite(room)
    new_trust = RunnerTrust(
        mode=RunnerTrustMode.OWNER_APPROVED, allowed_compose_hashes=["c0" * 32, "d1" * 32]
    )
    updated = hm.sign(alice, next_revision(room.manifest, {"runner_trust": new_trust}))
    body = api.post(
        f"/v1/rooms/{room.room_id}/trust",
        token=alice.token,
        json={"signed_manifest": updated.model_dump(mode="json")},
    ).ok()
    assert body["previous_revision"] == 1 and body["warnings"] == []
    assert body["room"]["revision"] == 2 and body["room"]["manifest_hash"] == updated.manifest_hash
    seen = api.get(f"/v1/rooms/{room.room_id}", token=bob.token).ok()
    assert seen["revision"] == 2
    event = store.audit.list_events(room.room_id).items[-1]
    assert event.kind.value == "trust_updated"
    assert event.details["previous_manifest_hash"] == room.manifest_hash

    # Rollback: the old revision, and the same revision again, are refused; nothing changes.
    for stale in (room.signed, updated):
        response = api.post(
            f"/v1/rooms/{room.room_id}/trust",
            token=alice.token,
            json={"signed_manifest": stale.model_dump(mode="json")},
        )
        assert (response.status, response.error) == (409, "manifest_rollback")
    assert api.get(f"/v1/rooms/{room.room_id}", token=alice.token).ok()["revision"] == 2


def test_trust_update_refusals(hm_lambda, lambda_api) -> None:
    hm = hm_lambda
    alice = hm.tenant()
    room = hm.room(alice)
    bob = hm.invite(room)
    attacker = Ed25519PrivateKey.generate()
    next_manifest = next_revision(room.manifest, {"name": "v2"})
    cases = {
        "gap": (hm.sign(alice, next_manifest.model_copy(update={"revision": 3})), 400, "manifest_invalid"),
        "created_at changed": (
            hm.sign(alice, next_manifest.model_copy(update={"created_at": 1})),
            400,
            "manifest_invalid",
        ),
        "another signer": (
            SignedManifest(
                manifest=next_manifest,
                signature=b64encode(attacker.sign(next_manifest.signing_bytes())),
                manifest_hash=manifest_hash(next_manifest),
            ),
            400,
            "signature_invalid",
        ),
        "another room": (
            hm.sign(alice, next_manifest.model_copy(update={"room_id": random_id("room")})),
            400,
            "manifest_invalid",
        ),
        "unknown agent": (
            hm.sign(
                alice,
                next_revision(
                    room.manifest,
                    {"mediator": room.agents["scope"].ref().model_copy(update={"agent_id": "agent_gone"})},
                ),
            ),
            400,
            "agent_not_found",
        ),
    }
    for name, (signed, status, code) in cases.items():
        response = lambda_api.post(
            f"/v1/rooms/{room.room_id}/trust",
            token=alice.token,
            json={"signed_manifest": signed.model_dump(mode="json")},
        )
        assert (response.status, response.error) == (status, code), (name, response.body)
    good = hm.sign(alice, next_manifest)
    response = lambda_api.post(
        f"/v1/rooms/{room.room_id}/trust",
        token=bob.token,
        json={"signed_manifest": good.model_dump(mode="json")},
    )
    assert (response.status, response.error) == (403, "tenant_key_required")
    assert lambda_api.get(f"/v1/rooms/{room.room_id}", token=alice.token).ok()["revision"] == 1


def test_a_pinned_room_may_be_updated_but_it_is_recorded(hm_lambda, lambda_api, store) -> None:
    alice = hm_lambda.tenant()
    pinned = RunnerTrust(mode=RunnerTrustMode.PINNED, allowed_compose_hashes=["c0" * 32])
    room = hm_lambda.room(alice, runner_trust=pinned)
    widened = RunnerTrust(mode=RunnerTrustMode.PINNED, allowed_compose_hashes=["c0" * 32, "ee" * 32])
    updated = hm_lambda.sign(alice, next_revision(room.manifest, {"runner_trust": widened}))
    body = lambda_api.post(
        f"/v1/rooms/{room.room_id}/trust",
        token=alice.token,
        json={"signed_manifest": updated.model_dump(mode="json")},
    ).ok()
    assert body["warnings"] and "pinned" in body["warnings"][0]
    event = store.audit.list_events(room.room_id).items[-1]
    assert event.details["pinned_room_changed"] is True


# --- delete ---------------------------------------------------------------------------------------


def test_delete_revokes_removes_and_tombstones(api, hm, store) -> None:
    alice = hm.tenant()
    room = hm.room(alice, query_mode="uploadable")
    bob = hm.invite(room)
    carol = hm.invite(room, by=bob)
    hm.add_item(room, b"secret,data\n1,2\n")
    query_agent = hm.agent(bob, room=room, name="bob's query")
    body = api.delete(f"/v1/rooms/{room.room_id}", token=alice.token).ok()
    assert (body["invites_revoked"], body["agents_deleted"]) == (2, 1)
    assert body["objects_deleted"] >= 1

    for invite in (bob, carol):
        for path in (f"/v1/rooms/{room.room_id}", f"/v1/rooms/{room.room_id}/key", "/v1/whoami"):
            response = api.get(path, token=invite.token)
            assert (response.status, response.error) == (410, "room_deleted"), path
            assert "deleted" in response.json()["message"]
    response = api.get(f"/v1/rooms/{room.room_id}", token=alice.token)
    assert (response.status, response.error) == (410, "room_deleted")
    assert api.get("/v1/rooms", token=alice.token).ok()["rooms"] == []

    # Wraps, items and objects are gone; the agent uploaded for the room too; the audit log remains.
    assert store.rooms.get_wrap(room.room_id, alice.tenant_id) is None
    assert store.rooms.get_wrap(room.room_id, bob.invite_id) is None
    assert store.rooms.list_items(room.room_id, include_pending=True).items == []
    versions = store.clients.s3.list_object_versions(
        Bucket=store.blobs.bucket, Prefix=f"rooms/{room.room_id}/"
    )
    assert not versions.get("Versions") and not versions.get("DeleteMarkers")
    assert store.agents.get(query_agent.agent_id) is None
    audit = api.get(f"/v1/rooms/{room.room_id}/audit", token=alice.token).ok()
    assert audit["events"][-1]["kind"] == "room_deleted" and audit["chain"]["valid"] is True

    # Deleting again finishes (nothing left to do); the id cannot be reused.
    assert api.delete(f"/v1/rooms/{room.room_id}", token=alice.token).ok()["invites_revoked"] == 0
    response = _create(api, alice, room.signed)
    assert (response.status, response.error) == (409, "room_exists")


def test_other_tenants_cannot_delete(api, hm) -> None:
    alice = hm.tenant()
    room = hm.room(alice)
    mallory = hm.tenant("mallory")
    response = api.delete(f"/v1/rooms/{room.room_id}", token=mallory.token)
    assert (response.status, response.error) == (404, "room_not_found")
    api.get(f"/v1/rooms/{room.room_id}", token=alice.token).ok()


# --- audit ----------------------------------------------------------------------------------------


def test_audit_reports_a_broken_chain(hm_lambda, lambda_api, store) -> None:
    alice = hm_lambda.tenant()
    room = hm_lambda.room(alice)
    hm_lambda.invite(room)
    table = store.config.table_name(TableRole.AUDIT)
    store.clients.dynamodb.update_item(
        TableName=table,
        Key={"room_id": {"S": room.room_id}, "seq": {"N": "2"}},
        UpdateExpression="SET actor = :actor",
        ExpressionAttributeValues={":actor": {"S": "someone_else"}},
    )
    body = lambda_api.get(f"/v1/rooms/{room.room_id}/audit", token=alice.token).ok()
    assert body["chain"]["valid"] is False
    assert body["chain"]["error"]["error"] == "audit_chain_invalid"
    assert body["chain"]["error"]["details"] == {"room_id": room.room_id, "seq": 2}
