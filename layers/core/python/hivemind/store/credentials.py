"""Credentials: the server-side half of every key and invite (DESIGN §3, §5).

The table holds ``sha256(auth)`` only (see :mod:`hivemind.keys`), never anything that opens data. The
checks a request needs are explicit steps with their own errors: unknown key, wrong kind, revoked,
expired, out of uses.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Self

from pydantic import Field, model_validator

from hivemind.errors import Conflict, Forbidden, Gone, InvalidInput, NotFound, Unauthenticated
from hivemind.models import Budgets, Sha256Hex, UnixSeconds
from hivemind.store.base import Clock, ConditionFailed, Page, Record, Table, TransactionCancelled, transact
from hivemind.store.config import AwsClients
from hivemind.store.schema import CREDENTIALS_BY_ROOM, CREDENTIALS_BY_TENANT, TableRole
from hivemind.tokens import TokenKind

TokenId = str


class CredentialKind(StrEnum):
    TENANT = "tenant"
    INVITE = "invite"
    ADMIN = "admin"

    @classmethod
    def of_token(cls, kind: TokenKind) -> CredentialKind:
        """The credential kind a bearer token's prefix claims (credit codes are not credentials)."""
        mapping = {TokenKind.TENANT: cls.TENANT, TokenKind.INVITE: cls.INVITE, TokenKind.ADMIN: cls.ADMIN}
        if kind not in mapping:
            raise Unauthenticated(f"a {kind.value}_ token is not an API credential")
        return mapping[kind]


class CredentialRecord(Record):
    auth_hash: Sha256Hex
    kind: CredentialKind
    # Public id of the credential (bearer id, invite id): the first 16 hex digits of auth_hash.
    token_id: TokenId = Field(pattern=r"^[0-9a-f]{16}$")
    # Tenant keys: the tenant. Invites: the tenant that issued the invite (owner or deriving participant).
    tenant_id: str | None = None
    room_id: str | None = None
    # Derived invites name the invite they narrow (DESIGN §5: a capability may only shrink).
    parent_token_id: TokenId | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    budgets: Budgets | None = None
    max_uses: int | None = Field(default=None, ge=1)
    uses: int = Field(default=0, ge=0)
    expires_at: UnixSeconds | None = None
    revoked: bool = False
    revoked_at: UnixSeconds | None = None
    label: str | None = Field(default=None, max_length=200)
    created_at: UnixSeconds

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.token_id != self.auth_hash[:16]:
            raise ValueError("token_id must be the first 16 hex digits of auth_hash")
        if self.kind is CredentialKind.TENANT and (self.tenant_id is None or self.room_id is not None):
            raise ValueError("a tenant key names its tenant and no room")
        if self.kind is CredentialKind.INVITE and (self.tenant_id is None or self.room_id is None):
            raise ValueError("an invite names its room and the tenant that issued it")
        if self.kind is CredentialKind.ADMIN and self.room_id is not None:
            raise ValueError("an admin key names no room")
        return self


def _refuse_unusable(record: CredentialRecord, now: int) -> None:
    if record.revoked:
        raise Gone(f"{record.kind.value} credential {record.token_id} was revoked", code="credential_revoked")
    if record.expires_at is not None and record.expires_at <= now:
        raise Gone(f"{record.kind.value} credential {record.token_id} has expired", code="credential_expired")


