"""The room audit log: hash-chained events per room (DESIGN §9).

Same chain construction as the billing ledger (:func:`hivemind.ledger.entry_hash`): ``hash =
SHA-256(prev_hash || JCS(event without hash))``, seq from 1 without gaps, each append conditional on its
seq not existing. The log outlives the room (deleting a room appends an event; it never erases one).
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
from hivemind.store.base import Clock, ConditionFailed, Page, Record, Table
from hivemind.store.config import AwsClients
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
        self._table = Table(clients, TableRole.AUDIT)
        self._clock = clock

    def append(
        self, room_id: str, kind: AuditKind, *, actor: str, details: dict[str, Any] | None = None
    ) -> AuditEntry:
        """Append an event after the room's current head; concurrent appends retry on the next seq."""
        for attempt in range(_MAX_ATTEMPTS):
            head = self._head(room_id)
            fields: dict[str, Any] = {
                "room_id": room_id,
                "seq": head.seq + 1 if head else 1,
                "kind": kind.value,
                "actor": actor,
                "at": self._clock(),
                "details": details or {},
                "prev_hash": head.hash if head else GENESIS_HASH,
            }
            entry = AuditEntry.model_validate({**fields, "hash": entry_hash(fields["prev_hash"], fields)})
            try:
                self._table.put(entry.to_item(), condition="attribute_not_exists(seq)")
            except ConditionFailed:
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

    def entries(self, room_id: str) -> Iterator[AuditEntry]:
        for item in self._table.query_all(
            key_condition="room_id = :room", values={":room": room_id}, scope={"room_id": room_id}
        ):
            yield AuditEntry.from_item(item)

    def verify(self, room_id: str) -> int:
        """Recompute the room's chain; return its length or raise ``IntegrityError`` naming the seq."""
        expected_seq = 1
        prev_hash = GENESIS_HASH
        for entry in self.entries(room_id):
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
        return expected_seq - 1

    def _head(self, room_id: str) -> AuditEntry | None:
        items, _ = self._table.query(
            key_condition="room_id = :room",
            values={":room": room_id},
            scope={"room_id": room_id},
            limit=1,
            newest_first=True,
        )
        return AuditEntry.from_item(items[0]) if items else None
