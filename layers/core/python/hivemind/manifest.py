"""Room manifests (v1): the owner-signed rules of a room, and ``hmroom://`` invite links (DESIGN §5).

A manifest is signed by the owner's CLI with Ed25519 over ``b"hivemind-room-v1\\n" + JCS(manifest)``;
its hash is ``SHA-256(JCS(manifest))``. Every reader (CLI, functions, runner) verifies the signed
manifest on every use with :func:`verify_manifest`, one explicit step at a time. A trust update re-signs
with ``revision + 1`` (:func:`next_revision`); readers refuse a revision lower than one they accepted.

An owner key rotation re-signs every room of the tenant with the new key (:func:`rotated_revision`) and
publishes a key-rotation certificate signed with the old key (:class:`SignedKeyRotation`); readers that
pin the old key (links, accepted manifests) follow the certificates to the new one
(:func:`follow_key_rotations`, the ``rotations`` argument of :func:`verify_manifest`).

An invite link is ``hmroom://`` + base64url(JCS{service, room_id, invite, owner_sign_pub}). It carries the
``hmq_`` secret of the invite, so **a link is a bearer credential**: whoever holds it can query the room
(within the invite's limits). It also carries the owner's signing key, which pins the manifest a
participant will accept: a control plane that serves a manifest signed by any other key is refused.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from hivemind.canonical import canonical_json, canonical_sha256, refuse_floats
from hivemind.encoding import b64decode, b64encode, sha256_hex
from hivemind.envelope import RoomId
from hivemind.errors import (
    InvalidInput,
    InvalidLink,
    InvalidToken,
    KeyRotationError,
    ManifestError,
    RevisionRollback,
    SignatureError,
)
from hivemind.keys import public_bytes
from hivemind.models import (
    BudgetLimits,
    Ed25519PublicB64,
    Ed25519SignatureB64,
    Identifier,
    OutputVisibility,
    QueryMode,
    Sha256Hex,
    StrictModel,
    UnixSeconds,
    Visibility,
    X25519PublicB64,
    b64url_bytes,
)
from hivemind.policy import ScopePolicy
from hivemind.tokens import Secret, TokenKind
from hivemind.trust import RunnerTrust

MANIFEST_VERSION = 1
ROOM_SIGNING_CONTEXT = b"hivemind-room-v1\n"
KEY_ROTATION_CONTEXT = b"hivemind-key-rotation-v1\n"
MAX_KEY_ROTATIONS = 256
LINK_SCHEME = "hmroom://"
MAX_LINK_CHARS = 4096
MAX_TEXT_CHARS = 100_000

ProviderName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]


def rules_digest(rules: str) -> str:
    """The ``rules_sha256`` of a rules text: hex SHA-256 of its UTF-8 bytes."""
    return sha256_hex(rules.encode("utf-8"))


# --- the manifest ------------------------------------------------------------------------------------


class AgentRef(StrictModel):
    """A pinned agent: its id, the SHA-256 digest of its source, and who may read the source."""

    agent_id: Identifier
    digest: Sha256Hex
    visibility: Visibility


class QueryRule(StrictModel):
    """``fixed``: every run uses the named agent. ``uploadable``: participants bring their own agent."""

    mode: QueryMode
    agent_id: Identifier | None = None
    digest: Sha256Hex | None = None
    # For uploadable rooms, the visibility an uploaded query agent must have.
    visibility: Visibility

    @model_validator(mode="after")
    def _agent_matches_mode(self) -> Self:
        pinned = (self.agent_id is not None, self.digest is not None)
        if self.mode is QueryMode.FIXED and pinned != (True, True):
            raise ValueError("query mode fixed needs both agent_id and digest")
        if self.mode is QueryMode.UPLOADABLE and pinned != (False, False):
            raise ValueError("query mode uploadable names no agent_id or digest")
        return self


class OutputRule(StrictModel):
    visibility: OutputVisibility


class EgressRule(StrictModel):
    """Where a run may reach beyond the runner: LLM providers by name, and whether it may emit artifacts."""

    llm_providers: list[ProviderName] = Field(max_length=32)
    artifacts: StrictBool

    @field_validator("llm_providers")
    @classmethod
    def _unique(cls, providers: list[str]) -> list[str]:
        if len(set(providers)) != len(providers):
            raise ValueError("llm_providers lists a provider twice")
        return providers


class RoomManifest(StrictModel):
    """Room manifest version 1. Every field is signed; optional fields are signed as ``null``."""

    version: Literal[1] = MANIFEST_VERSION
    room_id: RoomId
    tenant_id: Identifier
    name: str = Field(min_length=1, max_length=200)
    rules: str = Field(max_length=MAX_TEXT_CHARS)
    rules_sha256: Sha256Hex
    policy: str = Field(max_length=MAX_TEXT_CHARS)
    scope: AgentRef
    query: QueryRule
    mediator: AgentRef | None
    output: OutputRule
    egress: EgressRule
    budgets: BudgetLimits
    runner_trust: RunnerTrust
    data_policy: ScopePolicy | None = None
    owner_sign_pub: Ed25519PublicB64
    owner_box_pub: X25519PublicB64
    created_at: UnixSeconds
    revision: StrictInt = Field(ge=1)

    @model_validator(mode="before")
    @classmethod
    def _no_floats(cls, data: Any) -> Any:
        return refuse_floats(data)

    @model_validator(mode="after")
    def _rules_hash_matches(self) -> Self:
        if rules_digest(self.rules) != self.rules_sha256:
            raise ValueError("rules_sha256 is not the SHA-256 of the rules text")
        return self

    def signing_bytes(self) -> bytes:
        return ROOM_SIGNING_CONTEXT + canonical_json(self)


def manifest_hash(manifest: RoomManifest) -> str:
    """Hex SHA-256 of the manifest's JCS bytes: what runs, receipts and ``room accept`` refer to."""
    return canonical_sha256(manifest)


