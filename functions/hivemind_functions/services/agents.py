"""Agents: declare an upload, commit it after verifying it, list, inspect and delete (DESIGN §8, §12).

Two kinds of agent:

- **library agents** belong to a tenant (``room_id`` unset); room manifests pin them by id and digest;
- **room query agents** are uploaded for one uploadable room by its owner or an invite holder
  (``room_id`` set, ``tenant_id`` = the room owner, whose room the agent's sealing context names).

Inspectable sources are plaintext ``.tar.gz`` archives: the commit streams the pinned object, validates
it with :func:`hivemind.archive.validate_archive` (paths, member types, sizes, compression ratio) and
requires the recomputed source digest to equal the declared one. Reading the files later downloads the
pinned version, checks it against the recorded size and SHA-256, and only then parses it: a committed
source that no longer verifies or parses was changed in storage (409 ``agent_source_invalid``), never
the caller's fault. Sealed sources are HMS1 ciphertext the
control plane cannot read: the commit checks size and SHA-256 only; the runner decrypts, re-validates
and recomputes the digest, and refuses a mismatch.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from hivemind.archive import DEFAULT_LIMITS, AgentManifest, ArchiveLimits, read_archive_file, validate_archive
from hivemind.encoding import sha256_hex
from hivemind.envelope import SealedEnvelope
from hivemind.errors import (
    Conflict,
    Forbidden,
    IntegrityError,
    InvalidArchive,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
)
from hivemind.models import QueryMode, Visibility
from hivemind.seal import sealed_size
from hivemind.store import Store
from hivemind.store.agents import AgentRecord, AgentState
from hivemind.store.audit import AuditKind
from hivemind.store.blobs import PresignedUpload, StoredObject
from hivemind.store.rooms import RoomStatus
from hivemind.store.schema import agent_prefix, agent_source_key
from hivemind_functions.api.deps import Caller, Services
from hivemind_functions.services.common import ChunkReader
from hivemind_functions.services.rooms import load_room, manifest_agent_refs

# One file served by GET /v1/room-agents/{id}/files/{path}: Lambda responses are capped at 6 MB.
MAX_SERVED_FILE_BYTES = 4 * 1024 * 1024
# A verified source is buffered in memory up to this size, then on local disk (Lambda's /tmp).
_SPOOL_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class AgentDeclaration:
    agent_id: str
    name: str
    visibility: Visibility
    size: int
    sha256: str
    source_digest: str
    sealed_key: SealedEnvelope | None


def _archive_limits(services: Services) -> ArchiveLimits:
    cap = services.settings.max_agent_archive_bytes
    return DEFAULT_LIMITS.model_copy(update={"max_total_bytes": cap, "max_file_bytes": cap})


def _check_declaration(services: Services, declared: AgentDeclaration) -> None:
    cap = services.settings.max_agent_archive_bytes
    limit = sealed_size(cap) if declared.visibility is Visibility.SEALED else cap
    if declared.size > limit:
        raise PayloadTooLarge(f"an agent source is at most {limit} bytes here, not {declared.size}")
    if declared.visibility is Visibility.SEALED and declared.sealed_key is None:
        raise InvalidInput(
            "a sealed agent carries sealed_key: its source key sealed to the runner", code="invalid_input"
        )
    if declared.visibility is Visibility.INSPECTABLE and declared.sealed_key is not None:
        raise InvalidInput("an inspectable agent has no sealed_key", code="invalid_input")


def declare_agent(
    services: Services, caller: Caller, declared: AgentDeclaration, *, room_id: str | None
) -> tuple[AgentRecord, PresignedUpload]:
    """Record a pending agent and hand out the presigned PUT for its source."""
    store = services.store
    _check_declaration(services, declared)
    if room_id is None:
        if not caller.is_tenant:
            raise Forbidden(
                "library agents are uploaded with a tenant (hmk_) key; invite holders register query "
                "agents with POST /v1/rooms/{id}/query-agents",
                code="tenant_key_required",
            )
        tenant_id = caller.require_tenant_id()
    else:
        room = load_room(store, caller, room_id)
        rule = room.manifest.query
        if rule.mode is not QueryMode.UPLOADABLE:
            raise Conflict(
                f"room {room_id} runs a fixed query agent; it takes no uploaded query agents",
                code="query_not_uploadable",
            )
        if declared.visibility is not rule.visibility:
            raise InvalidInput(
                f"room {room_id} takes {rule.visibility.value} query agents, not {declared.visibility.value}",
                code="agent_visibility_mismatch",
            )
        tenant_id = room.owner_tenant_id
    if store.agents.get(declared.agent_id) is not None:
        raise Conflict(f"agent id {declared.agent_id} is taken; choose another", code="agent_exists")
    now = services.now()
    fields: dict[str, Any] = {
        "agent_id": declared.agent_id,
        "tenant_id": tenant_id,
        "name": declared.name,
        "room_id": room_id,
        "visibility": declared.visibility,
        "source_digest": declared.source_digest,
        "source_key": agent_source_key(declared.agent_id),
        "created_at": now,
        "updated_at": now,
    }
    if declared.sealed_key is not None:
        # The runner reads the sealed source key from the agent record (docs/sealing.md).
        fields["sealed_key"] = declared.sealed_key
    record = AgentRecord(**fields)
    upload = store.blobs.presign_put(
        record.source_key,
        size=declared.size,
        sha256=declared.sha256,
        expires_in=services.settings.presign_put_expires_s,
    )
    store.agents.create(record)
    return record, upload


# --- access ----------------------------------------------------------------------------------------


def _room_participant(store: Store, caller: Caller, room_id: str) -> bool:
    """Whether the caller is the owner or an invite of ``room_id`` (an active room)."""
    room = store.rooms.get(room_id)
    if room is None or room.status is not RoomStatus.ACTIVE:
        return False
    if caller.is_tenant:
        return caller.tenant_id == room.tenant_id
    return caller.is_invite and caller.room_id == room_id


def _no_agent(agent_id: str) -> NotFound:
    return NotFound(f"no agent {agent_id}", code="agent_not_found")


def visible_agent(services: Services, caller: Caller, agent_id: str) -> AgentRecord:
    """The agent, if the caller may see it; otherwise 404 (no hint that it exists).

    Tenants see their own agents (pending ones too). Invite holders see the committed agents their
    room's verified manifest pins, and the committed query agents uploaded for their room.
    """
    store = services.store
    agent = store.agents.get(agent_id)
    if agent is None or caller.is_admin:
        raise _no_agent(agent_id)
    if caller.is_tenant:
        if agent.tenant_id != caller.tenant_id:
            raise _no_agent(agent_id)
        return agent
    if agent.state is not AgentState.ACTIVE or caller.room_id is None:
        raise _no_agent(agent_id)
    if agent.room_id == caller.room_id:
        return agent
    room = load_room(store, caller, caller.room_id)
    pinned = {ref.agent_id for ref in manifest_agent_refs(room.manifest).values()}
    if agent.agent_id not in pinned:
        raise _no_agent(agent_id)
    return agent


def _writable_agent(services: Services, caller: Caller, agent_id: str) -> AgentRecord:
    store = services.store
    agent = store.agents.get(agent_id)
    if agent is None:
        raise _no_agent(agent_id)
    if agent.room_id is not None:
        if not _room_participant(store, caller, agent.room_id):
            raise _no_agent(agent_id)
        return agent
    if not caller.is_tenant or agent.tenant_id != caller.tenant_id:
        raise _no_agent(agent_id)
    return agent


# --- commit ----------------------------------------------------------------------------------------


def commit_agent(services: Services, caller: Caller, agent_id: str, *, size: int, sha256: str) -> AgentRecord:
    """Verify the uploaded source (size, SHA-256; inspectable: the archive and its digest) and
    activate the agent. Committing an active agent again with the same object is a no-op."""
    store = services.store
    agent = _writable_agent(services, caller, agent_id)
    if agent.state is AgentState.ACTIVE:
        if agent.source_object is not None and (agent.source_object.size, agent.source_object.sha256) == (
            size,
            sha256,
        ):
            return agent
        raise Conflict(f"agent {agent_id} is already committed with another source", code="agent_committed")
    stored = store.blobs.verify_uploaded(agent.source_key, size=size, sha256=sha256)
    file_digests: dict[str, str] = {}
    if agent.visibility is Visibility.INSPECTABLE:
        manifest = _read_manifest(services, stored)
        if manifest.digest != agent.source_digest:
            raise InvalidInput(
                f"the uploaded archive has source digest {manifest.digest}; "
                f"{agent.source_digest} was declared",
                code="agent_digest_mismatch",
            )
        file_digests = manifest.file_digests()
    committed = store.agents.commit(agent_id, stored, file_digests=file_digests)
    if committed.room_id is not None:
        store.audit.append(
            committed.room_id,
            AuditKind.QUERY_AGENT_ADDED,
            actor=caller.bearer_id,
            details={
                "agent_id": agent_id,
                "visibility": committed.visibility.value,
                "source_digest": committed.source_digest,
            },
        )
    return committed


def _read_manifest(services: Services, stored: StoredObject) -> AgentManifest:
    chunks = services.store.blobs.iter_chunks(stored.key, version_id=stored.version_id)
    return validate_archive(ChunkReader(chunks), _archive_limits(services))


# --- reads -----------------------------------------------------------------------------------------


def list_agents(
    services: Services, caller: Caller, *, include_pending: bool, cursor: str | None, limit: int
) -> tuple[list[AgentRecord], str | None]:
    """Tenants: their agents (a page). Invite holders: their room's pinned and uploaded query agents."""
    store = services.store
    if caller.is_tenant:
        page = store.agents.list_by_tenant(caller.require_tenant_id(), cursor=cursor, limit=limit)
        items = [agent for agent in page.items if include_pending or agent.state is AgentState.ACTIVE]
        return items, page.cursor
    if caller.room_id is None:
        raise Forbidden("this route needs a tenant or invite key", code="participant_key_required")
    room = load_room(store, caller, caller.room_id)
    found: dict[str, AgentRecord] = {}
    for ref in manifest_agent_refs(room.manifest).values():
        agent = store.agents.get(ref.agent_id)
        if agent is not None and agent.state is AgentState.ACTIVE:
            found[agent.agent_id] = agent
    next_cursor: str | None = None
    while True:
        page = store.agents.list_by_tenant(room.owner_tenant_id, cursor=next_cursor, limit=100)
        for agent in page.items:
            if agent.room_id == room.room_id and agent.state is AgentState.ACTIVE:
                found[agent.agent_id] = agent
        next_cursor = page.cursor
        if next_cursor is None:
            break
    return sorted(found.values(), key=lambda agent: agent.agent_id), None


