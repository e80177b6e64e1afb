"""Tenant registration, shared by self-serve signup and the admin route that creates tenants."""

from __future__ import annotations

from hivemind.errors import Conflict
from hivemind.store import Store
from hivemind.store.credentials import CredentialKind, CredentialRecord
from hivemind.store.tenants import TenantRecord
from hivemind.tokens import random_id

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