class SignedManifest(StrictModel):
    """The envelope stored and served by the control plane. ``manifest_hash`` is checked, not trusted."""

    manifest: RoomManifest
    signature: Ed25519SignatureB64
    manifest_hash: Sha256Hex

    def to_json(self) -> str:
        return canonical_json(self).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> SignedManifest:
        """Parse a stored or served envelope; malformed input raises :class:`ManifestError`."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "$"
            raise ManifestError(f"not a valid signed manifest: {where}: {error['msg']}") from None


def sign_manifest(manifest: RoomManifest, owner_sign_key: Ed25519PrivateKey) -> SignedManifest:
    """Owner side: sign ``manifest`` with the key whose public half is ``manifest.owner_sign_pub``."""
    if b64encode(public_bytes(owner_sign_key)) != manifest.owner_sign_pub:
        raise InvalidInput("the signing key is not the manifest's owner_sign_pub")
    signature = owner_sign_key.sign(manifest.signing_bytes())
    return SignedManifest(
        manifest=manifest, signature=b64encode(signature), manifest_hash=manifest_hash(manifest)
    )


def verify_manifest(
    signed: SignedManifest,
    *,
    expected_owner_sign_pub: str | None,
    expected_room_id: str | None,
    min_revision: int | None,
    rotations: Sequence[SignedKeyRotation] = (),
) -> RoomManifest:
    """Verify a signed manifest, step by step; return the manifest only if every step passes.

    1. ``manifest_hash`` is the hash of the manifest (:class:`ManifestError`);
    2. the signature verifies under ``manifest.owner_sign_pub`` (:class:`SignatureError`);
    3. that key is the one the reader expects, e.g. from the invite link or its own profile, or the
       owner rotated from the expected key to it through ``rotations`` (the owner's key-rotation
       certificates, see :func:`follow_key_rotations`) (:class:`SignatureError`: a valid signature by
       any other key is a substituted manifest);
    4. the room id is the one the reader asked for (:class:`ManifestError`);
    5. the revision is not lower than one the reader accepted (:class:`RevisionRollback`).

    Pass ``None`` for a check only where the reader has nothing to compare with (first contact).
    """
    manifest = signed.manifest
    computed = manifest_hash(manifest)
    if computed != signed.manifest_hash:
        raise ManifestError(
            f"manifest hash mismatch: envelope says {signed.manifest_hash}, content is {computed}"
        )

    try:
        public_key = Ed25519PublicKey.from_public_bytes(b64decode(manifest.owner_sign_pub))
        public_key.verify(b64decode(signed.signature), manifest.signing_bytes())
    except (InvalidSignature, ValueError):
        raise SignatureError(
            f"manifest signature of room {manifest.room_id} does not verify under its owner_sign_pub"
        ) from None

    if expected_owner_sign_pub is not None and manifest.owner_sign_pub != expected_owner_sign_pub:
        if not rotations:
            raise SignatureError(
                f"manifest of room {manifest.room_id} is signed by {manifest.owner_sign_pub}, not by the "
                f"expected owner key {expected_owner_sign_pub}: refusing a substituted manifest"
            )
        follow_key_rotations(
            rotations,
            tenant_id=manifest.tenant_id,
            from_sign_pub=expected_owner_sign_pub,
            to_sign_pub=manifest.owner_sign_pub,
        )
    if expected_room_id is not None and manifest.room_id != expected_room_id:
        raise ManifestError(f"manifest is for room {manifest.room_id}, not {expected_room_id}")
    if min_revision is not None and manifest.revision < min_revision:
        raise RevisionRollback(
            f"manifest of room {manifest.room_id} has revision {manifest.revision}, lower than the "
            f"accepted revision {min_revision}"
        )
    return manifest


_FIXED_ACROSS_REVISIONS = frozenset(
    {"version", "room_id", "tenant_id", "owner_sign_pub", "created_at", "revision", "rules_sha256"}
)


def next_revision(previous: RoomManifest, changes: Mapping[str, Any]) -> RoomManifest:
    """The manifest of a trust update: ``previous`` with ``changes`` applied and ``revision + 1``.

    Room, tenant, owner signing key and creation time never change; ``rules_sha256`` follows ``rules``.
    """
    fixed = sorted(_FIXED_ACROSS_REVISIONS.intersection(changes))
    if fixed:
        raise ManifestError(f"a new revision cannot set {', '.join(fixed)}")
    fields: dict[str, Any] = {name: getattr(previous, name) for name in RoomManifest.model_fields}
    fields.update(changes)
    fields["rules_sha256"] = rules_digest(fields["rules"])
    fields["revision"] = previous.revision + 1
    return RoomManifest.model_validate(fields)


# --- owner key rotation ------------------------------------------------------------------------------


class KeyRotation(StrictModel):
    """An owner's statement, signed with its OLD owner-sign key, that its keys are now the new ones.

    Rotating a tenant secret changes ``owner_sign_pub``, but manifests already accepted and invite links
    already shared pin the old key. A chain of these certificates links a pinned key to the current one,
    so every room keeps verifying after a rotation (DESIGN §16.11). Signed with Ed25519 over
    ``b"hivemind-key-rotation-v1\\n" + JCS(rotation)``.
    """

    tenant_id: Identifier
    old_sign_pub: Ed25519PublicB64
    new_sign_pub: Ed25519PublicB64
    new_box_pub: X25519PublicB64
    rotated_at: UnixSeconds

    @model_validator(mode="before")
    @classmethod
    def _no_floats(cls, data: Any) -> Any:
        return refuse_floats(data)

    @model_validator(mode="after")
    def _changes_the_key(self) -> Self:
        if self.old_sign_pub == self.new_sign_pub:
            raise ValueError("a key rotation names a new signing key different from the old one")
        return self

    def signing_bytes(self) -> bytes:
        return KEY_ROTATION_CONTEXT + canonical_json(self)


class SignedKeyRotation(StrictModel):
    """A key-rotation certificate as stored and served; verify it with :func:`verify_key_rotation`."""

    rotation: KeyRotation
    signature: Ed25519SignatureB64

    def to_json(self) -> str:
        return canonical_json(self).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> SignedKeyRotation:
        """Parse a served certificate; malformed input raises :class:`KeyRotationError`."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "$"
            raise KeyRotationError(f"not a valid key-rotation certificate: {where}: {error['msg']}") from None


