"""HPKE sealing (RFC 9180): run envelopes, sealed agent keys and tenant provider keys to the attested
runner, output keys to the requester (DESIGN §6, §7, §8).

Two suites, both base mode with HKDF-SHA256 and AES-256-GCM:

- ``mlkem768-x25519`` (default): the hybrid KEM MLKEM768-X25519 (KEM id 0x647a, draft-ietf-hpke-pq), so
  a run envelope recorded today stays closed against a future quantum computer;
- ``x25519``: DHKEM(X25519, HKDF-SHA256), the fallback a client may choose, and the only suite for output
  keys (reply keys and owner box keys are X25519).

Every seal binds a context through the HPKE ``info`` (run envelopes: the room; output keys: the run and
the recipient role; agent keys: the agent; provider keys: the tenant and the provider), so ciphertext
moved to another room, run, recipient, agent, tenant or provider, or replayed as another kind of
secret, does not open. The public HPKE API of ``cryptography`` takes no AEAD associated data; ``info``
enters the key schedule, so binding the context there is equally strong.

The runner derives its key pair from a 32-byte seed (dstack KMS or a local seed file), so every instance
of the runner app holds the same keys. Replays are refused by nonce and expiry through a
:class:`ReplayGuard`; the runner uses a store-backed guard (a conditional put per nonce) so a nonce is
spent once across all instances, and :class:`MemoryReplayGuard` serves tests and single processes.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import threading
import time
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Annotated, Literal, Protocol, Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import AfterValidator, Field, ValidationError, model_validator

from hivemind.canonical import canonical_json
from hivemind.encoding import b64decode, b64encode, sha256_hex
from hivemind.errors import EnvelopeError, ExpiredError, InvalidInput, ReplayError, ServiceUnavailable
from hivemind.keys import HKDF_SALT, public_bytes
from hivemind.models import (
    Base64Url,
    Budgets,
    Identifier,
    Key256B64,
    Sha256Hex,
    StrictModel,
    UnixSeconds,
    X25519PublicB64,
    b64url_bytes,
)

SEALED_VERSION = 1
RUN_INFO_PREFIX = b"hivemind-run-v1|"
OUTPUT_INFO_PREFIX = b"hivemind-output-v1|"
AGENT_KEY_INFO_PREFIX = b"hivemind-agent-v1|"
PROVIDER_KEY_INFO_PREFIX = b"hivemind-provider-key-v1|"
RUNNER_KEY_SEED_BYTES = 32
OUTPUT_KEY_BYTES = 32
AGENT_KEY_BYTES = 32
MAX_PROVIDER_KEY_CHARS = 4096
RUN_NONCE_BYTES = 16
DEFAULT_RUN_ENVELOPE_TTL_S = 3600
# A nonce must be remembered until its envelope expires; the cap bounds what a replay guard holds.
MAX_RUN_ENVELOPE_TTL_S = 24 * 3600
MAX_PROMPT_CHARS = 1_000_000

_MLKEM768_PUBLIC_BYTES = 1184
_X25519_BYTES = 32
_HYBRID_SEED_BYTES = 32
_MLKEM_SEED_BYTES = 64

# Field types of this module's sizes; the shared base64url types are in hivemind.models.
NonceB64 = Annotated[str, AfterValidator(b64url_bytes(RUN_NONCE_BYTES, 64, "a nonce"))]
HybridPublicB64 = Annotated[
    str, AfterValidator(b64url_bytes(1216, 1216, "an MLKEM768-X25519 public key (ek_PQ || ek_T)"))
]
RoomId = Annotated[str, Field(pattern=r"^room_[a-z0-9]{1,64}$")]
# Bearer ids are tenant ids (owner) or invite credential ids; never '|', which separates AAD fields.
BearerId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,80}$")]


# --- suites and keys ---------------------------------------------------------------------------------


class HpkeSuite(StrEnum):
    MLKEM768_X25519 = "mlkem768-x25519"
    X25519 = "x25519"


DEFAULT_SUITE = HpkeSuite.MLKEM768_X25519

_KEMS = {HpkeSuite.MLKEM768_X25519: hpke.KEM.MLKEM768_X25519, HpkeSuite.X25519: hpke.KEM.X25519}
_SUITES = {name: hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM) for name, kem in _KEMS.items()}
_ENC_BYTES = {name: kem.enc_length() for name, kem in _KEMS.items()}

_PublicKey = hpke.MLKEM768X25519PublicKey | X25519PublicKey
_PrivateKey = hpke.MLKEM768X25519PrivateKey | X25519PrivateKey


def _hkdf(seed: bytes, label: str, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=HKDF_SALT, info=label.encode()).derive(seed)


class HpkePublicKeys(StrictModel):
    """The runner's published HPKE public keys, one per suite (attested through ``report_data``)."""

    mlkem768_x25519: HybridPublicB64
    x25519: X25519PublicB64

    @model_validator(mode="after")
    def _keys_load(self) -> Self:
        # Refuse a key that has the right size but is not a valid encapsulation key.
        try:
            self.public_key(HpkeSuite.MLKEM768_X25519)
        except ValueError:
            raise ValueError("mlkem768_x25519 does not hold a valid ML-KEM-768 encapsulation key") from None
        return self

    def by_suite(self) -> dict[str, str]:
        """``{suite name: base64url key}``: the form attestation documents publish and bind."""
        return {HpkeSuite.MLKEM768_X25519.value: self.mlkem768_x25519, HpkeSuite.X25519.value: self.x25519}

    @classmethod
    def from_suites(cls, keys: Mapping[str, str]) -> HpkePublicKeys:
        """Read the keys back from ``{suite name: base64url key}``; both suites must be there."""
        missing = [suite.value for suite in HpkeSuite if suite.value not in keys]
        if missing:
            raise EnvelopeError(f"the runner publishes no HPKE key for suite {', '.join(missing)}")
        try:
            return cls(
                mlkem768_x25519=keys[HpkeSuite.MLKEM768_X25519.value], x25519=keys[HpkeSuite.X25519.value]
            )
        except ValidationError as exc:
            raise EnvelopeError(f"the runner's HPKE public keys are malformed: {_first_error(exc)}") from None

    def public_key(self, suite: HpkeSuite) -> _PublicKey:
        if suite is HpkeSuite.X25519:
            return X25519PublicKey.from_public_bytes(b64decode(self.x25519))
        raw = b64decode(self.mlkem768_x25519)
        return hpke.MLKEM768X25519PublicKey(
            MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM768_PUBLIC_BYTES]),
            X25519PublicKey.from_public_bytes(raw[_MLKEM768_PUBLIC_BYTES:]),
        )


