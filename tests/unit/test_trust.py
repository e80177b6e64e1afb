"""Runner-trust modes and operator release statements (DESIGN §5, §6, §16.1)."""

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from hivemind.canonical import canonical_json
from hivemind.encoding import b64decode, b64encode
from hivemind.errors import ComposeHashNotTrusted, SignatureError
from hivemind.trust import (
    RELEASE_CONTEXT,
    ReleaseStatement,
    RunnerTrust,
    RunnerTrustMode,
    SignedRelease,
    check_runner_trust,
    operator_public_key,
    sign_release,
    verify_release,
)

PINNED_HASH = hashlib.sha256(b"app-compose v1").hexdigest()
NEW_HASH = hashlib.sha256(b"app-compose v2").hexdigest()
OTHER_HASH = hashlib.sha256(b"app-compose evil").hexdigest()
APP_ID = "ab" * 20

OPERATOR = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
STRANGER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def operator_trust() -> RunnerTrust:
    return RunnerTrust(
        mode=RunnerTrustMode.OPERATOR_UPDATES,
        allowed_compose_hashes=[PINNED_HASH],
        operator_sign_pub=operator_public_key(OPERATOR),
    )


def release_for(compose_hash: str, key: Ed25519PrivateKey = OPERATOR, app_id: str = APP_ID) -> SignedRelease:
    statement = ReleaseStatement(
        app_id=app_id, compose_hash=compose_hash, version="1.2.0", issued_at=1_750_000_000
    )
    return sign_release(statement, key)


@pytest.mark.parametrize("mode", [RunnerTrustMode.PINNED, RunnerTrustMode.OWNER_APPROVED])
def test_listed_modes_accept_exactly_the_listed_hashes(mode: RunnerTrustMode) -> None:
    trust = RunnerTrust(mode=mode, allowed_compose_hashes=[PINNED_HASH, NEW_HASH])
    check_runner_trust(PINNED_HASH, trust)
    check_runner_trust(NEW_HASH, trust)
    with pytest.raises(ComposeHashNotTrusted) as refused:
        check_runner_trust(OTHER_HASH, trust)
    assert OTHER_HASH in refused.value.message
    assert str(mode) in refused.value.message


@pytest.mark.parametrize("mode", [RunnerTrustMode.PINNED, RunnerTrustMode.OWNER_APPROVED])
def test_listed_modes_ignore_operator_releases(mode: RunnerTrustMode) -> None:
    trust = RunnerTrust(mode=mode, allowed_compose_hashes=[PINNED_HASH])
    with pytest.raises(ComposeHashNotTrusted):
        check_runner_trust(NEW_HASH, trust, release_for(NEW_HASH))


def test_operator_updates_accepts_listed_hash_without_release() -> None:
    check_runner_trust(PINNED_HASH, operator_trust())


def test_operator_updates_accepts_signed_release() -> None:
    check_runner_trust(NEW_HASH, operator_trust(), release_for(NEW_HASH), app_id=APP_ID)


def test_operator_updates_refuses_unlisted_hash_without_release() -> None:
    with pytest.raises(ComposeHashNotTrusted, match="no operator release"):
        check_runner_trust(NEW_HASH, operator_trust())


def test_release_signed_by_another_key_is_refused() -> None:
    with pytest.raises(ComposeHashNotTrusted, match="not signed by the room's operator key"):
        check_runner_trust(NEW_HASH, operator_trust(), release_for(NEW_HASH, key=STRANGER))


def test_release_for_another_compose_hash_is_refused() -> None:
    with pytest.raises(ComposeHashNotTrusted, match=f"release statement is for compose hash {NEW_HASH}"):
        check_runner_trust(OTHER_HASH, operator_trust(), release_for(NEW_HASH))


def test_release_for_another_app_is_refused() -> None:
    release = release_for(NEW_HASH, app_id="cd" * 20)
    with pytest.raises(ComposeHashNotTrusted, match="for app"):
        check_runner_trust(NEW_HASH, operator_trust(), release, app_id=APP_ID)


def test_release_with_edited_statement_is_refused() -> None:
    release = release_for(NEW_HASH)
    # Replay the signature over a statement with the compose hash swapped.
    edited = SignedRelease(
        statement=release.statement.model_copy(update={"compose_hash": OTHER_HASH}),
        signature=release.signature,
    )
    with pytest.raises(ComposeHashNotTrusted, match="not signed"):
        check_runner_trust(OTHER_HASH, operator_trust(), edited)


