"""Rooms: creation, verified reads, trust updates, deletion, invites, data items, wraps, audit (§5, §12).

Every operation on a room first loads it with :func:`load_room`, which decides visibility (a room that
is not the caller's does not exist for it) and then re-verifies the stored signed manifest: a changed
byte anywhere in the envelope, a substituted owner key or a stored revision that disagrees with the
envelope fails the operation with 409 before anything else happens. Writes come last, after every
check, and are conditional in the store.

Who may do what:

| operation | owner (tenant key) | invite of the room | anyone else |
|---|---|---|---|
| read room, attest, own wrap | yes | yes | 404 |
| trust update, delete, list invites, data, audit | yes | 403 ``owner_only`` | 404 |
| create invite | yes | yes, narrower than its own | 404 |
| revoke invite | any | itself and its descendants | 404 |
| register a query agent (uploadable rooms) | yes | yes | 404 |
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from hivemind.errors import (
    Conflict,
    Forbidden,
    Gone,
    HivemindError,
    IntegrityError,
    InvalidInput,
    ManifestError,
    NotFound,
    RevisionRollback,
    SignatureError,
)
from hivemind.manifest import AgentRef, RoomManifest, SignedKeyRotation, SignedManifest, verify_manifest
from hivemind.models import Budgets, QueryMode
from hivemind.store import Store
from hivemind.store.agents import AgentState
from hivemind.store.audit import AuditEntry, AuditKind
from hivemind.store.blobs import PresignedUpload
from hivemind.store.credentials import CredentialKind, CredentialRecord
from hivemind.store.rooms import ItemState, RoomItem, RoomRecord, RoomStatus, RoomWrap
from hivemind.store.schema import agent_prefix, item_key, room_prefix
from hivemind.trust import RunnerTrustMode
from hivemind_functions.api.deps import Caller, Services
from hivemind_functions.services.common import delete_object_versions


class RoomRole(StrEnum):
    OWNER = "owner"
    INVITE = "invite"


@dataclass(frozen=True)
class VerifiedRoom:
    """An active room whose stored envelope verified just now, and the caller's role in it."""

    record: RoomRecord
    signed: SignedManifest
    role: RoomRole
    # The owner's key-rotation certificates: readers that pinned an older owner key follow them.
    rotations: tuple[SignedKeyRotation, ...] = field(default=())

    @property
    def room_id(self) -> str:
        return self.record.room_id

    @property
    def manifest(self) -> RoomManifest:
        return self.signed.manifest

    @property
    def owner_tenant_id(self) -> str:
        return self.record.tenant_id


# --- verification ----------------------------------------------------------------------------------


def _tampered(room_id: str, error: HivemindError) -> HivemindError:
    """The same error class and code, with a message that says what it means for the caller."""
    message = (
        f"room {room_id}: the stored manifest does not verify ({error.message}). Nothing was done; "
        "the control plane's storage may have been altered, so do not trust this room until its owner "
        "re-signs it"
    )
    return type(error)(message, code=error.code, details=error.details)


def pinned_owner_sign_pub(store: Store, room_id: str) -> str:
    """The owner key the room was created with, from the first event of its hash-chained audit log.

    Trust updates may not change ``owner_sign_pub``, and a tenant key rotation re-registers the
    tenant's public keys, so the pin comes from the room's creation, not from the tenant record; a
    rotated room is signed by a later key that the owner's certificates lead to from this one.
    """
    page = store.audit.list_events(room_id, limit=1)
    first = page.items[0] if page.items else None
    if first is None or first.kind is not AuditKind.ROOM_CREATED or first.seq != 1:
        raise ManifestError(f"room {room_id} has no creation record in its audit log")
    key = first.details.get("owner_sign_pub")
    if not isinstance(key, str):
        raise ManifestError(f"the creation record of room {room_id} names no owner key")
    return key


def owner_key_rotations(store: Store, tenant_id: str) -> tuple[SignedKeyRotation, ...]:
    """The key-rotation certificates of a room owner, oldest first (none for an unknown tenant)."""
    tenant = store.tenants.get(tenant_id)
    return tuple(tenant.key_rotations) if tenant is not None else ()


