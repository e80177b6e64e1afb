"""Rooms: the signed manifest envelope, key wraps per bearer, and data items (DESIGN §5, §9).

One partition per room. Sort keys: ``manifest`` (envelope, hash, revision, status, and the anchored head
of the room's audit log, see :mod:`hivemind.store.audit`), ``wrap#<bearer>``
(the room DEK wrapped for one bearer; useless without that bearer's secret) and ``item#<id>`` (a sealed
data object's size, SHA-256, content type, metadata, S3 key and pinned version).

The store itself refuses a manifest revision that is not newer than the stored one, so a rollback is
impossible even for code that forgets to check. Deleting a room leaves a tombstone: old links then get
"room deleted" (410), not "not found".
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field, ValidationError

from hivemind.errors import Conflict, Gone, IntegrityError, NotFound, RevisionRollback
from hivemind.ledger import GENESIS_HASH
from hivemind.models import Sha256Hex, UnixSeconds
from hivemind.store.base import Clock, ConditionFailed, Page, Record, Table, TransactionCancelled, transact
from hivemind.store.blobs import StoredObject
from hivemind.store.config import AwsClients
from hivemind.store.schema import ROOMS_BY_TENANT, TableRole

MANIFEST_SK = "manifest"
WRAP_PREFIX = "wrap#"
ITEM_PREFIX = "item#"


class RoomStatus(StrEnum):
    ACTIVE = "active"
    DELETED = "deleted"


class RoomRecord(Record):
    room_id: str = Field(min_length=1, max_length=80)
    tenant_id: str = Field(min_length=1, max_length=80)
    # The signed manifest envelope as JSON; readers verify it on every use. None once deleted.
    envelope: dict[str, Any] | None = None
    manifest_hash: Sha256Hex
    revision: int = Field(ge=1)
    status: RoomStatus = RoomStatus.ACTIVE
    created_at: UnixSeconds
    updated_at: UnixSeconds
    deleted_at: UnixSeconds | None = None
    # The audit log's head (last seq and hash), moved only in the transaction that appends an event.
    # A new room starts before its first event; the tombstone keeps it (the log outlives the room).
    audit_head_seq: int = Field(default=0, ge=0)
    audit_head_hash: Sha256Hex = GENESIS_HASH


class AuditHead(Record):
    """Where a room's audit log ends: seq 0 and the genesis hash before the first event."""

    seq: int = Field(ge=0)
    hash: Sha256Hex


class RoomWrap(Record):
    room_id: str
    bearer_id: str = Field(min_length=1, max_length=80, pattern=r"^[^|#]+$")
    wrapped: str = Field(pattern=r"^[A-Za-z0-9_-]{16,200}$")
    created_at: UnixSeconds


class ItemState(StrEnum):
    PENDING = "pending"
    COMMITTED = "committed"


class RoomItem(Record):
    room_id: str
    item_id: str = Field(min_length=1, max_length=80)
    content_type: str = Field(min_length=1, max_length=200)
    size: int = Field(ge=1)
    sha256: Sha256Hex
    metadata: dict[str, str] = Field(default_factory=dict, max_length=64)
    s3_key: str
    state: ItemState = ItemState.PENDING
    version_id: str | None = None
    created_at: UnixSeconds
    committed_at: UnixSeconds | None = None


def _room_gone(record: RoomRecord) -> Gone:
    return Gone(f"room {record.room_id} was deleted", code="room_deleted")


