"""Agents: uploaded agent sources, their digests and visibility (DESIGN §5, §8, §12).

An agent is created ``pending`` with the digest its owner declares, becomes ``active`` once its source
object is verified, and gets the image digest the runner built from it recorded next to the source
digest (receipts cover both).
"""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import Field

from hivemind.envelope import SealedEnvelope
from hivemind.errors import Conflict, IntegrityError, InvalidInput, NotFound
from hivemind.models import Sha256Hex, UnixSeconds, Visibility
from hivemind.store.base import Clock, ConditionFailed, Page, Record, Table
from hivemind.store.blobs import StoredObject
from hivemind.store.config import AwsClients
from hivemind.store.schema import AGENTS_BY_TENANT, TableRole

_IMAGE_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class AgentState(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"


class AgentRecord(Record):
    agent_id: str = Field(min_length=1, max_length=80)
    tenant_id: str = Field(min_length=1, max_length=80)
    name: str = Field(min_length=1, max_length=200)
    # Set when the agent was uploaded for one room (an uploadable query agent); None for a library agent.
    room_id: str | None = None
    visibility: Visibility
    # Digest that manifests pin: hivemind.archive.source_digest, the SHA-256 of the JCS of the sorted
    # file list (not of the archive bytes, sealed or not).
    source_digest: Sha256Hex
    source_key: str
    # The stored (possibly sealed) source object, pinned at commit.
    source_object: StoredObject | None = None
    file_digests: dict[str, Sha256Hex] = Field(default_factory=dict)
    # Sealed agents only: the agent key, HPKE-sealed to the runner; the control plane cannot open it.
    sealed_key: SealedEnvelope | None = None
    image_digest: str | None = Field(default=None, pattern=_IMAGE_DIGEST.pattern)
    state: AgentState = AgentState.PENDING
    created_at: UnixSeconds
    updated_at: UnixSeconds


class AgentRepository:
    def __init__(self, clients: AwsClients, clock: Clock) -> None:
        self._table = Table(clients, TableRole.AGENTS)
        self._clock = clock

    def create(self, record: AgentRecord) -> AgentRecord:
        if record.state is not AgentState.PENDING or record.source_object is not None:
            raise Conflict("a new agent starts pending, before its source is verified")
        self._table.put_new(record.to_item(), what=f"agent {record.agent_id}")
        return record

    def get(self, agent_id: str) -> AgentRecord | None:
        item = self._table.get({"agent_id": agent_id})
        return AgentRecord.from_item(item) if item else None

    def require_active(self, agent_id: str) -> AgentRecord:
        record = self.get(agent_id)
        if record is None or record.state is not AgentState.ACTIVE:
            raise NotFound(f"no active agent {agent_id}")
        return record

    def commit(self, agent_id: str, stored: StoredObject, *, file_digests: dict[str, str]) -> AgentRecord:
        """Activate an agent whose source object was verified; repeating the same commit is a no-op."""
        record = self.get(agent_id)
        if record is None:
            raise NotFound(f"no agent {agent_id}")
        if stored.key != record.source_key:
            raise IntegrityError(
                f"agent {agent_id}: the verified object is not its source", code="upload_mismatch"
            )
        if record.state is AgentState.ACTIVE:
            if record.source_object == stored and record.file_digests == file_digests:
                return record
            raise Conflict(f"agent {agent_id} is already committed with another source")
        committed = AgentRecord.model_validate(
            {
                **record.model_dump(),
                "source_object": stored.model_dump(),
                "file_digests": file_digests,
                "state": AgentState.ACTIVE,
                "updated_at": self._clock(),
            }
        )
        try:
            self._table.put(
                committed.to_item(),
                condition="#state = :pending",
                names={"#state": "state"},
                values={":pending": AgentState.PENDING.value},
            )
        except ConditionFailed:
            raise Conflict(f"agent {agent_id} changed while committing; retry") from None
        return committed

    def record_image_digest(self, agent_id: str, image_digest: str) -> AgentRecord:
        """The runner records the image it last built from the source. Image builds need not be
        reproducible, so a rebuild may replace the digest; each run's receipt names the one it used."""
        if not _IMAGE_DIGEST.fullmatch(image_digest):
            raise InvalidInput("an image digest looks like sha256:<64 hex digits>")
        try:
            item = self._table.update(
                {"agent_id": agent_id},
                update="SET image_digest = :digest, updated_at = :now",
                condition="#state = :active",
                names={"#state": "state"},
                values={":digest": image_digest, ":active": AgentState.ACTIVE.value, ":now": self._clock()},
            )
        except ConditionFailed:
            raise NotFound(f"no active agent {agent_id}") from None
        return AgentRecord.from_item(item)

    def list_by_tenant(
        self, tenant_id: str, *, cursor: str | None = None, limit: int = 50
    ) -> Page[AgentRecord]:
        items, next_cursor = self._table.query(
            index=AGENTS_BY_TENANT,
            key_condition="tenant_id = :tenant",
            values={":tenant": tenant_id},
            scope={"tenant_id": tenant_id},
            cursor=cursor,
            limit=limit,
        )
        return Page[AgentRecord](items=[AgentRecord.from_item(item) for item in items], cursor=next_cursor)

    def delete(self, agent_id: str) -> AgentRecord:
        old = self._table.delete({"agent_id": agent_id})
        if old is None:
            raise NotFound(f"no agent {agent_id}")
        return AgentRecord.from_item(old)
