"""Tamper matrix: every kind of stored object, changed the ways someone with full access to the AWS
account could change it (flip a byte, truncate, swap between rooms / tenants / runs / objects, replay an
older version). Every case must be refused by whoever reads the object, with the documented error code,
and a refusal through the API must change nothing else in the deployment.

- manifest envelope (rooms table): every room route answers 409 manifest_invalid, signature_invalid
  or manifest_rollback; a consistent rollback of row and envelope is caught by the client;
- DEK wraps (rooms table): the bearer's client (GET /key, then unwrap) refuses with wrap_invalid;
- inspectable agent sources (bucket + agents table): the files routes answer 409 agent_source_invalid;
- HMS1 objects (items, sealed sources, outputs, artifacts): opening fails with a seal_* code, and a
  committed object is read only at its pinned version (object_checksum_mismatch otherwise);
- run envelopes and output keys: envelope_invalid, replay_detected, expired;
- receipts and artifacts: receipt_invalid naming the field;
- attestation documents (runners table, relayed by GET /v1/attestation): report_data_mismatch,
  event_log_invalid, simulated_tee_refused, compose_hash_not_trusted;
- ledger entries (ledger + accounts tables): ledger_invalid, also 409 from the admin verify route;
- audit events (audit table): audit_chain_invalid, also in GET /rooms/{id}/audit.

The runner's own refusals of tampered rooms, items, sources and envelopes during a real run are in
``test_tamper_runner.py``.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from security_support import (
    AnyCollateral,
    delete_row,
    deployment_snapshot,
    edit_row,
    flip_byte,
    flip_text,
    genuine_quote_for,
    put_row,
    read_row,
    snapshot_difference,
    tdx_document,
    truncate,
)

from hivemind import attestation as attestation_module
from hivemind.attestation import (
    AttestationDocument,
    verify_attestation,
)
from hivemind.encoding import b64encode, sha256_hex
from hivemind.envelope import (
    HpkeKeyPair,
    MemoryReplayGuard,
    OutputRecipient,
    RunEnvelope,
    SealedEnvelope,
    open_output_key,
    open_run_envelope,
    seal_output_key,
    seal_run_envelope,
)
from hivemind.errors import (
    ComposeHashNotTrusted,
    EnvelopeError,
    EventLogError,
    ExpiredError,
    HivemindError,
    IntegrityError,
    LedgerError,
    ManifestError,
    ReceiptError,
    ReplayError,
    ReportDataMismatch,
    SealError,
    SimulatedTeeRefused,
    WrapError,
)
from hivemind.keys import public_bytes, unwrap_dek, wrap_key
from hivemind.ledger import entry_hash
from hivemind.manifest import SignedManifest, verify_manifest
from hivemind.models import Budgets, ObjectKind, RunStatus, Stage, StageUsage, TeeKind
from hivemind.receipt import (
    ArtifactDigests,
    OutputDigests,
    Receipt,
    ReceiptAgent,
    ReceiptExpectations,
    SignedReceipt,
    UsageTotals,
    sign_receipt,
    verify_artifact,
    verify_receipt,
)
from hivemind.seal import SealContext, open_bytes, seal_bytes
from hivemind.store import Store
from hivemind.store.blobs import StoredObject
from hivemind.store.runners import RunnerRecord
from hivemind.store.schema import TableRole, agent_source_key
from hivemind.tokens import random_id
from hivemind.trust import RunnerTrust, RunnerTrustMode

pytestmark = pytest.mark.moto_server

# --- the room manifest envelope, through every room route ------------------------------------------


def _flip_signature(row: dict[str, Any], **_: Any) -> None:
    row["envelope"]["signature"] = flip_text(row["envelope"]["signature"], 20)


def _flip_manifest_field(row: dict[str, Any], **_: Any) -> None:
    row["envelope"]["manifest"]["name"] = row["envelope"]["manifest"]["name"] + "!"


def _flip_manifest_hash(row: dict[str, Any], **_: Any) -> None:
    flipped = flip_text(row["envelope"]["manifest_hash"], 7)
    row["envelope"]["manifest_hash"] = flipped
    row["manifest_hash"] = flipped


def _truncate_signature(row: dict[str, Any], **_: Any) -> None:
    row["envelope"]["signature"] = row["envelope"]["signature"][:40]


def _drop_signature(row: dict[str, Any], **_: Any) -> None:
    del row["envelope"]["signature"]


def _swap_other_room(row: dict[str, Any], *, other_room: dict[str, Any], **_: Any) -> None:
    # The other room's envelope is validly signed by the same owner, and the row is made to agree.
    row["envelope"] = other_room["envelope"]
    row["manifest_hash"] = other_room["manifest_hash"]
    row["revision"] = other_room["revision"]


def _swap_other_tenant(row: dict[str, Any], *, other_tenant_room: dict[str, Any], **_: Any) -> None:
    row["envelope"] = other_tenant_room["envelope"]
    row["manifest_hash"] = other_tenant_room["manifest_hash"]
    row["revision"] = other_tenant_room["revision"]


def _replay_old_revision(row: dict[str, Any], *, old_envelope: dict[str, Any], **_: Any) -> None:
    row["envelope"] = old_envelope


MANIFEST_TAMPERS: dict[str, tuple[Callable[..., None], str]] = {
    "flip-signature": (_flip_signature, "signature_invalid"),
    "flip-manifest-field": (_flip_manifest_field, "manifest_invalid"),
    "flip-manifest-hash": (_flip_manifest_hash, "manifest_invalid"),
    "truncate-signature": (_truncate_signature, "manifest_invalid"),
    "drop-signature": (_drop_signature, "manifest_invalid"),
    "swap-other-room": (_swap_other_room, "manifest_invalid"),
    "swap-other-tenant": (_swap_other_tenant, "signature_invalid"),
    "replay-old-revision": (_replay_old_revision, "manifest_rollback"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_TAMPERS))
def test_tampered_manifest_envelope_is_refused_by_every_room_route_and_nothing_changes(
    hm_lambda: Any, case: str
) -> None:
    hm = hm_lambda
    alice, mallory = hm.tenant("alice"), hm.tenant("mallory")
    room = hm.room(alice)
    first = read_row(hm.store, TableRole.ROOMS, {"room_id": room.room_id, "sk": "manifest"})["envelope"]
    hm.trust_update(room, name="Renamed room")
    other = hm.room(alice)
    foreign = hm.room(mallory)
    invite = hm.invite(room)
    rows = {
        "other_room": read_row(hm.store, TableRole.ROOMS, {"room_id": other.room_id, "sk": "manifest"}),
        "other_tenant_room": read_row(
            hm.store, TableRole.ROOMS, {"room_id": foreign.room_id, "sk": "manifest"}
        ),
        "old_envelope": first,
    }
    mutate, code = MANIFEST_TAMPERS[case]
    hm.tamper_room(room, lambda row: mutate(row, **copy.deepcopy(rows)))
    before = deployment_snapshot(hm.store)

    new_invite = hm.invite_key(room)
    attempts = [
        ("GET", f"/v1/rooms/{room.room_id}", alice.token, None),
        ("GET", f"/v1/rooms/{room.room_id}", invite.token, None),
        ("GET", f"/v1/rooms/{room.room_id}/attest", invite.token, None),
        ("GET", f"/v1/rooms/{room.room_id}/key", invite.token, None),
        ("POST", f"/v1/rooms/{room.room_id}/invites", alice.token, hm.invite_body(new_invite, room.dek)),
        ("DELETE", f"/v1/rooms/{room.room_id}", alice.token, None),
    ]
    for method, path, token, body in attempts:
        kwargs: dict[str, Any] = {"token": token}
        if body is not None:
            kwargs["json"] = body
        response = hm.api.request(method, path, **kwargs)
        assert (response.status, response.error) == (409, code), (method, path, response.body[:300])
    assert snapshot_difference(before, deployment_snapshot(hm.store)) == {}


def test_a_consistent_rollback_of_row_and_envelope_is_caught_by_the_client(hm_lambda: Any) -> None:
    """An attacker who rolls back both the envelope and the row's revision and hash passes the server's
    own consistency check; the participant's client refuses it against the revision it accepted."""
    hm = hm_lambda
    alice = hm.tenant("alice")
    room = hm.room(alice)
    first = read_row(hm.store, TableRole.ROOMS, {"room_id": room.room_id, "sk": "manifest"})
    hm.trust_update(room, name="Renamed room")
    accepted_revision = room.manifest.revision

    def roll_back(row: dict[str, Any]) -> None:
        row.update(envelope=first["envelope"], manifest_hash=first["manifest_hash"], revision=1)

    hm.tamper_room(room, roll_back)
    served = hm.api.get(f"/v1/rooms/{room.room_id}", token=alice.token)
    signed = SignedManifest.model_validate(served.ok()["signed_manifest"])
    with pytest.raises(ManifestError) as refused:
        verify_manifest(
            signed,
            expected_owner_sign_pub=alice.sign_pub,
            expected_room_id=room.room_id,
            min_revision=accepted_revision,
        )
    assert refused.value.code == "manifest_rollback"


