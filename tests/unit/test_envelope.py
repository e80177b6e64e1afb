"""HPKE sealing, run envelopes, replay protection, output keys, and the agent and provider keys sealed to
the runner (hivemind.envelope)."""

import hashlib
import hmac
import json
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import ValidationError

from hivemind.encoding import b64decode, b64encode
from hivemind.envelope import (
    MAX_RUN_ENVELOPE_TTL_S,
    HpkeKeyPair,
    HpkePublicKeys,
    HpkeSuite,
    MemoryReplayGuard,
    OutputRecipient,
    RunEnvelope,
    SealedEnvelope,
    agent_key_info,
    open_agent_key,
    open_output_key,
    open_provider_key,
    open_run_envelope,
    open_sealed,
    provider_key_info,
    seal_agent_key,
    seal_output_key,
    seal_provider_key,
    seal_run_envelope,
    seal_to,
)
from hivemind.errors import EnvelopeError, ExpiredError, InvalidInput, ReplayError, ServiceUnavailable
from hivemind.keys import public_bytes
from hivemind.models import Budgets

NOW = 1_750_000_000
ROOM = "room_abc123"
MANIFEST_HASH = "ab" * 32
RUNNER = HpkeKeyPair.from_seed(bytes(range(32)))
OTHER_RUNNER = HpkeKeyPair.from_seed(bytes(range(1, 33)))
BUDGETS = Budgets(timeout_s=60, llm_calls=0, tokens=0, memory_mb=256)
BOTH_SUITES = pytest.mark.parametrize("suite", list(HpkeSuite))


def flip(text: str, index: int = 0) -> str:
    """Flip one bit of the byte at ``index`` of a base64url field."""
    raw = bytearray(b64decode(text))
    raw[index] ^= 0x01
    return b64encode(bytes(raw))


def fresh_guard() -> MemoryReplayGuard:
    return MemoryReplayGuard(clock=lambda: NOW)


def new_envelope(room_id: str = ROOM, *, now: int = NOW, ttl_s: int = 600) -> RunEnvelope:
    return RunEnvelope.create(
        room_id=room_id,
        manifest_hash=MANIFEST_HASH,
        bearer_id="0123456789abcdef",
        wrap_key=b"\x07" * 32,
        prompt="how many orders by country?",
        reply_pub=public_bytes(X25519PrivateKey.generate()),
        budgets=BUDGETS,
        now=now,
        ttl_s=ttl_s,
    )


# --- keys ----------------------------------------------------------------------------------------


def test_key_pair_is_deterministic_per_seed() -> None:
    assert HpkeKeyPair.from_seed(bytes(range(32))).public_keys() == RUNNER.public_keys()
    assert OTHER_RUNNER.public_keys().x25519 != RUNNER.public_keys().x25519
    assert OTHER_RUNNER.public_keys().mlkem768_x25519 != RUNNER.public_keys().mlkem768_x25519
    with pytest.raises(InvalidInput, match="32 bytes"):
        HpkeKeyPair.from_seed(b"\x00" * 31)
    assert "HpkeKeyPair(…)" == repr(RUNNER)


# Seed 00 01 .. 1f: published in docs/formats.md.
VECTOR_HYBRID_PUB_SHA256 = "61d6752cc65f88f457bc21951d6bda0ceb9834b43e3ba661d41b5d0bc2e3b06d"
VECTOR_X25519_PUB = "WkITRkFVJh8_jOx9zuMPTnFOijgc7rwrrm_oSA1LdwA"


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out, counter = out + block, counter + 1
    return out[:length]


def _runner_subkey(seed: bytes, label: bytes) -> bytes:
    return _hkdf_expand(_hkdf_extract(b"hivemind/v1", seed), label, 32)


def _hpke_open(kem_id: int, shared_secret: bytes, info: bytes, ct: bytes) -> bytes:
    """RFC 9180 base-mode key schedule with HKDF-SHA256 and AES-256-GCM, written out independently."""
    suite_id = b"HPKE" + struct.pack(">HHH", kem_id, 0x0001, 0x0002)

    def extract(salt: bytes, label: bytes, ikm: bytes) -> bytes:
        return _hkdf_extract(salt, b"HPKE-v1" + suite_id + label + ikm)

    def expand(prk: bytes, label: bytes, context: bytes, length: int) -> bytes:
        return _hkdf_expand(prk, struct.pack(">H", length) + b"HPKE-v1" + suite_id + label + context, length)

    context = b"\x00" + extract(b"", b"psk_id_hash", b"") + extract(b"", b"info_hash", info)
    secret = extract(shared_secret, b"secret", b"")
    return AESGCM(expand(secret, b"key", context, 32)).decrypt(
        expand(secret, b"base_nonce", context, 12), ct, b""
    )