def _inspectable_source(
    services: Services, caller: Caller, agent_id: str
) -> tuple[AgentRecord, StoredObject]:
    agent = visible_agent(services, caller, agent_id)
    if agent.visibility is Visibility.SEALED:
        raise Forbidden(
            f"agent {agent_id} is sealed: only the attested runner can read its source", code="agent_sealed"
        )
    if agent.state is not AgentState.ACTIVE or agent.source_object is None:
        raise Conflict(f"agent {agent_id} is not committed yet", code="agent_not_committed")
    return agent, agent.source_object


def agent_files(services: Services, caller: Caller, agent_id: str) -> tuple[AgentRecord, AgentManifest]:
    """The files of an inspectable agent, re-read from the pinned source and checked against its digest."""
    agent, stored = _inspectable_source(services, caller, agent_id)
    with _verified_source(services, agent, stored) as source:
        try:
            manifest = validate_archive(source, _archive_limits(services))
        except InvalidArchive as exc:
            raise _source_changed(agent, exc.message) from None
    _check_digest(agent, manifest)
    return agent, manifest


def agent_file(services: Services, caller: Caller, agent_id: str, path: str) -> tuple[bytes, str]:
    """One file's bytes and SHA-256, from the pinned source (the whole archive is re-validated)."""
    agent, stored = _inspectable_source(services, caller, agent_id)
    expected = agent.file_digests.get(path)
    if expected is None:
        raise NotFound(f"agent {agent_id} has no file {path!r}", code="file_not_found")
    with _verified_source(services, agent, stored) as source:
        try:
            data = read_archive_file(source, path, _archive_limits(services))
        except InvalidArchive as exc:
            raise _source_changed(agent, exc.message) from None
        except NotFound:
            # The committed source listed this file (file_digests): a source without it was replaced.
            raise _source_changed(agent, f"it has no file {path!r}") from None
    if len(data) > MAX_SERVED_FILE_BYTES:
        raise PayloadTooLarge(
            f"{path!r} is {len(data)} bytes; files above {MAX_SERVED_FILE_BYTES} bytes are not served",
            code="file_too_large",
        )
    digest = sha256_hex(data)
    if digest != expected:
        raise _source_changed(agent, f"{path!r} does not match its recorded SHA-256")
    return data, digest


