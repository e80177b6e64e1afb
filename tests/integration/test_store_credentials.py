"""Credentials on a real moto server: conditional create, use counting, revocation, rotation, listings."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from hivemind.errors import Conflict, Forbidden, Gone, HivemindError, InvalidInput, NotFound, Unauthenticated
from hivemind.keys import auth_hash, auth_hash_from_bearer, auth_token
from hivemind.store import Store
from hivemind.store.credentials import CredentialKind, CredentialRecord
from hivemind.tokens import Secret, TokenKind

from .conftest import T0, FakeClock

pytestmark = pytest.mark.moto_server


def tenant_key(tenant_id: str = "tenant_a") -> tuple[Secret, CredentialRecord]:
    secret = Secret.generate(TokenKind.TENANT)
    digest = auth_hash(secret)
    return secret, CredentialRecord(
        auth_hash=digest, kind=CredentialKind.TENANT, token_id=digest[:16], tenant_id=tenant_id, created_at=T0
    )


def invite(room_id: str = "room_a", **fields: object) -> CredentialRecord:
    digest = auth_hash(Secret.generate(TokenKind.INVITE))
    return CredentialRecord(
        auth_hash=digest,
        kind=CredentialKind.INVITE,
        token_id=digest[:16],
        tenant_id="tenant_owner",
        room_id=room_id,
        created_at=T0,
        **fields,
    )


def test_bearer_token_authenticates_through_its_hash(clocked_store: Store) -> None:
    secret, record = tenant_key()
    clocked_store.credentials.put(record)
    kind, digest = auth_hash_from_bearer(auth_token(secret))
    found = clocked_store.credentials.authenticate(digest, kind=CredentialKind.of_token(kind))
    assert found == record


def test_duplicate_create_is_refused_but_an_identical_retry_is_fine(clocked_store: Store) -> None:
    _, record = tenant_key()
    clocked_store.credentials.put(record)
    clocked_store.credentials.put(record)
    with pytest.raises(Conflict, match="already exists"):
        clocked_store.credentials.put(record.model_copy(update={"label": "other"}))


def test_unknown_and_wrong_kind_are_unauthenticated(clocked_store: Store) -> None:
    record = invite()
    clocked_store.credentials.put(record)
    with pytest.raises(Unauthenticated):
        clocked_store.credentials.authenticate("0" * 64, kind=CredentialKind.TENANT)
    with pytest.raises(Unauthenticated):
        clocked_store.credentials.authenticate(record.auth_hash, kind=CredentialKind.TENANT)
    with pytest.raises(Unauthenticated):
        CredentialKind.of_token(TokenKind.CREDIT_CODE)


def test_use_count_is_exhausted_exactly(clocked_store: Store) -> None:
    record = invite(max_uses=2)
    clocked_store.credentials.put(record)
    assert clocked_store.credentials.consume_use(record.auth_hash).uses == 1
    assert clocked_store.credentials.consume_use(record.auth_hash).uses == 2
    with pytest.raises(Forbidden) as caught:
        clocked_store.credentials.consume_use(record.auth_hash)
    assert caught.value.code == "credential_exhausted"
    assert clocked_store.credentials.get(record.auth_hash).uses == 2
    # Reading with an exhausted invite still works (e.g. fetching its own outputs).
    assert clocked_store.credentials.authenticate(record.auth_hash, kind=CredentialKind.INVITE).uses == 2


def test_concurrent_uses_never_exceed_max_uses(clocked_store: Store) -> None:
    record = invite(max_uses=3)
    clocked_store.credentials.put(record)

    def use(_: int) -> str:
        try:
            clocked_store.credentials.consume_use(record.auth_hash)
        except HivemindError as exc:
            return exc.code
        return "ok"

    with ThreadPoolExecutor(max_workers=10) as pool:
        outcomes = list(pool.map(use, range(12)))
    assert outcomes.count("ok") == 3
    assert outcomes.count("credential_exhausted") == 9
    assert clocked_store.credentials.get(record.auth_hash).uses == 3


def test_expired_and_revoked_are_gone_with_their_own_codes(clocked_store: Store, clock: FakeClock) -> None:
    expiring = invite(expires_at=T0 + 60)
    revoked = invite()
    clocked_store.credentials.put(expiring)
    clocked_store.credentials.put(revoked)
    clocked_store.credentials.consume_use(expiring.auth_hash)
    clock.advance(60)
    for action in (clocked_store.credentials.consume_use, _authenticate_invite(clocked_store)):
        with pytest.raises(Gone) as caught:
            action(expiring.auth_hash)
        assert caught.value.code == "credential_expired"

    first = clocked_store.credentials.revoke(revoked.auth_hash)
    clock.advance(5)
    again = clocked_store.credentials.revoke(revoked.auth_hash)
    assert first.revoked and again.revoked_at == first.revoked_at == clock.now - 5
    for action in (clocked_store.credentials.consume_use, _authenticate_invite(clocked_store)):
        with pytest.raises(Gone) as caught:
            action(revoked.auth_hash)
        assert caught.value.code == "credential_revoked"
    with pytest.raises(NotFound):
        clocked_store.credentials.revoke("f" * 64)


def _authenticate_invite(store: Store):
    return lambda digest: store.credentials.authenticate(digest, kind=CredentialKind.INVITE)


def test_rotation_swaps_the_hash_atomically_and_retries_are_safe(clocked_store: Store) -> None:
    old_secret, old = tenant_key("tenant_rot")
    new_secret = Secret.generate(TokenKind.TENANT)
    clocked_store.credentials.put(old)

    rotated = clocked_store.credentials.rotate(old.auth_hash, auth_hash(new_secret))
    assert rotated.tenant_id == "tenant_rot" and rotated.token_id == auth_hash(new_secret)[:16]
    with pytest.raises(Unauthenticated):
        clocked_store.credentials.authenticate(auth_hash(old_secret), kind=CredentialKind.TENANT)
    assert (
        clocked_store.credentials.authenticate(auth_hash(new_secret), kind=CredentialKind.TENANT) == rotated
    )
    # A retried rotation (lost response) returns the same result instead of failing.
    assert clocked_store.credentials.rotate(old.auth_hash, auth_hash(new_secret)) == rotated
    with pytest.raises(NotFound):
        clocked_store.credentials.rotate(old.auth_hash, auth_hash(Secret.generate(TokenKind.TENANT)))


def test_rotation_refuses_taken_hashes_invites_and_revoked_keys(clocked_store: Store) -> None:
    _, first = tenant_key("tenant_one")
    _, second = tenant_key("tenant_two")
    clocked_store.credentials.put(first)
    clocked_store.credentials.put(second)
    with pytest.raises(Conflict, match="already registered"):
        clocked_store.credentials.rotate(first.auth_hash, second.auth_hash)
    assert clocked_store.credentials.get(first.auth_hash) == first  # nothing half-done

    room_invite = invite()
    clocked_store.credentials.put(room_invite)
    with pytest.raises(InvalidInput, match="invites are not rotated"):
        clocked_store.credentials.rotate(room_invite.auth_hash, "a" * 64)

    clocked_store.credentials.revoke(first.auth_hash)
    with pytest.raises(Gone):
        clocked_store.credentials.rotate(first.auth_hash, "b" * 64)


def test_listings_by_room_and_tenant_paginate_and_find_one_invite(clocked_store: Store) -> None:
    invites = [invite("room_list") for _ in range(5)]
    for record in invites:
        clocked_store.credentials.put(record)
    clocked_store.credentials.put(invite("room_other"))

    first = clocked_store.credentials.list_by_room("room_list", limit=3)
    second = clocked_store.credentials.list_by_room("room_list", cursor=first.cursor, limit=3)
    listed = [record.token_id for record in first.items + second.items]
    assert sorted(listed) == sorted(record.token_id for record in invites)
    assert second.cursor is None

    target = invites[2]
    assert clocked_store.credentials.find_in_room("room_list", target.token_id) == target
    assert clocked_store.credentials.find_in_room("room_other", target.token_id) is None
    by_tenant = clocked_store.credentials.list_by_tenant("tenant_owner", limit=100)
    assert len(by_tenant.items) == 6


def test_records_refuse_inconsistent_shapes() -> None:
    digest = "a" * 64
    with pytest.raises(ValueError, match="token_id"):
        CredentialRecord(
            auth_hash=digest, kind=CredentialKind.TENANT, token_id="b" * 16, tenant_id="t", created_at=0
        )
    with pytest.raises(ValueError, match="names its room"):
        CredentialRecord(
            auth_hash=digest, kind=CredentialKind.INVITE, token_id=digest[:16], tenant_id="t", created_at=0
        )
