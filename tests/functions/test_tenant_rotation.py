"""Owner key rotation, ``POST /v1/tenant/key-rotation`` (DESIGN §3, §16.11).

Every room keeps working: its manifest is re-signed by the new key at ``revision + 1``, links and
accepted manifests pinning the old key follow the certificate chain, the owner's new wrap opens with the
new secret, and the old key stops working at the instant the new one starts. Refusals write nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hivemind.canonical import canonical_json
from hivemind.encoding import b64encode
from hivemind.errors import Conflict, HivemindError, KeyRotationError, PayloadTooLarge, ServiceUnavailable
from hivemind.keys import owner_box_key, owner_sign_key, public_bytes, unwrap_dek, wrap_key
from hivemind.manifest import (
    KeyRotation,
    SignedKeyRotation,
    SignedManifest,
    manifest_hash,
    rotated_revision,
    sign_key_rotation,
    sign_manifest,
    verify_manifest,
)
from hivemind.store import Store
from hivemind.store.base import Table
from hivemind.store.schema import TableRole
from hivemind.store.tenants import MAX_ROTATION_ROOMS, ResignedRoom
from hivemind.tokens import Secret, TokenKind
from hivemind_functions.services import tenants as tenant_service

if TYPE_CHECKING:
    from conftest import Harness, HttpApiClient, RoomHandle
    from support.rooms import Tenant

ROTATION = "/v1/tenant/key-rotation"


# --- the client side, as hmctl does it ----------------------------------------------------------------


@dataclass
class Rotation:
    old: Tenant
    new: Tenant
    certificate: SignedKeyRotation
    resigned: dict[str, SignedManifest]
    body: dict[str, Any]

    def apply_to(self, rooms: list[RoomHandle]) -> None:
        """Update the test's room handles to what the service now stores."""
        for room in rooms:
            room.signed = self.resigned[room.room_id]
            room.owner = self.new


def certificate(old: Tenant, new: Tenant, *, rotated_at: int = 1_700_000_000) -> SignedKeyRotation:
    rotation = KeyRotation(
        tenant_id=old.tenant_id,
        old_sign_pub=old.sign_pub,
        new_sign_pub=new.sign_pub,
        new_box_pub=new.box_pub,
        rotated_at=rotated_at,
    )
    return sign_key_rotation(rotation, old.sign_key)


def plan(
    owner: Tenant,
    rooms: list[RoomHandle],
    *,
    new_secret: Secret | None = None,
    rotated_at: int = 1_700_000_000,
) -> Rotation:
    new = dataclasses.replace(owner, secret=new_secret or Secret.generate(TokenKind.TENANT))
    signed_certificate = certificate(owner, new, rotated_at=rotated_at)
    resigned = {
        room.room_id: sign_manifest(
            rotated_revision(room.manifest, signed_certificate.rotation), new.sign_key
        )
        for room in rooms
    }
    body = {
        "new_auth_hash": new.auth_hash,
        "rotation": signed_certificate.model_dump(mode="json"),
        "rooms": [
            {
                "room_id": room.room_id,
                "signed_manifest": resigned[room.room_id].model_dump(mode="json"),
                "owner_wrap": new.wrap(room.room_id, room.dek),
            }
            for room in rooms
        ],
    }
    return Rotation(old=owner, new=new, certificate=signed_certificate, resigned=resigned, body=body)


# --- what the service stores ------------------------------------------------------------------------


def snapshot(store: Store, tenant: Tenant, *others: Tenant) -> dict[str, Any]:
    """Every stored item a rotation of ``tenant`` could touch: tenant, keys, rooms, wraps, audit logs."""
    tenants = Table(store.clients, TableRole.TENANTS)
    credentials = Table(store.clients, TableRole.CREDENTIALS)
    rooms = Table(store.clients, TableRole.ROOMS)
    room_ids = sorted(
        record.room_id
        for key in (tenant, *others)
        for record in store.rooms.list_by_tenant(key.tenant_id, include_deleted=True, limit=100).items
    )
    return {
        "tenants": [tenants.get({"tenant_id": key.tenant_id}) for key in (tenant, *others)],
        "credentials": [credentials.get({"auth_hash": key.auth_hash}) for key in (tenant, *others)],
        "rooms": {
            room_id: list(
                rooms.query_all(
                    key_condition="room_id = :r", values={":r": room_id}, scope={"room_id": room_id}
                )
            )
            for room_id in room_ids
        },
        "audit": {room_id: [entry.hash for entry in store.audit.entries(room_id)] for room_id in room_ids},
    }