@pytest.mark.parametrize("position", [0, 31, 63])
def test_release_with_flipped_signature_byte_is_refused(position: int) -> None:
    release = release_for(NEW_HASH)
    signature = bytearray(b64decode(release.signature))
    signature[position] ^= 0x01
    tampered = SignedRelease(statement=release.statement, signature=b64encode(bytes(signature)))
    with pytest.raises(SignatureError):
        verify_release(tampered, operator_public_key(OPERATOR))


def test_release_signature_is_bound_to_its_context() -> None:
    """A signature over the bare JCS statement (another context) does not verify as a release."""
    statement = release_for(NEW_HASH).statement
    bare = SignedRelease(statement=statement, signature=b64encode(OPERATOR.sign(canonical_json(statement))))
    with pytest.raises(SignatureError):
        verify_release(bare, operator_public_key(OPERATOR))


def test_release_signed_bytes_are_context_plus_jcs() -> None:
    statement = release_for(NEW_HASH).statement
    expected = (
        b"hivemind-release-v1\n"
        + b'{"app_id":"'
        + APP_ID.encode()
        + b'","compose_hash":"'
        + NEW_HASH.encode()
        + b'","issued_at":1750000000,"version":"1.2.0"}'
    )
    assert statement.signed_bytes() == expected
    assert expected.startswith(RELEASE_CONTEXT)
    assert verify_release(release_for(NEW_HASH), operator_public_key(OPERATOR)) == statement


def test_operator_updates_requires_operator_key() -> None:
    with pytest.raises(ValidationError, match="requires operator_sign_pub"):
        RunnerTrust(mode=RunnerTrustMode.OPERATOR_UPDATES, allowed_compose_hashes=[PINNED_HASH])


def test_operator_key_must_be_an_ed25519_public_key() -> None:
    with pytest.raises(ValidationError, match="32-byte"):
        RunnerTrust(
            mode=RunnerTrustMode.OPERATOR_UPDATES,
            allowed_compose_hashes=[],
            operator_sign_pub=b64encode(b"x" * 31),
        )


@pytest.mark.parametrize("mode", [RunnerTrustMode.PINNED, RunnerTrustMode.OWNER_APPROVED])
def test_operator_key_is_refused_outside_operator_updates(mode: RunnerTrustMode) -> None:
    with pytest.raises(ValidationError, match="operator_updates only"):
        RunnerTrust(
            mode=mode, allowed_compose_hashes=[PINNED_HASH], operator_sign_pub=operator_public_key(OPERATOR)
        )


@pytest.mark.parametrize("mode", [RunnerTrustMode.PINNED, RunnerTrustMode.OWNER_APPROVED])
def test_listed_modes_need_a_hash(mode: RunnerTrustMode) -> None:
    with pytest.raises(ValidationError, match="at least one"):
        RunnerTrust(mode=mode, allowed_compose_hashes=[])


def test_operator_updates_may_start_with_no_listed_hash() -> None:
    trust = RunnerTrust(
        mode=RunnerTrustMode.OPERATOR_UPDATES,
        allowed_compose_hashes=[],
        operator_sign_pub=operator_public_key(OPERATOR),
    )
    check_runner_trust(NEW_HASH, trust, release_for(NEW_HASH))
    with pytest.raises(ComposeHashNotTrusted):
        check_runner_trust(NEW_HASH, trust)


def test_malformed_hashes_and_duplicates_are_refused() -> None:
    with pytest.raises(ValidationError):
        RunnerTrust(mode=RunnerTrustMode.PINNED, allowed_compose_hashes=[PINNED_HASH.upper()])
    with pytest.raises(ValidationError, match="twice"):
        RunnerTrust(mode=RunnerTrustMode.PINNED, allowed_compose_hashes=[PINNED_HASH, PINNED_HASH])


def test_runner_trust_round_trips_through_json() -> None:
    trust = operator_trust()
    assert RunnerTrust.model_validate_json(trust.model_dump_json()) == trust
    with pytest.raises(ValidationError):
        RunnerTrust.model_validate({**trust.model_dump(), "extra": 1})