# --- wraps: the bearer's client is the only one that can tell ---------------------------------------


def _wrap_cases() -> dict[str, Callable[[dict[str, str]], str]]:
    return {
        "flip": lambda wraps: b64encode(flip_byte(_b64(wraps["owner"]), 30)),
        "truncate": lambda wraps: wraps["owner"][:40],
        "swap-other-room": lambda wraps: wraps["owner_other_room"],
        "swap-other-bearer": lambda wraps: wraps["invite"],
        "replay-revoked-invite": lambda wraps: wraps["revoked_invite"],
    }


def _b64(text: str) -> bytes:
    from hivemind.encoding import b64decode  # noqa: PLC0415 - local helper

    return b64decode(text)


@pytest.mark.parametrize("case", sorted(_wrap_cases()))
def test_tampered_wrap_does_not_open_for_its_bearer(hm_lambda: Any, case: str) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    room, other = hm.room(alice), hm.room(alice)
    invite = hm.invite(room)
    revoked = hm.invite(room)
    revoked_wrap = hm.store.rooms.get_wrap(room.room_id, revoked.invite_id)
    assert revoked_wrap is not None
    hm.api.delete(f"/v1/rooms/{room.room_id}/invites/{revoked.invite_id}", token=alice.token).ok()
    wraps = {
        "owner": hm.store.rooms.get_wrap(room.room_id, alice.tenant_id).wrapped,
        "owner_other_room": hm.store.rooms.get_wrap(other.room_id, alice.tenant_id).wrapped,
        "invite": hm.store.rooms.get_wrap(room.room_id, invite.invite_id).wrapped,
        "revoked_invite": revoked_wrap.wrapped,
    }
    tampered = _wrap_cases()[case](wraps)
    edit_row(
        hm.store,
        TableRole.ROOMS,
        {"room_id": room.room_id, "sk": f"wrap#{alice.tenant_id}"},
        lambda row: row.update(wrapped=tampered),
    )
    served = hm.api.get(f"/v1/rooms/{room.room_id}/key", token=alice.token).ok()
    assert served["wrapped"] == tampered  # the control plane cannot tell; the client can
    with pytest.raises(WrapError) as refused:
        unwrap_dek(
            wrap_key(alice.secret, room.room_id),
            served["wrapped"],
            room_id=room.room_id,
            bearer_id=served["bearer_id"],
        )
    assert refused.value.code == "wrap_invalid"


