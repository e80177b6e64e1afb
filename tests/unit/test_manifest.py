"""Room manifests (signing, verification steps, revisions, no floats) and hmroom:// invite links."""

import hashlib
import json
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import ValidationError

from hivemind.canonical import canonical_json
from hivemind.encoding import b64decode, b64encode
from hivemind.errors import (
    FloatInSignedDocument,
    InvalidInput,
    InvalidLink,
    KeyRotationError,
    ManifestError,
    RevisionRollback,
    SignatureError,
)
from hivemind.keys import owner_box_key, owner_sign_key, public_bytes
from hivemind.manifest import (
    KEY_ROTATION_CONTEXT,
    ROOM_SIGNING_CONTEXT,
    AgentRef,
    EgressRule,
    InviteLink,
    KeyRotation,
    OutputRule,
    QueryRule,
    RoomManifest,
    SignedKeyRotation,
    SignedManifest,
    encode_link,
    follow_key_rotations,
    manifest_hash,
    next_revision,
    parse_link,
    rotated_revision,
    rules_digest,
    sign_key_rotation,
    sign_manifest,
    verify_key_rotation,
    verify_manifest,
)
from hivemind.models import DEFAULT_BUDGET_LIMITS, OutputVisibility, QueryMode, Visibility
from hivemind.policy import parse_policy
from hivemind.tokens import Secret, TokenKind
from hivemind.trust import RunnerTrust, RunnerTrustMode

OWNER = Secret(TokenKind.TENANT, bytes(range(32)))
OWNER_KEY = owner_sign_key(OWNER)
OWNER_PUB = b64encode(public_bytes(OWNER_KEY))
ATTACKER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x66" * 32)
ATTACKER_PUB = b64encode(public_bytes(ATTACKER_KEY))
RULES = "Only aggregate counts by country; groups of at least 10."
COMPOSE = "c0" * 32


def make_manifest(**overrides: Any) -> RoomManifest:
    fields: dict[str, Any] = {
        "room_id": "room_abc123",
        "tenant_id": "tn_owner1",
        "name": "Orders 2025",
        "rules": RULES,
        "rules_sha256": rules_digest(RULES),
        "policy": "aggregate only",
        "scope": AgentRef(agent_id="ag_scope1", digest="11" * 32, visibility=Visibility.INSPECTABLE),
        "query": QueryRule(
            mode=QueryMode.FIXED, agent_id="ag_query1", digest="22" * 32, visibility=Visibility.INSPECTABLE
        ),
        "mediator": AgentRef(agent_id="ag_med1", digest="33" * 32, visibility=Visibility.SEALED),
        "output": OutputRule(visibility=OutputVisibility.QUERIER_ONLY),
        "egress": EgressRule(llm_providers=["openai"], artifacts=False),
        "budgets": DEFAULT_BUDGET_LIMITS,
        "runner_trust": RunnerTrust(mode=RunnerTrustMode.PINNED, allowed_compose_hashes=[COMPOSE]),
        "data_policy": parse_policy(
            {"tables": {"orders": {"columns": ["country"], "where": "country <> 'X'"}}}
        ),
        "owner_sign_pub": OWNER_PUB,
        "owner_box_pub": b64encode(public_bytes(owner_box_key(OWNER))),
        "created_at": 1_750_000_000,
        "revision": 1,
    }
    fields.update(overrides)
    return RoomManifest(**fields)


def verify(signed: SignedManifest, **overrides: Any) -> RoomManifest:
    expectations: dict[str, Any] = {
        "expected_owner_sign_pub": OWNER_PUB,
        "expected_room_id": "room_abc123",
        "min_revision": 1,
    }
    expectations.update(overrides)
    return verify_manifest(signed, **expectations)


def flip(text: str, index: int = 0) -> str:
    raw = bytearray(b64decode(text))
    raw[index] ^= 0x01
    return b64encode(bytes(raw))


# --- signing and hashing -------------------------------------------------------------------------


def test_sign_and_verify_round_trip_through_json() -> None:
    signed = sign_manifest(make_manifest(), OWNER_KEY)
    parsed = SignedManifest.from_json(signed.to_json())
    assert verify(parsed) == make_manifest()
    assert parsed.manifest_hash == manifest_hash(make_manifest())