def sign_key_rotation(rotation: KeyRotation, old_sign_key: Ed25519PrivateKey) -> SignedKeyRotation:
    """Owner side: sign with the key being retired, whose public half is ``rotation.old_sign_pub``."""
    if b64encode(public_bytes(old_sign_key)) != rotation.old_sign_pub:
        raise InvalidInput("a key rotation is signed with the old key it names (old_sign_pub)")
    signature = old_sign_key.sign(rotation.signing_bytes())
    return SignedKeyRotation(rotation=rotation, signature=b64encode(signature))


def verify_key_rotation(signed: SignedKeyRotation) -> KeyRotation:
    """Return the rotation if its signature verifies under its ``old_sign_pub``; else KeyRotationError."""
    rotation = signed.rotation
    try:
        public_key = Ed25519PublicKey.from_public_bytes(b64decode(rotation.old_sign_pub))
        public_key.verify(b64decode(signed.signature), rotation.signing_bytes())
    except (InvalidSignature, ValueError):
        raise KeyRotationError(
            f"key-rotation certificate of tenant {rotation.tenant_id} from {rotation.old_sign_pub} does not "
            "verify under that key"
        ) from None
    return rotation


def follow_key_rotations(
    rotations: Sequence[SignedKeyRotation], *, tenant_id: str, from_sign_pub: str, to_sign_pub: str
) -> list[KeyRotation]:
    """Verify that ``rotations`` link ``from_sign_pub`` to ``to_sign_pub``; return the path, in order.

    Every certificate must verify and belong to ``tenant_id``. From ``from_sign_pub``, each step follows
    the certificate signed by the current key until ``to_sign_pub`` is reached. Refused, each with
    :class:`KeyRotationError`: a certificate that does not verify or names another tenant; two
    certificates signed by the same key (a fork: only a stolen key would sign a second one); a cycle;
    no certificate leading on from a key on the way.
    """
    if len(rotations) > MAX_KEY_ROTATIONS:
        raise KeyRotationError(f"more than {MAX_KEY_ROTATIONS} key-rotation certificates")
    by_old_key: dict[str, KeyRotation] = {}
    for signed in rotations:
        rotation = verify_key_rotation(signed)
        if rotation.tenant_id != tenant_id:
            raise KeyRotationError(
                f"a key-rotation certificate is for tenant {rotation.tenant_id}, not {tenant_id}"
            )
        if rotation.old_sign_pub in by_old_key and by_old_key[rotation.old_sign_pub] != rotation:
            raise KeyRotationError(
                f"two key-rotation certificates of tenant {tenant_id} retire the same key "
                f"{rotation.old_sign_pub} (a forked history): refusing both"
            )
        by_old_key[rotation.old_sign_pub] = rotation
    path: list[KeyRotation] = []
    seen = {from_sign_pub}
    current = from_sign_pub
    while current != to_sign_pub:
        step = by_old_key.get(current)
        if step is None:
            raise KeyRotationError(
                f"no key-rotation certificate of tenant {tenant_id} leads from {current} towards "
                f"{to_sign_pub}: the expected owner key never handed over to the manifest's key"
            )
        if step.new_sign_pub in seen:
            raise KeyRotationError(f"the key-rotation certificates of tenant {tenant_id} form a cycle")
        seen.add(step.new_sign_pub)
        path.append(step)
        current = step.new_sign_pub
    return path