class CredentialRepository:
    def __init__(self, clients: AwsClients, clock: Clock) -> None:
        self._table = Table(clients, TableRole.CREDENTIALS)
        self._clients = clients
        self._clock = clock

    def put(self, record: CredentialRecord) -> CredentialRecord:
        """Register a new credential; an existing one with that hash is :class:`Conflict`."""
        self._table.put_new(record.to_item(), what=f"credential {record.token_id}")
        return record

    def get(self, auth_hash: str) -> CredentialRecord | None:
        item = self._table.get({"auth_hash": auth_hash})
        return CredentialRecord.from_item(item) if item else None

    def authenticate(self, auth_hash: str, *, kind: CredentialKind) -> CredentialRecord:
        """The credential behind a bearer token of ``kind``, if it exists, matches and is still valid.

        Uses are not counted here (reading your own runs does not spend an invite); see
        :meth:`consume_use`.
        """
        record = self.get(auth_hash)
        if record is None or record.kind is not kind:
            raise Unauthenticated("unknown key")
        _refuse_unusable(record, self._clock())
        return record

    def consume_use(self, auth_hash: str) -> CredentialRecord:
        """Spend one use atomically; refuses revoked, expired and exhausted credentials."""
        now = self._clock()
        try:
            item = self._table.update(
                {"auth_hash": auth_hash},
                update="SET uses = uses + :one",
                condition=(
                    "attribute_exists(auth_hash) AND revoked = :false"
                    " AND (attribute_not_exists(expires_at) OR expires_at > :now)"
                    " AND (attribute_not_exists(max_uses) OR uses < max_uses)"
                ),
                values={":one": 1, ":false": False, ":now": now},
            )
        except ConditionFailed:
            record = self.get(auth_hash)
            if record is None:
                raise Unauthenticated("unknown key") from None
            _refuse_unusable(record, now)
            raise Forbidden(
                f"invite {record.token_id} has used all {record.max_uses} of its uses",
                code="credential_exhausted",
            ) from None
        return CredentialRecord.from_item(item)

    def revoke(self, auth_hash: str) -> CredentialRecord:
        """Revoke a credential (idempotent: revoking twice keeps the first revocation time)."""
        try:
            item = self._table.update(
                {"auth_hash": auth_hash},
                update="SET revoked = :true, revoked_at = if_not_exists(revoked_at, :now)",
                condition="attribute_exists(auth_hash)",
                values={":true": True, ":now": self._clock()},
            )
        except ConditionFailed:
            raise NotFound("no such credential") from None
        return CredentialRecord.from_item(item)

    def rotate(self, old_auth_hash: str, new_auth_hash: str) -> CredentialRecord:
        """Swap a tenant or admin key's auth hash in one transaction: the old hash stops working at the
        instant the new one starts. Retrying a rotation that already happened returns the new record."""
        old = self.get(old_auth_hash)
        if old is None:
            rotated = self._table.get({"auth_hash": new_auth_hash})
            if rotated is not None and rotated.get("rotated_from") == old_auth_hash:
                return CredentialRecord.from_item(rotated)
            raise NotFound("no such credential")
        new, operations = self.rotation_ops(old, new_auth_hash)
        try:
            transact(self._clients, operations, what="rotate key")
        except TransactionCancelled as exc:
            if exc.condition_failed(1):
                raise Conflict("the new key is already registered") from None
            raise Conflict("the key changed while rotating; retry") from None
        return new

    def rotation_ops(
        self, old: CredentialRecord, new_auth_hash: str
    ) -> tuple[CredentialRecord, list[dict[str, Any]]]:
        """The new record and the two transaction operations of :meth:`rotate`, to run inside a larger
        transaction (an owner key rotation swaps the hash together with everything the key signs):
        delete the old hash (exists, not revoked), then put the new one (does not exist)."""
        if old.kind is CredentialKind.INVITE:
            raise InvalidInput("invites are not rotated; revoke the invite and share a new one")
        _refuse_unusable(old, self._clock())
        new = CredentialRecord.model_validate(
            {**old.model_dump(), "auth_hash": new_auth_hash, "token_id": new_auth_hash[:16]}
        )
        new_item = {**new.to_item(), "rotated_from": old.auth_hash}
        operations = [
            self._table.delete_op(
                {"auth_hash": old.auth_hash},
                condition="attribute_exists(auth_hash) AND revoked = :false",
                values={":false": False},
            ),
            self._table.put_op(new_item, condition="attribute_not_exists(auth_hash)"),
        ]
        return new, operations

    def find_in_room(self, room_id: str, token_id: str) -> CredentialRecord | None:
        """An invite of ``room_id`` by its public id (to revoke invites one by one)."""
        items, _ = self._table.query(
            index=CREDENTIALS_BY_ROOM,
            key_condition="room_id = :room AND token_id = :token",
            values={":room": room_id, ":token": token_id},
            scope={"room_id": room_id},
            limit=1,
        )
        return CredentialRecord.from_item(items[0]) if items else None

    def list_by_tenant(
        self, tenant_id: str, *, cursor: str | None = None, limit: int = 50
    ) -> Page[CredentialRecord]:
        """Keys and invites issued by ``tenant_id``."""
        return self._page(CREDENTIALS_BY_TENANT, "tenant_id", tenant_id, cursor, limit)

    def list_by_room(
        self, room_id: str, *, cursor: str | None = None, limit: int = 50
    ) -> Page[CredentialRecord]:
        """Every invite of ``room_id`` (including revoked ones, which say so)."""
        return self._page(CREDENTIALS_BY_ROOM, "room_id", room_id, cursor, limit)

    def _page(
        self, index: str, attribute: str, value: str, cursor: str | None, limit: int
    ) -> Page[CredentialRecord]:
        items, next_cursor = self._table.query_partition(index, attribute, value, cursor=cursor, limit=limit)
        return Page[CredentialRecord](
            items=[CredentialRecord.from_item(item) for item in items], cursor=next_cursor
        )