def test_hybrid_suite_is_draft_mlkem768_x25519_with_our_key_derivation() -> None:
    """A third party with the seed opens our envelope from the specs alone (draft-ietf-hpke-pq)."""
    seed = bytes(range(32))
    expanded = hashlib.shake_256(_runner_subkey(seed, b"runner-hpke|mlkem768-x25519")).digest(96)
    dk_pq = MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
    dk_t = X25519PrivateKey.from_private_bytes(expanded[64:])
    ek_t = public_bytes(dk_t)
    published = b64decode(RUNNER.public_keys().mlkem768_x25519)
    assert published == dk_pq.public_key().public_bytes_raw() + ek_t
    assert hashlib.sha256(published).hexdigest() == VECTOR_HYBRID_PUB_SHA256

    sealed = seal_to(RUNNER.public_keys(), b"interop", info=b"hivemind-run-v1|room_abc123")
    enc = b64decode(sealed.enc)
    ct_pq, ct_t = enc[:1088], enc[1088:]
    ss_pq = dk_pq.decapsulate(ct_pq)
    ss_t = dk_t.exchange(X25519PublicKey.from_public_bytes(ct_t))
    shared = hashlib.sha3_256(ss_pq + ss_t + ct_t + ek_t + b"\\.//^\\").digest()
    assert _hpke_open(0x647A, shared, b"hivemind-run-v1|room_abc123", b64decode(sealed.ct)) == b"interop"


def test_fallback_suite_is_rfc9180_dhkem_x25519_with_our_key_derivation() -> None:
    sk = X25519PrivateKey.from_private_bytes(_runner_subkey(bytes(range(32)), b"runner-hpke|x25519"))
    assert b64encode(public_bytes(sk)) == RUNNER.public_keys().x25519 == VECTOR_X25519_PUB
    sealed = seal_to(RUNNER.public_keys(), b"interop", info=b"ctx", suite=HpkeSuite.X25519)
    enc = b64decode(sealed.enc)
    kem_suite = b"KEM" + struct.pack(">H", 0x0020)
    dh = sk.exchange(X25519PublicKey.from_public_bytes(enc))
    eae_prk = _hkdf_extract(b"", b"HPKE-v1" + kem_suite + b"eae_prk" + dh)
    kem_context = enc + public_bytes(sk)
    shared = _hkdf_expand(
        eae_prk, struct.pack(">H", 32) + b"HPKE-v1" + kem_suite + b"shared_secret" + kem_context, 32
    )
    assert _hpke_open(0x0020, shared, b"ctx", b64decode(sealed.ct)) == b"interop"
    # The fallback key is independent of the hybrid's X25519 half.
    assert b64decode(RUNNER.public_keys().mlkem768_x25519)[1184:] != public_bytes(sk)


def test_public_keys_by_suite_round_trip_and_refuse_gaps() -> None:
    published = RUNNER.public_keys().by_suite()
    assert set(published) == {"mlkem768-x25519", "x25519"}
    assert HpkePublicKeys.from_suites(published) == RUNNER.public_keys()
    with pytest.raises(EnvelopeError, match="no HPKE key for suite x25519"):
        HpkePublicKeys.from_suites({"mlkem768-x25519": published["mlkem768-x25519"]})
    with pytest.raises(EnvelopeError, match="malformed"):
        HpkePublicKeys.from_suites({**published, "x25519": b64encode(b"\x01" * 31)})


def test_public_keys_refuse_wrong_sizes_and_non_canonical_base64() -> None:
    good = RUNNER.public_keys()
    with pytest.raises(ValidationError, match="must be 1216 bytes"):
        HpkePublicKeys(mlkem768_x25519=good.x25519, x25519=good.x25519)
    with pytest.raises(ValidationError, match="not hold a valid ML-KEM-768 encapsulation key"):
        # Right size, but its coefficients are not reduced mod q: not an encapsulation key.
        HpkePublicKeys(mlkem768_x25519=b64encode(b"\xff" * 1216), x25519=good.x25519)
    with pytest.raises(ValidationError, match="not canonical"):
        # A set trailing bit decodes to the same bytes; it must not count as the same key.
        HpkePublicKeys(mlkem768_x25519=good.mlkem768_x25519, x25519=good.x25519[:-1] + "B")