def rotated_revision(previous: RoomManifest, rotation: KeyRotation) -> RoomManifest:
    """The manifest re-signed after an owner key rotation: the new owner keys and ``revision + 1``.

    The only revision that may change ``owner_sign_pub``; everything else stays as it was.
    """
    if rotation.tenant_id != previous.tenant_id:
        raise ManifestError(f"the key rotation is for tenant {rotation.tenant_id}, not {previous.tenant_id}")
    if rotation.old_sign_pub != previous.owner_sign_pub:
        raise ManifestError(
            f"the key rotation retires {rotation.old_sign_pub}, but room {previous.room_id} is signed by "
            f"{previous.owner_sign_pub}"
        )
    fields: dict[str, Any] = {name: getattr(previous, name) for name in RoomManifest.model_fields}
    fields.update(
        owner_sign_pub=rotation.new_sign_pub,
        owner_box_pub=rotation.new_box_pub,
        revision=previous.revision + 1,
    )
    return RoomManifest.model_validate(fields)


# --- invite links ------------------------------------------------------------------------------------

_LINK_FIELDS = ("invite", "owner_sign_pub", "room_id", "service")
_BASE64URL_TEXT = re.compile(r"[A-Za-z0-9_-]+")
_ROOM_ID = re.compile(r"room_[a-z0-9]{1,64}")
_MAX_SERVICE_CHARS = 2048


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class InviteLink(StrictModel):
    """The content of an ``hmroom://`` link. A bearer credential: ``invite`` is the ``hmq_`` secret.

    Every field check raises :class:`InvalidLink` with a message saying which part is wrong.
    """

    service: str
    room_id: str
    invite: str = Field(repr=False)
    owner_sign_pub: str

    @field_validator("service", mode="before")
    @classmethod
    def _service(cls, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise InvalidLink("service must be a URL string")
        if len(value) > _MAX_SERVICE_CHARS or not value.isascii() or not value.isprintable() or " " in value:
            raise InvalidLink("service must be a printable ASCII URL without spaces")
        try:
            url = urlsplit(value)
            host, _port = url.hostname, url.port
        except ValueError:
            raise InvalidLink("service is not a valid URL") from None
        if url.scheme not in ("http", "https"):
            raise InvalidLink(f"service must be an https URL, not {url.scheme or 'schemeless'}")
        if not host:
            raise InvalidLink("service URL has no host")
        if url.username is not None or url.password is not None:
            raise InvalidLink("service URL must not carry credentials")
        if url.query or url.fragment:
            raise InvalidLink("service URL must not have a query or fragment")
        # Plain http would expose the bearer token; it is only for the local stack on loopback.
        if url.scheme == "http" and not _is_loopback(host):
            raise InvalidLink(f"service must use https; plain http is allowed only on loopback, not {host}")
        return value

    @field_validator("room_id", mode="before")
    @classmethod
    def _room_id(cls, value: Any) -> str:
        if not isinstance(value, str) or not _ROOM_ID.fullmatch(value):
            raise InvalidLink("room_id must look like room_<lowercase letters and digits>")
        return value

    @field_validator("invite", mode="before")
    @classmethod
    def _invite(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidLink("invite must be an hmq_ token string")
        try:
            Secret.parse(value, expect=TokenKind.INVITE)
        except InvalidToken as exc:
            raise InvalidLink(f"invite is not a valid hmq_ token: {exc.message}") from None
        return value

    @field_validator("owner_sign_pub", mode="before")
    @classmethod
    def _owner_sign_pub(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidLink("owner_sign_pub must be a base64url string")
        try:
            b64url_bytes(32, 32, "owner_sign_pub")(value)
        except ValueError as exc:
            raise InvalidLink(f"{exc} (a raw Ed25519 public key)") from None
        return value

    def invite_secret(self) -> Secret:
        return Secret.parse(self.invite, expect=TokenKind.INVITE)


def encode_link(link: InviteLink) -> str:
    return LINK_SCHEME + b64encode(canonical_json(link))


def _link_json(text: Any) -> bytes:
    """Scheme and base64url layers of a link; returns the JSON bytes inside."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidLink("the invite link is empty")
    text = text.strip()
    if len(text) > MAX_LINK_CHARS:
        raise InvalidLink(f"the invite link is longer than {MAX_LINK_CHARS} characters")
    if text[: len(LINK_SCHEME)].lower() != LINK_SCHEME:
        scheme, separator, _ = text.partition("://")
        # Name the wrong scheme only when it looks like one: never echo link content (it may be secret).
        shown = f"{scheme}://" if separator and scheme.isalnum() and len(scheme) <= 16 else "something else"
        raise InvalidLink(f"an invite link starts with {LINK_SCHEME}; this one starts with {shown}")
    body = text[len(LINK_SCHEME) :]
    if not body:
        raise InvalidLink(f"the invite link has nothing after {LINK_SCHEME}")
    if not _BASE64URL_TEXT.fullmatch(body):
        raise InvalidLink(
            f"the part after {LINK_SCHEME} is not base64url (letters, digits, '-' and '_', no padding); "
            "was the link cut or re-wrapped?"
        )
    try:
        raw = b64decode(body)
    except InvalidInput:
        raise InvalidLink(
            f"the part after {LINK_SCHEME} has an impossible base64url length; was it cut?"
        ) from None
    if b64encode(raw) != body:
        raise InvalidLink(f"the part after {LINK_SCHEME} is not canonical base64url; was it altered?")
    return raw


def parse_link(text: str) -> InviteLink:
    """Parse an ``hmroom://`` link; every malformation raises :class:`InvalidLink` saying what is wrong.

    Messages never repeat the link's content: it holds a secret.
    """
    raw = _link_json(text)
    try:
        content = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidLink("the invite link does not decode to JSON") from None
    if not isinstance(content, dict):
        raise InvalidLink("the invite link decodes to JSON, but not to an object")
    missing = sorted(set(_LINK_FIELDS) - content.keys())
    if missing:
        raise InvalidLink(f"the invite link lacks {', '.join(missing)}")
    extra = sorted(content.keys() - set(_LINK_FIELDS))
    if extra:
        raise InvalidLink(f"the invite link has unknown fields {', '.join(extra)}")
    try:
        canonical = canonical_json(content)
    except InvalidInput:  # includes FloatInSignedDocument
        canonical = b""
    if canonical != raw:
        raise InvalidLink("the invite link's JSON is not in canonical form (RFC 8785); it was altered")
    return InviteLink(**content)