def verify_stored_room(
    store: Store, record: RoomRecord, *, rotations: Sequence[SignedKeyRotation] | None = None
) -> SignedManifest:
    """Re-verify an active room's stored envelope; raise 409 ``manifest_invalid``/``signature_invalid``
    (``key_rotation_invalid`` for a certificate chain that is forged, forked or broken).

    Checks: the envelope parses; its hash and signature verify; it is signed by the key the room was
    created with, or by a key the owner rotated to from it (``rotations``: the owner's certificates,
    read from the tenant record when not given and needed); it is for this room and this owner; and it
    is exactly the revision and hash the row says.
    """
    room_id = record.room_id
    try:
        if record.envelope is None:
            raise ManifestError("the room has no manifest envelope")
        try:
            signed = SignedManifest.model_validate(record.envelope)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "$"
            raise ManifestError(f"not a valid signed manifest: {where}: {error['msg']}") from None
        pinned = pinned_owner_sign_pub(store, room_id)
        if rotations is None and signed.manifest.owner_sign_pub != pinned:
            rotations = owner_key_rotations(store, record.tenant_id)
        manifest = verify_manifest(
            signed,
            expected_owner_sign_pub=pinned,
            expected_room_id=room_id,
            min_revision=record.revision,
            rotations=rotations or (),
        )
        if manifest.revision != record.revision or signed.manifest_hash != record.manifest_hash:
            raise ManifestError(
                f"the envelope is revision {manifest.revision} ({signed.manifest_hash}); the room row says "
                f"revision {record.revision} ({record.manifest_hash})"
            )
        if manifest.tenant_id != record.tenant_id:
            raise ManifestError(
                f"the envelope names tenant {manifest.tenant_id}, the room row {record.tenant_id}"
            )
    except (ManifestError, SignatureError) as exc:
        raise _tampered(room_id, exc) from None
    return signed


def _role(caller: Caller, record: RoomRecord) -> RoomRole | None:
    if caller.is_tenant and caller.tenant_id == record.tenant_id:
        return RoomRole.OWNER
    if caller.is_invite and caller.room_id == record.room_id:
        return RoomRole.INVITE
    return None


def _no_room(room_id: str) -> NotFound:
    return NotFound(f"no room {room_id}", code="room_not_found")


def room_deleted(record: RoomRecord) -> Gone:
    return Gone(
        f"room {record.room_id} was deleted by its owner; its invite links and keys no longer work",
        code="room_deleted",
        details={"deleted_at": record.deleted_at} if record.deleted_at is not None else None,
    )


def visible_record(store: Store, caller: Caller, room_id: str) -> tuple[RoomRecord, RoomRole]:
    """The room row if the caller may see it (active or tombstoned); others get 404, never a hint."""
    record = store.rooms.get(room_id)
    if record is None:
        raise _no_room(room_id)
    role = _role(caller, record)
    if role is None:
        raise _no_room(room_id)
    return record, role


def load_room(store: Store, caller: Caller, room_id: str, *, owner_only: bool = False) -> VerifiedRoom:
    """Visibility, then tombstone (410 ``room_deleted``), then the envelope re-verified (409)."""
    record, role = visible_record(store, caller, room_id)
    if record.status is RoomStatus.DELETED:
        raise room_deleted(record)
    if owner_only and role is not RoomRole.OWNER:
        raise Forbidden(f"only the owner of room {room_id} may do this", code="owner_only")
    if role is RoomRole.OWNER and caller.tenant is not None:
        rotations = tuple(caller.tenant.key_rotations)  # read when the caller authenticated
    else:
        rotations = owner_key_rotations(store, record.tenant_id)
    signed = verify_stored_room(store, record, rotations=rotations)
    return VerifiedRoom(record=record, signed=signed, role=role, rotations=rotations)


# --- agents a manifest references ------------------------------------------------------------------


def manifest_agent_refs(manifest: RoomManifest) -> dict[str, AgentRef]:
    """``{role: ref}`` for the scope, the fixed query agent and the mediator."""
    refs: dict[str, AgentRef] = {"scope": manifest.scope}
    if manifest.query.mode is QueryMode.FIXED and manifest.query.agent_id and manifest.query.digest:
        refs["query"] = AgentRef(
            agent_id=manifest.query.agent_id,
            digest=manifest.query.digest,
            visibility=manifest.query.visibility,
        )
    if manifest.mediator is not None:
        refs["mediator"] = manifest.mediator
    return refs