# --- inspectable agent sources: the files route re-reads the pinned source -------------------------


@pytest.mark.parametrize("case", ["flip", "truncate", "swap-other-agent", "replay-rejected-upload"])
def test_tampered_inspectable_source_is_refused_when_read(hm_lambda: Any, case: str) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    agent = hm.agent(
        alice, files={"Dockerfile": b"FROM hivemind/agent-base:local\n", "main.py": b"print(1)\n"}
    )
    other = hm.agent(
        alice, files={"Dockerfile": b"FROM hivemind/agent-base:local\n", "main.py": b"print(2)\n"}
    )
    key = agent_source_key(agent.agent_id)
    if case == "flip":
        body = flip_byte(agent.archive)
    elif case == "truncate":
        body = truncate(agent.archive)
    elif case == "swap-other-agent":
        body = other.archive
    else:  # an earlier, never committed upload to the same key (e.g. a failed first attempt)
        body = hm.archive({"Dockerfile": b"FROM hivemind/agent-base:local\n", "main.py": b"evil()\n"})
    # Overwriting the key alone changes nothing: the record pins the version it verified.
    hm.store.blobs.put_bytes(key, body)
    listed = hm.api.get(f"/v1/room-agents/{agent.agent_id}/files", token=alice.token).ok()
    assert listed["source_digest"] == agent.digest
    # An attacker who also re-points the record at the new version is caught by the digest.
    stored = StoredObject(
        key=key,
        size=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        version_id=_latest_version(hm.store, key),
    )
    record = read_row(hm.store, TableRole.AGENTS, {"agent_id": agent.agent_id})
    _point_agent_at(record, stored)
    put_row(hm.store, TableRole.AGENTS, record)
    before = deployment_snapshot(hm.store)
    for path in (
        f"/v1/room-agents/{agent.agent_id}/files",
        f"/v1/room-agents/{agent.agent_id}/files/main.py",
    ):
        refused = hm.api.get(path, token=alice.token)
        assert (refused.status, refused.error) == (409, "agent_source_invalid"), refused.body[:300]
    assert snapshot_difference(before, deployment_snapshot(hm.store)) == {}


def _latest_version(store: Store, key: str) -> str:
    listing = store.clients.s3.list_object_versions(Bucket=store.config.bucket, Prefix=key)
    return next(v["VersionId"] for v in listing["Versions"] if v["IsLatest"])


def _point_agent_at(record: dict[str, Any], stored: StoredObject) -> None:
    """Re-point an agent record at another object version, whatever the record calls those fields."""
    pointed = False
    for value in record.values():
        if isinstance(value, dict) and {"key", "sha256", "size"} <= set(value):
            value.update(size=stored.size, sha256=stored.sha256, version_id=stored.version_id)
            pointed = True
    assert pointed, f"agent record has no stored-object field: {sorted(record)}"


# --- HMS1 objects: items, sealed agent sources, outputs, artifacts ---------------------------------

OWNER, ROOM, OTHER_ROOM = "tenant_owner1", "room_alpha", "room_beta"


def _context(kind: ObjectKind, object_id: str, *, room: str = ROOM, tenant: str = OWNER) -> SealContext:
    return SealContext(tenant_id=tenant, room_id=room, kind=kind, object_id=object_id)


SEALED_KINDS = {
    ObjectKind.ITEM: ("item_a", "item_b"),
    ObjectKind.AGENT_SOURCE: ("agent_a", "agent_b"),
    ObjectKind.OUTPUT: ("run_a", "run_b"),
    ObjectKind.ARTIFACT: ("chart.png", "table.csv"),
}

