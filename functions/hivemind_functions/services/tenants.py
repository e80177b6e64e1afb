"""Tenants: registration (self-serve signup and the admin route), owner key rotation, provider keys.

Owner key rotation (DESIGN §3, §16.11): the client re-signs every room with its new key, re-wraps every
room key for its new secret and signs a certificate with the old key; :func:`rotate_owner_key` checks all
of it before writing anything, then the store applies it in one transaction. Provider keys are a
tenant's own LLM API keys sealed to the attested runner (docs/sealing.md); the control plane stores
the sealed envelopes and cannot open them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from hivemind.envelope import SealedEnvelope
from hivemind.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    KeyRotationError,
    ManifestError,
    PayloadTooLarge,
    SignatureError,
)
from hivemind.manifest import (
    KeyRotation,
    RoomManifest,
    SignedKeyRotation,
    SignedManifest,
    rotated_revision,
    verify_key_rotation,
    verify_manifest,
)
from hivemind.store import Store
from hivemind.store.audit import AuditKind
from hivemind.store.credentials import CredentialKind, CredentialRecord
from hivemind.store.rooms import RoomRecord, RoomWrap
from hivemind.store.tenants import MAX_ROTATION_ROOMS, ProviderKey, ResignedRoom, TenantRecord
from hivemind.tokens import random_id
from hivemind_functions.api.deps import Caller, Services
from hivemind_functions.services.rooms import verify_stored_room

TENANT_ID_PREFIX = "tenant"


def register_tenant(
    store: Store, *, auth_hash: str, name: str, owner_sign_pub: str, owner_box_pub: str
) -> TenantRecord:
    """Create a tenant whose key hashes to ``auth_hash``, with its registered public keys.

    A key is registered once. Repeating the same registration (a retried request whose answer was
    lost) returns the tenant it created; anything else under that key is ``key_already_registered``.
    The tenant record is written before its credential: an interrupted registration leaves at worst a
    tenant nobody can authenticate as, never a key without a tenant.
    """
    existing = store.credentials.get(auth_hash)
    if existing is not None:
        return _same_registration(store, existing, name=name, sign=owner_sign_pub, box=owner_box_pub)
    now = store.clock()
    tenant = TenantRecord(
        tenant_id=random_id(TENANT_ID_PREFIX),
        name=name,
        owner_sign_pub=owner_sign_pub,
        owner_box_pub=owner_box_pub,
        created_at=now,
        updated_at=now,
    )
    credential = CredentialRecord(
        auth_hash=auth_hash,
        kind=CredentialKind.TENANT,
        token_id=auth_hash[:16],
        tenant_id=tenant.tenant_id,
        created_at=now,
    )
    store.tenants.create(tenant)
    try:
        store.credentials.put(credential)
    except Conflict:
        # Another registration of the same key won the race; answer as a retry would.
        raced = store.credentials.get(auth_hash)
        if raced is None:
            raise
        return _same_registration(store, raced, name=name, sign=owner_sign_pub, box=owner_box_pub)
    return tenant


def _same_registration(
    store: Store, credential: CredentialRecord, *, name: str, sign: str, box: str
) -> TenantRecord:
    if credential.kind is CredentialKind.TENANT and credential.tenant_id is not None:
        tenant = store.tenants.get(credential.tenant_id)
        if tenant is not None and (tenant.name, tenant.owner_sign_pub, tenant.owner_box_pub) == (
            name,
            sign,
            box,
        ):
            return tenant
    raise Conflict("this key is already registered", code="key_already_registered")


# --- owner key rotation (DESIGN §3, §16.11) ----------------------------------------------------------


@dataclass(frozen=True)
class OfferedRoom:
    """One room of a rotation request: the manifest re-signed with the new key, the owner's new wrap."""

    room_id: str
    signed_manifest: SignedManifest
    owner_wrap: str = field(repr=False)


@dataclass(frozen=True)
class KeyRotationResult:
    tenant_id: str
    token_id: str
    rooms: list[str]