def check_agent_refs(store: Store, manifest: RoomManifest) -> None:
    """Every agent the manifest pins is the owner's, committed, with that digest and visibility."""
    for role, ref in manifest_agent_refs(manifest).items():
        agent = store.agents.get(ref.agent_id)
        if agent is None or agent.tenant_id != manifest.tenant_id or agent.room_id is not None:
            raise InvalidInput(
                f"{role} agent {ref.agent_id} is not one of your library agents", code="agent_not_found"
            )
        if agent.state is not AgentState.ACTIVE:
            raise InvalidInput(
                f"{role} agent {ref.agent_id} is not committed yet; commit its upload first",
                code="agent_not_committed",
            )
        if agent.source_digest != ref.digest:
            raise InvalidInput(
                f"{role} agent {ref.agent_id} has digest {agent.source_digest}; "
                f"the manifest pins {ref.digest}",
                code="agent_digest_mismatch",
            )
        if agent.visibility is not ref.visibility:
            raise InvalidInput(
                f"{role} agent {ref.agent_id} is {agent.visibility.value}; "
                f"the manifest says {ref.visibility.value}",
                code="agent_visibility_mismatch",
            )


def _check_providers(services: Services, manifest: RoomManifest) -> None:
    offered = set(services.settings.allowed_llm_providers)
    missing = sorted(set(manifest.egress.llm_providers) - offered)
    if missing:
        raise InvalidInput(
            f"this deployment offers no LLM provider {', '.join(missing)} "
            f"(offered: {', '.join(sorted(offered)) or 'none'})",
            code="provider_not_allowed",
        )


def _as_input_error(error: HivemindError) -> InvalidInput:
    """A signed manifest in a request that does not verify is the caller's error (400), same code."""
    return InvalidInput(error.message, code=error.code, details=error.details)


# --- create ----------------------------------------------------------------------------------------


def create_room(services: Services, caller: Caller, signed: SignedManifest, owner_wrap: str) -> VerifiedRoom:
    store = services.store
    tenant = caller.tenant
    if tenant is None:
        raise Forbidden("rooms are created with a tenant (hmk_) key", code="tenant_key_required")
    try:
        manifest = verify_manifest(
            signed, expected_owner_sign_pub=tenant.owner_sign_pub, expected_room_id=None, min_revision=None
        )
    except (ManifestError, SignatureError) as exc:
        raise _as_input_error(exc) from None
    if manifest.tenant_id != tenant.tenant_id:
        raise InvalidInput(
            f"the manifest names tenant {manifest.tenant_id}; you are {tenant.tenant_id}",
            code="manifest_invalid",
        )
    if manifest.owner_box_pub != tenant.owner_box_pub:
        raise InvalidInput(
            "the manifest's owner_box_pub is not your registered owner-box key", code="manifest_invalid"
        )
    if manifest.revision != 1:
        raise InvalidInput(
            f"a new room starts at revision 1, not {manifest.revision}", code="manifest_invalid"
        )
    check_agent_refs(store, manifest)
    _check_providers(services, manifest)
    wrap = _wrap_record(manifest.room_id, tenant.tenant_id, owner_wrap, services.now())

    now = services.now()
    record = RoomRecord(
        room_id=manifest.room_id,
        tenant_id=tenant.tenant_id,
        envelope=signed.model_dump(mode="json"),
        manifest_hash=signed.manifest_hash,
        revision=1,
        created_at=now,
        updated_at=now,
    )
    existing = store.rooms.get(manifest.room_id)
    if existing is None:
        try:
            store.rooms.create(record)
        except Conflict:
            existing = store.rooms.get(manifest.room_id)
            if existing is None:
                raise
    if existing is not None:
        # A retried create (same owner, same signed manifest) finishes what the first attempt began.
        same = (
            existing.tenant_id == tenant.tenant_id
            and existing.manifest_hash == signed.manifest_hash
            and existing.status is RoomStatus.ACTIVE
        )
        if not same:
            raise Conflict(f"room id {manifest.room_id} is taken; choose another", code="room_exists")
        record = existing
    if not store.audit.list_events(record.room_id, limit=1).items:
        store.audit.append(
            record.room_id,
            AuditKind.ROOM_CREATED,
            actor=tenant.tenant_id,
            details={
                "manifest_hash": signed.manifest_hash,
                "revision": 1,
                "owner_sign_pub": manifest.owner_sign_pub,
            },
        )
    store.rooms.put_wrap(wrap)
    return VerifiedRoom(
        record=record, signed=signed, role=RoomRole.OWNER, rotations=tuple(tenant.key_rotations)
    )