def test_signature_and_hash_are_over_the_documented_bytes() -> None:
    manifest = make_manifest()
    signed = sign_manifest(manifest, OWNER_KEY)
    document = json.loads(signed.to_json())["manifest"]
    jcs = rfc8785.dumps(document)  # an independent canonicalization of the JSON as it travels
    assert signed.manifest_hash == hashlib.sha256(jcs).hexdigest()
    OWNER_KEY.public_key().verify(b64decode(signed.signature), b"hivemind-room-v1\n" + jcs)
    # Optional fields are signed as null, not left out.
    assert "data_policy" in document and document["mediator"] is not None


def test_manifest_without_optional_parts_round_trips() -> None:
    manifest = make_manifest(mediator=None, data_policy=None)
    signed = SignedManifest.from_json(sign_manifest(manifest, OWNER_KEY).to_json())
    assert verify(signed) == manifest
    assert json.loads(signed.to_json())["manifest"]["data_policy"] is None


def test_flipped_signature_byte_refused() -> None:
    signed = sign_manifest(make_manifest(), OWNER_KEY)
    for index in (0, 63):
        with pytest.raises(SignatureError, match="does not verify"):
            verify(signed.model_copy(update={"signature": flip(signed.signature, index)}))


def test_changed_manifest_with_stale_hash_refused() -> None:
    signed = sign_manifest(make_manifest(), OWNER_KEY)
    changed = signed.model_copy(update={"manifest": make_manifest(policy="anything goes")})
    with pytest.raises(ManifestError, match="manifest hash mismatch"):
        verify(changed)


def test_changed_manifest_with_recomputed_hash_refused() -> None:
    signed = sign_manifest(make_manifest(), OWNER_KEY)
    widened = make_manifest(egress=EgressRule(llm_providers=["openai", "evil-llm"], artifacts=True))
    forged = signed.model_copy(update={"manifest": widened, "manifest_hash": manifest_hash(widened)})
    with pytest.raises(SignatureError, match="does not verify"):
        verify(forged)


def test_signature_from_another_context_refused() -> None:
    manifest = make_manifest()
    for context in (b"", b"hivemind-receipt-v1\n"):
        signature = b64encode(OWNER_KEY.sign(context + canonical_json(manifest)))
        signed = SignedManifest(manifest=manifest, signature=signature, manifest_hash=manifest_hash(manifest))
        with pytest.raises(SignatureError):
            verify(signed)


def test_key_substitution_refused() -> None:
    # The control plane swaps in a manifest it signed itself: valid signature, wrong key.
    substituted = sign_manifest(make_manifest(owner_sign_pub=ATTACKER_PUB), ATTACKER_KEY)
    assert verify(substituted, expected_owner_sign_pub=None).owner_sign_pub == ATTACKER_PUB
    with pytest.raises(SignatureError, match="refusing a substituted manifest"):
        verify(substituted)


def test_manifest_of_another_room_refused() -> None:
    signed = sign_manifest(make_manifest(room_id="room_other"), OWNER_KEY)
    with pytest.raises(ManifestError, match="for room room_other, not room_abc123"):
        verify(signed)


def test_revision_rollback_refused() -> None:
    first = make_manifest()
    second = next_revision(first, {"runner_trust": first.runner_trust})
    assert verify(sign_manifest(second, OWNER_KEY), min_revision=2).revision == 2
    with pytest.raises(RevisionRollback, match="revision 1, lower than the accepted revision 2"):
        verify(sign_manifest(first, OWNER_KEY), min_revision=2)


def test_signing_with_a_key_other_than_owner_sign_pub_refused() -> None:
    with pytest.raises(InvalidInput, match="owner_sign_pub"):
        sign_manifest(make_manifest(), ATTACKER_KEY)


# --- the manifest's own rules --------------------------------------------------------------------


def _signed_json_with(path: list[str], value: Any) -> str:
    document = json.loads(sign_manifest(make_manifest(), OWNER_KEY).to_json())
    target = document["manifest"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(document)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["revision"], 1.0),
        (["created_at"], 1_750_000_000.0),
        (["budgets", "maxima", "timeout_s"], 600.0),
        (["data_policy", "max_rows"], 100.0),
    ],
)
def test_float_anywhere_refused(path: list[str], value: float) -> None:
    with pytest.raises(FloatInSignedDocument, match="float at"):
        SignedManifest.from_json(_signed_json_with(path, value))


def test_canonical_json_refuses_floats_in_a_manifest_dump() -> None:
    document = make_manifest().model_dump(mode="json")
    document["budgets"]["defaults"]["memory_mb"] = 256.5
    with pytest.raises(FloatInSignedDocument):
        canonical_json(document)


