"""A room's runner-trust policy: which runner builds (dstack compose hashes) may open its data.

DESIGN §5, §6.

Three modes, all enforced by the client before it seals a run and by the runner before it opens one
(§16.1):

- ``pinned``: exactly the listed compose hashes. The owner promises never to change the list; the CLI
  warns loudly on a trust update of a pinned room.
- ``owner_approved``: exactly the listed compose hashes. The owner is expected to add new builds through
  signed trust updates (manifest ``revision + 1``).
- ``operator_updates``: the listed hashes, plus any compose hash that arrives with a release statement
  signed by the operator key the room names (``operator_sign_pub``). The room thereby delegates the
  choice of new builds to that operator.

A release statement is Ed25519 over ``b"hivemind-release-v1\\n" + JCS({app_id, compose_hash, version,
issued_at})``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field, model_validator

from hivemind.canonical import canonical_json
from hivemind.encoding import b64decode, b64encode
from hivemind.errors import ComposeHashNotTrusted, InvalidInput, SignatureError
from hivemind.keys import public_bytes
from hivemind.models import Ed25519SignatureB64, Sha256Hex, StrictModel, UnixSeconds

RELEASE_CONTEXT = b"hivemind-release-v1\n"
_ED25519_PUBLIC_BYTES = 32


class RunnerTrustMode(StrEnum):
    PINNED = "pinned"
    OWNER_APPROVED = "owner_approved"
    OPERATOR_UPDATES = "operator_updates"


def _ed25519_public_key(encoded: str, what: str) -> Ed25519PublicKey:
    try:
        raw = b64decode(encoded)
    except InvalidInput:
        raise InvalidInput(f"{what} is not base64url") from None
    if len(raw) != _ED25519_PUBLIC_BYTES:
        raise InvalidInput(f"{what} must be a 32-byte Ed25519 public key, got {len(raw)} bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


class RunnerTrust(StrictModel):
    """The ``runner_trust`` block of a room manifest."""

    mode: RunnerTrustMode
    allowed_compose_hashes: list[Sha256Hex]
    # base64url Ed25519 public key; required iff mode is operator_updates.
    operator_sign_pub: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if len(set(self.allowed_compose_hashes)) != len(self.allowed_compose_hashes):
            raise ValueError("allowed_compose_hashes lists a hash twice")
        if self.mode is RunnerTrustMode.OPERATOR_UPDATES:
            if self.operator_sign_pub is None:
                raise ValueError("runner_trust mode operator_updates requires operator_sign_pub")
            try:
                _ed25519_public_key(self.operator_sign_pub, "operator_sign_pub")
            except InvalidInput as exc:
                raise ValueError(exc.message) from None
        else:
            if self.operator_sign_pub is not None:
                raise ValueError(f"operator_sign_pub belongs to mode operator_updates only, not {self.mode}")
            if not self.allowed_compose_hashes:
                # Without an operator key nothing could ever run: refuse the mistake up front.
                raise ValueError(f"runner_trust mode {self.mode} needs at least one allowed compose hash")
        return self


class ReleaseStatement(StrictModel):
    """The operator's statement that ``compose_hash`` is release ``version`` of dstack app ``app_id``."""

    app_id: str = Field(min_length=1, max_length=128, pattern=r"^[0-9a-zA-Z_-]+$")
    compose_hash: Sha256Hex
    version: str = Field(min_length=1, max_length=64)
    issued_at: UnixSeconds

    def signed_bytes(self) -> bytes:
        return RELEASE_CONTEXT + canonical_json(self)


class SignedRelease(StrictModel):
    statement: ReleaseStatement
    signature: Ed25519SignatureB64  # over statement.signed_bytes()


def sign_release(statement: ReleaseStatement, operator_key: Ed25519PrivateKey) -> SignedRelease:
    """Operator side: sign a release statement."""
    signature = operator_key.sign(statement.signed_bytes())
    return SignedRelease(statement=statement, signature=b64encode(signature))


def operator_public_key(operator_key: Ed25519PrivateKey) -> str:
    """The base64url public key a room puts in ``operator_sign_pub``."""
    return b64encode(public_bytes(operator_key))


def verify_release(release: SignedRelease, operator_sign_pub: str) -> ReleaseStatement:
    """Return the statement if its signature verifies under ``operator_sign_pub``; else SignatureError."""
    public_key = _ed25519_public_key(operator_sign_pub, "operator_sign_pub")
    try:
        public_key.verify(b64decode(release.signature), release.statement.signed_bytes())
    except InvalidSignature:
        raise SignatureError(
            f"release statement for compose hash {release.statement.compose_hash} is not signed by the "
            "room's operator key"
        ) from None
    return release.statement


def check_runner_trust(
    compose_hash: str,
    trust: RunnerTrust,
    release: SignedRelease | None = None,
    *,
    app_id: str | None = None,
) -> None:
    """Raise ComposeHashNotTrusted unless ``compose_hash`` satisfies ``trust``.

    ``release`` only matters in mode operator_updates. When ``app_id`` (the attested dstack app id) is
    given, a release statement must name that app, so a release of another app cannot be replayed here.
    """
    if compose_hash in trust.allowed_compose_hashes:
        return
    refusal = f"compose hash {compose_hash} is not trusted by this room (runner_trust mode {trust.mode})"
    if trust.mode is not RunnerTrustMode.OPERATOR_UPDATES:
        raise ComposeHashNotTrusted(f"{refusal}: it is not in allowed_compose_hashes")
    if release is None:
        raise ComposeHashNotTrusted(
            f"{refusal}: it is not in allowed_compose_hashes and no operator release statement came with it"
        )
    try:
        statement = verify_release(release, trust.operator_sign_pub or "")
    except SignatureError as exc:
        raise ComposeHashNotTrusted(f"{refusal}: {exc.message}") from None
    if statement.compose_hash != compose_hash:
        raise ComposeHashNotTrusted(
            f"{refusal}: the operator release statement is for compose hash {statement.compose_hash}"
        )
    if app_id is not None and statement.app_id != app_id:
        raise ComposeHashNotTrusted(
            f"{refusal}: the operator release statement is for app {statement.app_id}, not {app_id}"
        )
