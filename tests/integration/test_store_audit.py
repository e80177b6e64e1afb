"""The room audit log's anchored head on a real moto server: appends move the head on the room record in
the same transaction, and verification requires the chain to end exactly there."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from hivemind.errors import IntegrityError, NotFound
from hivemind.ledger import GENESIS_HASH, entry_hash
from hivemind.store import AwsClients, Store
from hivemind.store.audit import AuditEntry, AuditKind
from hivemind.store.base import deserialize, serialize
from hivemind.store.rooms import AuditHead, RoomRecord
from hivemind.store.schema import TableRole

from .conftest import T0

pytestmark = pytest.mark.moto_server

ROOM = "room_a"


def new_room(store: Store, room_id: str = ROOM) -> None:
    store.rooms.create(
        RoomRecord(
            room_id=room_id,
            tenant_id="tenant_owner",
            envelope={"manifest": {"room_id": room_id}, "signature": "sig"},
            manifest_hash=hashlib.sha256(room_id.encode()).hexdigest(),
            revision=1,
            created_at=T0,
            updated_at=T0,
        )
    )


def room_with_events(store: Store, count: int, room_id: str = ROOM) -> list[AuditEntry]:
    new_room(store, room_id)
    return [
        store.audit.append(room_id, AuditKind.INVITE_CREATED, actor=f"actor{index}") for index in range(count)
    ]


def audit_row(aws: AwsClients, seq: int) -> dict[str, Any]:
    item = aws.dynamodb.get_item(
        TableName=aws.config.table_name(TableRole.AUDIT),
        Key=serialize({"room_id": ROOM, "seq": seq}),
        ConsistentRead=True,
    )["Item"]
    return deserialize(item)


def put_audit_row(aws: AwsClients, row: dict[str, Any]) -> None:
    aws.dynamodb.put_item(TableName=aws.config.table_name(TableRole.AUDIT), Item=serialize(row))


def delete_audit_row(aws: AwsClients, seq: int) -> None:
    aws.dynamodb.delete_item(
        TableName=aws.config.table_name(TableRole.AUDIT), Key=serialize({"room_id": ROOM, "seq": seq})
    )


def relinked(after: dict[str, Any], seq: int, **changes: Any) -> dict[str, Any]:
    """A well-formed event at ``seq`` linked to ``after`` (a forger who knows the construction)."""
    fields = {**after, "seq": seq, "prev_hash": after["hash"], **changes}
    del fields["hash"]
    return {**fields, "hash": entry_hash(after["hash"], fields)}


def test_a_new_room_starts_at_the_genesis_head_and_each_append_moves_it(clocked_store: Store) -> None:
    new_room(clocked_store)
    assert clocked_store.rooms.audit_head(ROOM) == AuditHead(seq=0, hash=GENESIS_HASH)
    assert clocked_store.audit.verify(ROOM) == 0
    first = clocked_store.audit.append(ROOM, AuditKind.ROOM_CREATED, actor="tenant_owner")
    assert (first.seq, first.prev_hash) == (1, GENESIS_HASH)
    second = clocked_store.audit.append(ROOM, AuditKind.INVITE_CREATED, actor="tenant_owner")
    record = clocked_store.rooms.get(ROOM)
    assert (record.audit_head_seq, record.audit_head_hash) == (2, second.hash)
    assert clocked_store.audit.verify(ROOM) == 2


def test_concurrent_appends_serialize_on_the_anchor(clocked_store: Store) -> None:
    new_room(clocked_store)
    with ThreadPoolExecutor(max_workers=8) as pool:
        appended = list(
            pool.map(
                lambda index: clocked_store.audit.append(ROOM, AuditKind.DATA_ADDED, actor=f"a{index}"),
                range(8),
            )
        )
    assert sorted(entry.seq for entry in appended) == list(range(1, 9))
    assert clocked_store.audit.verify(ROOM) == 8
    newest = max(appended, key=lambda entry: entry.seq)
    assert clocked_store.rooms.audit_head(ROOM) == AuditHead(seq=8, hash=newest.hash)


@pytest.mark.parametrize("deleted", [[4], [3, 4], [1, 2, 3, 4]])
def test_deleting_the_newest_events_is_audit_truncated(
    clocked_store: Store, aws: AwsClients, deleted: list[int]
) -> None:
    room_with_events(clocked_store, 4)
    for seq in deleted:
        delete_audit_row(aws, seq)
    with pytest.raises(IntegrityError, match="anchored head is seq 4") as refused:
        clocked_store.audit.verify(ROOM)
    assert refused.value.code == "audit_truncated"
    assert refused.value.details == {"room_id": ROOM, "seq": deleted[0]}


def test_a_replaced_head_event_is_not_the_anchored_one(clocked_store: Store, aws: AwsClients) -> None:
    room_with_events(clocked_store, 3)
    put_audit_row(aws, relinked(audit_row(aws, 2), 3, actor="someone_else"))
    with pytest.raises(IntegrityError, match="seq 3 is not the anchored head") as refused:
        clocked_store.audit.verify(ROOM)
    assert (refused.value.code, refused.value.details["seq"]) == ("audit_chain_invalid", 3)


def test_an_event_past_the_anchor_is_refused_by_verify_and_by_the_next_append(
    clocked_store: Store, aws: AwsClients
) -> None:
    entries = room_with_events(clocked_store, 2)
    put_audit_row(aws, relinked(audit_row(aws, 2), 3, details={"forged": True}))
    with pytest.raises(IntegrityError, match="beyond the anchored head") as refused:
        clocked_store.audit.verify(ROOM)
    assert (refused.value.code, refused.value.details["seq"]) == ("audit_chain_invalid", 3)
    with pytest.raises(IntegrityError, match="exists past the anchored head") as appended:
        clocked_store.audit.append(ROOM, AuditKind.DATA_ADDED, actor="tenant_owner")
    assert appended.value.code == "audit_chain_invalid"
    assert clocked_store.rooms.audit_head(ROOM) == AuditHead(seq=2, hash=entries[-1].hash)


def test_rolling_the_anchor_back_leaves_events_past_it(clocked_store: Store, aws: AwsClients) -> None:
    entries = room_with_events(clocked_store, 3)
    aws.dynamodb.update_item(
        TableName=aws.config.table_name(TableRole.ROOMS),
        Key=serialize({"room_id": ROOM, "sk": "manifest"}),
        UpdateExpression="SET audit_head_seq = :seq, audit_head_hash = :hash",
        ExpressionAttributeValues=serialize({":seq": 1, ":hash": entries[0].hash}),
    )
    with pytest.raises(IntegrityError, match="seq 2 lies beyond the anchored head") as refused:
        clocked_store.audit.verify(ROOM)
    assert refused.value.code == "audit_chain_invalid"


def test_a_room_record_without_an_anchor_is_refused(clocked_store: Store, aws: AwsClients) -> None:
    """A room record written before the anchor existed (none are deployed) or stripped of it."""
    room_with_events(clocked_store, 2)
    aws.dynamodb.update_item(
        TableName=aws.config.table_name(TableRole.ROOMS),
        Key=serialize({"room_id": ROOM, "sk": "manifest"}),
        UpdateExpression="REMOVE audit_head_seq, audit_head_hash",
    )
    for attempt in (
        lambda: clocked_store.audit.verify(ROOM),
        lambda: clocked_store.audit.append(ROOM, AuditKind.DATA_ADDED, actor="tenant_owner"),
    ):
        with pytest.raises(IntegrityError) as refused:
            attempt()
        assert refused.value.code == "audit_unanchored"
    assert [entry.seq for entry in clocked_store.audit.entries(ROOM)] == [1, 2]


def test_no_audit_log_without_a_room(clocked_store: Store) -> None:
    with pytest.raises(NotFound):
        clocked_store.audit.append("room_unknown", AuditKind.ROOM_CREATED, actor="tenant_owner")
    with pytest.raises(NotFound):
        clocked_store.audit.verify("room_unknown")
    assert list(clocked_store.audit.entries("room_unknown")) == []
    assert clocked_store.rooms.get("room_unknown") is None  # the failed append created no record


def test_the_anchor_survives_manifest_updates_and_the_tombstone(clocked_store: Store) -> None:
    room_with_events(clocked_store, 2)
    clocked_store.rooms.update_manifest(
        ROOM, envelope={"manifest": {"room_id": ROOM}, "signature": "v2"}, manifest_hash="b" * 64, revision=2
    )
    assert clocked_store.audit.verify(ROOM) == 2
    clocked_store.rooms.delete(ROOM)
    deleted = clocked_store.audit.append(ROOM, AuditKind.ROOM_DELETED, actor="tenant_owner")
    assert deleted.seq == 3
    assert clocked_store.audit.verify(ROOM) == 3
    assert clocked_store.rooms.get(ROOM).audit_head_seq == 3