class HpkeKeyPair:
    """The runner's HPKE private keys for both suites. Never serialized; ``repr`` shows no key material.

    Derivation from a 32-byte seed (HKDF-SHA256, salt ``hivemind/v1``):

    - ``runner-hpke|mlkem768-x25519`` gives the 32-byte MLKEM768-X25519 private key (the draft's seed
      format; expanded with SHAKE256 into the ML-KEM-768 seed and the X25519 key);
    - ``runner-hpke|x25519`` gives the X25519 private key of the fallback suite.
    """

    __slots__ = ("_hybrid", "_hybrid_ek", "_x25519")

    def __init__(self, hybrid_seed: bytes, x25519_private: bytes) -> None:
        if len(hybrid_seed) != _HYBRID_SEED_BYTES or len(x25519_private) != _X25519_BYTES:
            raise InvalidInput("an HPKE key pair is made of two 32-byte private keys")
        # MLKEM768-X25519 expandKey: SHAKE256(seed, 96) = ML-KEM-768 seed (64) || X25519 private key (32).
        expanded = hashlib.shake_256(hybrid_seed).digest(_MLKEM_SEED_BYTES + _X25519_BYTES)
        mlkem_key = MLKEM768PrivateKey.from_seed_bytes(expanded[:_MLKEM_SEED_BYTES])
        hybrid_x25519 = X25519PrivateKey.from_private_bytes(expanded[_MLKEM_SEED_BYTES:])
        self._hybrid = hpke.MLKEM768X25519PrivateKey(mlkem_key, hybrid_x25519)
        # The hybrid public key is ek_PQ || ek_T, the draft's serialization.
        self._hybrid_ek = mlkem_key.public_key().public_bytes_raw() + public_bytes(hybrid_x25519)
        self._x25519 = X25519PrivateKey.from_private_bytes(x25519_private)

    @classmethod
    def from_seed(cls, seed: bytes) -> HpkeKeyPair:
        """Deterministic keys from the runner's 32-byte seed: every instance derives the same pair."""
        if len(seed) != RUNNER_KEY_SEED_BYTES:
            raise InvalidInput(f"the runner key seed is {RUNNER_KEY_SEED_BYTES} bytes, got {len(seed)}")
        return cls(
            _hkdf(seed, "runner-hpke|mlkem768-x25519", _HYBRID_SEED_BYTES),
            _hkdf(seed, "runner-hpke|x25519", _X25519_BYTES),
        )

    @classmethod
    def generate(cls) -> HpkeKeyPair:
        return cls.from_seed(os.urandom(RUNNER_KEY_SEED_BYTES))

    def public_keys(self) -> HpkePublicKeys:
        return HpkePublicKeys(
            mlkem768_x25519=b64encode(self._hybrid_ek), x25519=b64encode(public_bytes(self._x25519))
        )

    def private_key(self, suite: HpkeSuite) -> _PrivateKey:
        return self._hybrid if suite is HpkeSuite.MLKEM768_X25519 else self._x25519

    def __repr__(self) -> str:
        return "HpkeKeyPair(…)"