# --- generic seal/open ---------------------------------------------------------------------------


@BOTH_SUITES
def test_seal_round_trip_through_json(suite: HpkeSuite) -> None:
    sealed = seal_to(RUNNER.public_keys(), b"secret prompt", info=b"ctx", suite=suite)
    assert sealed.suite is suite
    parsed = SealedEnvelope.from_json(sealed.to_json())
    assert json.loads(sealed.to_json())["v"] == 1
    assert open_sealed(RUNNER, parsed, info=b"ctx") == b"secret prompt"
    assert b"secret prompt" not in sealed.to_json().encode()


@BOTH_SUITES
def test_wrong_key_refused(suite: HpkeSuite) -> None:
    sealed = seal_to(RUNNER.public_keys(), b"x", info=b"ctx", suite=suite)
    with pytest.raises(EnvelopeError, match="does not open"):
        open_sealed(OTHER_RUNNER, sealed, info=b"ctx")


@BOTH_SUITES
def test_other_context_refused(suite: HpkeSuite) -> None:
    sealed = seal_to(RUNNER.public_keys(), b"x", info=b"hivemind-run-v1|room_a", suite=suite)
    with pytest.raises(EnvelopeError, match="does not open"):
        open_sealed(RUNNER, sealed, info=b"hivemind-run-v1|room_b")


@BOTH_SUITES
@pytest.mark.parametrize("part", ["enc", "ct"])
@pytest.mark.parametrize("index", [0, -1])
def test_flipped_byte_refused(suite: HpkeSuite, part: str, index: int) -> None:
    sealed = seal_to(RUNNER.public_keys(), b"plaintext", info=b"ctx", suite=suite)
    tampered = sealed.model_copy(update={part: flip(getattr(sealed, part), index)})
    with pytest.raises(EnvelopeError):
        open_sealed(RUNNER, tampered, info=b"ctx")


def test_truncated_or_suite_swapped_envelope_refused() -> None:
    sealed = seal_to(RUNNER.public_keys(), b"x", info=b"ctx")
    truncated = sealed.model_copy(update={"ct": b64encode(b64decode(sealed.ct)[:-1])})
    with pytest.raises(EnvelopeError, match="does not open"):
        open_sealed(RUNNER, truncated, info=b"ctx")
    relabelled = sealed.model_copy(update={"suite": HpkeSuite.X25519})
    with pytest.raises(EnvelopeError, match="enc has 1120 bytes; suite x25519 uses 32"):
        open_sealed(RUNNER, relabelled, info=b"ctx")


def test_empty_info_refused_both_ways() -> None:
    with pytest.raises(InvalidInput, match="must bind a context"):
        seal_to(RUNNER.public_keys(), b"x", info=b"")
    sealed = seal_to(RUNNER.public_keys(), b"x", info=b"ctx")
    with pytest.raises(InvalidInput, match="must bind a context"):
        open_sealed(RUNNER, sealed, info=b"")


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"v": 2, "suite": "x25519", "enc": "AA", "ct": "AA"}',
        '{"v": 1, "suite": "rsa", "enc": "AA", "ct": "AA"}',
        '{"v": 1, "suite": "x25519", "enc": "AA==", "ct": "AA"}',
        '{"v": 1, "suite": "x25519", "enc": "AA", "ct": "AA", "extra": 1}',
    ],
)
def test_malformed_sealed_json_refused(text: str) -> None:
    with pytest.raises(EnvelopeError, match="not a sealed envelope"):
        SealedEnvelope.from_json(text)


# --- run envelopes -------------------------------------------------------------------------------


@BOTH_SUITES
def test_run_envelope_round_trip(suite: HpkeSuite) -> None:
    envelope = new_envelope()
    sealed = seal_run_envelope(RUNNER.public_keys(), envelope, suite=suite)
    opened = open_run_envelope(RUNNER, sealed, room_id=ROOM, now=NOW + 1, replay_guard=fresh_guard())
    assert opened == envelope
    assert opened.wrap_key_bytes() == b"\x07" * 32
    assert len(b64decode(opened.nonce)) == 16
    assert opened.expires_at == NOW + 600
    assert opened.prompt_sha256() == hashlib.sha256(b"how many orders by country?").hexdigest()