def _wrap_record(room_id: str, bearer_id: str, wrapped: str, now: int) -> RoomWrap:
    try:
        return RoomWrap(room_id=room_id, bearer_id=bearer_id, wrapped=wrapped, created_at=now)
    except ValidationError:
        raise InvalidInput("a wrap is unpadded base64url of nonce, ciphertext and tag") from None


# --- trust updates ---------------------------------------------------------------------------------

_FIXED_FIELDS = ("room_id", "tenant_id", "owner_sign_pub", "created_at")


@dataclass(frozen=True)
class TrustUpdate:
    room: VerifiedRoom
    previous_revision: int
    warnings: list[str]


def update_trust(services: Services, caller: Caller, room_id: str, signed: SignedManifest) -> TrustUpdate:
    store = services.store
    current = load_room(store, caller, room_id, owner_only=True)
    previous = current.manifest
    try:
        manifest = verify_manifest(
            signed,
            expected_owner_sign_pub=previous.owner_sign_pub,
            expected_room_id=room_id,
            min_revision=previous.revision + 1,
        )
    except RevisionRollback as exc:
        raise RevisionRollback(
            f"room {room_id} is at revision {previous.revision}; a trust update is revision "
            f"{previous.revision + 1}, not {signed.manifest.revision}",
            details={"stored_revision": previous.revision, "offered_revision": signed.manifest.revision},
        ) from exc
    except (ManifestError, SignatureError) as exc:
        raise _as_input_error(exc) from None
    if manifest.revision != previous.revision + 1:
        raise InvalidInput(
            f"room {room_id} is at revision {previous.revision}; the next revision is "
            f"{previous.revision + 1}, not {manifest.revision}",
            code="manifest_invalid",
        )
    changed = [name for name in _FIXED_FIELDS if getattr(manifest, name) != getattr(previous, name)]
    if changed:
        raise InvalidInput(f"a trust update cannot change {', '.join(changed)}", code="manifest_invalid")
    registered_box = caller.tenant.owner_box_pub if caller.tenant else None
    if manifest.owner_box_pub not in (previous.owner_box_pub, registered_box):
        raise InvalidInput(
            "owner_box_pub may only stay or become your registered owner-box key", code="manifest_invalid"
        )
    check_agent_refs(store, manifest)
    _check_providers(services, manifest)

    warnings: list[str] = []
    if previous.runner_trust.mode is RunnerTrustMode.PINNED:
        warnings.append(
            "this room pinned its runner trust; participants were promised it would not change, and this "
            "update is recorded in the room's audit log"
        )
    record = store.rooms.update_manifest(
        room_id,
        envelope=signed.model_dump(mode="json"),
        manifest_hash=signed.manifest_hash,
        revision=manifest.revision,
    )
    store.audit.append(
        room_id,
        AuditKind.TRUST_UPDATED,
        actor=current.owner_tenant_id,
        details={
            "revision": manifest.revision,
            "manifest_hash": signed.manifest_hash,
            "previous_manifest_hash": current.signed.manifest_hash,
            "runner_trust_mode": manifest.runner_trust.mode.value,
            "previous_runner_trust_mode": previous.runner_trust.mode.value,
            "pinned_room_changed": previous.runner_trust.mode is RunnerTrustMode.PINNED,
        },
    )
    return TrustUpdate(
        room=VerifiedRoom(record=record, signed=signed, role=RoomRole.OWNER, rotations=current.rotations),
        previous_revision=previous.revision,
        warnings=warnings,
    )


# --- delete ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoomDeletion:
    room_id: str
    deleted_at: int
    invites_revoked: int
    objects_deleted: int
    agents_deleted: int