SEALED_TAMPERS: dict[str, Callable[[bytes, dict[str, bytes]], bytes]] = {
    "flip-header": lambda blob, _: flip_byte(blob, 12),
    "flip-body": lambda blob, _: flip_byte(blob, len(blob) - 20),
    "flip-tag": lambda blob, _: flip_byte(blob, len(blob) - 1),
    "truncate-mid-chunk": lambda blob, _: blob[: len(blob) - 7],
    "truncate-to-header": lambda blob, _: blob[:25],
    "drop-last-chunk": lambda blob, _: blob[: 25 + 4096 + 16],
    "append": lambda blob, _: blob + b"\x00" * 16,
    "swap-other-room": lambda _, others: others["other_room"],
    "swap-other-tenant": lambda _, others: others["other_tenant"],
    "swap-other-object": lambda _, others: others["other_object"],
    "swap-other-kind": lambda _, others: others["other_kind"],
}
SEALED_CODES = {
    "truncate-to-header": "seal_truncated",
    "drop-last-chunk": "seal_truncated",
}


@pytest.mark.parametrize("kind", list(SEALED_KINDS), ids=lambda kind: kind.value)
@pytest.mark.parametrize("case", sorted(SEALED_TAMPERS))
def test_tampered_or_moved_sealed_object_does_not_open(kind: ObjectKind, case: str) -> None:
    key = bytes(range(32))
    object_id, other_id = SEALED_KINDS[kind]
    plaintext = b"canary-7f3a " * 700  # two chunks at 4 KiB
    context = _context(kind, object_id)
    blob = seal_bytes(plaintext, key=key, context=context, chunk_size=4096)
    other_kind = next(k for k in ObjectKind if k is not kind)
    others = {
        "other_room": seal_bytes(
            plaintext, key=key, context=_context(kind, object_id, room=OTHER_ROOM), chunk_size=4096
        ),
        "other_tenant": seal_bytes(
            plaintext, key=key, context=_context(kind, object_id, tenant="tenant_other"), chunk_size=4096
        ),
        "other_object": seal_bytes(plaintext, key=key, context=_context(kind, other_id), chunk_size=4096),
        "other_kind": seal_bytes(
            plaintext, key=key, context=_context(other_kind, object_id), chunk_size=4096
        ),
    }
    assert open_bytes(blob, key=key, context=context) == plaintext
    tampered = SEALED_TAMPERS[case](blob, others)
    with pytest.raises(SealError) as refused:
        open_bytes(tampered, key=key, context=context)
    expected = SEALED_CODES.get(case)
    if case == "append":
        # After a last chunk shorter than the chunk size, appended bytes run into that chunk's tag
        # (docs/sealing.md: there is no length field), so the tag no longer verifies.
        expected = "seal_tag_mismatch"
    if expected is None:
        expected = "seal_tag_mismatch"
    assert refused.value.code == expected


def test_a_committed_item_reads_only_its_pinned_bytes(store: Store) -> None:
    """Overwriting an item's key changes nothing (the record pins the version); re-pointing the record at
    tampered bytes without fixing its digest is caught by the checksum, and fixing the digest too is
    caught by HMS1 (the previous test)."""
    key = "rooms/room_alpha/items/item_a"
    blob = seal_bytes(b"secret,1\n", key=bytes(32), context=_context(ObjectKind.ITEM, "item_a"))
    pinned = store.blobs.put_bytes(key, blob)
    store.blobs.put_bytes(key, flip_byte(blob))  # a newer version at the same key
    import io  # noqa: PLC0415 - local

    sink = io.BytesIO()
    store.blobs.download_verified(pinned, sink)
    assert sink.getvalue() == blob
    tampered = StoredObject(
        key=key, size=pinned.size, sha256=pinned.sha256, version_id=_latest_version(store, key)
    )
    with pytest.raises(IntegrityError) as refused:
        store.blobs.download_verified(tampered, io.BytesIO())
    assert refused.value.code == "object_checksum_mismatch"


# --- run envelopes, output keys ------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner_keys() -> HpkeKeyPair:
    return HpkeKeyPair.generate()


def _envelope(room_id: str = ROOM, *, now: int, ttl_s: int = 3600) -> RunEnvelope:
    return RunEnvelope.create(
        room_id=room_id,
        manifest_hash="ab" * 32,
        bearer_id=OWNER,
        wrap_key=bytes(32),
        prompt="canary question",
        reply_pub=public_bytes(X25519PrivateKey.generate()),
        budgets=Budgets(timeout_s=60, llm_calls=0, tokens=0, memory_mb=256),
        now=now,
        ttl_s=ttl_s,
    )


def _mutate_ct(sealed: SealedEnvelope, change: Callable[[bytes], bytes]) -> SealedEnvelope:
    return sealed.model_copy(update={"ct": b64encode(change(_b64(sealed.ct)))})


