"""Sub-key derivation from secrets and room-key (DEK) wrapping (DESIGN §3).

Every secret ``S`` stays on the client. Sub-keys are ``HKDF-SHA256(S, salt=b"hivemind/v1", info=label)``:

- ``auth``: sent as ``Bearer <prefix>_<base32(auth)>``; the server stores only ``sha256(auth)``;
- ``owner-sign``: Ed25519 seed that signs room manifests (tenant keys);
- ``owner-box``: X25519 key that receives outputs the room shows to its owner (tenant keys);
- ``room-wrap|<room_id>``: AES-256 key that wraps that room's DEK for this bearer.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hivemind.encoding import b32decode, b32encode, b64decode, b64encode
from hivemind.errors import InvalidInput, InvalidToken, Unauthenticated, WrapError
from hivemind.tokens import SECRET_BYTES, Secret, TokenKind

HKDF_SALT = b"hivemind/v1"
WRAP_AAD_PREFIX = b"hivemind/v1/wrap|"
DEK_BYTES = 32
_NONCE_BYTES = 12


def derive(secret: Secret, label: str, length: int = 32) -> bytes:
    """HKDF-SHA256 sub-key of ``secret`` for ``label``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=HKDF_SALT, info=label.encode()).derive(
        secret.raw
    )


# --- authentication ------------------------------------------------------------------------------


def auth_token(secret: Secret) -> str:
    """The bearer token the client sends; it reveals nothing that opens data."""
    return f"{secret.kind.value}_{b32encode(derive(secret, 'auth'))}"


def auth_hash_from_bearer(bearer: str) -> tuple[TokenKind, str]:
    """Server side: parse ``<prefix>_<base32(auth)>`` and return its kind and ``sha256(auth)`` hex."""
    prefix, _, body = bearer.strip().partition("_")
    try:
        kind = TokenKind(prefix)
        raw = b32decode(body)
    except (ValueError, InvalidInput):
        raise Unauthenticated("malformed bearer token") from None
    if len(raw) != SECRET_BYTES:
        raise Unauthenticated("malformed bearer token")
    return kind, hashlib.sha256(raw).hexdigest()


def auth_hash(secret: Secret) -> str:
    """What the server stores for ``secret``: hex ``sha256(auth)``."""
    return hashlib.sha256(derive(secret, "auth")).hexdigest()


def credential_id(secret: Secret) -> str:
    """Stable public id of a credential (first 16 hex of its auth hash): bearer ids, invite ids."""
    return auth_hash(secret)[:16]


# --- owner keys ----------------------------------------------------------------------------------


def _tenant_only(secret: Secret, what: str) -> None:
    if secret.kind is not TokenKind.TENANT:
        raise InvalidToken(f"only tenant (hmk_) keys have an {what} key")


def owner_sign_key(secret: Secret) -> Ed25519PrivateKey:
    _tenant_only(secret, "owner-sign")
    return Ed25519PrivateKey.from_private_bytes(derive(secret, "owner-sign"))


def owner_box_key(secret: Secret) -> X25519PrivateKey:
    _tenant_only(secret, "owner-box")
    return X25519PrivateKey.from_private_bytes(derive(secret, "owner-box"))


def public_bytes(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --- DEK wrapping --------------------------------------------------------------------------------


def new_dek() -> bytes:
    return os.urandom(DEK_BYTES)


def wrap_key(secret: Secret, room_id: str) -> bytes:
    return derive(secret, f"room-wrap|{room_id}")


def _wrap_aad(room_id: str, bearer_id: str) -> bytes:
    if not room_id or not bearer_id or "|" in room_id or "|" in bearer_id:
        raise InvalidInput("room id and bearer id must be non-empty and must not contain '|'")
    return WRAP_AAD_PREFIX + f"{room_id}|{bearer_id}".encode()


def wrap_dek(key: bytes, dek: bytes, *, room_id: str, bearer_id: str) -> str:
    """AES-256-GCM wrap of the DEK bound to room and bearer; base64url of ``nonce ‖ ciphertext``."""
    if len(dek) != DEK_BYTES or len(key) != 32:
        raise InvalidInput("a DEK and a wrap key are 32 bytes each")
    nonce = os.urandom(_NONCE_BYTES)
    return b64encode(nonce + AESGCM(key).encrypt(nonce, dek, _wrap_aad(room_id, bearer_id)))


def unwrap_dek(key: bytes, wrapped: str, *, room_id: str, bearer_id: str) -> bytes:
    """Open a wrap; any other room, bearer, key or a changed byte raises :class:`WrapError`."""
    try:
        blob = b64decode(wrapped)
    except InvalidInput:
        raise WrapError("wrap is not base64url") from None
    if len(blob) != _NONCE_BYTES + DEK_BYTES + 16:
        raise WrapError("wrap has the wrong length")
    try:
        return AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], _wrap_aad(room_id, bearer_id))
    except InvalidTag:
        raise WrapError(
            f"room key wrap does not open for room {room_id} and bearer {bearer_id}: wrong key, "
            "another room or bearer, or tampered"
        ) from None


def constant_time_equal(a: str | bytes, b: str | bytes) -> bool:
    a_b = a.encode() if isinstance(a, str) else a
    b_b = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(a_b, b_b)