def delete_room(services: Services, caller: Caller, room_id: str) -> RoomDeletion:
    """Revoke every invite, tombstone the room (wraps and items go with it), delete its objects and the
    query agents uploaded for it. Repeating it after an interruption finishes the job."""
    store = services.store
    record, role = visible_record(store, caller, room_id)
    if role is not RoomRole.OWNER:
        raise Forbidden(f"only the owner of room {room_id} may delete it", code="owner_only")
    finishing = record.status is RoomStatus.DELETED
    if not finishing:
        verify_stored_room(store, record)
    revoked = 0
    for invite in _all_invites(store, room_id):
        if not invite.revoked:
            store.credentials.revoke(invite.auth_hash)
            revoked += 1
    tombstone = store.rooms.delete(room_id)
    objects = store.blobs.delete_prefix(room_prefix(room_id))
    agents = _delete_room_agents(store, record.tenant_id, room_id)
    if not finishing:
        store.audit.append(
            room_id,
            AuditKind.ROOM_DELETED,
            actor=record.tenant_id,
            details={"invites_revoked": revoked, "objects_deleted": objects, "agents_deleted": agents},
        )
    return RoomDeletion(
        room_id=room_id,
        deleted_at=tombstone.deleted_at or services.now(),
        invites_revoked=revoked,
        objects_deleted=objects,
        agents_deleted=agents,
    )


def _delete_room_agents(store: Store, tenant_id: str, room_id: str) -> int:
    doomed = []
    cursor: str | None = None
    while True:
        page = store.agents.list_by_tenant(tenant_id, cursor=cursor, limit=100)
        doomed.extend(agent for agent in page.items if agent.room_id == room_id)
        cursor = page.cursor
        if cursor is None:
            break
    for agent in doomed:
        store.blobs.delete_prefix(agent_prefix(agent.agent_id))
        store.agents.delete(agent.agent_id)
    return len(doomed)


# --- invites ---------------------------------------------------------------------------------------


def _all_invites(store: Store, room_id: str) -> list[CredentialRecord]:
    invites: list[CredentialRecord] = []
    cursor: str | None = None
    while True:
        page = store.credentials.list_by_room(room_id, cursor=cursor, limit=100)
        invites.extend(page.items)
        cursor = page.cursor
        if cursor is None:
            return invites


@dataclass(frozen=True)
class InviteConstraints:
    uses: int | None = None
    expires_at: int | None = None
    budgets: Budgets | None = None


def _inherit_or_narrow(asked: Any, parent: Any, what: str, widened: list[str]) -> Any:
    """``asked`` if set, else the parent's limit; notes in ``widened`` an ``asked`` above the parent's."""
    if parent is None:
        return asked
    if asked is None:
        return parent
    if isinstance(parent, Budgets):
        for name in Budgets.model_fields:
            if getattr(asked, name) > getattr(parent, name):
                widened.append(f"budgets.{name} {getattr(asked, name)} > {getattr(parent, name)}")
    elif asked > parent:
        widened.append(f"{what} {asked} > your invite's {parent}")
    return asked


def _narrowed(parent: CredentialRecord, asked: InviteConstraints) -> InviteConstraints:
    """A derived invite's limits: each one what was asked, or the parent's when not asked; never wider.

    Uses are compared with what the parent has left, not with its total.
    """
    remaining: int | None = None
    if parent.max_uses is not None:
        remaining = parent.max_uses - parent.uses
        if remaining <= 0:
            raise Forbidden(
                f"invite {parent.token_id} has used all of its {parent.max_uses} uses",
                code="credential_exhausted",
            )
    widened: list[str] = []
    narrowed = InviteConstraints(
        uses=_inherit_or_narrow(asked.uses, remaining, "uses (left)", widened),
        expires_at=_inherit_or_narrow(asked.expires_at, parent.expires_at, "expires_at", widened),
        budgets=_inherit_or_narrow(asked.budgets, parent.budgets, "budgets", widened),
    )
    if widened:
        raise Forbidden(
            "a derived invite may only narrow its parent: " + "; ".join(widened),
            code="invite_widens",
            details={"widened": widened},
        )
    return narrowed


