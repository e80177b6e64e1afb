"""Rooms on a real moto server: manifest revisions, wraps, items, deletion with a tombstone."""

from __future__ import annotations

import hashlib

import pytest

from hivemind.errors import Conflict, Gone, IntegrityError, NotFound, RevisionRollback
from hivemind.store import Store
from hivemind.store.blobs import StoredObject
from hivemind.store.rooms import ItemState, RoomItem, RoomRecord, RoomStatus, RoomWrap
from hivemind.store.schema import item_key

from .conftest import T0

pytestmark = pytest.mark.moto_server

WRAPPED = "A" * 80


def room(room_id: str = "room_a", tenant_id: str = "tenant_owner", revision: int = 1) -> RoomRecord:
    envelope = {
        "manifest": {"room_id": room_id, "revision": revision, "budgets": {"tokens": 5}},
        "signature": "sig",
    }
    return RoomRecord(
        room_id=room_id,
        tenant_id=tenant_id,
        envelope=envelope,
        manifest_hash=hashlib.sha256(f"{room_id}{revision}".encode()).hexdigest(),
        revision=revision,
        created_at=T0,
        updated_at=T0,
    )


def item(room_id: str, item_id: str, data: bytes = b"sealed bytes") -> RoomItem:
    return RoomItem(
        room_id=room_id,
        item_id=item_id,
        content_type="text/csv",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        metadata={"table": "sales"},
        s3_key=item_key(room_id, item_id),
        created_at=T0,
    )


def stored_for(record: RoomItem, version: str = "v1") -> StoredObject:
    return StoredObject(key=record.s3_key, size=record.size, sha256=record.sha256, version_id=version)


def test_create_round_trips_the_envelope_and_refuses_duplicates(clocked_store: Store) -> None:
    record = room()
    clocked_store.rooms.create(record)
    assert clocked_store.rooms.get("room_a") == record
    clocked_store.rooms.create(record)  # identical retry
    with pytest.raises(Conflict):
        clocked_store.rooms.create(room(tenant_id="tenant_intruder"))


def test_manifest_revision_can_only_go_up(clocked_store: Store) -> None:
    clocked_store.rooms.create(room())
    updated = clocked_store.rooms.update_manifest(
        "room_a", envelope=room(revision=3).envelope, manifest_hash=room(revision=3).manifest_hash, revision=3
    )
    assert updated.revision == 3 and updated.envelope["manifest"]["revision"] == 3
    # The same update again is a no-op, not an error (a retried request).
    again = clocked_store.rooms.update_manifest(
        "room_a", envelope=room(revision=3).envelope, manifest_hash=room(revision=3).manifest_hash, revision=3
    )
    assert again.revision == 3
    for stale in (1, 2, 3):
        with pytest.raises(RevisionRollback) as caught:
            clocked_store.rooms.update_manifest(
                "room_a", envelope=room(revision=stale).envelope, manifest_hash="f" * 64, revision=stale
            )
        assert caught.value.details == {"stored_revision": 3, "offered_revision": stale}
    assert clocked_store.rooms.get("room_a").manifest_hash == room(revision=3).manifest_hash
    with pytest.raises(NotFound):
        clocked_store.rooms.update_manifest("room_missing", envelope={}, manifest_hash="a" * 64, revision=9)


def test_wraps_are_per_bearer(clocked_store: Store) -> None:
    clocked_store.rooms.create(room())
    wrap = RoomWrap(room_id="room_a", bearer_id="0123456789abcdef", wrapped=WRAPPED, created_at=T0)
    clocked_store.rooms.put_wrap(wrap)
    assert clocked_store.rooms.get_wrap("room_a", "0123456789abcdef") == wrap
    assert clocked_store.rooms.get_wrap("room_a", "fedcba9876543210") is None
    assert clocked_store.rooms.delete_wrap("room_a", "0123456789abcdef")
    assert not clocked_store.rooms.delete_wrap("room_a", "0123456789abcdef")
    with pytest.raises(NotFound):
        clocked_store.rooms.put_wrap(wrap.model_copy(update={"room_id": "room_missing"}))


