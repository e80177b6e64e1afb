"""Tenants: owner and participant accounts with their registered public keys (DESIGN §3)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from hivemind.errors import NotFound
from hivemind.models import UnixSeconds
from hivemind.store.base import Clock, ConditionFailed, Page, Record, Table
from hivemind.store.config import AwsClients
from hivemind.store.schema import TableRole

_PUBLIC_KEY = r"^[A-Za-z0-9_-]{43}$"  # 32 bytes, unpadded base64url


class TenantStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


class TenantRecord(Record):
    tenant_id: str = Field(min_length=1, max_length=80)
    name: str = Field(min_length=1, max_length=200)
    owner_sign_pub: str = Field(pattern=_PUBLIC_KEY)
    owner_box_pub: str = Field(pattern=_PUBLIC_KEY)
    status: TenantStatus = TenantStatus.ACTIVE
    created_at: UnixSeconds
    updated_at: UnixSeconds


class TenantRepository:
    def __init__(self, clients: AwsClients, clock: Clock) -> None:
        self._table = Table(clients, TableRole.TENANTS)
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
        """Record the public keys of a rotated tenant key (the auth hash swap is in credentials)."""
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