def test_rules_hash_mismatch_refused() -> None:
    with pytest.raises(ValidationError, match="rules_sha256 is not the SHA-256 of the rules text"):
        make_manifest(rules=RULES + " Except for friends.")
    with pytest.raises(ManifestError, match="not a valid signed manifest"):
        SignedManifest.from_json(_signed_json_with(["rules"], "no rules"))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["version"], 2),
        (["surprise"], True),
        (["query", "mode"], "anything"),
        (["egress", "artifacts"], "yes"),
        (["owner_box_pub"], b64encode(b"\x01" * 31)),
        (["revision"], 0),
    ],
)
def test_malformed_signed_manifest_refused(path: list[str], value: Any) -> None:
    with pytest.raises(ManifestError, match="not a valid signed manifest"):
        SignedManifest.from_json(_signed_json_with(path, value))


def test_query_rule_matches_its_mode() -> None:
    with pytest.raises(ValidationError, match="fixed needs both agent_id and digest"):
        QueryRule(mode=QueryMode.FIXED, agent_id="ag_q1", visibility=Visibility.INSPECTABLE)
    with pytest.raises(ValidationError, match="uploadable names no agent_id"):
        QueryRule(mode=QueryMode.UPLOADABLE, digest="22" * 32, visibility=Visibility.INSPECTABLE)
    QueryRule(mode=QueryMode.UPLOADABLE, visibility=Visibility.INSPECTABLE)


def test_duplicate_llm_provider_refused() -> None:
    with pytest.raises(ValidationError, match="twice"):
        EgressRule(llm_providers=["openai", "openai"], artifacts=False)


# --- revisions -----------------------------------------------------------------------------------


def test_next_revision_increments_and_rehashes_rules() -> None:
    first = make_manifest()
    new_trust = RunnerTrust(mode=RunnerTrustMode.OWNER_APPROVED, allowed_compose_hashes=[COMPOSE, "d0" * 32])
    second = next_revision(first, {"runner_trust": new_trust, "rules": "Counts only."})
    assert second.revision == 2
    assert second.rules_sha256 == hashlib.sha256(b"Counts only.").hexdigest()
    assert second.runner_trust == new_trust
    assert (second.room_id, second.tenant_id, second.created_at) == (
        first.room_id,
        first.tenant_id,
        first.created_at,
    )


@pytest.mark.parametrize("field", ["room_id", "tenant_id", "owner_sign_pub", "revision", "created_at"])
def test_next_revision_keeps_identity(field: str) -> None:
    with pytest.raises(ManifestError, match=f"cannot set {field}"):
        next_revision(make_manifest(), {field: getattr(make_manifest(), field)})


# --- invite links --------------------------------------------------------------------------------

INVITE = Secret(TokenKind.INVITE, bytes(range(32, 64)))
LINK = InviteLink(
    service="https://api.example.com/prod",
    room_id="room_abc123",
    invite=INVITE.token(),
    owner_sign_pub=OWNER_PUB,
)
GOOD_FIELDS: dict[str, Any] = LINK.model_dump()


def link_of(content: dict[str, Any] | bytes) -> str:
    raw = content if isinstance(content, bytes) else canonical_json(content)
    return "hmroom://" + b64encode(raw)


def test_link_round_trip() -> None:
    text = encode_link(LINK)
    assert text.startswith("hmroom://")
    assert parse_link(text) == LINK
    assert json.loads(b64decode(text.removeprefix("hmroom://"))) == GOOD_FIELDS
    assert parse_link(text).invite_secret() == INVITE
    assert parse_link("  HMROOM://" + text.removeprefix("hmroom://") + "\n") == LINK


def test_link_vector_from_docs() -> None:
    owner_pub = b64encode(public_bytes(owner_sign_key(OWNER)))
    link = InviteLink(
        service="https://api.example.com",
        room_id="room_abc123",
        invite=INVITE.token(),
        owner_sign_pub=owner_pub,
    )
    documented = (
        "hmroom://eyJpbnZpdGUiOiJobXFfZWFxc2VpemVldXRjb2tiamZpdnN5bGpvZjR5ZGNtcnRncTJ0bW56eWhlNWR3cGI1aHk3cSIs"
        "Im93bmVyX3NpZ25fcHViIjoiVUI0ZkdMUGpGUjZMSm9UVm9RZTJvNzNLVk1sQWhfdmdYNjh1cDNRWXRUSSIsInJvb21faWQiOiJy"
        "b29tX2FiYzEyMyIsInNlcnZpY2UiOiJodHRwczovL2FwaS5leGFtcGxlLmNvbSJ9"
    )
    assert encode_link(link) == documented
    assert parse_link(documented) == link


