"""Room data: declare a sealed item, upload it to the presigned URL, commit it, list, delete (§4, §12)."""

from __future__ import annotations

from hivemind.encoding import sha256_hex
from hivemind.models import ObjectKind
from hivemind.seal import SealContext, open_bytes
from hivemind.store.schema import item_key
from hivemind.tokens import random_id


def _declare(api, room, sealed: bytes, item_id: str | None = None, **extra):
    body = {
        "item_id": item_id or random_id("item"),
        "content_type": "text/csv",
        "size": len(sealed),
        "sha256": sha256_hex(sealed),
        **extra,
    }
    return api.post(f"/v1/rooms/{room.room_id}/data", token=room.owner.token, json=body)


def test_items_are_listed_only_once_committed(api, hm, store) -> None:
    alice = hm.tenant()
    room = hm.room(alice)
    item_id = random_id("item")
    sealed = hm.sealed_item(room, item_id, b"name,age\nann,40\n")
    created = _declare(api, room, sealed, item_id, name="people.csv", metadata={"table": "people"}).ok(201)
    assert created["item"]["state"] == "pending"
    assert created["item"]["metadata"] == {"table": "people", "name": "people.csv"}
    assert created["upload"]["headers"]["Content-Length"] == str(len(sealed))
    hm.put_upload(created["upload"], sealed)

    assert api.get(f"/v1/rooms/{room.room_id}/data", token=alice.token).ok()["items"] == []
    pending = api.get(
        f"/v1/rooms/{room.room_id}/data", token=alice.token, params={"include_pending": "true"}
    ).ok()
    assert [item["item_id"] for item in pending["items"]] == [item_id]

    committed = api.post(f"/v1/rooms/{room.room_id}/data/{item_id}/commit", token=alice.token).ok()
    assert committed["state"] == "committed" and committed["sha256"] == sha256_hex(sealed)
    listed = api.get(f"/v1/rooms/{room.room_id}/data", token=alice.token).ok()["items"]
    assert [item["item_id"] for item in listed] == [item_id]
    # Committing again is a no-op; the stored object still opens under the room key.
    api.post(f"/v1/rooms/{room.room_id}/data/{item_id}/commit", token=alice.token).ok()
    stored = store.rooms.get_item(room.room_id, item_id)
    context = SealContext(
        tenant_id=alice.tenant_id, room_id=room.room_id, kind=ObjectKind.ITEM, object_id=item_id
    )
    blob = store.blobs.get_bytes(stored.s3_key, version_id=stored.version_id)
    assert open_bytes(blob, key=room.dek, context=context) == b"name,age\nann,40\n"
    assert (
        api.get(f"/v1/rooms/{room.room_id}/audit", token=alice.token).ok()["events"][-1]["kind"]
        == "data_added"
    )


def test_a_wrong_upload_is_refused_at_commit_and_stays_unlisted(hm_lambda, lambda_api, store) -> None:
    alice = hm_lambda.tenant()
    room = hm_lambda.room(alice)
    sealed = hm_lambda.sealed_item(room, "item_x", b"a,b\n1,2\n")
    missing = _declare(lambda_api, room, sealed, "item_missing").ok(201)["item"]["item_id"]
    response = lambda_api.post(f"/v1/rooms/{room.room_id}/data/{missing}/commit", token=alice.token)
    assert (response.status, response.error) == (404, "upload_missing")

    short = _declare(lambda_api, room, sealed, "item_short").ok(201)["item"]
    store.blobs.put_bytes(item_key(room.room_id, short["item_id"]), sealed[:-1])
    response = lambda_api.post(f"/v1/rooms/{room.room_id}/data/{short['item_id']}/commit", token=alice.token)
    assert (response.status, response.error) == (409, "upload_size_mismatch")

    flipped = _declare(lambda_api, room, sealed, "item_flipped").ok(201)["item"]
    store.blobs.put_bytes(item_key(room.room_id, flipped["item_id"]), sealed[:-1] + bytes([sealed[-1] ^ 1]))
    response = lambda_api.post(
        f"/v1/rooms/{room.room_id}/data/{flipped['item_id']}/commit", token=alice.token
    )
    assert (response.status, response.error) == (409, "upload_checksum_mismatch")

    assert lambda_api.get(f"/v1/rooms/{room.room_id}/data", token=alice.token).ok()["items"] == []
    # The right bytes fix it: the declaration stands until the object matches.
    store.blobs.put_bytes(item_key(room.room_id, flipped["item_id"]), sealed)
    lambda_api.post(f"/v1/rooms/{room.room_id}/data/{flipped['item_id']}/commit", token=alice.token).ok()