def test_run_envelope_repr_hides_prompt_and_wrap_key() -> None:
    envelope = new_envelope()
    assert "orders" not in repr(envelope)
    assert envelope.wrap_key not in repr(envelope)


def test_run_envelope_for_another_room_refused() -> None:
    sealed = seal_run_envelope(RUNNER.public_keys(), new_envelope("room_a"))
    with pytest.raises(EnvelopeError, match="does not open"):
        open_run_envelope(RUNNER, sealed, room_id="room_b", now=NOW, replay_guard=fresh_guard())


def test_run_envelope_whose_content_names_another_room_refused() -> None:
    # A client seals room_a's envelope under room_b's info: it opens for room_b but must be refused.
    content = new_envelope("room_a").model_dump_json().encode()
    sealed = seal_to(RUNNER.public_keys(), content, info=b"hivemind-run-v1|room_b")
    with pytest.raises(EnvelopeError, match="names room room_a, but it was sent to room room_b"):
        open_run_envelope(RUNNER, sealed, room_id="room_b", now=NOW, replay_guard=fresh_guard())


def test_run_envelope_sealed_to_another_runner_refused() -> None:
    sealed = seal_run_envelope(OTHER_RUNNER.public_keys(), new_envelope())
    with pytest.raises(EnvelopeError, match="does not open"):
        open_run_envelope(RUNNER, sealed, room_id=ROOM, now=NOW, replay_guard=fresh_guard())


def test_tampered_run_envelope_refused() -> None:
    sealed = seal_run_envelope(RUNNER.public_keys(), new_envelope())
    tampered = sealed.model_copy(update={"ct": flip(sealed.ct, 40)})
    with pytest.raises(EnvelopeError, match="does not open"):
        open_run_envelope(RUNNER, tampered, room_id=ROOM, now=NOW, replay_guard=fresh_guard())


def test_run_envelope_replay_refused() -> None:
    guard = MemoryReplayGuard(clock=lambda: NOW)
    sealed = seal_run_envelope(RUNNER.public_keys(), new_envelope())
    open_run_envelope(RUNNER, sealed, room_id=ROOM, now=NOW, replay_guard=guard)
    with pytest.raises(ReplayError, match="already opened"):
        open_run_envelope(RUNNER, sealed, room_id=ROOM, now=NOW + 5, replay_guard=guard)


def test_expired_run_envelope_refused_before_the_guard_sees_it() -> None:
    guard = MemoryReplayGuard(clock=lambda: NOW)
    sealed = seal_run_envelope(RUNNER.public_keys(), new_envelope(ttl_s=60))
    with pytest.raises(ExpiredError, match="expired"):
        open_run_envelope(RUNNER, sealed, room_id=ROOM, now=NOW + 60, replay_guard=guard)
    # Not recorded: it still opens for a runner whose clock is within the lifetime.
    open_run_envelope(RUNNER, sealed, room_id=ROOM, now=NOW + 59, replay_guard=guard)


def test_run_envelope_expiring_too_far_ahead_refused() -> None:
    envelope = new_envelope(ttl_s=MAX_RUN_ENVELOPE_TTL_S).model_copy(
        update={"expires_at": NOW + MAX_RUN_ENVELOPE_TTL_S + 1}
    )
    sealed = seal_run_envelope(RUNNER.public_keys(), envelope)
    with pytest.raises(EnvelopeError, match="expires more than"):
        open_run_envelope(RUNNER, sealed, room_id=ROOM, now=NOW, replay_guard=fresh_guard())
    with pytest.raises(InvalidInput, match="lifetime"):
        new_envelope(ttl_s=MAX_RUN_ENVELOPE_TTL_S + 1)


def test_malformed_run_envelope_content_refused() -> None:
    sealed = seal_to(RUNNER.public_keys(), b'{"room_id": "room_abc123"}', info=b"hivemind-run-v1|room_abc123")
    with pytest.raises(EnvelopeError, match="malformed"):
        open_run_envelope(RUNNER, sealed, room_id=ROOM, now=NOW, replay_guard=fresh_guard())