def create_invite(
    services: Services,
    caller: Caller,
    room_id: str,
    *,
    auth_hash: str,
    wrap: str,
    constraints: InviteConstraints,
    label: str | None,
) -> CredentialRecord:
    store = services.store
    room = load_room(store, caller, room_id)
    now = services.now()
    if constraints.expires_at is not None and constraints.expires_at <= now:
        raise InvalidInput("expires_at is in the past", code="invalid_input")
    maxima = room.manifest.budgets.maxima
    if constraints.budgets is not None:
        over = [
            name
            for name in Budgets.model_fields
            if getattr(constraints.budgets, name) > getattr(maxima, name)
        ]
        if over:
            raise InvalidInput(
                f"invite budgets exceed the room's maxima: {', '.join(over)}", code="budget_exceeds_room"
            )
    parent: CredentialRecord | None = None
    if room.role is RoomRole.INVITE:
        parent = caller.credential
        constraints = _narrowed(parent, constraints)
    issuer = parent.tenant_id if parent is not None else room.owner_tenant_id
    record = CredentialRecord(
        auth_hash=auth_hash,
        kind=CredentialKind.INVITE,
        token_id=auth_hash[:16],
        tenant_id=issuer,
        room_id=room_id,
        parent_token_id=parent.token_id if parent is not None else None,
        budgets=constraints.budgets,
        max_uses=constraints.uses,
        expires_at=constraints.expires_at,
        label=label,
        created_at=now,
    )
    wrap_record = _wrap_record(room_id, record.token_id, wrap, now)
    existing = store.credentials.get(auth_hash)
    if existing is not None:
        raise Conflict(
            "this invite key is already registered; make a new invite secret", code="invite_exists"
        )
    store.credentials.put(record)
    try:
        store.rooms.put_wrap(wrap_record)
    except HivemindError:
        # The room went away (or changed) between the checks and the write: the invite must not stay.
        store.credentials.revoke(auth_hash)
        raise
    store.audit.append(
        room_id,
        AuditKind.INVITE_CREATED,
        actor=caller.bearer_id,
        details={
            "invite_id": record.token_id,
            "parent_id": record.parent_token_id,
            "uses": record.max_uses,
            "expires_at": record.expires_at,
        },
    )
    return record


def list_invites(
    services: Services, caller: Caller, room_id: str, *, cursor: str | None, limit: int
) -> tuple[list[CredentialRecord], str | None]:
    load_room(services.store, caller, room_id, owner_only=True)
    page = services.store.credentials.list_by_room(room_id, cursor=cursor, limit=limit)
    return page.items, page.cursor


def revoke_invite(services: Services, caller: Caller, room_id: str, invite_id: str) -> list[CredentialRecord]:
    """Revoke an invite and every invite derived from it (transitively); remove their wraps.

    The owner may revoke any invite of the room; an invite holder itself and its descendants.
    Revoking again is harmless. Returns the invites revoked by this call (target first).
    """
    store = services.store
    room = load_room(store, caller, room_id)
    invites = _all_invites(store, room_id)
    by_id = {invite.token_id: invite for invite in invites}
    target = by_id.get(invite_id)
    if target is None:
        raise NotFound(f"no invite {invite_id} in room {room_id}", code="invite_not_found")
    if room.role is RoomRole.INVITE and not _descends_from(target, caller.credential.token_id, by_id):
        raise Forbidden(
            "an invite holder may revoke only its own invite and the invites derived from it",
            code="not_your_invite",
        )
    children: dict[str, list[CredentialRecord]] = defaultdict(list)
    for invite in invites:
        if invite.parent_token_id is not None:
            children[invite.parent_token_id].append(invite)
    doomed: list[CredentialRecord] = []
    queue = [target]
    seen: set[str] = set()
    while queue:
        invite = queue.pop(0)
        if invite.token_id in seen:
            continue
        seen.add(invite.token_id)
        doomed.append(invite)
        queue.extend(children.get(invite.token_id, []))
    revoked: list[CredentialRecord] = []
    for invite in doomed:
        if not invite.revoked:
            revoked.append(store.credentials.revoke(invite.auth_hash))
        store.rooms.delete_wrap(room_id, invite.token_id)
    if revoked:
        store.audit.append(
            room_id,
            AuditKind.INVITE_REVOKED,
            actor=caller.bearer_id,
            details={"invite_id": invite_id, "revoked": [invite.token_id for invite in revoked]},
        )
    return revoked


def _descends_from(invite: CredentialRecord, ancestor_id: str, by_id: dict[str, CredentialRecord]) -> bool:
    current: CredentialRecord | None = invite
    hops = 0
    while current is not None and hops <= len(by_id):
        if current.token_id == ancestor_id:
            return True
        current = by_id.get(current.parent_token_id) if current.parent_token_id else None
        hops += 1
    return False


