"""Token formats, HKDF sub-keys and DEK wraps against the published vectors in docs/api.md."""

import hashlib
import hmac
from pathlib import Path

import pytest

from hivemind.encoding import b64decode, b64encode
from hivemind.errors import InvalidToken, Unauthenticated, WrapError
from hivemind.keys import (
    auth_hash,
    auth_hash_from_bearer,
    auth_token,
    derive,
    new_dek,
    owner_box_key,
    owner_sign_key,
    public_bytes,
    unwrap_dek,
    wrap_dek,
    wrap_key,
)
from hivemind.tokens import Secret, TokenKind, parse_token

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
TENANT = Secret(TokenKind.TENANT, bytes(range(32)))
INVITE = Secret(TokenKind.INVITE, bytes(range(32, 64)))

TENANT_VECTORS = {
    "token": "hmk_aaaqeayeaudaocajbifqydiob4ibceqtcqkrmfyydenbwha5dypq",
    "auth": "fc03b7e15354d645cf72239fca634953c42c009bac959c0ff5d838ebd7e5c66e",
    "bearer": "hmk_7qb3pyktktlelt3seop4uy2jkpccyae3vskzyd7v3a4oxv7fyzxa",
    "auth_hash": "433c21b248e918dce08e94abae22989e6928e2f7ba56c6b2a9ec71e31c38c5d0",
    "owner_sign_seed": "0998739d4302ef0b1e14bc6e9ec74486554ef3a41839d622c0351106bf63f288",
    "owner_sign_pub": "UB4fGLPjFR6LJoTVoQe2o73KVMlAh_vgX68up3QYtTI",
    "owner_box_pub": "u7unrvcAcONB5iaru-7-9npcSvA12Q9BajBTYA_Tvn8",
    "wrap": "b599975407a6a9f2623d040647699a442116603a8b3e0ff7cf4905350a7045fb",
}
INVITE_VECTORS = {
    "token": "hmq_eaqseizeeutcokbjfivsyljof4ydcmrtgq2tmnzyhe5dwpb5hy7q",
    "bearer": "hmq_tqtp6ctcs2gbh3ulewncpi7jqospfga4aakles2qhjf6nvgzqjxa",
    "auth_hash": "9bfa19ab8a235ed62e661157c0cb823128f5be5f4285b38dfd4b5bcf0a0ae983",
    "wrap": "3f15a9e8c7519f3fd807dddee7d34b85dbc4dfc79828522e8560d59549062ace",
}


def rfc5869(ikm: bytes, label: str) -> bytes:
    """Independent HKDF-SHA256 (extract, one expand block) from the RFC, for cross-checking."""
    prk = hmac.new(b"hivemind/v1", ikm, hashlib.sha256).digest()
    return hmac.new(prk, label.encode() + b"\x01", hashlib.sha256).digest()


def test_tenant_vectors() -> None:
    v = TENANT_VECTORS
    assert TENANT.token() == v["token"]
    assert derive(TENANT, "auth").hex() == v["auth"] == rfc5869(TENANT.raw, "auth").hex()
    assert auth_token(TENANT) == v["bearer"]
    assert auth_hash(TENANT) == v["auth_hash"]
    assert derive(TENANT, "owner-sign").hex() == v["owner_sign_seed"]
    assert b64encode(public_bytes(owner_sign_key(TENANT))) == v["owner_sign_pub"]
    assert b64encode(public_bytes(owner_box_key(TENANT))) == v["owner_box_pub"]
    assert (
        wrap_key(TENANT, "room_example").hex()
        == v["wrap"]
        == rfc5869(TENANT.raw, "room-wrap|room_example").hex()
    )


def test_invite_vectors() -> None:
    v = INVITE_VECTORS
    assert INVITE.token() == v["token"]
    assert auth_token(INVITE) == v["bearer"]
    assert auth_hash(INVITE) == v["auth_hash"]
    assert wrap_key(INVITE, "room_example").hex() == v["wrap"]


def test_docs_publish_the_same_vectors() -> None:
    text = API_DOC.read_text()
    for value in [*TENANT_VECTORS.values(), *INVITE_VECTORS.values()]:
        assert value in text, f"docs/api.md does not show {value}"


def test_server_hashes_bearer_to_the_stored_hash() -> None:
    kind, digest = auth_hash_from_bearer(TENANT_VECTORS["bearer"])
    assert kind is TokenKind.TENANT and digest == TENANT_VECTORS["auth_hash"]
    # The secret itself is not a valid bearer for the same account: it hashes to something else.
    assert auth_hash_from_bearer(TENANT.token())[1] != TENANT_VECTORS["auth_hash"]


@pytest.mark.parametrize("bearer", ["", "hmk", "hmk_", "xyz_abc", "hmk_ABC", "hmk_aaaa", "hmk_" + "a" * 60])
def test_malformed_bearer_is_unauthenticated(bearer: str) -> None:
    with pytest.raises(Unauthenticated):
        auth_hash_from_bearer(bearer)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nothing", "no prefix"),
        ("hmz_" + "a" * 52, "unknown token prefix"),
        ("hmk_" + "A" * 52, "not lowercase unpadded base32"),
        ("hmk_" + "a" * 56, "carries 32 bytes"),
        ("hmk_" + "a" * 52 + "====", "not lowercase unpadded base32"),
    ],
)
def test_malformed_tokens_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InvalidToken, match=message):
        parse_token(text)


def test_token_kind_is_enforced_and_never_printed() -> None:
    with pytest.raises(InvalidToken, match="expected a hmq_ token"):
        Secret.parse(TENANT.token(), expect=TokenKind.INVITE)
    assert TENANT_VECTORS["token"][4:] not in repr(TENANT)
    with pytest.raises(InvalidToken):
        owner_sign_key(INVITE)


def test_wrap_round_trip_and_binding() -> None:
    dek = new_dek()
    key = wrap_key(TENANT, "room_a")
    wrapped = wrap_dek(key, dek, room_id="room_a", bearer_id="tenant_x")
    assert unwrap_dek(key, wrapped, room_id="room_a", bearer_id="tenant_x") == dek
    # Same DEK wrapped twice gives different ciphertexts (random nonce).
    assert wrap_dek(key, dek, room_id="room_a", bearer_id="tenant_x") != wrapped


@pytest.mark.parametrize("position", [0, 11, 12, 30, 59])
def test_flipped_wrap_byte_is_refused(position: int) -> None:
    key = wrap_key(TENANT, "room_a")
    blob = bytearray(b64decode(wrap_dek(key, new_dek(), room_id="room_a", bearer_id="b")))
    blob[position] ^= 0x01
    with pytest.raises(WrapError):
        unwrap_dek(key, b64encode(bytes(blob)), room_id="room_a", bearer_id="b")


def test_wrap_moved_to_other_room_bearer_or_key_is_refused() -> None:
    key = wrap_key(TENANT, "room_a")
    wrapped = wrap_dek(key, new_dek(), room_id="room_a", bearer_id="b")
    with pytest.raises(WrapError, match="room room_b"):
        unwrap_dek(key, wrapped, room_id="room_b", bearer_id="b")
    with pytest.raises(WrapError):
        unwrap_dek(key, wrapped, room_id="room_a", bearer_id="c")
    with pytest.raises(WrapError):
        unwrap_dek(wrap_key(INVITE, "room_a"), wrapped, room_id="room_a", bearer_id="b")
    with pytest.raises(WrapError, match="wrong length"):
        unwrap_dek(key, wrapped[:-4], room_id="room_a", bearer_id="b")