def test_items_are_listed_only_once_committed_with_the_declared_object(clocked_store: Store) -> None:
    clocked_store.rooms.create(room())
    first = clocked_store.rooms.add_item(item("room_a", "item_1"))
    clocked_store.rooms.add_item(item("room_a", "item_1"))  # identical retry
    with pytest.raises(Conflict):
        clocked_store.rooms.add_item(item("room_a", "item_1", b"other bytes"))
    assert clocked_store.rooms.list_items("room_a").items == []
    assert [
        entry.item_id for entry in clocked_store.rooms.list_items("room_a", include_pending=True).items
    ] == ["item_1"]

    wrong = stored_for(first).model_copy(update={"sha256": "0" * 64})
    with pytest.raises(IntegrityError, match="not the declared one"):
        clocked_store.rooms.commit_item("room_a", "item_1", wrong)

    committed = clocked_store.rooms.commit_item("room_a", "item_1", stored_for(first))
    assert committed.state is ItemState.COMMITTED and committed.version_id == "v1"
    assert clocked_store.rooms.commit_item("room_a", "item_1", stored_for(first)) == committed
    with pytest.raises(Conflict, match="another version"):
        clocked_store.rooms.commit_item("room_a", "item_1", stored_for(first, "v2"))
    assert clocked_store.rooms.list_items("room_a").items == [committed]

    assert clocked_store.rooms.remove_item("room_a", "item_1") == committed
    with pytest.raises(NotFound):
        clocked_store.rooms.remove_item("room_a", "item_1")


def test_delete_leaves_a_tombstone_and_nothing_else(clocked_store: Store) -> None:
    clocked_store.rooms.create(room())
    clocked_store.rooms.create(room("room_kept"))
    clocked_store.rooms.put_wrap(
        RoomWrap(room_id="room_a", bearer_id="owner", wrapped=WRAPPED, created_at=T0)
    )
    pending = clocked_store.rooms.add_item(item("room_a", "item_1"))
    clocked_store.rooms.add_item(item("room_a", "item_2"))
    clocked_store.rooms.commit_item("room_a", "item_2", stored_for(item("room_a", "item_2")))

    tombstone = clocked_store.rooms.delete("room_a")
    assert tombstone.status is RoomStatus.DELETED and tombstone.envelope is None
    assert clocked_store.rooms.delete("room_a").status is RoomStatus.DELETED  # idempotent
    with pytest.raises(Gone) as caught:
        clocked_store.rooms.require_active("room_a")
    assert caught.value.code == "room_deleted"
    assert clocked_store.rooms.get_wrap("room_a", "owner") is None
    assert clocked_store.rooms.list_items("room_a", include_pending=True).items == []

    # Nothing can be added to a deleted room, and its id cannot be reused.
    with pytest.raises(Gone):
        clocked_store.rooms.put_wrap(
            RoomWrap(room_id="room_a", bearer_id="late", wrapped=WRAPPED, created_at=T0)
        )
    with pytest.raises(Gone):
        clocked_store.rooms.add_item(pending)
    with pytest.raises(Gone):
        clocked_store.rooms.update_manifest("room_a", envelope={}, manifest_hash="a" * 64, revision=5)
    with pytest.raises(Conflict):
        clocked_store.rooms.create(room())

    listed = clocked_store.rooms.list_by_tenant("tenant_owner")
    assert [record.room_id for record in listed.items] == ["room_kept"]
    with_deleted = clocked_store.rooms.list_by_tenant("tenant_owner", include_deleted=True)
    assert {record.room_id for record in with_deleted.items} == {"room_a", "room_kept"}
    with pytest.raises(NotFound):
        clocked_store.rooms.delete("room_never")