def test_declaration_refusals(hm_lambda, lambda_api) -> None:
    alice = hm_lambda.tenant()
    room = hm_lambda.room(alice)
    sealed = hm_lambda.sealed_item(room, "item_a", b"x")
    _declare(lambda_api, room, sealed, "item_a").ok(201)
    assert _declare(lambda_api, room, sealed, "item_a").error == "item_exists"
    for extra in (
        {"size": 0},
        {"size": 6 * 1024**3},
        {"sha256": "XYZ"},
        {"content_type": "not a type"},
        {"metadata": {"bad key!": "x"}},
        {"metadata": {f"k{i}": "v" for i in range(65)}},
        {"name": "a\u0000b"},
        {"item_id": "../escape"},
    ):
        response = (
            _declare(lambda_api, room, sealed, **extra)
            if "item_id" not in extra
            else lambda_api.post(
                f"/v1/rooms/{room.room_id}/data",
                token=alice.token,
                json={"content_type": "text/csv", "size": 1, "sha256": "ab" * 32, **extra},
            )
        )
        assert (response.status, response.error) == (400, "invalid_input"), extra
    response = _declare(lambda_api, room, sealed, name="a.csv", metadata={"name": "b.csv"})
    assert response.error == "invalid_input"


def test_only_the_owner_manages_data(api, hm) -> None:
    alice = hm.tenant()
    room = hm.room(alice)
    bob = hm.invite(room)
    mallory = hm.tenant("mallory")
    item_id = hm.add_item(room, b"a\n1\n")
    body = {"content_type": "text/csv", "size": 10, "sha256": "ab" * 32}
    assert (
        api.post(f"/v1/rooms/{room.room_id}/data", token=bob.token, json=body).error == "tenant_key_required"
    )
    response = api.post(f"/v1/rooms/{room.room_id}/data", token=mallory.token, json=body)
    assert (response.status, response.error) == (404, "room_not_found")
    response = api.delete(f"/v1/rooms/{room.room_id}/data/{item_id}", token=mallory.token)
    assert (response.status, response.error) == (404, "room_not_found")
    assert api.get(f"/v1/rooms/{room.room_id}/data", token=alice.token).ok()["items"][0]["item_id"] == item_id


def test_removing_an_item_deletes_every_version_of_its_object(api, hm, store) -> None:
    alice = hm.tenant()
    room = hm.room(alice)
    keep = hm.add_item(room, b"keep\n")
    item_id = hm.add_item(room, b"gone\n")
    key = item_key(room.room_id, item_id)
    store.blobs.put_bytes(key, b"a second version")
    body = api.delete(f"/v1/rooms/{room.room_id}/data/{item_id}", token=alice.token).ok()
    assert body["item_id"] == item_id
    versions = store.clients.s3.list_object_versions(Bucket=store.blobs.bucket, Prefix=key)
    assert not [entry for entry in versions.get("Versions", []) if entry["Key"] == key]
    assert not versions.get("DeleteMarkers")
    assert store.blobs.exists(item_key(room.room_id, keep))
    assert [
        item["item_id"] for item in api.get(f"/v1/rooms/{room.room_id}/data", token=alice.token).ok()["items"]
    ] == [keep]
    response = api.delete(f"/v1/rooms/{room.room_id}/data/{item_id}", token=alice.token)
    assert (response.status, response.error) == (404, "item_not_found")
    assert (
        api.get(f"/v1/rooms/{room.room_id}/audit", token=alice.token).ok()["events"][-1]["kind"]
        == "data_removed"
    )