def rotate_owner_key(
    services: Services,
    caller: Caller,
    *,
    new_auth_hash: str,
    certificate: SignedKeyRotation,
    rooms: Sequence[OfferedRoom],
) -> KeyRotationResult:
    """Check a tenant's key rotation completely, then apply it in one transaction (or recognise a retry).

    Refused before anything is written (400 unless said otherwise):

    - ``key_rotation_invalid``: the certificate does not verify, names another tenant, does not retire
      the caller's registered key, or hands over to a key the tenant used before (a cycle);
    - ``rotation_incomplete``: the rooms offered are not exactly the tenant's active rooms;
    - ``manifest_invalid``/``signature_invalid``: an offered manifest is not the stored one with only
      the owner keys and revision changed (:func:`hivemind.manifest.rotated_revision`), or is not
      signed by the new key, or an offered wrap is malformed;
    - 409 when a stored room does not verify (it cannot be re-signed), 409 ``key_already_registered``,
      409 ``rotation_conflict`` when something changed meanwhile, 413 ``rotation_too_large``.

    A request repeated with the new key after the rotation went through (its answer was lost) answers
    the same success and adds any audit event the first attempt did not get to write.
    """
    store = services.store
    tenant = _caller_tenant(caller)
    rotation = _checked_certificate(certificate, tenant.tenant_id)
    offered = _unique_rooms(rooms)
    if tenant.owner_sign_pub == rotation.new_sign_pub:
        return _already_rotated(
            services,
            caller,
            tenant=tenant,
            certificate=certificate,
            new_auth_hash=new_auth_hash,
            offered=offered,
        )
    if rotation.old_sign_pub != tenant.owner_sign_pub:
        raise InvalidInput(
            f"the certificate retires {rotation.old_sign_pub}, not your registered signing key "
            f"{tenant.owner_sign_pub}",
            code="key_rotation_invalid",
        )
    retired = {signed.rotation.old_sign_pub for signed in tenant.key_rotations}
    if rotation.new_sign_pub in retired:
        raise InvalidInput(
            "the certificate hands over to a signing key this tenant already retired",
            code="key_rotation_invalid",
        )
    if new_auth_hash == caller.auth_hash or store.credentials.get(new_auth_hash) is not None:
        raise Conflict("the new key is already registered; make a new secret", code="key_already_registered")

    active = _active_rooms(store, tenant.tenant_id)
    if len(active) > MAX_ROTATION_ROOMS:
        raise PayloadTooLarge(
            f"a key rotation re-signs every room in one atomic write, which holds at most "
            f"{MAX_ROTATION_ROOMS} rooms; you have {len(active)}: delete the rooms you no longer need first",
            code="rotation_too_large",
        )
    missing = sorted(set(active) - set(offered))
    unknown = sorted(set(offered) - set(active))
    if missing or unknown:
        raise InvalidInput(
            "a key rotation re-signs every active room of the tenant, and only those"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; not your active rooms: {', '.join(unknown)}" if unknown else ""),
            code="rotation_incomplete",
            details={"missing": missing, "unknown": unknown},
        )
    resigned = [
        _checked_room(store, active[room_id], offered[room_id], rotation, tenant)
        for room_id in sorted(active)
    ]
    store.tenants.rotate_owner_key(
        tenant.tenant_id,
        certificate=certificate,
        old_auth_hash=caller.auth_hash,
        new_auth_hash=new_auth_hash,
        rooms=resigned,
    )
    for room in resigned:
        _audit_rotation(
            store,
            room.room_id,
            rotation,
            revision=room.revision,
            manifest_hash=room.manifest_hash,
            previous_manifest_hash=room.previous_manifest_hash,
        )
    services.logger.info("owner key rotated", tenant_id=tenant.tenant_id, rooms=len(resigned))
    return KeyRotationResult(
        tenant_id=tenant.tenant_id,
        token_id=new_auth_hash[:16],
        rooms=[room.room_id for room in resigned],
    )


def _caller_tenant(caller: Caller) -> TenantRecord:
    if caller.tenant is None:
        raise Forbidden("this route needs a tenant (hmk_) key", code="tenant_key_required")
    return caller.tenant


def _checked_certificate(certificate: SignedKeyRotation, tenant_id: str) -> KeyRotation:
    try:
        rotation = verify_key_rotation(certificate)
    except KeyRotationError as exc:
        raise InvalidInput(exc.message, code=exc.code) from None
    if rotation.tenant_id != tenant_id:
        raise InvalidInput(
            f"the certificate is for tenant {rotation.tenant_id}, not {tenant_id}",
            code="key_rotation_invalid",
        )
    return rotation


def _unique_rooms(rooms: Sequence[OfferedRoom]) -> dict[str, OfferedRoom]:
    offered: dict[str, OfferedRoom] = {}
    for room in rooms:
        if room.room_id in offered:
            raise InvalidInput(f"room {room.room_id} is listed twice", code="invalid_input")
        offered[room.room_id] = room
    return offered


def _active_rooms(store: Store, tenant_id: str) -> dict[str, RoomRecord]:
    records: dict[str, RoomRecord] = {}
    cursor: str | None = None
    while True:
        page = store.rooms.list_by_tenant(tenant_id, cursor=cursor, limit=100)
        records.update((record.room_id, record) for record in page.items)
        cursor = page.cursor
        if cursor is None:
            return records