def rewrite_tenant(store: Store, tenant_id: str, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Edit the tenant item directly, as someone with write access to the table would."""
    table = Table(store.clients, TableRole.TENANTS)
    item = table.get({"tenant_id": tenant_id})
    assert item is not None
    mutate(item)
    table.put(item)


def assert_room_works_for_owner(api: Any, owner: Tenant, room: RoomHandle, *, pinned_sign_pub: str) -> dict:
    """The owner (with its current key) reads the room; it verifies from ``pinned_sign_pub`` via the
    chain; the owner's wrap opens with the current secret."""
    view = api.get(f"/v1/rooms/{room.room_id}", token=owner.token).ok()
    signed = SignedManifest.model_validate(view["signed_manifest"])
    rotations = [SignedKeyRotation.model_validate(entry) for entry in view["owner_key_rotations"]]
    manifest = verify_manifest(
        signed,
        expected_owner_sign_pub=pinned_sign_pub,
        expected_room_id=room.room_id,
        min_revision=None,
        rotations=rotations,
    )
    assert manifest.owner_sign_pub == owner.sign_pub and manifest.owner_box_pub == owner.box_pub
    wrap = api.get(f"/v1/rooms/{room.room_id}/key", token=owner.token).ok()
    dek = unwrap_dek(
        wrap_key(owner.secret, room.room_id), wrap["wrapped"], room_id=room.room_id, bearer_id=owner.tenant_id
    )
    assert dek == room.dek
    return view


# --- the happy path -----------------------------------------------------------------------------------


def test_rotation_keeps_every_room_link_and_wrap_working(api, hm: Harness, store: Store) -> None:
    alice = hm.tenant("alice")
    shared = hm.room(alice, name="Shared")
    private = hm.room(alice, name="Private")
    hm.add_item(private, b"region,amount\nnorth,1\n", name="orders.csv")
    bob = hm.invite(shared)
    link_pin = alice.sign_pub  # what bob's hmroom:// link carries

    rotation = plan(alice, [shared, private])
    answer = api.post(ROTATION, token=alice.token, json=rotation.body).ok()
    assert answer == {
        "tenant_id": alice.tenant_id,
        "token_id": rotation.new.auth_hash[:16],
        "rooms": sorted([shared.room_id, private.room_id]),
    }
    rotation.apply_to([shared, private])
    new = rotation.new

    # The old key stopped working; the new one is the tenant, with the new public keys.
    assert api.get("/v1/whoami", token=alice.token).error == "credential_unknown"
    me = api.get("/v1/whoami", token=new.token).ok()
    assert (me["tenant_id"], me["owner_sign_pub"], me["owner_box_pub"]) == (
        alice.tenant_id,
        new.sign_pub,
        new.box_pub,
    )

    # Every room moved to revision 2, signed by the new key, and verifies from the old pin.
    for room in (shared, private):
        view = assert_room_works_for_owner(api, new, room, pinned_sign_pub=link_pin)
        assert view["revision"] == 2 and view["owner_key_rotations"] == [rotation.body["rotation"]]
        terms = SignedManifest.model_validate(view["signed_manifest"]).manifest
        assert terms.model_copy(
            update={"owner_sign_pub": link_pin, "owner_box_pub": alice.box_pub, "revision": 1}
        ) == room.manifest.model_copy(
            update={"owner_sign_pub": link_pin, "owner_box_pub": alice.box_pub, "revision": 1}
        )

    # Bob's link still works: the attest view carries the chain, and his own wrap still opens.
    attest = api.get(f"/v1/rooms/{shared.room_id}/attest", token=bob.token).ok()
    verify_manifest(
        SignedManifest.model_validate(attest["room"]["signed_manifest"]),
        expected_owner_sign_pub=link_pin,
        expected_room_id=shared.room_id,
        min_revision=1,
        rotations=[
            SignedKeyRotation.model_validate(entry) for entry in attest["room"]["owner_key_rotations"]
        ],
    )
    bob_wrap = api.get(f"/v1/rooms/{shared.room_id}/key", token=bob.token).ok()
    assert (
        unwrap_dek(
            wrap_key(bob.secret, shared.room_id),
            bob_wrap["wrapped"],
            room_id=shared.room_id,
            bearer_id=bob.invite_id,
        )
        == shared.dek
    )

    # The listing says every room is valid, and each audit log records the rotation.
    listing = api.get("/v1/rooms", token=new.token).ok()["rooms"]
    assert {(entry["room_id"], entry["status"], entry["revision"]) for entry in listing} == {
        (shared.room_id, "active", 2),
        (private.room_id, "active", 2),
    }
    audit = api.get(f"/v1/rooms/{private.room_id}/audit", token=new.token).ok()
    assert audit["chain"]["valid"] is True
    last = audit["events"][-1]
    assert last["kind"] == "owner_key_rotated"
    assert last["details"]["manifest_hash"] == private.manifest_hash
    assert (last["details"]["old_owner_sign_pub"], last["details"]["new_owner_sign_pub"]) == (
        link_pin,
        new.sign_pub,
    )

    # The room keeps working for its owner: a trust update signed by the new key is accepted.
    hm.trust_update(private, name="Private, renamed")
    assert api.get(f"/v1/rooms/{private.room_id}", token=new.token).ok()["revision"] == 3


def test_a_second_rotation_extends_the_chain_and_old_pins_follow_it(hm_lambda: Harness, lambda_api) -> None:
    alice = hm_lambda.tenant("alice")
    room = hm_lambda.room(alice)
    first = plan(alice, [room])
    lambda_api.post(ROTATION, token=alice.token, json=first.body).ok()
    first.apply_to([room])
    # A room created after the first rotation pins the second key.
    later = hm_lambda.room(first.new)

    second = plan(first.new, [room, later], rotated_at=1_700_000_100)
    lambda_api.post(ROTATION, token=first.new.token, json=second.body).ok()
    second.apply_to([room, later])
    newest = second.new

    view = assert_room_works_for_owner(lambda_api, newest, room, pinned_sign_pub=alice.sign_pub)
    assert view["revision"] == 3
    assert view["owner_key_rotations"] == [first.body["rotation"], second.body["rotation"]]
    assert_room_works_for_owner(lambda_api, newest, later, pinned_sign_pub=first.new.sign_pub)
    for token in (alice.token, first.new.token):
        assert lambda_api.get("/v1/whoami", token=token).error == "credential_unknown"


# --- retries and interruptions ------------------------------------------------------------------------


def test_a_retry_with_the_new_key_answers_the_same_success(api, hm: Harness, store: Store) -> None:
    alice = hm.tenant("alice")
    room = hm.room(alice)
    rotation = plan(alice, [room])
    first = api.post(ROTATION, token=alice.token, json=rotation.body).ok()
    before = snapshot(store, rotation.new)

    again = api.post(ROTATION, token=rotation.new.token, json=rotation.body).ok()
    assert again == first
    assert snapshot(store, rotation.new) == before  # nothing applied twice, no second audit event
    # The old key is gone for good: its retry is an unknown key, not a second rotation.
    assert api.post(ROTATION, token=alice.token, json=rotation.body).error == "credential_unknown"


def test_a_retry_finishes_what_an_interrupted_rotation_left_out(
    hm_lambda: Harness, lambda_api, store
) -> None:
    """The transaction went through and the process died before the audit events: the retry adds them."""
    alice = hm_lambda.tenant("alice")
    room = hm_lambda.room(alice)
    rotation = plan(alice, [room])
    resigned = rotation.resigned[room.room_id]
    store.tenants.rotate_owner_key(
        alice.tenant_id,
        certificate=rotation.certificate,
        old_auth_hash=alice.auth_hash,
        new_auth_hash=rotation.new.auth_hash,
        rooms=[
            ResignedRoom(
                room_id=room.room_id,
                previous_manifest_hash=room.manifest_hash,
                previous_revision=1,
                envelope=resigned.model_dump(mode="json"),
                manifest_hash=resigned.manifest_hash,
                revision=2,
                owner_wrap=rotation.new.wrap(room.room_id, room.dek),
            )
        ],
    )
    kinds = [entry.kind.value for entry in store.audit.entries(room.room_id)]
    assert kinds == ["room_created"]

    answer = lambda_api.post(ROTATION, token=rotation.new.token, json=rotation.body).ok()
    assert answer["rooms"] == [room.room_id]
    events = list(store.audit.entries(room.room_id))
    assert [event.kind.value for event in events] == ["room_created", "owner_key_rotated"]
    assert events[-1].details["manifest_hash"] == resigned.manifest_hash
    lambda_api.post(ROTATION, token=rotation.new.token, json=rotation.body).ok()
    assert len(list(store.audit.entries(room.room_id))) == 2
    assert store.audit.verify(room.room_id) == 2


def test_a_failed_commit_leaves_the_old_key_and_every_room_as_they_were(
    hm_lambda: Harness, lambda_api, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = hm_lambda.tenant("alice")
    rooms = [hm_lambda.room(alice), hm_lambda.room(alice)]
    before = snapshot(store, alice)
    rotation = plan(alice, rooms)

    def storage_down(*args: Any, **kwargs: Any) -> None:
        raise ServiceUnavailable("rotate owner key: storage is busy; retry")

    monkeypatch.setattr("hivemind.store.tenants.transact", storage_down)
    assert lambda_api.post(ROTATION, token=alice.token, json=rotation.body).error == "service_unavailable"
    assert snapshot(store, alice) == before
    monkeypatch.undo()

    for room in rooms:
        assert_room_works_for_owner(lambda_api, alice, room, pinned_sign_pub=alice.sign_pub)
    lambda_api.post(ROTATION, token=alice.token, json=rotation.body).ok()
    rotation.apply_to(rooms)
    for room in rooms:
        assert_room_works_for_owner(lambda_api, rotation.new, room, pinned_sign_pub=alice.sign_pub)


# --- refusals: nothing is written ---------------------------------------------------------------------


def _refused(
    api: Any, store: Store, owner: Tenant, body: dict[str, Any], *others: Tenant, token: str = ""
) -> Any:
    before = snapshot(store, owner, *others)
    response = api.post(ROTATION, token=token or owner.token, json=body)
    assert response.status >= 400, response.body
    assert snapshot(store, owner, *others) == before
    return response


def test_certificates_that_do_not_retire_the_registered_key_are_refused(
    hm_lambda: Harness, lambda_api, store
) -> None:
    alice = hm_lambda.tenant("alice")
    carol = hm_lambda.tenant("carol")
    room = hm_lambda.room(alice)
    rotation = plan(alice, [room])

    # Signed by another key than the one it claims to retire (a forged certificate).
    attacker = Ed25519PrivateKey.generate()
    forged = SignedKeyRotation(
        rotation=rotation.certificate.rotation,
        signature=b64encode(attacker.sign(rotation.certificate.rotation.signing_bytes())),
    )
    response = _refused(
        lambda_api, store, alice, {**rotation.body, "rotation": forged.model_dump(mode="json")}
    )
    assert (response.status, response.error) == (400, "key_rotation_invalid")
    assert "does not verify" in response.json()["message"]

    # A valid certificate, but of another key (carol's), presented by alice.
    carols = certificate(carol, rotation.new)
    response = _refused(
        lambda_api, store, alice, {**rotation.body, "rotation": carols.model_dump(mode="json")}
    )
    assert (response.status, response.error) == (400, "key_rotation_invalid")

    # A valid certificate of alice's key naming another tenant.
    other_tenant = KeyRotation(**{**rotation.certificate.rotation.model_dump(), "tenant_id": carol.tenant_id})
    response = _refused(
        lambda_api,
        store,
        alice,
        {
            **rotation.body,
            "rotation": sign_key_rotation(other_tenant, alice.sign_key).model_dump(mode="json"),
        },
    )
    assert (response.status, response.error) == (400, "key_rotation_invalid")

    # The certificate verifies, but the request's signed body is bytes-altered (rotated_at changed).
    altered = {
        **rotation.body["rotation"],
        "rotation": {**rotation.body["rotation"]["rotation"], "rotated_at": 5},
    }
    response = _refused(lambda_api, store, alice, {**rotation.body, "rotation": altered})
    assert (response.status, response.error) == (400, "key_rotation_invalid")


def test_the_rooms_must_be_exactly_the_active_rooms(hm_lambda: Harness, lambda_api, store) -> None:
    alice = hm_lambda.tenant("alice")
    carol = hm_lambda.tenant("carol")
    first, second = hm_lambda.room(alice), hm_lambda.room(alice)
    carols_room = hm_lambda.room(carol)

    missing = plan(alice, [first])
    response = _refused(lambda_api, store, alice, missing.body, carol)
    assert (response.status, response.error) == (400, "rotation_incomplete")
    assert response.json()["details"] == {"missing": [second.room_id], "unknown": []}

    foreign = plan(alice, [first, second])
    foreign.body["rooms"].append({**foreign.body["rooms"][0], "room_id": carols_room.room_id})
    response = _refused(lambda_api, store, alice, foreign.body, carol)
    assert (response.status, response.error) == (400, "rotation_incomplete")
    assert response.json()["details"]["unknown"] == [carols_room.room_id]

    twice = plan(alice, [first, second])
    twice.body["rooms"].append(twice.body["rooms"][0])
    assert _refused(lambda_api, store, alice, twice.body).error == "invalid_input"

    # A deleted room is not an active room: rotating without it works.
    lambda_api.delete(f"/v1/rooms/{second.room_id}", token=alice.token).ok()
    lambda_api.post(ROTATION, token=alice.token, json=plan(alice, [first]).body).ok()


def test_every_room_must_be_the_stored_manifest_re_signed_by_the_new_key(
    hm_lambda: Harness, lambda_api, store
) -> None:
    alice = hm_lambda.tenant("alice")
    room = hm_lambda.room(alice)
    rotation = plan(alice, [room])
    expected = rotated_revision(room.manifest, rotation.certificate.rotation)

    def with_manifest(signed: SignedManifest) -> dict[str, Any]:
        entry = {**rotation.body["rooms"][0], "signed_manifest": signed.model_dump(mode="json")}
        return {**rotation.body, "rooms": [entry]}

    # Anything but the owner keys and the revision changed (the terms participants accepted).
    renamed = sign_manifest(expected.model_copy(update={"name": "Something else"}), rotation.new.sign_key)
    response = _refused(lambda_api, store, alice, with_manifest(renamed))
    assert (response.status, response.error) == (400, "manifest_invalid")
    assert response.json()["details"]["fields"] == ["name"]

    skipped = sign_manifest(expected.model_copy(update={"revision": 3}), rotation.new.sign_key)
    assert _refused(lambda_api, store, alice, with_manifest(skipped)).error == "manifest_invalid"

    # The right manifest, signed by some other key.
    attacker = Ed25519PrivateKey.generate()
    wrong_signer = SignedManifest(
        manifest=expected,
        signature=b64encode(attacker.sign(expected.signing_bytes())),
        manifest_hash=manifest_hash(expected),
    )
    response = _refused(lambda_api, store, alice, with_manifest(wrong_signer))
    assert (response.status, response.error) == (400, "signature_invalid")

    # Still signed by the old key, at the next revision, with the old keys: not a rotation.
    unrotated = sign_manifest(room.manifest.model_copy(update={"revision": 2}), alice.sign_key)
    assert _refused(lambda_api, store, alice, with_manifest(unrotated)).error == "manifest_invalid"

    # A manifest built from an older revision than the stored one (a trust update happened meanwhile).
    hm_lambda.trust_update(room, name="Updated")
    response = _refused(lambda_api, store, alice, rotation.body)
    assert (response.status, response.error) == (400, "manifest_invalid")


def test_other_keys_and_reused_keys_are_refused(hm_lambda: Harness, lambda_api, store) -> None:
    alice = hm_lambda.tenant("alice")
    bob_tenant = hm_lambda.tenant("bob")
    room = hm_lambda.room(alice)
    invite = hm_lambda.invite(room)
    admin = hm_lambda.admin()
    rotation = plan(alice, [room])

    for token in (invite.token, admin.token):
        response = _refused(lambda_api, store, alice, rotation.body, token=token)
        assert (response.status, response.error) == (403, "tenant_key_required")

    # The new key must be new: another tenant's registered key is refused.
    taken = plan(alice, [room], new_secret=bob_tenant.secret)
    response = _refused(lambda_api, store, alice, taken.body, bob_tenant)
    assert (response.status, response.error) == (409, "key_already_registered")

    # After K0 -> K1, handing back to K0 would make a cycle in the chain.
    lambda_api.post(ROTATION, token=alice.token, json=rotation.body).ok()
    rotation.apply_to([room])
    back = plan(rotation.new, [room], new_secret=alice.secret)
    response = _refused(lambda_api, store, rotation.new, back.body)
    assert (response.status, response.error) == (400, "key_rotation_invalid")

    # A retry with the new key but another certificate for the same hand-over is a conflict.
    other_time = plan(alice, [], new_secret=rotation.new.secret, rotated_at=1_700_000_999)
    response = _refused(lambda_api, store, rotation.new, other_time.body, token=rotation.new.token)
    assert (response.status, response.error) == (409, "rotation_conflict")


def test_a_room_whose_stored_manifest_does_not_verify_blocks_the_rotation(
    hm_lambda: Harness, lambda_api, store
) -> None:
    alice = hm_lambda.tenant("alice")
    good, bad = hm_lambda.room(alice), hm_lambda.room(alice)
    rotation = plan(alice, [good, bad])

    def rename(row: dict[str, Any]) -> None:
        row["envelope"]["manifest"]["name"] = "tampered"

    hm_lambda.tamper_room(bad, rename)
    response = _refused(lambda_api, store, alice, rotation.body)
    assert (response.status, response.error) == (409, "manifest_invalid")
    assert lambda_api.get("/v1/whoami", token=alice.token).ok()["owner_sign_pub"] == alice.sign_pub


def test_too_many_rooms_are_refused_before_anything_is_checked(
    hm_lambda: Harness, lambda_api, store, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = hm_lambda.tenant("alice")
    rooms = [hm_lambda.room(alice), hm_lambda.room(alice)]
    monkeypatch.setattr(tenant_service, "MAX_ROTATION_ROOMS", 1)
    response = _refused(lambda_api, store, alice, plan(alice, rooms).body)
    assert (response.status, response.error) == (413, "rotation_too_large")


# --- the store's own conditions -----------------------------------------------------------------------


def test_the_store_applies_a_rotation_entirely_or_not_at_all(hm_lambda: Harness, store: Store) -> None:
    alice = hm_lambda.tenant("alice")
    first, second = hm_lambda.room(alice), hm_lambda.room(alice)
    rotation = plan(alice, [first, second])

    def resigned(room: RoomHandle, *, previous_hash: str | None = None) -> ResignedRoom:
        signed = rotation.resigned[room.room_id]
        return ResignedRoom(
            room_id=room.room_id,
            previous_manifest_hash=previous_hash or room.manifest_hash,
            previous_revision=1,
            envelope=signed.model_dump(mode="json"),
            manifest_hash=signed.manifest_hash,
            revision=2,
            owner_wrap=rotation.new.wrap(room.room_id, room.dek),
        )

    def rotate(
        rooms: list[ResignedRoom], *, cert: SignedKeyRotation = rotation.certificate, new_hash: str = ""
    ) -> Any:
        return store.tenants.rotate_owner_key(
            alice.tenant_id,
            certificate=cert,
            old_auth_hash=alice.auth_hash,
            new_auth_hash=new_hash or rotation.new.auth_hash,
            rooms=rooms,
        )

    before = snapshot(store, alice)
    # One room changed since it was verified: the whole rotation is refused, the other room untouched.
    with pytest.raises(Conflict) as refused:
        rotate([resigned(first), resigned(second, previous_hash="0" * 64)])
    assert refused.value.code == "rotation_conflict" and refused.value.details == {"rooms": [second.room_id]}
    assert snapshot(store, alice) == before

    # An unverified certificate never enters the chain, even when the caller forgot to check it.
    attacker = Ed25519PrivateKey.generate()
    forged = SignedKeyRotation(
        rotation=rotation.certificate.rotation,
        signature=b64encode(attacker.sign(rotation.certificate.rotation.signing_bytes())),
    )
    with pytest.raises(KeyRotationError):
        rotate([resigned(first), resigned(second)], cert=forged)
    with pytest.raises(PayloadTooLarge):
        rotate([resigned(first)] * (MAX_ROTATION_ROOMS + 1))
    assert snapshot(store, alice) == before

    tenant = rotate([resigned(first), resigned(second)])
    assert (tenant.owner_sign_pub, tenant.owner_box_pub) == (rotation.new.sign_pub, rotation.new.box_pub)
    assert tenant.key_rotations == [rotation.certificate]
    assert store.credentials.get(alice.auth_hash) is None
    assert store.credentials.get(rotation.new.auth_hash).tenant_id == alice.tenant_id  # type: ignore[union-attr]
    # The same rotation again: the tenant no longer registers the old key.
    with pytest.raises(Conflict):
        rotate([resigned(first), resigned(second)])
    # Account views built from a dump never carry the chain; the item keeps it.
    assert "key_rotations" not in tenant.model_dump() and "provider_keys" not in tenant.model_dump()
    assert tenant.to_item()["key_rotations"] == [rotation.certificate.model_dump(mode="json")]


# --- forged and forked chains stay refused ------------------------------------------------------------


def test_a_forged_certificate_chain_is_refused_with_409(api, hm: Harness, store: Store) -> None:
    """Someone with table access claims the owner rotated to its key and re-signs the room with it."""
    alice = hm.tenant("alice")
    room = hm.room(alice)
    invite = hm.invite(room)
    attacker = Ed25519PrivateKey.generate()
    claimed = KeyRotation(
        tenant_id=alice.tenant_id,
        old_sign_pub=alice.sign_pub,
        new_sign_pub=b64encode(public_bytes(attacker)),
        new_box_pub=b64encode(public_bytes(owner_box_key(Secret.generate(TokenKind.TENANT)))),
        rotated_at=1,
    )
    forged = SignedKeyRotation(rotation=claimed, signature=b64encode(attacker.sign(claimed.signing_bytes())))
    substitute = sign_manifest(rotated_revision(room.manifest, claimed), attacker)

    rewrite_tenant(
        store, alice.tenant_id, lambda item: item.update(key_rotations=[forged.model_dump(mode="json")])
    )

    def substitute_room(row: dict[str, Any]) -> None:
        row.update(
            envelope=substitute.model_dump(mode="json"), manifest_hash=substitute.manifest_hash, revision=2
        )

    hm.tamper_room(room, substitute_room)
    for token in (alice.token, invite.token):
        response = api.get(f"/v1/rooms/{room.room_id}", token=token)
        assert (response.status, response.error) == (409, "key_rotation_invalid")
    listing = api.get("/v1/rooms", token=alice.token).ok()["rooms"]
    assert [(entry["status"], entry["integrity_error"]["error"]) for entry in listing] == [
        ("invalid", "key_rotation_invalid")
    ]

    # Without any certificate the substituted signer is refused as before.
    rewrite_tenant(store, alice.tenant_id, lambda item: item.update(key_rotations=[]))
    response = api.get(f"/v1/rooms/{room.room_id}", token=invite.token)
    assert (response.status, response.error) == (409, "signature_invalid")


def test_a_forked_chain_is_refused_even_for_the_legitimate_branch(
    hm_lambda: Harness, lambda_api, store
) -> None:
    """The old key was stolen and signed a second hand-over: both branches are refused."""
    alice = hm_lambda.tenant("alice")
    room = hm_lambda.room(alice)
    rotation = plan(alice, [room])
    lambda_api.post(ROTATION, token=alice.token, json=rotation.body).ok()
    rotation.apply_to([room])
    assert_room_works_for_owner(lambda_api, rotation.new, room, pinned_sign_pub=alice.sign_pub)

    thief = dataclasses.replace(alice, secret=Secret.generate(TokenKind.TENANT))
    fork = certificate(alice, thief, rotated_at=1_700_000_050)
    rewrite_tenant(
        store, alice.tenant_id, lambda item: item["key_rotations"].append(fork.model_dump(mode="json"))
    )
    response = lambda_api.get(f"/v1/rooms/{room.room_id}", token=rotation.new.token)
    assert (response.status, response.error) == (409, "key_rotation_invalid")
    assert "forked" in response.json()["message"]


# --- the real client: hmctl's rotation over HTTP ------------------------------------------------------


def _profile_world(
    http_api: HttpApiClient, hm_lambda: Harness, tmp_path: Path
) -> tuple[Any, Any, Tenant, list[RoomHandle]]:
    """alice with two rooms (made through the Lambda path: same app, same store) and her hmctl profile
    pointing at the app over real HTTP."""
    from hmctl.profiles import Profile, ProfileStore  # noqa: PLC0415 - client code only these tests use

    alice = hm_lambda.tenant("alice")
    rooms = [hm_lambda.room(alice), hm_lambda.room(alice)]
    profiles = ProfileStore(tmp_path / "config", tmp_path / "cache")
    service = str(http_api.client.base_url).rstrip("/")
    profiles.save(
        Profile(name="alice", service=service, key=alice.secret.token(), tenant_id=alice.tenant_id),
        make_current=True,
    )
    return profiles, profiles.load("alice"), alice, rooms


def _rotate_with_hmctl(profiles: Any, profile: Any, *, now: int) -> Any:
    from hmctl.client import ApiClient  # noqa: PLC0415
    from hmctl.rotation import rotate_key  # noqa: PLC0415

    return rotate_key(
        profiles,
        profile,
        api_for=lambda secret: ApiClient.for_secret(profile.service, secret, retries=0),
        now=now,
    )


def test_hmctl_rotation_and_its_resumption_against_the_real_api(
    http_api: HttpApiClient, hm_lambda: Harness, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    profiles, profile, alice, rooms = _profile_world(http_api, hm_lambda, tmp_path)

    # The first attempt dies at the commit: the profile keeps the pending key, the old key still works.
    def storage_down(*args: Any, **kwargs: Any) -> None:
        raise ServiceUnavailable("rotate owner key: storage is busy; retry")

    monkeypatch.setattr("hivemind.store.tenants.transact", storage_down)
    with pytest.raises(HivemindError) as failed:
        _rotate_with_hmctl(profiles, profile, now=store.clock())
    assert failed.value.code == "service_unavailable"
    monkeypatch.undo()
    interrupted = profiles.load("alice")
    assert interrupted.pending_key is not None and interrupted.key == alice.secret.token()
    assert http_api.get("/v1/whoami", token=alice.token).ok()["tenant_id"] == alice.tenant_id

    # Run again: it resumes with the same pending key, and the service applies it.
    result = _rotate_with_hmctl(profiles, interrupted, now=store.clock())
    assert result.resumed is True and sorted(result.rooms) == sorted(room.room_id for room in rooms)
    done = profiles.load("alice")
    assert done.key == interrupted.pending_key and done.pending_key is None
    new = dataclasses.replace(alice, secret=Secret.parse(done.key))
    for room in rooms:  # the DEK itself never changed: only its wrap did
        assert_room_works_for_owner(http_api, new, room, pinned_sign_pub=alice.sign_pub)


def test_hmctl_resumes_a_rotation_whose_answer_was_lost(
    http_api: HttpApiClient, hm_lambda: Harness, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    profiles, profile, alice, rooms = _profile_world(http_api, hm_lambda, tmp_path)
    real_audit = tenant_service._audit_rotation

    def crash_after_commit(*args: Any, **kwargs: Any) -> None:
        raise ServiceUnavailable("the function timed out")

    # The transaction is applied, then the request dies: the client sees an error.
    monkeypatch.setattr(tenant_service, "_audit_rotation", crash_after_commit)
    with pytest.raises(HivemindError):
        _rotate_with_hmctl(profiles, profile, now=store.clock())
    monkeypatch.setattr(tenant_service, "_audit_rotation", real_audit)
    pending = profiles.load("alice")
    assert pending.pending_key is not None
    assert http_api.get("/v1/whoami", token=alice.token).error == "credential_unknown"

    # The resumed run sees that the pending key is already the tenant's and finishes on the client.
    result = _rotate_with_hmctl(profiles, pending, now=store.clock())
    assert result.resumed is True and result.rooms == []
    done = profiles.load("alice")
    assert done.key == pending.pending_key and done.retired_keys == [alice.secret.token()]
    new = dataclasses.replace(alice, secret=Secret.parse(done.key))
    for room in rooms:
        assert_room_works_for_owner(http_api, new, room, pinned_sign_pub=alice.sign_pub)


def test_the_documented_certificate_example_is_what_the_code_makes() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "formats.md").read_text(encoding="utf-8")
    section = text.split("## Key rotation certificate", 1)[1].split("\n## ", 1)[0]
    documented = dict(line.split(":", 1) for line in section.split("```")[-2].strip().splitlines())
    old = Secret(TokenKind.TENANT, bytes(range(0x00, 0x20)))
    new = Secret(TokenKind.TENANT, bytes(range(0x40, 0x60)))
    assert new.token() in section
    rotation = KeyRotation(
        tenant_id="tenant_example",
        old_sign_pub=b64encode(public_bytes(owner_sign_key(old))),
        new_sign_pub=b64encode(public_bytes(owner_sign_key(new))),
        new_box_pub=b64encode(public_bytes(owner_box_key(new))),
        rotated_at=1_700_000_000,
    )
    signed = sign_key_rotation(rotation, owner_sign_key(old))
    assert documented["JCS(rotation)"].strip() == canonical_json(rotation).decode()
    assert documented["signature"].strip() == signed.signature
    assert rotation.signing_bytes() == b"hivemind-key-rotation-v1\n" + canonical_json(rotation)