def test_link_repr_hides_the_invite_secret() -> None:
    assert INVITE.token() not in repr(LINK)
    assert INVITE.token() not in str(LINK)


@pytest.mark.parametrize(
    "service",
    ["https://api.example.com", "http://127.0.0.1:8080", "http://localhost:8000/", "http://[::1]:80"],
)
def test_link_services_accepted(service: str) -> None:
    assert parse_link(link_of({**GOOD_FIELDS, "service": service})).service == service


def _non_canonical_b64() -> str:
    body = encode_link(LINK).removeprefix("hmroom://")
    # The last character carries unused low bits; setting one keeps the bytes but changes the text.
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = last.index(body[-1])
    return "hmroom://" + body[:-1] + last[index ^ 1]


MALFORMED_LINKS = [
    ("", "the invite link is empty"),
    ("   ", "the invite link is empty"),
    ("https://example.com/room", "starts with hmroom://; this one starts with https://"),
    ("hmroom:/abc", "this one starts with something else"),
    ("hmroom://", "nothing after hmroom://"),
    ("hmroom://" + "A" * 5000, "longer than 4096"),
    ("hmroom://abc+def/", "is not base64url"),
    (encode_link(LINK) + "==", "is not base64url"),
    ("hmroom://abcde", "impossible base64url length"),
    (_non_canonical_b64(), "not canonical base64url"),
    (link_of(b"\xff\xfe\xfd"), "does not decode to JSON"),
    (link_of(b"not json"), "does not decode to JSON"),
    (link_of(b"[1,2]"), "not to an object"),
    (link_of({k: v for k, v in GOOD_FIELDS.items() if k != "invite"}), "lacks invite"),
    (link_of({}), "lacks invite, owner_sign_pub, room_id, service"),
    (link_of({**GOOD_FIELDS, "uses": 3}), "unknown fields uses"),
    (link_of(json.dumps(GOOD_FIELDS, indent=1).encode()), "not in canonical form"),
    (link_of(json.dumps({**GOOD_FIELDS, "room_id": 1.5}).encode()), "not in canonical form"),
    (link_of({**GOOD_FIELDS, "service": 5}), "service must be a URL string"),
    (link_of({**GOOD_FIELDS, "service": "ftp://example.com"}), "must be an https URL, not ftp"),
    (link_of({**GOOD_FIELDS, "service": "example.com"}), "must be an https URL, not schemeless"),
    (link_of({**GOOD_FIELDS, "service": "http://api.example.com"}), "plain http is allowed only on loopback"),
    (link_of({**GOOD_FIELDS, "service": "https://"}), "has no host"),
    (link_of({**GOOD_FIELDS, "service": "https://u:p@api.example.com"}), "must not carry credentials"),
    (link_of({**GOOD_FIELDS, "service": "https://api.example.com/?a=1"}), "must not have a query"),
    (link_of({**GOOD_FIELDS, "service": "https://api.example.com:99999"}), "not a valid URL"),
    (link_of({**GOOD_FIELDS, "service": "https://api.example.com/a b"}), "without spaces"),
    (link_of({**GOOD_FIELDS, "room_id": "ROOM_ABC"}), "room_id must look like room_"),
    (link_of({**GOOD_FIELDS, "room_id": "tn_abc"}), "room_id must look like room_"),
    (
        link_of({**GOOD_FIELDS, "invite": Secret(TokenKind.TENANT, bytes(32)).token()}),
        "expected a hmq_ token",
    ),
    (link_of({**GOOD_FIELDS, "invite": "hmq_notbase32!"}), "not a valid hmq_ token"),
    (link_of({**GOOD_FIELDS, "invite": INVITE.token()[:-4]}), "not a valid hmq_ token"),
    (link_of({**GOOD_FIELDS, "invite": None}), "invite must be an hmq_ token string"),
    (link_of({**GOOD_FIELDS, "owner_sign_pub": b64encode(b"\x01" * 31)}), "must be 32 bytes, got 31"),
    (link_of({**GOOD_FIELDS, "owner_sign_pub": OWNER_PUB + "="}), "not unpadded base64url"),
    (link_of({**GOOD_FIELDS, "owner_sign_pub": 7}), "owner_sign_pub must be a base64url string"),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED_LINKS)