def test_run_envelope_fields_are_validated() -> None:
    with pytest.raises(ValidationError, match="X25519 public key must be 32 bytes"):
        RunEnvelope.model_validate({**new_envelope().model_dump(), "reply_pub": b64encode(b"\x01" * 31)})
    with pytest.raises(ValidationError, match="nonce must be 16 to 64 bytes"):
        RunEnvelope.model_validate({**new_envelope().model_dump(), "nonce": b64encode(b"\x01" * 8)})
    with pytest.raises(ValidationError, match="bearer_id"):
        RunEnvelope.model_validate({**new_envelope().model_dump(), "bearer_id": "a|b"})


# --- replay guard --------------------------------------------------------------------------------


def test_memory_guard_forgets_only_expired_nonces() -> None:
    clock = [NOW]
    guard = MemoryReplayGuard(clock=lambda: clock[0])
    guard.check_and_record("n1", NOW + 10)
    guard.check_and_record("n2", NOW + 100)
    clock[0] = NOW + 50
    guard.check_and_record("n1", NOW + 60)  # n1 expired, so its slot is free again
    with pytest.raises(ReplayError):
        guard.check_and_record("n2", NOW + 100)
    with pytest.raises(ExpiredError):
        guard.check_and_record("n3", NOW + 50)


def test_memory_guard_full_of_live_nonces_refuses_instead_of_forgetting() -> None:
    clock = [NOW]
    guard = MemoryReplayGuard(max_entries=2, clock=lambda: clock[0])
    guard.check_and_record("a", NOW + 10)
    guard.check_and_record("b", NOW + 10)
    with pytest.raises(ServiceUnavailable, match="full"):
        guard.check_and_record("c", NOW + 10)
    with pytest.raises(ReplayError):
        guard.check_and_record("a", NOW + 10)
    clock[0] = NOW + 10
    guard.check_and_record("c", NOW + 20)


# --- output keys ---------------------------------------------------------------------------------

QUERIER = X25519PrivateKey.generate()
OWNER = X25519PrivateKey.generate()
OUTPUT_KEY = hashlib.sha256(b"output key").digest()


@pytest.mark.parametrize(
    ("key", "recipient"), [(QUERIER, OutputRecipient.QUERIER), (OWNER, OutputRecipient.OWNER)]
)
def test_output_key_round_trip(key: X25519PrivateKey, recipient: OutputRecipient) -> None:
    sealed = seal_output_key(OUTPUT_KEY, public_bytes(key), run_id="run_1", recipient=recipient)
    assert sealed.suite is HpkeSuite.X25519
    assert open_output_key(key, sealed, run_id="run_1", recipient=recipient) == OUTPUT_KEY


def test_output_key_for_another_run_refused() -> None:
    sealed = seal_output_key(
        OUTPUT_KEY, public_bytes(QUERIER), run_id="run_1", recipient=OutputRecipient.QUERIER
    )
    with pytest.raises(EnvelopeError, match="does not open"):
        open_output_key(QUERIER, sealed, run_id="run_2", recipient=OutputRecipient.QUERIER)


def test_output_key_for_another_role_refused() -> None:
    # The owner holds both keys of a self-run: the role still has to match.
    sealed = seal_output_key(
        OUTPUT_KEY, public_bytes(OWNER), run_id="run_1", recipient=OutputRecipient.QUERIER
    )
    with pytest.raises(EnvelopeError, match="does not open"):
        open_output_key(OWNER, sealed, run_id="run_1", recipient=OutputRecipient.OWNER)


def test_output_key_wrong_private_key_or_flipped_byte_refused() -> None:
    sealed = seal_output_key(
        OUTPUT_KEY, public_bytes(QUERIER), run_id="run_1", recipient=OutputRecipient.QUERIER
    )
    with pytest.raises(EnvelopeError, match="does not open"):
        open_output_key(OWNER, sealed, run_id="run_1", recipient=OutputRecipient.QUERIER)
    for part in ("enc", "ct"):
        tampered = sealed.model_copy(update={part: flip(getattr(sealed, part), 3)})
        with pytest.raises(EnvelopeError, match="does not open"):
            open_output_key(QUERIER, tampered, run_id="run_1", recipient=OutputRecipient.QUERIER)