class RoomRepository:
    def __init__(self, clients: AwsClients, clock: Clock) -> None:
        self._table = Table(clients, TableRole.ROOMS)
        self._clients = clients
        self._clock = clock

    # --- manifest --------------------------------------------------------------------------------

    def create(self, record: RoomRecord) -> RoomRecord:
        """Create an active room; an id already used (even by a deleted room) is :class:`Conflict`."""
        if record.status is not RoomStatus.ACTIVE or record.envelope is None:
            raise Conflict("a new room is active and has a manifest envelope")
        self._table.put_new({**record.to_item(), "sk": MANIFEST_SK}, what=f"room {record.room_id}")
        return record

    def get(self, room_id: str) -> RoomRecord | None:
        item = self._table.get({"room_id": room_id, "sk": MANIFEST_SK})
        return RoomRecord.from_item(item) if item else None

    def require_active(self, room_id: str) -> RoomRecord:
        record = self.get(room_id)
        if record is None:
            raise NotFound(f"no room {room_id}")
        if record.status is RoomStatus.DELETED:
            raise _room_gone(record)
        return record

    def update_manifest(
        self, room_id: str, *, envelope: dict[str, Any], manifest_hash: str, revision: int
    ) -> RoomRecord:
        """Store a re-signed manifest. Only a strictly newer revision of an active room is accepted;
        repeating the very same update is a no-op."""
        try:
            item = self._table.update(
                {"room_id": room_id, "sk": MANIFEST_SK},
                update=(
                    "SET envelope = :envelope, manifest_hash = :hash, revision = :revision, updated_at = :now"
                ),
                condition="#status = :active AND revision < :revision",
                names={"#status": "status"},
                values={
                    ":envelope": envelope,
                    ":hash": manifest_hash,
                    ":revision": revision,
                    ":active": RoomStatus.ACTIVE.value,
                    ":now": self._clock(),
                },
            )
        except ConditionFailed:
            current = self.require_active(room_id)
            if current.revision == revision and current.manifest_hash == manifest_hash:
                return current
            raise RevisionRollback(
                f"room {room_id} is at revision {current.revision}; revision {revision} is not newer",
                details={"stored_revision": current.revision, "offered_revision": revision},
            ) from None
        return RoomRecord.from_item(item)

    def list_by_tenant(
        self, tenant_id: str, *, include_deleted: bool = False, cursor: str | None = None, limit: int = 50
    ) -> Page[RoomRecord]:
        items, next_cursor = self._table.query(
            index=ROOMS_BY_TENANT,
            key_condition="tenant_id = :tenant",
            values={":tenant": tenant_id} | ({} if include_deleted else {":active": RoomStatus.ACTIVE.value}),
            names=None if include_deleted else {"#status": "status"},
            filter_expression=None if include_deleted else "#status = :active",
            scope={"tenant_id": tenant_id},
            cursor=cursor,
            limit=limit,
        )
        return Page[RoomRecord](items=[RoomRecord.from_item(item) for item in items], cursor=next_cursor)

    def delete(self, room_id: str) -> RoomRecord:
        """Tombstone the room and remove every wrap and item record (idempotent: finishing an
        interrupted delete is fine). Sealed objects are removed separately from the bucket."""
        now = self._clock()
        try:
            item = self._table.update(
                {"room_id": room_id, "sk": MANIFEST_SK},
                update="SET #status = :deleted, deleted_at = :now, updated_at = :now REMOVE envelope",
                condition="#status = :active",
                names={"#status": "status"},
                values={
                    ":deleted": RoomStatus.DELETED.value,
                    ":active": RoomStatus.ACTIVE.value,
                    ":now": now,
                },
            )
            tombstone = RoomRecord.from_item(item)
        except ConditionFailed:
            existing = self.get(room_id)
            if existing is None:
                raise NotFound(f"no room {room_id}") from None
            tombstone = existing
        children = [
            {"room_id": room_id, "sk": child["sk"]}
            for child in self._table.query_all(
                key_condition="room_id = :room", values={":room": room_id}, scope={"room_id": room_id}
            )
            if child["sk"] != MANIFEST_SK
        ]
        self._table.delete_many(children)
        return tombstone

    # --- wraps -----------------------------------------------------------------------------------

    def put_wrap(self, wrap: RoomWrap) -> RoomWrap:
        """Store (or replace, e.g. after key rotation) a bearer's wrap of an active room."""
        self._write_with_active_room(
            wrap.room_id, self._table.put_op({**wrap.to_item(), "sk": WRAP_PREFIX + wrap.bearer_id})
        )
        return wrap

    def get_wrap(self, room_id: str, bearer_id: str) -> RoomWrap | None:
        item = self._table.get({"room_id": room_id, "sk": WRAP_PREFIX + bearer_id})
        return RoomWrap.from_item(item) if item else None

    def delete_wrap(self, room_id: str, bearer_id: str) -> bool:
        """Remove a bearer's wrap; returns whether there was one."""
        return self._table.delete({"room_id": room_id, "sk": WRAP_PREFIX + bearer_id}) is not None

    # --- items -----------------------------------------------------------------------------------

    def add_item(self, item: RoomItem) -> RoomItem:
        """Record a pending item (its upload is not verified yet, so it is not listed)."""
        if item.state is not ItemState.PENDING:
            raise Conflict("a new item starts pending")
        stored = {**item.to_item(), "sk": ITEM_PREFIX + item.item_id}
        try:
            self._write_with_active_room(
                item.room_id, self._table.put_op(stored, condition="attribute_not_exists(room_id)")
            )
        except Conflict:
            if self._table.get({"room_id": item.room_id, "sk": stored["sk"]}) != stored:
                raise
        return item

    def commit_item(self, room_id: str, item_id: str, stored: StoredObject) -> RoomItem:
        """Mark an item committed once its object was verified (see ``BlobStore.verify_uploaded``).

        The verified object must be the declared one (key, size, SHA-256). Repeating a commit of the
        same version is a no-op.
        """
        item = self.get_item(room_id, item_id)
        if item is None:
            raise NotFound(f"no item {item_id} in room {room_id}")
        if (stored.key, stored.size, stored.sha256) != (item.s3_key, item.size, item.sha256):
            raise IntegrityError(
                f"item {item_id}: the verified object is not the declared one", code="upload_mismatch"
            )
        if item.state is ItemState.COMMITTED:
            if item.version_id == stored.version_id:
                return item
            raise Conflict(f"item {item_id} is already committed with another version")
        now = self._clock()
        self._write_with_active_room(
            room_id,
            self._table.update_op(
                {"room_id": room_id, "sk": ITEM_PREFIX + item_id},
                update="SET #state = :committed, version_id = :version, committed_at = :now",
                condition="#state = :pending",
                names={"#state": "state"},
                values={
                    ":committed": ItemState.COMMITTED.value,
                    ":pending": ItemState.PENDING.value,
                    ":version": stored.version_id,
                    ":now": now,
                },
            ),
        )
        return item.model_copy(
            update={"state": ItemState.COMMITTED, "version_id": stored.version_id, "committed_at": now}
        )

    def get_item(self, room_id: str, item_id: str) -> RoomItem | None:
        item = self._table.get({"room_id": room_id, "sk": ITEM_PREFIX + item_id})
        return RoomItem.from_item(item) if item else None

    def list_items(
        self, room_id: str, *, include_pending: bool = False, cursor: str | None = None, limit: int = 100
    ) -> Page[RoomItem]:
        """The room's items; only committed (verified) ones unless ``include_pending``."""
        values: dict[str, Any] = {":room": room_id, ":prefix": ITEM_PREFIX}
        if not include_pending:
            values[":committed"] = ItemState.COMMITTED.value
        items, next_cursor = self._table.query(
            key_condition="room_id = :room AND begins_with(sk, :prefix)",
            values=values,
            names=None if include_pending else {"#state": "state"},
            filter_expression=None if include_pending else "#state = :committed",
            scope={"room_id": room_id},
            cursor=cursor,
            limit=limit,
        )
        return Page[RoomItem](items=[RoomItem.from_item(item) for item in items], cursor=next_cursor)

    def remove_item(self, room_id: str, item_id: str) -> RoomItem:
        old = self._table.delete({"room_id": room_id, "sk": ITEM_PREFIX + item_id})
        if old is None:
            raise NotFound(f"no item {item_id} in room {room_id}")
        return RoomItem.from_item(old)

    # --- audit head ------------------------------------------------------------------------------

    def audit_head(self, room_id: str) -> AuditHead:
        """The anchored head of the room's audit log (tombstones keep it).

        :class:`NotFound` for an unknown room; ``IntegrityError`` (``audit_unanchored``) for a room record
        that carries no valid head: every room written by this store has one from its creation.
        """
        item = self._table.get({"room_id": room_id, "sk": MANIFEST_SK})
        if item is None:
            raise NotFound(f"no room {room_id}")
        try:
            return AuditHead(seq=item["audit_head_seq"], hash=item["audit_head_hash"])
        except (KeyError, ValidationError):
            raise IntegrityError(
                f"room {room_id} has no valid anchored audit head, so its audit log cannot be verified",
                code="audit_unanchored",
                details={"room_id": room_id},
            ) from None

    def advance_audit_head_op(self, room_id: str, previous: AuditHead, new: AuditHead) -> dict[str, Any]:
        """The transaction operation that moves the head from ``previous`` to ``new``; it fails unless
        the head is still ``previous`` (so concurrent appends serialize) and never creates a record."""
        return self._table.update_op(
            {"room_id": room_id, "sk": MANIFEST_SK},
            update="SET audit_head_seq = :seq, audit_head_hash = :hash",
            condition="audit_head_seq = :previous_seq AND audit_head_hash = :previous_hash",
            values={
                ":seq": new.seq,
                ":hash": new.hash,
                ":previous_seq": previous.seq,
                ":previous_hash": previous.hash,
            },
        )

    # --- helpers ---------------------------------------------------------------------------------

    def _write_with_active_room(self, room_id: str, operation: dict[str, Any]) -> None:
        """Apply ``operation`` only while the room is active (a wrap or item can never appear in a
        deleted room, even when the delete races with the write)."""
        try:
            transact(
                self._clients,
                [
                    self._table.check_op(
                        {"room_id": room_id, "sk": MANIFEST_SK},
                        condition="#status = :active",
                        names={"#status": "status"},
                        values={":active": RoomStatus.ACTIVE.value},
                    ),
                    operation,
                ],
                what="write room",
            )
        except TransactionCancelled as exc:
            if exc.condition_failed(0):
                self.require_active(room_id)
            if exc.condition_failed(1):
                raise Conflict(f"room {room_id}: the record changed concurrently or already exists") from None
            raise Conflict(f"room {room_id} changed concurrently; retry") from None