def test_malformed_link_refused_with_its_reason(text: str, message: str) -> None:
    with pytest.raises(InvalidLink, match=message.replace("+", r"\+").replace("?", r"\?")) as caught:
        parse_link(text)
    # The secret never appears in an error, whatever went wrong.
    assert INVITE.token().removeprefix("hmq_") not in str(caught.value)


def test_link_owner_key_pins_the_manifest() -> None:
    link = parse_link(encode_link(LINK))
    substituted = sign_manifest(make_manifest(owner_sign_pub=ATTACKER_PUB), ATTACKER_KEY)
    with pytest.raises(SignatureError):
        verify_manifest(
            substituted,
            expected_owner_sign_pub=link.owner_sign_pub,
            expected_room_id=link.room_id,
            min_revision=None,
        )


def test_box_key_is_x25519_sized() -> None:
    with pytest.raises(ValidationError, match="X25519 public key must be 32 bytes"):
        make_manifest(owner_box_pub=b64encode(public_bytes(X25519PrivateKey.generate()) + b"\x00"))


# --- owner key rotation ----------------------------------------------------------------------------

NEW_OWNER = Secret(TokenKind.TENANT, bytes(range(100, 132)))
NEWER_OWNER = Secret(TokenKind.TENANT, bytes(range(200, 232)))


def _pubs(secret: Secret) -> tuple[str, str]:
    return (
        b64encode(public_bytes(owner_sign_key(secret))),
        b64encode(public_bytes(owner_box_key(secret))),
    )


def rotation_cert(old: Secret, new: Secret, *, tenant_id: str = "tn_owner1", at: int = 1_760_000_000):
    new_sign, new_box = _pubs(new)
    rotation = KeyRotation(
        tenant_id=tenant_id,
        old_sign_pub=_pubs(old)[0],
        new_sign_pub=new_sign,
        new_box_pub=new_box,
        rotated_at=at,
    )
    return sign_key_rotation(rotation, owner_sign_key(old))


def test_rotation_signature_is_over_the_documented_bytes() -> None:
    signed = rotation_cert(OWNER, NEW_OWNER)
    expected = KEY_ROTATION_CONTEXT + rfc8785.dumps(signed.rotation.model_dump(mode="json"))
    owner_sign_key(OWNER).public_key().verify(b64decode(signed.signature), expected)
    assert KEY_ROTATION_CONTEXT == b"hivemind-key-rotation-v1\n"
    assert SignedKeyRotation.from_json(signed.to_json()) == signed
    assert verify_key_rotation(signed) == signed.rotation


def test_rotated_manifest_verifies_against_the_old_pinned_key_through_the_chain() -> None:
    first = make_manifest()
    cert = rotation_cert(OWNER, NEW_OWNER)
    second = rotated_revision(first, cert.rotation)
    assert (second.revision, second.owner_sign_pub, second.owner_box_pub) == (2, *_pubs(NEW_OWNER))
    assert second.model_dump(exclude={"revision", "owner_sign_pub", "owner_box_pub"}) == first.model_dump(
        exclude={"revision", "owner_sign_pub", "owner_box_pub"}
    )
    signed = sign_manifest(second, owner_sign_key(NEW_OWNER))
    # A link pinning the old key: refused without the chain, accepted with it.
    with pytest.raises(SignatureError, match="substituted manifest"):
        verify(signed)
    assert verify(signed, rotations=[cert], min_revision=1).revision == 2
    # A reader that pins the new key needs no chain.
    assert verify(signed, expected_owner_sign_pub=_pubs(NEW_OWNER)[0]).revision == 2


def test_two_rotations_chain_and_unrelated_certificates_are_harmless() -> None:
    first_cert = rotation_cert(OWNER, NEW_OWNER, at=1)
    second_cert = rotation_cert(NEW_OWNER, NEWER_OWNER, at=2)
    manifest = rotated_revision(rotated_revision(make_manifest(), first_cert.rotation), second_cert.rotation)
    signed = sign_manifest(manifest, owner_sign_key(NEWER_OWNER))
    assert verify(signed, rotations=[second_cert, first_cert]).revision == 3
    # A reader that already pins the middle key follows only the second step.
    path = follow_key_rotations(
        [first_cert, second_cert],
        tenant_id="tn_owner1",
        from_sign_pub=_pubs(NEW_OWNER)[0],
        to_sign_pub=_pubs(NEWER_OWNER)[0],
    )
    assert path == [second_cert.rotation]
    with pytest.raises(KeyRotationError, match="leads from"):
        verify(signed, rotations=[second_cert])  # the first hop is missing