# --- sealed envelopes --------------------------------------------------------------------------------


class SealedEnvelope(StrictModel):
    """One HPKE single-shot seal: ``enc`` is the KEM encapsulation, ``ct`` the AEAD ciphertext and tag."""

    v: Literal[1] = SEALED_VERSION
    suite: HpkeSuite
    enc: Base64Url
    ct: Base64Url

    def to_json(self) -> str:
        return canonical_json(self).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> SealedEnvelope:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise EnvelopeError(f"not a sealed envelope: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "$"
    return f"{where}: {error['msg']}"


def _require_info(info: bytes) -> None:
    # An empty info would let a ciphertext open in every context; each use names its own.
    if not info:
        raise InvalidInput("HPKE info must bind a context (room, run, recipient)")


def _seal(public_key: _PublicKey, suite: HpkeSuite, plaintext: bytes, info: bytes) -> SealedEnvelope:
    _require_info(info)
    sealed = _SUITES[suite].encrypt(plaintext, public_key, info=info)
    enc_bytes = _ENC_BYTES[suite]
    return SealedEnvelope(suite=suite, enc=b64encode(sealed[:enc_bytes]), ct=b64encode(sealed[enc_bytes:]))


def _open(private_key: _PrivateKey, sealed: SealedEnvelope, info: bytes) -> bytes:
    _require_info(info)
    enc = b64decode(sealed.enc)
    if len(enc) != _ENC_BYTES[sealed.suite]:
        raise EnvelopeError(
            f"envelope enc has {len(enc)} bytes; suite {sealed.suite} uses {_ENC_BYTES[sealed.suite]}"
        )
    try:
        return _SUITES[sealed.suite].decrypt(enc + b64decode(sealed.ct), private_key, info=info)
    except InvalidTag:
        raise EnvelopeError(
            "sealed envelope does not open: wrong key, another context (room, run or recipient), or tampered"
        ) from None


def seal_to(
    public_keys: HpkePublicKeys, plaintext: bytes, *, info: bytes, suite: HpkeSuite = DEFAULT_SUITE
) -> SealedEnvelope:
    """Seal ``plaintext`` to the runner's public key of ``suite``, bound to ``info``."""
    return _seal(public_keys.public_key(suite), suite, plaintext, info)


def open_sealed(keypair: HpkeKeyPair, sealed: SealedEnvelope, *, info: bytes) -> bytes:
    """Open with the key of the envelope's suite; any mismatch or change raises :class:`EnvelopeError`."""
    return _open(keypair.private_key(sealed.suite), sealed, info)


# --- replay protection -------------------------------------------------------------------------------


class ReplayGuard(Protocol):
    """Spends a nonce once. Implementations keep a nonce at least until ``expires_at``."""

    def check_and_record(self, nonce: str, expires_at: int) -> None:
        """Record ``nonce``; raise :class:`ReplayError` if it was recorded before and has not expired."""


class MemoryReplayGuard:
    """In-process guard: a bounded set of nonces, each dropped once its envelope has expired.

    When full of unexpired nonces it refuses new ones (``ServiceUnavailable``) rather than forgetting a
    nonce that could then be replayed.
    """

    def __init__(self, *, max_entries: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._max_entries = max_entries
        self._clock = clock
        self._expiry_by_nonce: dict[str, int] = {}
        self._by_expiry: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def check_and_record(self, nonce: str, expires_at: int) -> None:
        with self._lock:
            now = int(self._clock())
            while self._by_expiry and self._by_expiry[0][0] <= now:
                _, expired = heapq.heappop(self._by_expiry)
                del self._expiry_by_nonce[expired]
            if expires_at <= now:
                raise ExpiredError(f"envelope expired at {expires_at}, now is {now}")
            if nonce in self._expiry_by_nonce:
                raise ReplayError("this run envelope was already opened (nonce seen before)")
            if len(self._expiry_by_nonce) >= self._max_entries:
                raise ServiceUnavailable("replay guard is full of unexpired nonces; retry later")
            self._expiry_by_nonce[nonce] = expires_at
            heapq.heappush(self._by_expiry, (expires_at, nonce))


# --- run envelopes -----------------------------------------------------------------------------------


class RunEnvelope(StrictModel):
    """What a client seals to the runner for one run (DESIGN §7 step 2)."""

    room_id: RoomId
    manifest_hash: Sha256Hex
    bearer_id: BearerId
    # The bearer's room wrap key, so the runner can unwrap the room DEK; never shown in repr.
    wrap_key: Key256B64 = Field(repr=False)
    prompt: str = Field(max_length=MAX_PROMPT_CHARS, repr=False)
    # A fresh X25519 public key for this run; the output key is sealed to it.
    reply_pub: X25519PublicB64
    budgets: Budgets
    nonce: NonceB64
    expires_at: UnixSeconds
    query_agent_id: Identifier | None = None

    @classmethod
    def create(
        cls,
        *,
        room_id: str,
        manifest_hash: str,
        bearer_id: str,
        wrap_key: bytes,
        prompt: str,
        reply_pub: bytes,
        budgets: Budgets,
        now: int,
        ttl_s: int = DEFAULT_RUN_ENVELOPE_TTL_S,
        query_agent_id: str | None = None,
    ) -> RunEnvelope:
        """A new envelope with a fresh random nonce, expiring ``ttl_s`` seconds after ``now``."""
        if not 0 < ttl_s <= MAX_RUN_ENVELOPE_TTL_S:
            raise InvalidInput(f"run envelope lifetime must be 1..{MAX_RUN_ENVELOPE_TTL_S} seconds")
        return cls(
            room_id=room_id,
            manifest_hash=manifest_hash,
            bearer_id=bearer_id,
            wrap_key=b64encode(wrap_key),
            prompt=prompt,
            reply_pub=b64encode(reply_pub),
            budgets=budgets,
            nonce=b64encode(os.urandom(RUN_NONCE_BYTES)),
            expires_at=now + ttl_s,
            query_agent_id=query_agent_id,
        )

    def wrap_key_bytes(self) -> bytes:
        return b64decode(self.wrap_key)

    def prompt_sha256(self) -> str:
        """Hex SHA-256 of the prompt's UTF-8 bytes: what the run request and the receipt carry."""
        return sha256_hex(self.prompt.encode("utf-8"))

    def reply_public_bytes(self) -> bytes:
        return b64decode(self.reply_pub)


def run_envelope_info(room_id: str) -> bytes:
    return RUN_INFO_PREFIX + room_id.encode()


def seal_run_envelope(
    runner_keys: HpkePublicKeys, envelope: RunEnvelope, *, suite: HpkeSuite = DEFAULT_SUITE
) -> SealedEnvelope:
    """Client side: seal the JCS bytes of ``envelope`` to the runner, bound to its room."""
    return seal_to(
        runner_keys, canonical_json(envelope), info=run_envelope_info(envelope.room_id), suite=suite
    )


def open_run_envelope(
    keypair: HpkeKeyPair, sealed: SealedEnvelope, *, room_id: str, now: int, replay_guard: ReplayGuard
) -> RunEnvelope:
    """Runner side, in order: decrypt for ``room_id``, parse, same room, not expired, not replayed.

    The caller still compares ``manifest_hash`` with the manifest it verified itself.
    """
    plaintext = open_sealed(keypair, sealed, info=run_envelope_info(room_id))
    try:
        envelope = RunEnvelope.model_validate_json(plaintext)
    except ValidationError as exc:
        raise EnvelopeError(f"run envelope content is malformed: {_first_error(exc)}") from None
    if envelope.room_id != room_id:
        raise EnvelopeError(f"run envelope names room {envelope.room_id}, but it was sent to room {room_id}")
    if envelope.expires_at <= now:
        raise ExpiredError(f"run envelope expired at {envelope.expires_at}, now is {now}")
    if envelope.expires_at - now > MAX_RUN_ENVELOPE_TTL_S:
        raise EnvelopeError(
            f"run envelope expires more than {MAX_RUN_ENVELOPE_TTL_S} seconds ahead; "
            "refusing to hold its nonce that long"
        )
    replay_guard.check_and_record(envelope.nonce, envelope.expires_at)
    return envelope


# --- output keys -------------------------------------------------------------------------------------


class OutputRecipient(StrEnum):
    """Who an output key is sealed to: the requester's ``reply_pub`` or the room's ``owner_box_pub``."""

    QUERIER = "querier"
    OWNER = "owner"


def output_key_info(run_id: str, recipient: OutputRecipient) -> bytes:
    if not run_id or "|" in run_id:
        raise InvalidInput("a run id is non-empty and has no '|'")
    return OUTPUT_INFO_PREFIX + f"{run_id}|{recipient.value}".encode()


def seal_output_key(
    output_key: bytes, recipient_pub: bytes, *, run_id: str, recipient: OutputRecipient
) -> SealedEnvelope:
    """Seal a run's 32-byte output key (HMS1 key of its output and artifacts) to an X25519 key."""
    if len(output_key) != OUTPUT_KEY_BYTES:
        raise InvalidInput(f"an output key is {OUTPUT_KEY_BYTES} bytes")
    if len(recipient_pub) != _X25519_BYTES:
        raise InvalidInput("the recipient key is a raw 32-byte X25519 public key")
    public_key = X25519PublicKey.from_public_bytes(recipient_pub)
    return _seal(public_key, HpkeSuite.X25519, output_key, output_key_info(run_id, recipient))


def open_output_key(
    recipient_key: X25519PrivateKey, sealed: SealedEnvelope, *, run_id: str, recipient: OutputRecipient
) -> bytes:
    """Open a sealed output key for ``run_id`` and ``recipient``; anything else raises EnvelopeError."""
    if sealed.suite is not HpkeSuite.X25519:
        raise EnvelopeError(f"output keys are sealed with suite x25519, not {sealed.suite}")
    output_key = _open(recipient_key, sealed, output_key_info(run_id, recipient))
    if len(output_key) != OUTPUT_KEY_BYTES:
        raise EnvelopeError("sealed output key has the wrong length")
    return output_key


# --- secrets sealed to the attested runner -----------------------------------------------------------


def agent_key_info(agent_id: str) -> bytes:
    """HPKE info of a sealed agent's source key: bound to the agent it opens."""
    if not agent_id or "|" in agent_id:
        raise InvalidInput("an agent id is non-empty and has no '|'")
    return AGENT_KEY_INFO_PREFIX + agent_id.encode()


def seal_agent_key(
    runner_keys: HpkePublicKeys, agent_key: bytes, *, agent_id: str, suite: HpkeSuite = DEFAULT_SUITE
) -> SealedEnvelope:
    """Uploader side: seal a sealed agent's 32-byte HMS1 source key to the runner's attested keys."""
    if len(agent_key) != AGENT_KEY_BYTES:
        raise InvalidInput(f"an agent key is {AGENT_KEY_BYTES} bytes")
    return seal_to(runner_keys, agent_key, info=agent_key_info(agent_id), suite=suite)


def open_agent_key(keypair: HpkeKeyPair, sealed: SealedEnvelope, *, agent_id: str) -> bytes:
    """Runner side: the source key of ``agent_id``; anything else raises :class:`EnvelopeError`."""
    agent_key = open_sealed(keypair, sealed, info=agent_key_info(agent_id))
    if len(agent_key) != AGENT_KEY_BYTES:
        raise EnvelopeError("a sealed agent key has the wrong length")
    return agent_key


def provider_key_info(tenant_id: str, provider: str) -> bytes:
    """HPKE info of a tenant's provider key: bound to the tenant and the provider it is for."""
    if not tenant_id or not provider or "|" in tenant_id or "|" in provider:
        raise InvalidInput("a provider key is bound to a non-empty tenant id and provider name")
    return PROVIDER_KEY_INFO_PREFIX + tenant_id.encode() + b"|" + provider.encode()


def _provider_key_problem(api_key: str) -> str | None:
    # Only a printable token may reach an Authorization header: no spaces, no control characters.
    if not api_key or len(api_key) > MAX_PROVIDER_KEY_CHARS:
        return f"an API key is 1 to {MAX_PROVIDER_KEY_CHARS} characters"
    if any(not 0x21 <= ord(character) <= 0x7E for character in api_key):
        return "an API key is printable ASCII without spaces (check what you pasted)"
    return None


def seal_provider_key(
    runner_keys: HpkePublicKeys,
    *,
    tenant_id: str,
    provider: str,
    api_key: str,
    suite: HpkeSuite = DEFAULT_SUITE,
) -> SealedEnvelope:
    """Tenant side: seal the tenant's own API key for ``provider`` to the runner's attested keys.

    Refuses (:class:`InvalidInput`) a key the runner would refuse to open.
    """
    problem = _provider_key_problem(api_key)
    if problem is not None:
        raise InvalidInput(problem)
    return seal_to(runner_keys, api_key.encode(), info=provider_key_info(tenant_id, provider), suite=suite)


def open_provider_key(keypair: HpkeKeyPair, sealed: SealedEnvelope, *, tenant_id: str, provider: str) -> str:
    """Runner side: a tenant's API key for ``provider``. Another tenant's or provider's key, a tampered
    one, or one that is not a printable token raises :class:`EnvelopeError`."""
    plaintext = open_sealed(keypair, sealed, info=provider_key_info(tenant_id, provider))
    try:
        api_key = plaintext.decode("ascii")
    except UnicodeDecodeError:
        raise EnvelopeError("the sealed provider key is not a printable token") from None
    if _provider_key_problem(api_key) is not None:
        raise EnvelopeError("the sealed provider key is not a printable token")
    return api_key