ENVELOPE_TAMPERS: dict[str, tuple[Callable[..., SealedEnvelope], type[HivemindError], str]] = {
    "flip-ciphertext": (lambda s, **_: _mutate_ct(s, flip_byte), EnvelopeError, "envelope_invalid"),
    "flip-enc": (
        lambda s, **_: s.model_copy(update={"enc": b64encode(flip_byte(_b64(s.enc), 5))}),
        EnvelopeError,
        "envelope_invalid",
    ),
    "truncate": (lambda s, **_: _mutate_ct(s, truncate), EnvelopeError, "envelope_invalid"),
    "swap-other-room": (lambda s, other_room, **_: other_room, EnvelopeError, "envelope_invalid"),
    "swap-other-runner": (lambda s, other_runner, **_: other_runner, EnvelopeError, "envelope_invalid"),
    "replay": (lambda s, **_: s, ReplayError, "replay_detected"),
    "expired": (lambda s, expired, **_: expired, ExpiredError, "expired"),
}


@pytest.mark.parametrize("case", sorted(ENVELOPE_TAMPERS))
def test_tampered_run_envelope_is_refused_by_the_runner(runner_keys: HpkeKeyPair, case: str) -> None:
    now = int(time.time())
    sealed = seal_run_envelope(runner_keys.public_keys(), _envelope(now=now))
    guard = MemoryReplayGuard()
    if case == "replay":  # the first opening spends the nonce; the replay is the second
        open_run_envelope(runner_keys, sealed, room_id=ROOM, now=now, replay_guard=guard)
    variants = {
        "other_room": seal_run_envelope(runner_keys.public_keys(), _envelope(OTHER_ROOM, now=now)),
        "other_runner": seal_run_envelope(HpkeKeyPair.generate().public_keys(), _envelope(now=now)),
        "expired": seal_run_envelope(runner_keys.public_keys(), _envelope(now=now - 7200, ttl_s=60)),
    }
    mutate, error, code = ENVELOPE_TAMPERS[case]
    with pytest.raises(error) as refused:
        open_run_envelope(runner_keys, mutate(sealed, **variants), room_id=ROOM, now=now, replay_guard=guard)
    assert refused.value.code == code


@pytest.mark.parametrize("case", ["flip", "truncate", "other-run", "other-role"])
def test_tampered_or_moved_output_key_does_not_open(case: str) -> None:
    querier = X25519PrivateKey.generate()
    output_key = bytes(range(32))
    sealed = seal_output_key(
        output_key, public_bytes(querier), run_id="run_a", recipient=OutputRecipient.QUERIER
    )
    run_id, recipient = "run_a", OutputRecipient.QUERIER
    if case == "flip":
        sealed = _mutate_ct(sealed, flip_byte)
    elif case == "truncate":
        sealed = _mutate_ct(sealed, truncate)
    elif case == "other-run":
        run_id = "run_b"
    else:
        recipient = OutputRecipient.OWNER
    with pytest.raises(EnvelopeError) as refused:
        open_output_key(querier, sealed, run_id=run_id, recipient=recipient)
    assert refused.value.code == "envelope_invalid"


# --- receipts and artifacts ---------------------------------------------------------------------

RUNNER_SIGN = Ed25519PrivateKey.generate()
RUNNER_PUB = b64encode(public_bytes(RUNNER_SIGN))
COMPOSE = "c0" * 32


def _receipt(run_id: str = "run_a", **changes: Any) -> Receipt:
    usage = [StageUsage(stage=Stage.QUERY, duration_ms=1000, tool_calls={"sql": 1})]
    fields: dict[str, Any] = {
        "run_id": run_id,
        "status": RunStatus.COMPLETED,
        "room_id": ROOM,
        "manifest_hash": "ab" * 32,
        "compose_hash": COMPOSE,
        "quote_hash": sha256_hex(b""),
        "agents": [
            ReceiptAgent(
                stage=stage, agent_id=f"agent_{stage.value}", source_digest="dd" * 32, image_digest=None
            )
            for stage in (Stage.SCOPE, Stage.QUERY, Stage.MEDIATOR)
        ],
        "scope_policy_hash": "5c" * 32,
        "prompt_sha256": sha256_hex(b"canary question"),
        "output": OutputDigests(ciphertext_sha256="01" * 32, plaintext_sha256="02" * 32),
        "artifacts": [
            ArtifactDigests(name="chart.png", ciphertext_sha256="03" * 32, plaintext_sha256="04" * 32)
        ],
        "error_code": None,
        "usage": usage,
        "totals": UsageTotals.of(usage),
        "started_at": 1_700_000_000,
        "finished_at": 1_700_000_010,
        "signer_pub": RUNNER_PUB,
    }
    fields.update(changes)
    return Receipt.model_validate(fields)


def _expected(run_id: str = "run_a") -> ReceiptExpectations:
    return ReceiptExpectations(
        run_id=run_id,
        room_id=ROOM,
        manifest_hash="ab" * 32,
        prompt_sha256=sha256_hex(b"canary question"),
        output_ciphertext_sha256="01" * 32,
        output_plaintext_sha256="02" * 32,
        allowed_compose_hashes=frozenset({COMPOSE}),
    )