def test_attacker_cannot_rotate_the_owner_key_to_its_own() -> None:
    attacker_rotation = KeyRotation(
        tenant_id="tn_owner1",
        old_sign_pub=OWNER_PUB,
        new_sign_pub=ATTACKER_PUB,
        new_box_pub=_pubs(NEW_OWNER)[1],
        rotated_at=1,
    )
    with pytest.raises(InvalidInput, match="old key it names"):
        sign_key_rotation(attacker_rotation, ATTACKER_KEY)
    forged = SignedKeyRotation(
        rotation=attacker_rotation, signature=b64encode(ATTACKER_KEY.sign(attacker_rotation.signing_bytes()))
    )
    substituted = sign_manifest(make_manifest(owner_sign_pub=ATTACKER_PUB), ATTACKER_KEY)
    with pytest.raises(KeyRotationError, match="does not verify"):
        verify(substituted, rotations=[forged])


def test_flipped_byte_in_a_rotation_refused() -> None:
    cert = rotation_cert(OWNER, NEW_OWNER)
    tampered = cert.model_copy(update={"signature": flip(cert.signature, 3)})
    with pytest.raises(KeyRotationError, match="does not verify"):
        verify_key_rotation(tampered)
    later = cert.model_copy(update={"rotation": cert.rotation.model_copy(update={"rotated_at": 2})})
    with pytest.raises(KeyRotationError, match="does not verify"):
        verify_key_rotation(later)


def test_rotation_signature_in_another_context_refused() -> None:
    cert = rotation_cert(OWNER, NEW_OWNER)
    # The old key's signature over the same JCS bytes in the room-manifest context does not count.
    wrong_context = ROOM_SIGNING_CONTEXT + canonical_json(cert.rotation)
    swapped = cert.model_copy(update={"signature": b64encode(OWNER_KEY.sign(wrong_context))})
    with pytest.raises(KeyRotationError):
        verify_key_rotation(swapped)


def test_rotation_of_another_tenant_refused() -> None:
    cert = rotation_cert(OWNER, NEW_OWNER, tenant_id="tn_someoneelse")
    signed = sign_manifest(rotated_revision_unchecked(NEW_OWNER), owner_sign_key(NEW_OWNER))
    with pytest.raises(KeyRotationError, match="for tenant tn_someoneelse, not tn_owner1"):
        verify(signed, rotations=[cert])
    with pytest.raises(ManifestError, match="for tenant tn_someoneelse"):
        rotated_revision(make_manifest(), cert.rotation)


def rotated_revision_unchecked(new: Secret) -> RoomManifest:
    new_sign, new_box = _pubs(new)
    return make_manifest(owner_sign_pub=new_sign, owner_box_pub=new_box, revision=2)


def test_forked_and_cyclic_histories_refused() -> None:
    to_new = rotation_cert(OWNER, NEW_OWNER)
    fork = rotation_cert(OWNER, NEWER_OWNER)
    signed = sign_manifest(rotated_revision_unchecked(NEW_OWNER), owner_sign_key(NEW_OWNER))
    with pytest.raises(KeyRotationError, match="forked history"):
        verify(signed, rotations=[to_new, fork])
    back = rotation_cert(NEW_OWNER, OWNER)
    with pytest.raises(KeyRotationError, match="cycle"):
        follow_key_rotations(
            [to_new, back], tenant_id="tn_owner1", from_sign_pub=OWNER_PUB, to_sign_pub=_pubs(NEWER_OWNER)[0]
        )


def test_rotated_revision_needs_the_key_that_signed_the_room() -> None:
    cert = rotation_cert(NEW_OWNER, NEWER_OWNER)
    with pytest.raises(ManifestError, match="retires"):
        rotated_revision(make_manifest(), cert.rotation)


def test_rotation_rules() -> None:
    with pytest.raises(ValidationError, match="different from the old one"):
        KeyRotation(
            tenant_id="tn_owner1",
            old_sign_pub=OWNER_PUB,
            new_sign_pub=OWNER_PUB,
            new_box_pub=_pubs(OWNER)[1],
            rotated_at=1,
        )
    document = json.loads(rotation_cert(OWNER, NEW_OWNER).to_json())
    document["rotation"]["rotated_at"] = 1.0
    with pytest.raises(FloatInSignedDocument):
        SignedKeyRotation.from_json(json.dumps(document))
    document["rotation"]["rotated_at"] = 1
    document["rotation"]["surprise"] = True
    with pytest.raises(KeyRotationError, match="not a valid key-rotation certificate"):
        SignedKeyRotation.from_json(json.dumps(document))