@contextmanager
def _verified_source(services: Services, agent: AgentRecord, stored: StoredObject) -> Iterator[IO[bytes]]:
    """The pinned source object, read whole and checked against its recorded size and SHA-256 before
    anything parses it (a stored object that is not what was committed is never handed to the parser)."""
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as buffer:
        try:
            services.store.blobs.download_verified(stored, buffer)
        except IntegrityError as exc:
            raise _source_changed(agent, exc.message) from None
        buffer.seek(0)
        yield buffer


def _check_digest(agent: AgentRecord, manifest: AgentManifest) -> None:
    if manifest.digest != agent.source_digest:
        raise _source_changed(agent, "its source digest differs")


def _source_changed(agent: AgentRecord, reason: str) -> IntegrityError:
    return IntegrityError(
        f"the stored source of agent {agent.agent_id} is not the committed one ({reason}); the control "
        "plane's storage may have been altered",
        code="agent_source_invalid",
    )


# --- delete ----------------------------------------------------------------------------------------


def _referencing_rooms(store: Store, tenant_id: str, agent_id: str) -> list[str]:
    rooms: list[str] = []
    cursor: str | None = None
    while True:
        page = store.rooms.list_by_tenant(tenant_id, cursor=cursor, limit=100)
        for room in page.items:
            if agent_id in _pinned_ids(room.envelope):
                rooms.append(room.room_id)
        cursor = page.cursor
        if cursor is None:
            return rooms


def _pinned_ids(envelope: dict[str, Any] | None) -> set[str]:
    """Agent ids a stored envelope names, read from the raw JSON: whether it still verifies does not
    matter here, only whether it points at the agent."""
    manifest = (envelope or {}).get("manifest")
    if not isinstance(manifest, dict):
        return set()
    ids: set[str] = set()
    for role in ("scope", "query", "mediator"):
        part = manifest.get(role)
        if isinstance(part, dict) and isinstance(part.get("agent_id"), str):
            ids.add(part["agent_id"])
    return ids


def delete_agent(services: Services, caller: Caller, agent_id: str) -> AgentRecord:
    store = services.store
    agent = store.agents.get(agent_id)
    if agent is None or not caller.is_tenant or agent.tenant_id != caller.tenant_id:
        raise _no_agent(agent_id)
    if agent.room_id is None:
        rooms = _referencing_rooms(store, agent.tenant_id, agent_id)
        if rooms:
            raise Conflict(
                f"agent {agent_id} is pinned by active rooms {', '.join(rooms)}; delete them or update their "
                "manifests first",
                code="agent_in_use",
                details={"rooms": rooms},
            )
    store.blobs.delete_prefix(agent_prefix(agent_id))
    return store.agents.delete(agent_id)