def test_output_key_sealing_refuses_misuse() -> None:
    hybrid = seal_to(RUNNER.public_keys(), OUTPUT_KEY, info=b"hivemind-output-v1|run_1|querier")
    with pytest.raises(EnvelopeError, match="suite x25519"):
        open_output_key(QUERIER, hybrid, run_id="run_1", recipient=OutputRecipient.QUERIER)
    with pytest.raises(InvalidInput, match="32 bytes"):
        seal_output_key(b"short", public_bytes(QUERIER), run_id="run_1", recipient=OutputRecipient.QUERIER)
    with pytest.raises(InvalidInput, match="'\\|'"):
        seal_output_key(
            OUTPUT_KEY, public_bytes(QUERIER), run_id="run_1|owner", recipient=OutputRecipient.QUERIER
        )


# --- agent keys sealed to the runner -------------------------------------------------------------

# Printable and 32 bytes long: valid as either kind of secret, so only the context can refuse a replay.
AGENT_KEY = b"A" * 32
PROVIDER_KEY = "sk-" + "k" * 29


@BOTH_SUITES
def test_agent_key_round_trip(suite: HpkeSuite) -> None:
    sealed = seal_agent_key(RUNNER.public_keys(), AGENT_KEY, agent_id="agent_a", suite=suite)
    parsed = SealedEnvelope.from_json(sealed.to_json())
    assert open_agent_key(RUNNER, parsed, agent_id="agent_a") == AGENT_KEY
    # The info string is the documented one (docs/formats.md, "Secrets sealed to the runner").
    assert open_sealed(RUNNER, sealed, info=b"hivemind-agent-v1|agent_a") == AGENT_KEY


def test_agent_key_for_another_agent_refused() -> None:
    sealed = seal_agent_key(RUNNER.public_keys(), AGENT_KEY, agent_id="agent_a")
    with pytest.raises(EnvelopeError, match="does not open"):
        open_agent_key(RUNNER, sealed, agent_id="agent_b")


def test_agent_key_wrong_runner_or_flipped_byte_refused() -> None:
    sealed = seal_agent_key(RUNNER.public_keys(), AGENT_KEY, agent_id="agent_a")
    with pytest.raises(EnvelopeError, match="does not open"):
        open_agent_key(OTHER_RUNNER, sealed, agent_id="agent_a")
    for part in ("enc", "ct"):
        tampered = sealed.model_copy(update={part: flip(getattr(sealed, part), -1)})
        with pytest.raises(EnvelopeError):
            open_agent_key(RUNNER, tampered, agent_id="agent_a")


def test_agent_key_of_the_wrong_length_refused_both_ways() -> None:
    with pytest.raises(InvalidInput, match="32 bytes"):
        seal_agent_key(RUNNER.public_keys(), AGENT_KEY[:31], agent_id="agent_a")
    short = seal_to(RUNNER.public_keys(), AGENT_KEY[:31], info=agent_key_info("agent_a"))
    with pytest.raises(EnvelopeError, match="wrong length"):
        open_agent_key(RUNNER, short, agent_id="agent_a")


@pytest.mark.parametrize("agent_id", ["", "agent_a|x"])
def test_agent_key_info_refuses_an_ambiguous_agent_id(agent_id: str) -> None:
    with pytest.raises(InvalidInput, match="agent id"):
        agent_key_info(agent_id)


# --- provider keys sealed to the runner ----------------------------------------------------------


@BOTH_SUITES
def test_provider_key_round_trip(suite: HpkeSuite) -> None:
    sealed = seal_provider_key(
        RUNNER.public_keys(), tenant_id="tn_payer1", provider="openrouter", api_key=PROVIDER_KEY, suite=suite
    )
    parsed = SealedEnvelope.from_json(sealed.to_json())
    assert parsed == sealed
    assert open_provider_key(RUNNER, parsed, tenant_id="tn_payer1", provider="openrouter") == PROVIDER_KEY
    assert PROVIDER_KEY.encode() not in sealed.to_json().encode()
    info = b"hivemind-provider-key-v1|tn_payer1|openrouter"
    assert open_sealed(RUNNER, sealed, info=info) == PROVIDER_KEY.encode()


@pytest.mark.parametrize(
    ("tenant_id", "provider"),
    [("tn_other1", "openrouter"), ("tn_payer1", "tinfoil")],
    ids=["tenant", "provider"],
)
def test_provider_key_for_another_tenant_or_provider_refused(tenant_id: str, provider: str) -> None:
    # Tenant A's sealed key replayed on tenant B's record, or under another provider, does not open.
    sealed = seal_provider_key(
        RUNNER.public_keys(), tenant_id="tn_payer1", provider="openrouter", api_key=PROVIDER_KEY
    )
    with pytest.raises(EnvelopeError, match="does not open"):
        open_provider_key(RUNNER, sealed, tenant_id=tenant_id, provider=provider)