def _field_edit(path: list[str | int], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(document: dict[str, Any]) -> None:
        target: Any = document["receipt"]
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return edit


RECEIPT_FIELD_EDITS = {
    "status": _field_edit(["status"], "failed"),
    "scope-policy-hash": _field_edit(["scope_policy_hash"], "5d" * 32),
    "mediator-digest": _field_edit(["agents", 2, "source_digest"], "ee" * 32),
    "image-digest": _field_edit(["agents", 1, "image_digest"], "sha256:" + "ff" * 32),
    "artifact-hash": _field_edit(["artifacts", 0, "plaintext_sha256"], "05" * 32),
    "output-hash": _field_edit(["output", "ciphertext_sha256"], "06" * 32),
    "usage": _field_edit(["totals", "llm_calls"], 7),
    "compose-hash": _field_edit(["compose_hash"], "c1" * 32),
}


@pytest.mark.parametrize("case", sorted(RECEIPT_FIELD_EDITS))
def test_any_edited_receipt_field_breaks_its_signature(case: str) -> None:
    import json  # noqa: PLC0415 - local

    document = json.loads(sign_receipt(_receipt(), RUNNER_SIGN).to_json())
    RECEIPT_FIELD_EDITS[case](document)
    with pytest.raises(ReceiptError) as refused:
        # A status edit already fails the receipt's own shape rules (a failed run has no output).
        tampered = SignedReceipt.from_json(json.dumps(document))
        verify_receipt(tampered, attested_sign_pub=RUNNER_PUB, expected=_expected())
    assert refused.value.code == "receipt_invalid"
    assert refused.value.details in ({"field": "signature"}, {}), refused.value.details


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("truncated-json", None),
        ("flipped-signature", "signature"),
        ("another-runs-receipt", "run_id"),
        ("self-signed-by-another-key", "signature"),
        ("output-swapped-for-another-runs", "output.ciphertext_sha256"),
        ("runner-build-not-trusted", "compose_hash"),
    ],
)
def test_receipt_refusals(case: str, field: str | None) -> None:
    signed = sign_receipt(_receipt(), RUNNER_SIGN)
    expected = _expected()
    text = signed.to_json()
    if case == "truncated-json":
        with pytest.raises(ReceiptError) as refused:
            SignedReceipt.from_json(text[: len(text) // 2])
        assert refused.value.code == "receipt_invalid"
        return
    if case == "flipped-signature":
        signed = signed.model_copy(update={"signature": b64encode(flip_byte(_b64(signed.signature)))})
    elif case == "another-runs-receipt":
        signed = sign_receipt(_receipt("run_b"), RUNNER_SIGN)
    elif case == "self-signed-by-another-key":
        other = Ed25519PrivateKey.generate()
        signed = sign_receipt(_receipt(signer_pub=b64encode(public_bytes(other))), other)
    elif case == "output-swapped-for-another-runs":
        expected = expected.model_copy(update={"output_ciphertext_sha256": "07" * 32})
    else:
        expected = expected.model_copy(update={"allowed_compose_hashes": frozenset({"c2" * 32})})
    with pytest.raises(ReceiptError) as refused:
        verify_receipt(signed, attested_sign_pub=RUNNER_PUB, expected=expected)
    assert refused.value.code == "receipt_invalid"
    assert refused.value.details == {"field": field}


@pytest.mark.parametrize("case", ["flip", "other-name", "other-runs-artifact"])
def test_artifact_not_matching_its_receipt_entry_is_refused(case: str) -> None:
    receipt = verify_receipt(
        sign_receipt(_receipt(), RUNNER_SIGN), attested_sign_pub=RUNNER_PUB, expected=_expected()
    )
    name, cipher, plain = "chart.png", "03" * 32, "04" * 32
    if case == "flip":
        plain = flip_text(plain)
    elif case == "other-name":
        name = "secrets.csv"
    else:
        cipher = "08" * 32
    with pytest.raises(ReceiptError) as refused:
        verify_artifact(receipt, name, ciphertext_sha256=cipher, plaintext_sha256=plain)
    assert refused.value.code == "receipt_invalid"


# --- attestation documents, as stored in the Runners table and relayed -----------------------------

ATTESTATION_TAMPERS: dict[
    str, tuple[Callable[[dict[str, Any], dict[str, Any]], None], type[HivemindError], str]
] = {
    "swap-hpke-key": (
        lambda doc, other: doc["hpke_public_keys"].update(x25519=other["hpke_public_keys"]["x25519"]),
        ReportDataMismatch,
        "report_data_mismatch",
    ),
    "drop-hpke-suite": (
        lambda doc, _: doc["hpke_public_keys"].pop("mlkem768-x25519"),
        ReportDataMismatch,
        "report_data_mismatch",
    ),
    "swap-sign-pub": (
        lambda doc, other: doc.update(sign_pub=other["sign_pub"]),
        ReportDataMismatch,
        "report_data_mismatch",
    ),
    "flip-compose-hash-field": (
        lambda doc, _: doc.update(compose_hash="c1" * 32),
        EventLogError,
        "event_log_invalid",
    ),
    "flip-event-payload": (
        lambda doc, _: doc["event_log"][2].update(event_payload="c1" * 32),
        EventLogError,
        "event_log_invalid",
    ),
    "truncate-event-log": (lambda doc, _: doc["event_log"].pop(), EventLogError, "event_log_invalid"),
    "marked-simulated": (
        lambda doc, _: doc.update(tee="simulated", quote="", event_log=[]),
        SimulatedTeeRefused,
        "simulated_tee_refused",
    ),
    "replay-older-build": (
        lambda doc, other: doc.update(
            {
                key: other[key]
                for key in ("compose_hash", "event_log", "hpke_public_keys", "sign_pub", "quote")
            }
        ),
        ComposeHashNotTrusted,
        "compose_hash_not_trusted",
    ),
}


@pytest.mark.parametrize("case", sorted(ATTESTATION_TAMPERS))
def test_tampered_attestation_document_is_refused_by_the_client(
    hm_lambda: Any, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    hm = hm_lambda
    trusted = "c0" * 32
    genuine = tdx_document(
        HpkeKeyPair.generate(), b64encode(public_bytes(Ed25519PrivateKey.generate())), trusted
    )
    older = tdx_document(
        HpkeKeyPair.generate(), b64encode(public_bytes(Ed25519PrivateKey.generate())), "0d" * 32
    )
    quotes = {genuine.quote_sha256: genuine_quote_for(genuine)}
    # The "older build" was a genuine runner too: its own quote binds its own keys and log.
    older = older.model_copy(update={"quote": "cd" * 64})
    quotes[older.quote_sha256] = genuine_quote_for(older)
    monkeypatch.setattr(
        attestation_module,
        "verify_quote",
        lambda quote, collateral, *, now: quotes[hashlib.sha256(quote).hexdigest()],
    )
    trust = RunnerTrust(mode=RunnerTrustMode.OWNER_APPROVED, allowed_compose_hashes=[trusted])
    document = genuine.model_dump(mode="json")
    mutate, error, code = ATTESTATION_TAMPERS[case]
    mutate(document, older.model_dump(mode="json"))
    now = hm.store.clock()
    hm.store.runners.publish(
        RunnerRecord(
            runner_id=genuine.runner_id,
            tee=TeeKind(document["tee"]),
            compose_hash=document["compose_hash"],
            version="0.1.0",
            attestation=document,
            started_at=now,
            heartbeat_at=now,
        )
    )
    relayed = hm.api.get("/v1/attestation").ok()["runners"]
    assert [runner["runner_id"] for runner in relayed] == [genuine.runner_id]
    served = AttestationDocument.model_validate(relayed[0]["document"])
    # The untampered document verifies: the refusal below is the tampering's doing.
    verify_attestation(genuine, collateral=AnyCollateral(), now=now, trust=trust, allow_simulated=False)
    with pytest.raises(error) as refused:
        verify_attestation(served, collateral=AnyCollateral(), now=now, trust=trust, allow_simulated=False)
    assert refused.value.code == code


# --- ledger entries -------------------------------------------------------------------------------


def _ledger_key(tenant_id: str, seq: int) -> dict[str, Any]:
    return {"tenant_id": tenant_id, "seq": seq}


def _tamper_ledger(store: Store, case: str, tenant: str, other: str) -> None:
    if case == "flip-amount":  # entry 3 is a credit grant: one more micro-USD keeps its shape valid
        edit_row(
            store, TableRole.LEDGER, _ledger_key(tenant, 3), lambda row: row.update(amount=row["amount"] + 1)
        )
    elif case == "malformed-entry":  # a hold that also credits: not a shape any transaction writes
        edit_row(store, TableRole.LEDGER, _ledger_key(tenant, 2), lambda row: row.update(amount=1))
    elif case == "flip-hash":
        edit_row(
            store,
            TableRole.LEDGER,
            _ledger_key(tenant, 2),
            lambda row: row.update(hash=flip_text(row["hash"])),
        )
    elif case == "delete-entry":
        delete_row(store, TableRole.LEDGER, _ledger_key(tenant, 2))
    elif case == "swap-other-tenant":
        row = read_row(store, TableRole.LEDGER, _ledger_key(other, 2))
        row["tenant_id"] = tenant
        put_row(store, TableRole.LEDGER, row)
    elif case == "replay-older-head":
        # Roll the account back to after entry 2, as if the later charge never happened; entry 3
        # still exists past the head.
        entry = read_row(store, TableRole.LEDGER, _ledger_key(tenant, 2))
        edit_row(
            store,
            TableRole.ACCOUNTS,
            {"tenant_id": tenant},
            lambda row: row.update(
                last_seq=2,
                last_hash=entry["hash"],
                balance=entry["balance_after"],
                held=entry["held_after"],
                available=entry["balance_after"] - entry["held_after"],
            ),
        )
    elif case == "insert-entry":
        row = read_row(store, TableRole.LEDGER, _ledger_key(tenant, 3))
        row["seq"] = 4
        put_row(store, TableRole.LEDGER, row)
    else:
        raise AssertionError(case)


LEDGER_TAMPERS = [
    "malformed-entry",
    "flip-amount",
    "flip-hash",
    "delete-entry",
    "swap-other-tenant",
    "replay-older-head",
    "insert-entry",
]


@pytest.mark.parametrize("case", LEDGER_TAMPERS)
def test_tampered_ledger_is_found_by_verification_and_the_admin_route(hm_lambda: Any, case: str) -> None:
    hm = hm_lambda
    store: Store = hm.store
    tenant, other = random_id("tenant"), random_id("tenant")
    for who in (tenant, other):
        store.billing.grant(who, 5_000_000)
        store.billing.hold(who, random_id("run"), 1_000_000, enforce=True)
        store.billing.grant(who, 1_000)
    assert store.billing.verify(tenant) == 3
    _tamper_ledger(store, case, tenant, other)
    with pytest.raises(LedgerError) as refused:
        store.billing.verify(tenant)
    assert refused.value.code == "ledger_invalid"
    assert store.billing.verify(other) == 3
    admin = hm.admin()
    report = hm.api.get("/v1/admin/billing/verify", token=admin.token)
    assert (report.status, report.error) == (409, "ledger_invalid")
    failing = {
        entry["tenant_id"] for entry in report.json()["details"]["tenants"] if not entry.get("ok", True)
    }
    assert failing == {tenant}


# --- audit events ---------------------------------------------------------------------------------

AUDIT_TAMPERS = [
    "flip-details",
    "flip-hash",
    "delete-event",
    "swap-other-room",
    "reorder",
    "insert-past-head",
    "roll-back-head",
]


@pytest.mark.parametrize("case", AUDIT_TAMPERS)
def test_tampered_audit_log_is_reported_by_the_audit_route(hm_lambda: Any, case: str) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    room, other = hm.room(alice), hm.room(alice)
    for target in (room, other):
        hm.invite(target)
        hm.invite(target)
    store: Store = hm.store
    assert store.audit.verify(room.room_id) >= 3
    key = {"room_id": room.room_id, "seq": 2}
    if case == "flip-details":
        edit_row(store, TableRole.AUDIT, key, lambda row: row["details"].update(tampered=True))
    elif case == "flip-hash":
        edit_row(store, TableRole.AUDIT, key, lambda row: row.update(hash=flip_text(row["hash"])))
    elif case == "delete-event":
        delete_row(store, TableRole.AUDIT, key)
    elif case == "swap-other-room":
        row = read_row(store, TableRole.AUDIT, {"room_id": other.room_id, "seq": 2})
        row["room_id"] = room.room_id
        put_row(store, TableRole.AUDIT, row)
    elif case == "insert-past-head":  # a well-linked event the anchored head never covered
        length = store.audit.verify(room.room_id)
        newest = read_row(store, TableRole.AUDIT, {"room_id": room.room_id, "seq": length})
        fields = {**newest, "seq": length + 1, "prev_hash": newest["hash"], "details": {"forged": True}}
        del fields["hash"]
        put_row(store, TableRole.AUDIT, {**fields, "hash": entry_hash(newest["hash"], fields)})
    elif case == "roll-back-head":  # the room's anchor points at seq 2 again, as if 3.. never happened
        two = read_row(store, TableRole.AUDIT, key)
        edit_row(
            store,
            TableRole.ROOMS,
            {"room_id": room.room_id, "sk": "manifest"},
            lambda row: row.update(audit_head_seq=2, audit_head_hash=two["hash"]),
        )
    else:
        two = read_row(store, TableRole.AUDIT, key)
        three = read_row(store, TableRole.AUDIT, {"room_id": room.room_id, "seq": 3})
        two["seq"], three["seq"] = 3, 2
        put_row(store, TableRole.AUDIT, two)
        put_row(store, TableRole.AUDIT, three)
    with pytest.raises(IntegrityError) as refused:
        store.audit.verify(room.room_id)
    assert refused.value.code == "audit_chain_invalid"
    listed = hm.api.get(f"/v1/rooms/{room.room_id}/audit", token=alice.token).ok()
    assert listed["chain"]["valid"] is False
    assert listed["chain"]["error"]["error"] == "audit_chain_invalid"
    assert hm.api.get(f"/v1/rooms/{other.room_id}/audit", token=alice.token).ok()["chain"]["valid"] is True


def test_deleting_the_newest_audit_events_is_detected(hm_lambda: Any) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    room = hm.room(alice)
    hm.invite(room)
    hm.invite(room)
    store: Store = hm.store
    length = store.audit.verify(room.room_id)
    for seq in (length, length - 1):  # the two newest events: the remaining chain links up fine
        delete_row(store, TableRole.AUDIT, {"room_id": room.room_id, "seq": seq})
    with pytest.raises(IntegrityError) as refused:
        store.audit.verify(room.room_id)
    assert refused.value.code == "audit_truncated"
    assert refused.value.details["seq"] == length - 1
    listed = hm.api.get(f"/v1/rooms/{room.room_id}/audit", token=alice.token).ok()
    assert listed["chain"]["valid"] is False
    assert listed["chain"]["error"]["error"] == "audit_truncated"
