"""Room routes (DESIGN §5, §12): rooms, trust updates, deletion, invites, data items, key wraps, audit.

Every route re-verifies the room's stored signed manifest before doing anything (see
:mod:`hivemind_functions.services.rooms`); ``POST /v1/rooms/{id}/runs`` lives in ``routers.runs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import Field

from hivemind.errors import IntegrityError, InvalidInput
from hivemind.manifest import SignedKeyRotation, SignedManifest
from hivemind.models import Budgets, Identifier, Sha256Hex, StrictModel, UnixSeconds, Visibility
from hivemind.store.audit import AuditEntry, AuditKind
from hivemind.store.blobs import MAX_PRESIGNED_UPLOAD, PresignedUpload
from hivemind.store.credentials import CredentialRecord
from hivemind.store.rooms import ItemState, RoomItem, RoomRecord, RoomStatus
from hivemind.tokens import random_id
from hivemind_functions.api.deps import ParticipantCaller, ServicesDep, TenantCaller
from hivemind_functions.api.routers.agents import AgentUploadResponse, DeclareQueryAgentRequest, agent_upload
from hivemind_functions.api.routers.system import RunnerAttestation, live_attestations
from hivemind_functions.services import rooms as service
from hivemind_functions.services.common import ContentType, DisplayName, Label, MetadataKey, MetadataValue
from hivemind_functions.services.rooms import RoomRole, VerifiedRoom

router = APIRouter(tags=["rooms"])

RoomIdPath = Annotated[str, Path(pattern=r"^room_[a-z0-9]{1,64}$", description="room id")]
ItemIdPath = Annotated[str, Path(pattern=r"^[a-z][a-z0-9]*_[a-z0-9]{1,64}$", description="item id")]
InviteIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$", description="invite id")]
Cursor = Annotated[str | None, Query(max_length=2048, description="from the previous page")]
Limit = Annotated[int, Query(ge=1, le=100)]
# A DEK wrap: unpadded base64url of a 12-byte nonce, the 32-byte DEK encrypted and a 16-byte tag.
WrapText = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{80}$", description="base64url(nonce || ct || tag)")]


# --- models ----------------------------------------------------------------------------------------


class RoomView(StrictModel):
    """A room with its signed manifest, verified by the service just before it was returned."""

    room_id: str
    tenant_id: str
    status: RoomStatus
    role: RoomRole = Field(description="the caller's role in the room")
    revision: int
    manifest_hash: Sha256Hex
    signed_manifest: SignedManifest
    owner_key_rotations: list[SignedKeyRotation] = Field(
        description="the owner's key-rotation certificates, oldest first: a reader that pinned an older "
        "owner key (an invite link, an accepted manifest) follows them to the key that signed this manifest"
    )
    created_at: UnixSeconds
    updated_at: UnixSeconds


class IntegrityProblem(StrictModel):
    error: str
    message: str


class RoomSummary(StrictModel):
    room_id: str
    status: Literal["active", "invalid"] = Field(description="invalid: the stored manifest does not verify")
    name: str | None
    revision: int
    manifest_hash: Sha256Hex
    role: RoomRole
    created_at: UnixSeconds
    updated_at: UnixSeconds
    integrity_error: IntegrityProblem | None = None


class RoomList(StrictModel):
    rooms: list[RoomSummary]
    cursor: str | None = None


class CreateRoomRequest(StrictModel):
    signed_manifest: SignedManifest
    owner_wrap: WrapText


class TrustUpdateRequest(StrictModel):
    signed_manifest: SignedManifest


class TrustUpdateResponse(StrictModel):
    room: RoomView
    previous_revision: int
    warnings: list[str]


class RoomDeleted(StrictModel):
    room_id: str
    status: Literal["deleted"] = "deleted"
    deleted_at: UnixSeconds
    invites_revoked: int
    objects_deleted: int
    agents_deleted: int


class AgentDigest(StrictModel):
    """An agent the manifest pins, as the Agents table knows it (clients compare it with the manifest)."""

    role: Literal["scope", "query", "mediator"]
    agent_id: str
    digest: Sha256Hex = Field(description="what the manifest pins")
    visibility: Visibility
    available: bool = Field(description="the agent exists, is committed and has the pinned digest")
    image_digest: str | None = None


class RoomAttestation(StrictModel):
    room: RoomView
    agents: list[AgentDigest]
    runners: list[RunnerAttestation]


class InviteConstraints(StrictModel):
    """Limits of an invite. A derived invite inherits each limit it does not set, and may only narrow."""

    uses: int | None = Field(default=None, ge=1, le=1_000_000, description="runs the invite may start")
    expires_at: UnixSeconds | None = None
    budgets: Budgets | None = Field(default=None, description="per-run maxima, within the room's")


class CreateInviteRequest(StrictModel):
    auth_hash: Sha256Hex = Field(
        description="sha256(HKDF(hmq_ secret, 'auth')), hex; the secret stays client-side"
    )
    wrap: WrapText = Field(description="the room DEK wrapped for bearer id = the first 16 hex of auth_hash")
    constraints: InviteConstraints = Field(default_factory=InviteConstraints)
    label: Label | None = None


class InviteView(StrictModel):
    invite_id: str
    room_id: str
    parent_id: str | None
    issued_by: str | None = Field(description="the tenant whose room (or invite chain) issued it")
    label: str | None
    max_uses: int | None
    uses: int
    expires_at: UnixSeconds | None
    budgets: Budgets | None
    revoked: bool
    revoked_at: UnixSeconds | None
    created_at: UnixSeconds


class InviteList(StrictModel):
    invites: list[InviteView]
    cursor: str | None = None


class InvitesRevoked(StrictModel):
    revoked: list[str] = Field(description="invite ids revoked by this call: the target, then descendants")


class DeclareItemRequest(StrictModel):
    item_id: Identifier | None = Field(
        default=None,
        description="choose it before sealing: the HMS1 context binds it (default: the server picks one, "
        "which only works if you seal after this call)",
    )
    name: DisplayName | None = Field(default=None, description="stored as metadata 'name'")
    content_type: ContentType
    size: int = Field(ge=1, le=MAX_PRESIGNED_UPLOAD, description="bytes of the sealed object")
    sha256: Sha256Hex = Field(description="hex SHA-256 of the sealed object")
    metadata: dict[MetadataKey, MetadataValue] = Field(default_factory=dict, max_length=64)


class ItemView(StrictModel):
    item_id: str
    room_id: str
    content_type: str
    size: int
    sha256: Sha256Hex
    metadata: dict[str, str]
    state: ItemState
    created_at: UnixSeconds
    committed_at: UnixSeconds | None


class ItemUploadResponse(StrictModel):
    item: ItemView
    upload: PresignedUpload


class ItemList(StrictModel):
    items: list[ItemView]
    cursor: str | None = None


class WrapView(StrictModel):
    room_id: str
    bearer_id: str
    wrapped: str


class AuditEvent(StrictModel):
    room_id: str
    seq: int
    kind: AuditKind
    actor: str
    at: UnixSeconds
    details: dict[str, Any]
    prev_hash: Sha256Hex
    hash: Sha256Hex


class ChainStatus(StrictModel):
    valid: bool
    length: int | None = None
    error: dict[str, Any] | None = None


class AuditLog(StrictModel):
    events: list[AuditEvent]
    cursor: str | None = None
    chain: ChainStatus


# --- views -----------------------------------------------------------------------------------------


def room_view(room: VerifiedRoom) -> RoomView:
    record = room.record
    return RoomView(
        room_id=record.room_id,
        tenant_id=record.tenant_id,
        status=record.status,
        role=room.role,
        revision=record.revision,
        manifest_hash=record.manifest_hash,
        signed_manifest=room.signed,
        owner_key_rotations=list(room.rotations),
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


def invite_view(record: CredentialRecord) -> InviteView:
    return InviteView(
        invite_id=record.token_id,
        room_id=record.room_id or "",
        parent_id=record.parent_token_id,
        issued_by=record.tenant_id,
        label=record.label,
        max_uses=record.max_uses,
        uses=record.uses,
        expires_at=record.expires_at,
        budgets=record.budgets,
        revoked=record.revoked,
        revoked_at=record.revoked_at,
        created_at=record.created_at,
    )


def item_view(item: RoomItem) -> ItemView:
    return ItemView(
        item_id=item.item_id,
        room_id=item.room_id,
        content_type=item.content_type,
        size=item.size,
        sha256=item.sha256,
        metadata=item.metadata,
        state=item.state,
        created_at=item.created_at,
        committed_at=item.committed_at,
    )


def _summary(
    services: ServicesDep,
    record: RoomRecord,
    role: RoomRole,
    rotations: Sequence[SignedKeyRotation] | None = None,
) -> RoomSummary:
    base: dict[str, Any] = {
        "room_id": record.room_id,
        "revision": record.revision,
        "manifest_hash": record.manifest_hash,
        "role": role,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }
    try:
        signed = service.verify_stored_room(services.store, record, rotations=rotations)
    except IntegrityError as exc:
        problem = IntegrityProblem(error=exc.code, message=exc.message)
        return RoomSummary(status="invalid", name=None, integrity_error=problem, **base)
    return RoomSummary(status="active", name=signed.manifest.name, **base)


# --- rooms -----------------------------------------------------------------------------------------


@router.post("/v1/rooms", status_code=201, summary="Create a room from an owner-signed manifest")
def create_room(body: CreateRoomRequest, caller: TenantCaller, services: ServicesDep) -> RoomView:
    return room_view(service.create_room(services, caller, body.signed_manifest, body.owner_wrap))


@router.get("/v1/rooms", summary="The caller's rooms (an invite: its one room)")
def list_rooms(
    caller: ParticipantCaller, services: ServicesDep, cursor: Cursor = None, limit: Limit = 50
) -> RoomList:
    store = services.store
    if caller.is_invite and caller.room_id is not None:
        record, role = service.visible_record(store, caller, caller.room_id)
        if record.status is RoomStatus.DELETED:
            raise service.room_deleted(record)
        return RoomList(rooms=[_summary(services, record, role)])
    page = store.rooms.list_by_tenant(caller.require_tenant_id(), cursor=cursor, limit=limit)
    rotations = caller.tenant.key_rotations if caller.tenant is not None else None
    return RoomList(
        rooms=[_summary(services, record, RoomRole.OWNER, rotations) for record in page.items],
        cursor=page.cursor,
    )


@router.get("/v1/rooms/{room_id}", summary="A room and its signed manifest (re-verified)")
def get_room(room_id: RoomIdPath, caller: ParticipantCaller, services: ServicesDep) -> RoomView:
    return room_view(service.load_room(services.store, caller, room_id))


@router.get("/v1/rooms/{room_id}/attest", summary="Everything a client verifies before a run")
def attest_room(room_id: RoomIdPath, caller: ParticipantCaller, services: ServicesDep) -> RoomAttestation:
    store = services.store
    room = service.load_room(store, caller, room_id)
    agents: list[AgentDigest] = []
    for role, ref in service.manifest_agent_refs(room.manifest).items():
        record = store.agents.get(ref.agent_id)
        available = (
            record is not None
            and record.state.value == "active"
            and record.source_digest == ref.digest
            and record.visibility is ref.visibility
        )
        agents.append(
            AgentDigest(
                role=role,  # type: ignore[arg-type]
                agent_id=ref.agent_id,
                digest=ref.digest,
                visibility=ref.visibility,
                available=available,
                image_digest=record.image_digest if record is not None else None,
            )
        )
    return RoomAttestation(room=room_view(room), agents=agents, runners=live_attestations(services))


@router.post("/v1/rooms/{room_id}/trust", summary="Store an owner-signed trust update (revision + 1)")
def update_trust(
    room_id: RoomIdPath, body: TrustUpdateRequest, caller: TenantCaller, services: ServicesDep
) -> TrustUpdateResponse:
    update = service.update_trust(services, caller, room_id, body.signed_manifest)
    return TrustUpdateResponse(
        room=room_view(update.room), previous_revision=update.previous_revision, warnings=update.warnings
    )


@router.delete(
    "/v1/rooms/{room_id}", summary="Delete a room: revoke invites, remove wraps and data, tombstone"
)
def delete_room(room_id: RoomIdPath, caller: TenantCaller, services: ServicesDep) -> RoomDeleted:
    deletion = service.delete_room(services, caller, room_id)
    return RoomDeleted(
        room_id=deletion.room_id,
        deleted_at=deletion.deleted_at,
        invites_revoked=deletion.invites_revoked,
        objects_deleted=deletion.objects_deleted,
        agents_deleted=deletion.agents_deleted,
    )


# --- invites ---------------------------------------------------------------------------------------


@router.post(
    "/v1/rooms/{room_id}/invites", status_code=201, summary="Create an invite (or derive a narrower one)"
)
def create_invite(
    room_id: RoomIdPath, body: CreateInviteRequest, caller: ParticipantCaller, services: ServicesDep
) -> InviteView:
    constraints = service.InviteConstraints(
        uses=body.constraints.uses, expires_at=body.constraints.expires_at, budgets=body.constraints.budgets
    )
    record = service.create_invite(
        services,
        caller,
        room_id,
        auth_hash=body.auth_hash,
        wrap=body.wrap,
        constraints=constraints,
        label=body.label,
    )
    return invite_view(record)


@router.get("/v1/rooms/{room_id}/invites", summary="The room's invites (owner)")
def list_invites(
    room_id: RoomIdPath, caller: TenantCaller, services: ServicesDep, cursor: Cursor = None, limit: Limit = 50
) -> InviteList:
    records, next_cursor = service.list_invites(services, caller, room_id, cursor=cursor, limit=limit)
    return InviteList(invites=[invite_view(record) for record in records], cursor=next_cursor)


@router.delete("/v1/rooms/{room_id}/invites/{invite_id}", summary="Revoke an invite and its descendants")
def revoke_invite(
    room_id: RoomIdPath, invite_id: InviteIdPath, caller: ParticipantCaller, services: ServicesDep
) -> InvitesRevoked:
    revoked = service.revoke_invite(services, caller, room_id, invite_id)
    return InvitesRevoked(revoked=[record.token_id for record in revoked])


# --- data ------------------------------------------------------------------------------------------


@router.post("/v1/rooms/{room_id}/data", status_code=201, summary="Declare a sealed item; get its upload URL")
def declare_item(
    room_id: RoomIdPath, body: DeclareItemRequest, caller: TenantCaller, services: ServicesDep
) -> ItemUploadResponse:
    metadata = dict(body.metadata)
    if body.name is not None:
        if metadata.get("name", body.name) != body.name:
            raise InvalidInput("name and metadata.name disagree")
        metadata["name"] = body.name
    item, upload = service.declare_item(
        services,
        caller,
        room_id,
        item_id=body.item_id or random_id("item"),
        content_type=body.content_type,
        size=body.size,
        sha256=body.sha256,
        metadata=metadata,
    )
    return ItemUploadResponse(item=item_view(item), upload=upload)


@router.post("/v1/rooms/{room_id}/data/{item_id}/commit", summary="Verify an uploaded item and list it")
def commit_item(
    room_id: RoomIdPath, item_id: ItemIdPath, caller: TenantCaller, services: ServicesDep
) -> ItemView:
    return item_view(service.commit_item(services, caller, room_id, item_id))


@router.get("/v1/rooms/{room_id}/data", summary="The room's items (owner)")
def list_items(
    room_id: RoomIdPath,
    *,
    caller: TenantCaller,
    services: ServicesDep,
    include_pending: bool = False,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> ItemList:
    items, next_cursor = service.list_items(
        services, caller, room_id, include_pending=include_pending, cursor=cursor, limit=limit
    )
    return ItemList(items=[item_view(item) for item in items], cursor=next_cursor)


@router.delete("/v1/rooms/{room_id}/data/{item_id}", summary="Remove an item and its sealed object")
def remove_item(
    room_id: RoomIdPath, item_id: ItemIdPath, caller: TenantCaller, services: ServicesDep
) -> ItemView:
    return item_view(service.remove_item(services, caller, room_id, item_id))


# --- key, query agents, audit ----------------------------------------------------------------------


@router.get("/v1/rooms/{room_id}/key", summary="The caller's wrap of the room key")
def get_wrap(room_id: RoomIdPath, caller: ParticipantCaller, services: ServicesDep) -> WrapView:
    wrap = service.caller_wrap(services, caller, room_id)
    return WrapView(room_id=wrap.room_id, bearer_id=wrap.bearer_id, wrapped=wrap.wrapped)


@router.post(
    "/v1/rooms/{room_id}/query-agents",
    status_code=201,
    summary="Register a query agent for an uploadable room; get its upload URL",
)
def register_query_agent(
    room_id: RoomIdPath, body: DeclareQueryAgentRequest, caller: ParticipantCaller, services: ServicesDep
) -> AgentUploadResponse:
    return agent_upload(services, caller, body, room_id=room_id)


@router.get("/v1/rooms/{room_id}/audit", summary="The room's hash-chained audit log, verified (owner)")
def audit_log(
    room_id: RoomIdPath,
    caller: TenantCaller,
    services: ServicesDep,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> AuditLog:
    view = service.audit_log(services, caller, room_id, cursor=cursor, limit=limit)
    return AuditLog(
        events=[_audit_event(entry) for entry in view.events],
        cursor=view.cursor,
        chain=ChainStatus(valid=view.chain_valid, length=view.chain_length, error=view.chain_error),
    )


def _audit_event(entry: AuditEntry) -> AuditEvent:
    return AuditEvent.model_validate(entry.model_dump(mode="json"))
