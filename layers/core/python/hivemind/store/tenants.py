"""Tenants: owner and participant accounts with their registered public keys (DESIGN §3).

Besides the account itself, a tenant item holds two things that belong to its keys:

- ``key_rotations``: the tenant's owner-key rotation certificates, oldest first
  (:class:`hivemind.manifest.SignedKeyRotation`). Readers that pinned an older ``owner_sign_pub``
  (invite links, accepted manifests, a room's creation record) follow them to the current key.
- ``provider_keys``: the tenant's own LLM provider keys, each HPKE-sealed to the attested runner
  (``{provider: {sealed_key, runner_id, updated_at}}``). Only a runner opens them.

An owner key rotation is one DynamoDB transaction (:meth:`TenantRepository.rotate_owner_key`): every
room's re-signed manifest and owner wrap, the certificate appended to the chain, the new public keys and
the auth-hash swap. It happens entirely or not at all, so the old key works until the instant the new
one does, and neither ever sees half-rotated rooms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import Field, TypeAdapter, ValidationError

from hivemind.canonical import canonical_json
from hivemind.envelope import SealedEnvelope
from hivemind.errors import Conflict, InvalidInput, KeyRotationError, NotFound, PayloadTooLarge
from hivemind.manifest import MAX_KEY_ROTATIONS, ProviderName, SignedKeyRotation, verify_key_rotation
from hivemind.models import Sha256Hex, UnixSeconds
from hivemind.store.base import Clock, ConditionFailed, Page, Record, Table, TransactionCancelled, transact
from hivemind.store.config import AwsClients
from hivemind.store.credentials import CredentialRepository
from hivemind.store.rooms import MANIFEST_SK, WRAP_PREFIX, RoomStatus, RoomWrap
from hivemind.store.schema import TableRole

_PUBLIC_KEY = r"^[A-Za-z0-9_-]{43}$"  # 32 bytes, unpadded base64url

# DynamoDB transactions hold at most 100 operations: the tenant, the two credential operations, and
# two per room (manifest, owner wrap). They also carry at most 4 MB; keep the manifests well below.
_FIXED_ROTATION_OPERATIONS = 3
MAX_ROTATION_ROOMS = (100 - _FIXED_ROTATION_OPERATIONS) // 2
MAX_ROTATION_ENVELOPE_BYTES = 3 * 1024 * 1024


class TenantStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


class ProviderKey(Record):
    """A tenant's API key for one LLM provider, sealed to the runner (the control plane cannot open it)."""

    sealed_key: SealedEnvelope
    runner_id: str = Field(min_length=1, max_length=80)
    updated_at: UnixSeconds


_PROVIDER_NAME: TypeAdapter[str] = TypeAdapter(ProviderName)


def _checked_provider(provider: str) -> str:
    """A provider name, checked before it becomes a map key in an update expression."""
    try:
        return _PROVIDER_NAME.validate_python(provider)
    except ValidationError:
        raise InvalidInput("a provider name is 1 to 64 of a-z, 0-9, '.', '_', '-'") from None


class TenantRecord(Record):
    tenant_id: str = Field(min_length=1, max_length=80)
    name: str = Field(min_length=1, max_length=200)
    owner_sign_pub: str = Field(pattern=_PUBLIC_KEY)
    owner_box_pub: str = Field(pattern=_PUBLIC_KEY)
    status: TenantStatus = TenantStatus.ACTIVE
    created_at: UnixSeconds
    updated_at: UnixSeconds
    # Left out of model_dump() (so account views built from a dump never carry the certificate chain
    # or sealed provider keys by accident); to_item() stores them.
    key_rotations: list[SignedKeyRotation] = Field(
        default_factory=list, max_length=MAX_KEY_ROTATIONS, exclude=True
    )
    provider_keys: dict[ProviderName, ProviderKey] = Field(default_factory=dict, exclude=True)

    def to_item(self) -> dict[str, Any]:
        return {
            **super().to_item(),
            "key_rotations": [signed.model_dump(mode="json") for signed in self.key_rotations],
            "provider_keys": {name: key.model_dump(mode="json") for name, key in self.provider_keys.items()},
        }


@dataclass(frozen=True)
class ResignedRoom:
    """One room's part of an owner key rotation: its re-signed envelope and the owner's new wrap.

    ``previous_manifest_hash`` and ``previous_revision`` are what the caller verified: the write is
    conditional on the room still holding exactly that manifest.
    """

    room_id: str
    previous_manifest_hash: Sha256Hex
    previous_revision: int
    envelope: dict[str, Any] = field(repr=False)
    manifest_hash: Sha256Hex
    revision: int
    owner_wrap: str = field(repr=False)