def test_provider_key_wrong_runner_or_flipped_byte_refused() -> None:
    sealed = seal_provider_key(
        RUNNER.public_keys(), tenant_id="tn_payer1", provider="openrouter", api_key=PROVIDER_KEY
    )
    with pytest.raises(EnvelopeError, match="does not open"):
        open_provider_key(OTHER_RUNNER, sealed, tenant_id="tn_payer1", provider="openrouter")
    for part in ("enc", "ct"):
        tampered = sealed.model_copy(update={part: flip(getattr(sealed, part), -1)})
        with pytest.raises(EnvelopeError):
            open_provider_key(RUNNER, tampered, tenant_id="tn_payer1", provider="openrouter")


@pytest.mark.parametrize(
    "api_key",
    ["", "two words", "tab\tkey", "new\nline", "ключ", "k" * 4097],
    ids=["empty", "space", "tab", "newline", "non-ascii", "too-long"],
)
def test_provider_key_that_is_not_a_printable_token_refused_both_ways(api_key: str) -> None:
    with pytest.raises(InvalidInput, match="an API key is"):
        seal_provider_key(RUNNER.public_keys(), tenant_id="tn_payer1", provider="local", api_key=api_key)
    # Sealed by something other than seal_provider_key: the runner still refuses to use it.
    forged = seal_to(RUNNER.public_keys(), api_key.encode(), info=provider_key_info("tn_payer1", "local"))
    with pytest.raises(EnvelopeError, match="not a printable token"):
        open_provider_key(RUNNER, forged, tenant_id="tn_payer1", provider="local")


def test_provider_key_of_the_longest_length_accepted() -> None:
    api_key = "k" * 4096
    sealed = seal_provider_key(RUNNER.public_keys(), tenant_id="tn_payer1", provider="local", api_key=api_key)
    assert open_provider_key(RUNNER, sealed, tenant_id="tn_payer1", provider="local") == api_key


def test_provider_key_that_is_not_text_refused() -> None:
    forged = seal_to(RUNNER.public_keys(), b"sk-\xff", info=provider_key_info("tn_payer1", "local"))
    with pytest.raises(EnvelopeError, match="not a printable token"):
        open_provider_key(RUNNER, forged, tenant_id="tn_payer1", provider="local")


@pytest.mark.parametrize(("tenant_id", "provider"), [("", "local"), ("tn_payer1", ""), ("tn|x", "local")])
def test_provider_key_info_refuses_an_ambiguous_context(tenant_id: str, provider: str) -> None:
    with pytest.raises(InvalidInput, match="bound to a non-empty tenant id"):
        seal_provider_key(RUNNER.public_keys(), tenant_id=tenant_id, provider=provider, api_key="k")


# --- one kind of secret is not another -----------------------------------------------------------


def test_agent_key_replayed_as_a_provider_key_refused() -> None:
    sealed = seal_agent_key(RUNNER.public_keys(), AGENT_KEY, agent_id="agent_a")
    with pytest.raises(EnvelopeError, match="does not open"):
        open_provider_key(RUNNER, sealed, tenant_id="agent_a", provider="local")


def test_provider_key_replayed_as_an_agent_key_refused() -> None:
    assert len(PROVIDER_KEY.encode()) == 32  # the right length for an agent key: only the context differs
    sealed = seal_provider_key(
        RUNNER.public_keys(), tenant_id="tn_payer1", provider="local", api_key=PROVIDER_KEY
    )
    with pytest.raises(EnvelopeError, match="does not open"):
        open_agent_key(RUNNER, sealed, agent_id="tn_payer1")


def test_run_envelope_replayed_as_a_runner_secret_refused() -> None:
    sealed = seal_run_envelope(RUNNER.public_keys(), new_envelope())
    with pytest.raises(EnvelopeError, match="does not open"):
        open_agent_key(RUNNER, sealed, agent_id="agent_a")
    with pytest.raises(EnvelopeError, match="does not open"):
        open_provider_key(RUNNER, sealed, tenant_id="tn_payer1", provider="local")