# --- data items ------------------------------------------------------------------------------------


def declare_item(
    services: Services,
    caller: Caller,
    room_id: str,
    *,
    item_id: str,
    content_type: str,
    size: int,
    sha256: str,
    metadata: dict[str, str],
) -> tuple[RoomItem, PresignedUpload]:
    store = services.store
    load_room(store, caller, room_id, owner_only=True)
    existing = store.rooms.get_item(room_id, item_id)
    if existing is not None:
        raise Conflict(f"room {room_id} already has an item {item_id}", code="item_exists")
    item = RoomItem(
        room_id=room_id,
        item_id=item_id,
        content_type=content_type,
        size=size,
        sha256=sha256,
        metadata=metadata,
        s3_key=item_key(room_id, item_id),
        created_at=services.now(),
    )
    upload = store.blobs.presign_put(
        item.s3_key, size=size, sha256=sha256, expires_in=services.settings.presign_put_expires_s
    )
    store.rooms.add_item(item)
    return item, upload


def commit_item(services: Services, caller: Caller, room_id: str, item_id: str) -> RoomItem:
    store = services.store
    load_room(store, caller, room_id, owner_only=True)
    item = _require_item(store, room_id, item_id)
    if item.state is ItemState.COMMITTED:
        return item
    stored = store.blobs.verify_uploaded(item.s3_key, size=item.size, sha256=item.sha256)
    committed = store.rooms.commit_item(room_id, item_id, stored)
    store.audit.append(
        room_id,
        AuditKind.DATA_ADDED,
        actor=caller.bearer_id,
        details={"item_id": item_id, "size": item.size, "sha256": item.sha256},
    )
    return committed


def list_items(
    services: Services, caller: Caller, room_id: str, *, include_pending: bool, cursor: str | None, limit: int
) -> tuple[list[RoomItem], str | None]:
    load_room(services.store, caller, room_id, owner_only=True)
    page = services.store.rooms.list_items(
        room_id, include_pending=include_pending, cursor=cursor, limit=limit
    )
    return page.items, page.cursor


def remove_item(services: Services, caller: Caller, room_id: str, item_id: str) -> RoomItem:
    store = services.store
    load_room(store, caller, room_id, owner_only=True)
    item = _require_item(store, room_id, item_id)
    delete_object_versions(store, item.s3_key)
    removed = store.rooms.remove_item(room_id, item_id)
    store.audit.append(room_id, AuditKind.DATA_REMOVED, actor=caller.bearer_id, details={"item_id": item_id})
    return removed


def _require_item(store: Store, room_id: str, item_id: str) -> RoomItem:
    item = store.rooms.get_item(room_id, item_id)
    if item is None:
        raise NotFound(f"no item {item_id} in room {room_id}", code="item_not_found")
    return item


# --- wraps and audit -------------------------------------------------------------------------------


def caller_wrap(services: Services, caller: Caller, room_id: str) -> RoomWrap:
    store = services.store
    load_room(store, caller, room_id)
    wrap = store.rooms.get_wrap(room_id, caller.bearer_id)
    if wrap is None:
        raise NotFound(f"room {room_id} holds no key wrap for {caller.bearer_id}", code="wrap_not_found")
    return wrap


@dataclass(frozen=True)
class AuditView:
    events: list[AuditEntry]
    cursor: str | None
    chain_valid: bool
    chain_length: int | None
    chain_error: dict[str, Any] | None


def audit_log(
    services: Services, caller: Caller, room_id: str, *, cursor: str | None, limit: int
) -> AuditView:
    """The owner's view of the room's hash-chained log (it outlives the room), with the chain verified."""
    store = services.store
    record, role = visible_record(store, caller, room_id)
    if role is not RoomRole.OWNER:
        raise Forbidden(f"only the owner of room {room_id} may read its audit log", code="owner_only")
    if record.status is RoomStatus.ACTIVE:
        verify_stored_room(store, record)
    page = store.audit.list_events(room_id, cursor=cursor, limit=limit)
    try:
        length: int | None = store.audit.verify(room_id)
        valid, error = True, None
    except IntegrityError as exc:
        length, valid, error = None, False, exc.to_dict()
    return AuditView(
        events=page.items, cursor=page.cursor, chain_valid=valid, chain_length=length, chain_error=error
    )