def _checked_room(
    store: Store, record: RoomRecord, offered: OfferedRoom, rotation: KeyRotation, tenant: TenantRecord
) -> ResignedRoom:
    room_id = record.room_id
    stored = verify_stored_room(store, record, rotations=tenant.key_rotations)
    expected = rotated_revision(stored.manifest, rotation)
    signed = offered.signed_manifest
    if signed.manifest != expected:
        changed = sorted(
            name
            for name in RoomManifest.model_fields
            if getattr(signed.manifest, name) != getattr(expected, name)
        )
        raise InvalidInput(
            f"room {room_id} was not re-signed as it is: a rotation changes only the owner keys and "
            f"the revision (to {expected.revision}); these differ: {', '.join(changed)}",
            code="manifest_invalid",
            details={"room_id": room_id, "fields": changed},
        )
    try:
        verify_manifest(
            signed, expected_owner_sign_pub=rotation.new_sign_pub, expected_room_id=room_id, min_revision=None
        )
    except (ManifestError, SignatureError) as exc:
        raise InvalidInput(f"room {room_id}: {exc.message}", code=exc.code) from None
    try:
        RoomWrap(room_id=room_id, bearer_id=tenant.tenant_id, wrapped=offered.owner_wrap, created_at=0)
    except ValidationError:
        raise InvalidInput(
            f"room {room_id}: a wrap is unpadded base64url of nonce, ciphertext and tag"
        ) from None
    return ResignedRoom(
        room_id=room_id,
        previous_manifest_hash=record.manifest_hash,
        previous_revision=record.revision,
        envelope=signed.model_dump(mode="json"),
        manifest_hash=signed.manifest_hash,
        revision=expected.revision,
        owner_wrap=offered.owner_wrap,
    )


def _already_rotated(
    services: Services,
    caller: Caller,
    *,
    tenant: TenantRecord,
    certificate: SignedKeyRotation,
    new_auth_hash: str,
    offered: dict[str, OfferedRoom],
) -> KeyRotationResult:
    """A repeated request: the tenant already rotated with exactly this certificate, to this key."""
    if certificate not in tenant.key_rotations or caller.auth_hash != new_auth_hash:
        raise Conflict(
            "this tenant already rotated to that signing key with another certificate or auth key",
            code="rotation_conflict",
        )
    store = services.store
    rotation = certificate.rotation
    owned: list[str] = []
    for room_id, room in offered.items():
        record = store.rooms.get(room_id)
        if record is None or record.tenant_id != tenant.tenant_id:
            continue
        owned.append(room_id)
        if record.manifest_hash == room.signed_manifest.manifest_hash and not _rotation_audited(
            store, room_id, record.manifest_hash
        ):
            _audit_rotation(
                store,
                room_id,
                rotation,
                revision=record.revision,
                manifest_hash=record.manifest_hash,
                previous_manifest_hash=None,
            )
    return KeyRotationResult(tenant_id=tenant.tenant_id, token_id=new_auth_hash[:16], rooms=sorted(owned))


def _rotation_audited(store: Store, room_id: str, manifest_hash: str) -> bool:
    return any(
        entry.kind is AuditKind.OWNER_KEY_ROTATED and entry.details.get("manifest_hash") == manifest_hash
        for entry in store.audit.entries(room_id)
    )


def _audit_rotation(
    store: Store,
    room_id: str,
    rotation: KeyRotation,
    *,
    revision: int,
    manifest_hash: str,
    previous_manifest_hash: str | None,
) -> None:
    """A rotation is a new revision of every room, recorded as its own audit kind."""
    store.audit.append(
        room_id,
        AuditKind.OWNER_KEY_ROTATED,
        actor=rotation.tenant_id,
        details={
            "revision": revision,
            "manifest_hash": manifest_hash,
            "previous_manifest_hash": previous_manifest_hash,
            "old_owner_sign_pub": rotation.old_sign_pub,
            "new_owner_sign_pub": rotation.new_sign_pub,
        },
    )


# --- provider keys -----------------------------------------------------------------------------------


def put_provider_key(
    services: Services, caller: Caller, provider: str, *, sealed_key: SealedEnvelope, runner_id: str
) -> ProviderKey:
    """Store the caller's sealed key for ``provider`` (replacing an older one).

    The provider must be one the deployment offers (400 ``provider_not_allowed``) and the runner one
    that published an attestation (400 ``runner_not_found``): the key was sealed to its keys.
    """
    tenant = _caller_tenant(caller)
    offered = services.settings.allowed_llm_providers
    if provider not in offered:
        raise InvalidInput(
            f"this deployment offers no LLM provider {provider} (offered: {', '.join(offered) or 'none'})",
            code="provider_not_allowed",
        )
    if services.store.runners.get(runner_id) is None:
        raise InvalidInput(
            f"no runner {runner_id} published an attestation; seal the key to a runner from "
            "GET /v1/attestation",
            code="runner_not_found",
        )
    key = services.store.tenants.put_provider_key(
        tenant.tenant_id, provider, sealed_key=sealed_key, runner_id=runner_id
    )
    services.logger.info("provider key stored", tenant_id=tenant.tenant_id, provider=provider)
    return key


def provider_keys(caller: Caller) -> dict[str, ProviderKey]:
    """The caller's stored provider keys (from the tenant record read when it authenticated)."""
    return dict(_caller_tenant(caller).provider_keys)


def delete_provider_key(services: Services, caller: Caller, provider: str) -> bool:
    """Remove the caller's key for ``provider``; False when there was none (a repeated delete)."""
    tenant = _caller_tenant(caller)
    removed = services.store.tenants.delete_provider_key(tenant.tenant_id, provider)
    if removed:
        services.logger.info("provider key removed", tenant_id=tenant.tenant_id, provider=provider)
    return removed
