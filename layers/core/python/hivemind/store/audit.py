"""The room audit log: hash-chained events per room (DESIGN §9).

Same chain construction as the billing ledger (:func:`hivemind.ledger.entry_hash`): ``hash =
SHA-256(prev_hash || JCS(event without hash))``, seq from 1 without gaps. The log outlives the room
(deleting a room appends an event; it never erases one).

Like the ledger's account head, the log's head (last seq and hash) is anchored on the room's record
(``audit_head_seq``, ``audit_head_hash`` on ``sk=manifest``). Each append is ONE DynamoDB transaction
that puts the event (conditional on its seq not existing) and moves the anchor (conditional on it
still being the head that was read), so concurrent appends serialize and every stored event is covered
by the anchor. Verification requires the chain to end exactly at the anchor: deleting the newest
events is ``audit_truncated``, an event past the anchor or a head that is not the anchored one is
``audit_chain_invalid``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

from pydantic import Field

from hivemind.errors import IntegrityError, ServiceUnavailable
from hivemind.ledger import GENESIS_HASH, entry_hash
from hivemind.models import Sha256Hex, UnixSeconds
from hivemind.store.base import Clock, Page, Record, Table, TransactionCancelled, transact
from hivemind.store.config import AwsClients
from hivemind.store.rooms import AuditHead, RoomRepository
from hivemind.store.schema import TableRole

_MAX_ATTEMPTS = 20


class AuditKind(StrEnum):
    ROOM_CREATED = "room_created"
    TRUST_UPDATED = "trust_updated"
    OWNER_KEY_ROTATED = "owner_key_rotated"
    INVITE_CREATED = "invite_created"
    INVITE_REVOKED = "invite_revoked"
    DATA_ADDED = "data_added"
    DATA_REMOVED = "data_removed"
    QUERY_AGENT_ADDED = "query_agent_added"
    ROOM_DELETED = "room_deleted"


class AuditEntry(Record):
    room_id: str = Field(min_length=1, max_length=80)
    seq: int = Field(ge=1)
    kind: AuditKind
    actor: str = Field(min_length=1, max_length=80)
    at: UnixSeconds
    details: dict[str, Any] = Field(default_factory=dict)
    prev_hash: Sha256Hex
    hash: Sha256Hex

    def hashed_fields(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"hash"})


class AuditRepository:
    def __init__(self, clients: AwsClients, clock: Clock) -> None:
        self._clients = clients
        self._table = Table(clients, TableRole.AUDIT)
        self._rooms = RoomRepository(clients, clock)
        self._clock = clock

    def append(
        self, room_id: str, kind: AuditKind, *, actor: str, details: dict[str, Any] | None = None
    ) -> AuditEntry:
        """Append an event after the room's anchored head and move the anchor in the same transaction;
        concurrent appends retry on the next seq. The room must exist (a tombstone is fine)."""
        for attempt in range(_MAX_ATTEMPTS):
            head = self._rooms.audit_head(room_id)
            fields: dict[str, Any] = {
                "room_id": room_id,
                "seq": head.seq + 1,
                "kind": kind.value,
                "actor": actor,
                "at": self._clock(),
                "details": details or {},
                "prev_hash": head.hash,
            }
            entry = AuditEntry.model_validate({**fields, "hash": entry_hash(head.hash, fields)})
            try:
                transact(
                    self._clients,
                    [
                        self._table.put_op(entry.to_item(), condition="attribute_not_exists(seq)"),
                        self._rooms.advance_audit_head_op(
                            room_id, head, AuditHead(seq=entry.seq, hash=entry.hash)
                        ),
                    ],
                    what="append audit event",
                )
            except TransactionCancelled as cancelled:
                # The anchor and its events only ever move together: an event in the next slot while
                # the anchor still stands where it was read was written around the transaction.
                if cancelled.condition_failed(0) and self._rooms.audit_head(room_id) == head:
                    raise IntegrityError(
                        f"audit log of room {room_id}: seq {entry.seq} exists past the anchored head "
                        f"(seq {head.seq})",
                        code="audit_chain_invalid",
                        details={"room_id": room_id, "seq": entry.seq},
                    ) from None
                time.sleep(random.uniform(0, 0.005 * 2 ** min(attempt, 5)))  # noqa: S311 - jitter, not secrecy
                continue
            return entry
        raise ServiceUnavailable(f"audit log of room {room_id} is busy; retry", code="audit_busy")

    def list_events(self, room_id: str, *, cursor: str | None = None, limit: int = 100) -> Page[AuditEntry]:
        items, next_cursor = self._table.query(
            key_condition="room_id = :room",
            values={":room": room_id},
            scope={"room_id": room_id},
            cursor=cursor,
            limit=limit,
        )
        return Page[AuditEntry](items=[AuditEntry.from_item(item) for item in items], cursor=next_cursor)

    def entries(self, room_id: str, *, up_to_seq: int | None = None) -> Iterator[AuditEntry]:
        """The room's events in seq order (up to and including ``up_to_seq`` when given)."""
        key_condition = "room_id = :room"
        values: dict[str, Any] = {":room": room_id}
        if up_to_seq is not None:
            key_condition += " AND seq <= :head"
            values[":head"] = up_to_seq
        for item in self._table.query_all(
            key_condition=key_condition, values=values, scope={"room_id": room_id}
        ):
            yield AuditEntry.from_item(item)

    def verify(self, room_id: str) -> int:
        """Recompute the room's chain and check that it ends exactly at the anchored head; return its
        length or raise ``IntegrityError`` naming the seq (``audit_chain_invalid``, ``audit_truncated``,
        ``audit_unanchored``). An unknown room is :class:`~hivemind.errors.NotFound`."""
        # The anchor is read first and the chain up to it, so appends made meanwhile do not disturb
        # the snapshot (they commit event and anchor together).
        head = self._rooms.audit_head(room_id)
        expected_seq = 1
        prev_hash = GENESIS_HASH
        for entry in self.entries(room_id, up_to_seq=head.seq):
            where = {"room_id": room_id, "seq": entry.seq}
            if entry.seq != expected_seq:
                raise IntegrityError(
                    f"audit log of room {room_id}: expected seq {expected_seq}, found {entry.seq}",
                    code="audit_chain_invalid",
                    details=where,
                )
            if (
                entry.prev_hash != prev_hash
                or entry_hash(entry.prev_hash, entry.hashed_fields()) != entry.hash
            ):
                raise IntegrityError(
                    f"audit log of room {room_id}: seq {entry.seq} does not verify",
                    code="audit_chain_invalid",
                    details=where,
                )
            prev_hash = entry.hash
            expected_seq += 1
        length = expected_seq - 1
        if length != head.seq:
            raise IntegrityError(
                f"audit log of room {room_id} ends at seq {length}, but its anchored head is seq "
                f"{head.seq}: the newest events were deleted",
                code="audit_truncated",
                details={"room_id": room_id, "seq": length + 1},
            )
        if prev_hash != head.hash:
            raise IntegrityError(
                f"audit log of room {room_id}: seq {length} is not the anchored head event",
                code="audit_chain_invalid",
                details={"room_id": room_id, "seq": length},
            )
        self._refuse_events_past(room_id, head)
        return length

    def _refuse_events_past(self, room_id: str, head: AuditHead) -> None:
        beyond, _ = self._table.query(
            key_condition="room_id = :room AND seq > :head",
            values={":room": room_id, ":head": head.seq},
            scope={"room_id": room_id},
            limit=1,
        )
        # An event past the head that the anchor still does not cover afterwards was not appended by
        # a transaction: that is tampering, not a race.
        if beyond and self._rooms.audit_head(room_id).seq < beyond[0]["seq"]:
            raise IntegrityError(
                f"audit log of room {room_id}: seq {beyond[0]['seq']} lies beyond the anchored head "
                f"(seq {head.seq})",
                code="audit_chain_invalid",
                details={"room_id": room_id, "seq": beyond[0]["seq"]},
            )