class TenantRepository:
    def __init__(self, clients: AwsClients, clock: Clock) -> None:
        self._table = Table(clients, TableRole.TENANTS)
        self._rooms = Table(clients, TableRole.ROOMS)
        self._credentials = CredentialRepository(clients, clock)
        self._clients = clients
        self._clock = clock

    def create(self, record: TenantRecord) -> TenantRecord:
        self._table.put_new(record.to_item(), what=f"tenant {record.tenant_id}")
        return record

    def get(self, tenant_id: str) -> TenantRecord | None:
        item = self._table.get({"tenant_id": tenant_id})
        return TenantRecord.from_item(item) if item else None

    def require(self, tenant_id: str) -> TenantRecord:
        record = self.get(tenant_id)
        if record is None:
            raise NotFound(f"no tenant {tenant_id}")
        return record

    def set_status(self, tenant_id: str, status: TenantStatus) -> TenantRecord:
        return self._update(
            tenant_id,
            "SET #status = :status, updated_at = :now",
            {":status": status.value},
            names={"#status": "status"},
        )

    def set_public_keys(self, tenant_id: str, *, owner_sign_pub: str, owner_box_pub: str) -> TenantRecord:
        """Record the public keys of a reset tenant key (an operator's reset, without a certificate).

        A tenant that rotates its own key uses :meth:`rotate_owner_key` instead, which keeps its rooms
        and the certificate chain consistent with the new keys.
        """
        checked = TenantRecord.model_validate(
            {
                **self.require(tenant_id).model_dump(),
                "owner_sign_pub": owner_sign_pub,
                "owner_box_pub": owner_box_pub,
            }
        )
        return self._update(
            tenant_id,
            "SET owner_sign_pub = :sign, owner_box_pub = :box, updated_at = :now",
            {":sign": checked.owner_sign_pub, ":box": checked.owner_box_pub},
        )

    def list_all(self, *, cursor: str | None = None, limit: int = 50) -> Page[TenantRecord]:
        """Operator listing (a paginated scan: tenants are few and this is not a request path)."""
        items, next_cursor = self._table.scan_page(cursor=cursor, limit=limit)
        return Page[TenantRecord](items=[TenantRecord.from_item(item) for item in items], cursor=next_cursor)

    # --- owner key rotation ----------------------------------------------------------------------

    def rotate_owner_key(
        self,
        tenant_id: str,
        *,
        certificate: SignedKeyRotation,
        old_auth_hash: str,
        new_auth_hash: str,
        rooms: Sequence[ResignedRoom],
    ) -> TenantRecord:
        """Apply a verified owner key rotation in one transaction, or nothing at all.

        Conditions, each refusing the whole rotation with :class:`Conflict` (``rotation_conflict``,
        ``key_already_registered``): the tenant is active, still registers the certificate's old key
        and has room in its chain; the old credential exists and is not revoked; the new one does not
        exist; every room is active and still at the manifest the caller verified. The store checks
        the certificate's signature and tenant itself: an unverified certificate never enters a chain.
        The caller checks the rooms' signatures and that they are all of the tenant's active rooms.
        """
        rotation = verify_key_rotation(certificate)
        if rotation.tenant_id != tenant_id:
            raise KeyRotationError(f"the key-rotation certificate is for tenant {rotation.tenant_id}")
        if len(rooms) > MAX_ROTATION_ROOMS:
            raise PayloadTooLarge(
                f"a key rotation re-signs every room in one atomic write, which holds at most "
                f"{MAX_ROTATION_ROOMS} rooms; this one has {len(rooms)}",
                code="rotation_too_large",
            )
        envelope_bytes = sum(len(canonical_json(room.envelope)) for room in rooms)
        if envelope_bytes > MAX_ROTATION_ENVELOPE_BYTES:
            raise PayloadTooLarge(
                f"a key rotation re-signs every room in one atomic write of at most "
                f"{MAX_ROTATION_ENVELOPE_BYTES} bytes of manifests; these are {envelope_bytes}",
                code="rotation_too_large",
            )
        now = self._clock()
        wraps = [
            RoomWrap(room_id=room.room_id, bearer_id=tenant_id, wrapped=room.owner_wrap, created_at=now)
            for room in rooms
        ]
        credential = self._credentials.get(old_auth_hash)
        if credential is None or credential.tenant_id != tenant_id:
            raise Conflict("the key this rotation retires is not registered", code="rotation_conflict")
        _, credential_ops = self._credentials.rotation_ops(credential, new_auth_hash)
        operations = [
            self._table.update_op(
                {"tenant_id": tenant_id},
                update=(
                    "SET owner_sign_pub = :new_sign, owner_box_pub = :new_box, updated_at = :now, "
                    "key_rotations = list_append(if_not_exists(key_rotations, :empty), :certificate)"
                ),
                condition=(
                    "#status = :active AND owner_sign_pub = :old_sign"
                    " AND (attribute_not_exists(key_rotations) OR size(key_rotations) < :max)"
                ),
                names={"#status": "status"},
                values={
                    ":new_sign": rotation.new_sign_pub,
                    ":new_box": rotation.new_box_pub,
                    ":old_sign": rotation.old_sign_pub,
                    ":now": now,
                    ":empty": [],
                    ":certificate": [certificate.model_dump(mode="json")],
                    ":active": TenantStatus.ACTIVE.value,
                    ":max": MAX_KEY_ROTATIONS,
                },
            ),
            *credential_ops,
        ]
        for room, wrap in zip(rooms, wraps, strict=True):
            operations.append(
                self._rooms.update_op(
                    {"room_id": room.room_id, "sk": MANIFEST_SK},
                    update=(
                        "SET envelope = :envelope, manifest_hash = :hash, revision = :revision, "
                        "updated_at = :now"
                    ),
                    condition=(
                        "#status = :active AND tenant_id = :tenant AND manifest_hash = :previous_hash"
                        " AND revision = :previous_revision"
                    ),
                    names={"#status": "status"},
                    values={
                        ":envelope": room.envelope,
                        ":hash": room.manifest_hash,
                        ":revision": room.revision,
                        ":now": now,
                        ":active": RoomStatus.ACTIVE.value,
                        ":tenant": tenant_id,
                        ":previous_hash": room.previous_manifest_hash,
                        ":previous_revision": room.previous_revision,
                    },
                )
            )
            operations.append(self._rooms.put_op({**wrap.to_item(), "sk": WRAP_PREFIX + wrap.bearer_id}))
        try:
            transact(self._clients, operations, what="rotate owner key")
        except TransactionCancelled as exc:
            raise _rotation_refused(exc, rooms) from None
        return self.require(tenant_id)

    # --- provider keys ---------------------------------------------------------------------------

    def put_provider_key(
        self, tenant_id: str, provider: str, *, sealed_key: SealedEnvelope, runner_id: str
    ) -> ProviderKey:
        """Store (or replace) the tenant's sealed key for ``provider``."""
        key = ProviderKey(sealed_key=sealed_key, runner_id=runner_id, updated_at=self._clock())
        provider = _checked_provider(provider)
        value = key.model_dump(mode="json")
        # Two attempts: the map may not exist yet on items written before provider keys existed.
        for _ in range(2):
            try:
                self._table.update(
                    {"tenant_id": tenant_id},
                    update="SET provider_keys.#provider = :key, updated_at = :now",
                    condition="attribute_exists(tenant_id) AND attribute_exists(provider_keys)",
                    names={"#provider": provider},
                    values={":key": value, ":now": key.updated_at},
                )
                return key
            except ConditionFailed:
                pass
            try:
                self._table.update(
                    {"tenant_id": tenant_id},
                    update="SET provider_keys = :keys, updated_at = :now",
                    condition="attribute_exists(tenant_id) AND attribute_not_exists(provider_keys)",
                    values={":keys": {provider: value}, ":now": key.updated_at},
                )
                return key
            except ConditionFailed:
                self.require(tenant_id)
        raise Conflict(f"the provider keys of tenant {tenant_id} changed concurrently; retry")

    def delete_provider_key(self, tenant_id: str, provider: str) -> bool:
        """Remove the tenant's key for ``provider``; returns whether there was one."""
        provider = _checked_provider(provider)
        try:
            self._table.update(
                {"tenant_id": tenant_id},
                update="REMOVE provider_keys.#provider SET updated_at = :now",
                condition="attribute_exists(provider_keys.#provider)",
                names={"#provider": provider},
                values={":now": self._clock()},
            )
        except ConditionFailed:
            self.require(tenant_id)
            return False
        return True

    def sealed_provider_keys(self, tenant_id: str) -> dict[str, str]:
        """``{provider: SealedEnvelope JSON}`` of the tenant: the runner's ``TenantKeyLookup``."""
        tenant = self.require(tenant_id)
        return {name: key.sealed_key.to_json() for name, key in tenant.provider_keys.items()}

    def _update(
        self, tenant_id: str, update: str, values: dict[str, object], *, names: dict[str, str] | None = None
    ) -> TenantRecord:
        try:
            item = self._table.update(
                {"tenant_id": tenant_id},
                update=update,
                condition="attribute_exists(tenant_id)",
                names=names,
                values={**values, ":now": self._clock()},
            )
        except ConditionFailed:
            raise NotFound(f"no tenant {tenant_id}") from None
        return TenantRecord.from_item(item)


def _rotation_refused(exc: TransactionCancelled, rooms: Sequence[ResignedRoom]) -> Conflict:
    """Say which condition of a cancelled rotation failed (nothing was written)."""
    retry = "nothing was changed; run the rotation again"
    if exc.condition_failed(0):
        return Conflict(
            f"the tenant's registered key changed (another rotation or a reset?), the tenant is not active, "
            f"or its certificate chain is full: {retry}",
            code="rotation_conflict",
        )
    if exc.condition_failed(1):
        return Conflict(
            f"the key being rotated was revoked or rotated meanwhile: {retry}", code="rotation_conflict"
        )
    if exc.condition_failed(2):
        return Conflict("the new key is already registered", code="key_already_registered")
    changed = [
        room.room_id
        for index, room in enumerate(rooms)
        if exc.condition_failed(_FIXED_ROTATION_OPERATIONS + 2 * index)
    ]
    if changed:
        return Conflict(
            f"rooms {', '.join(changed)} changed while rotating (a trust update or a deletion): {retry}",
            code="rotation_conflict",
            details={"rooms": changed},
        )
    return Conflict(f"the tenant's rooms or keys changed while rotating: {retry}", code="rotation_conflict")
