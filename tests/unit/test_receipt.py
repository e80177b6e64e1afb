"""Run receipts: signing, verification against the attested key, and one refusal per field."""

import hashlib
import json
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from hivemind.canonical import canonical_json
from hivemind.encoding import b64decode, b64encode
from hivemind.errors import FloatInSignedDocument, InvalidInput, ReceiptError
from hivemind.keys import public_bytes
from hivemind.models import RunStatus, Stage, StageUsage
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

RUNNER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x11" * 32)
RUNNER_PUB = b64encode(public_bytes(RUNNER_KEY))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x22" * 32)
OTHER_PUB = b64encode(public_bytes(OTHER_KEY))
PROMPT = b"how many orders by country?"
CIPHERTEXT = b"HMS1...sealed output"
PLAINTEXT = b"DE: 120, FR: 80"
COMPOSE = "c0" * 32


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


USAGE = [
    StageUsage(stage=Stage.SCOPE, duration_ms=1200, tool_calls={"schema": 1}),
    StageUsage(stage=Stage.QUERY, duration_ms=3400, tool_calls={"sql": 3}, llm_calls=2, prompt_tokens=900),
    StageUsage(stage=Stage.MEDIATOR, duration_ms=800, llm_calls=1, completion_tokens=40),
]


def make_receipt(**overrides: Any) -> Receipt:
    fields: dict[str, Any] = {
        "run_id": "run_abc123",
        "status": RunStatus.COMPLETED,
        "room_id": "room_abc123",
        "manifest_hash": "aa" * 32,
        "compose_hash": COMPOSE,
        "quote_hash": "bb" * 32,
        "agents": [
            ReceiptAgent(
                stage=Stage.SCOPE,
                agent_id="ag_s1",
                source_digest="11" * 32,
                image_digest="sha256:" + "44" * 32,
            ),
            ReceiptAgent(
                stage=Stage.QUERY,
                agent_id="ag_q1",
                source_digest="22" * 32,
                image_digest="sha256:" + "55" * 32,
            ),
            ReceiptAgent(stage=Stage.MEDIATOR, agent_id="ag_m1", source_digest="33" * 32, image_digest=None),
        ],
        "scope_policy_hash": "dd" * 32,
        "prompt_sha256": sha(PROMPT),
        "output": OutputDigests(ciphertext_sha256=sha(CIPHERTEXT), plaintext_sha256=sha(PLAINTEXT)),
        "artifacts": [
            ArtifactDigests(name="chart.png", ciphertext_sha256="e1" * 32, plaintext_sha256="e2" * 32)
        ],
        "error_code": None,
        "usage": USAGE,
        "totals": UsageTotals.of(USAGE),
        "started_at": 1_750_000_000,
        "finished_at": 1_750_000_006,
        "signer_pub": RUNNER_PUB,
    }
    fields.update(overrides)
    return Receipt(**fields)


def expectations(**overrides: Any) -> ReceiptExpectations:
    fields: dict[str, Any] = {
        "run_id": "run_abc123",
        "room_id": "room_abc123",
        "manifest_hash": "aa" * 32,
        "prompt_sha256": sha(PROMPT),
        "output_ciphertext_sha256": sha(CIPHERTEXT),
        "output_plaintext_sha256": sha(PLAINTEXT),
        "allowed_compose_hashes": {COMPOSE},
    }
    fields.update(overrides)
    return ReceiptExpectations(**fields)


SIGNED = sign_receipt(make_receipt(), RUNNER_KEY)


def test_sign_and_verify_round_trip_through_json() -> None:
    parsed = SignedReceipt.from_json(SIGNED.to_json())
    assert verify_receipt(parsed, attested_sign_pub=RUNNER_PUB, expected=expectations()) == make_receipt()


def test_signature_is_over_the_documented_bytes() -> None:
    document = json.loads(SIGNED.to_json())["receipt"]
    RUNNER_KEY.public_key().verify(
        b64decode(SIGNED.signature), b"hivemind-receipt-v1\n" + rfc8785.dumps(document)
    )
    assert document["totals"] == {
        "duration_ms": 5400,
        "tool_calls": 4,
        "llm_calls": 3,
        "prompt_tokens": 900,
        "completion_tokens": 40,
    }


def test_signed_by_another_key_refused_even_if_self_consistent() -> None:
    # Self-consistent: signer_pub names the key that really signed. It is still not the attested key.
    forged = sign_receipt(make_receipt(signer_pub=OTHER_PUB), OTHER_KEY)
    with pytest.raises(
        ReceiptError, match="receipt signature: does not verify under the attested runner key"
    ):
        verify_receipt(forged, attested_sign_pub=RUNNER_PUB, expected=expectations())


def test_attested_key_signing_a_receipt_that_names_another_signer_refused() -> None:
    mislabelled = make_receipt(signer_pub=OTHER_PUB)
    signed = SignedReceipt(
        receipt=mislabelled, signature=b64encode(RUNNER_KEY.sign(mislabelled.signing_bytes()))
    )
    with pytest.raises(ReceiptError, match="receipt signer_pub: names"):
        verify_receipt(signed, attested_sign_pub=RUNNER_PUB, expected=expectations())


def test_flipped_signature_or_receipt_byte_refused() -> None:
    for index in (0, 63):
        raw = bytearray(b64decode(SIGNED.signature))
        raw[index] ^= 0x01
        tampered = SIGNED.model_copy(update={"signature": b64encode(bytes(raw))})
        with pytest.raises(ReceiptError, match="receipt signature"):
            verify_receipt(tampered, attested_sign_pub=RUNNER_PUB, expected=expectations())
    changed = SIGNED.model_copy(update={"receipt": make_receipt(finished_at=1_750_000_007)})
    with pytest.raises(ReceiptError, match="receipt signature"):
        verify_receipt(changed, attested_sign_pub=RUNNER_PUB, expected=expectations())


def test_signature_from_another_context_refused() -> None:
    receipt = make_receipt()
    for context in (b"", b"hivemind-room-v1\n"):
        signed = SignedReceipt(
            receipt=receipt, signature=b64encode(RUNNER_KEY.sign(context + canonical_json(receipt)))
        )
        with pytest.raises(ReceiptError, match="receipt signature"):
            verify_receipt(signed, attested_sign_pub=RUNNER_PUB, expected=expectations())


@pytest.mark.parametrize(
    ("field", "expected_override"),
    [
        ("run_id", {"run_id": "run_other"}),
        ("room_id", {"room_id": "room_other"}),
        ("manifest_hash", {"manifest_hash": "ab" * 32}),
        ("prompt_sha256", {"prompt_sha256": sha(b"another prompt")}),
        ("output.ciphertext_sha256", {"output_ciphertext_sha256": sha(b"other ciphertext")}),
        ("output.plaintext_sha256", {"output_plaintext_sha256": sha(b"DE: 121, FR: 80")}),
        ("compose_hash", {"allowed_compose_hashes": {"d0" * 32}}),
    ],
)
def test_each_field_mismatch_refused_naming_the_field(field: str, expected_override: dict[str, Any]) -> None:
    with pytest.raises(ReceiptError, match=f"^receipt_invalid: receipt {field}:") as caught:
        verify_receipt(SIGNED, attested_sign_pub=RUNNER_PUB, expected=expectations(**expected_override))
    assert caught.value.details == {"field": field}


def test_receipt_from_a_failed_run_refused_when_output_was_downloaded() -> None:
    failed = make_receipt(
        status=RunStatus.FAILED,
        output=None,
        artifacts=[],
        error_code="scope_policy_invalid",
        scope_policy_hash=None,
    )
    signed = sign_receipt(failed, RUNNER_KEY)
    with pytest.raises(ReceiptError, match="receipt output: the run failed without an output"):
        verify_receipt(signed, attested_sign_pub=RUNNER_PUB, expected=expectations())
    metadata_only = expectations(output_ciphertext_sha256=None, output_plaintext_sha256=None)
    assert verify_receipt(signed, attested_sign_pub=RUNNER_PUB, expected=metadata_only).error_code == (
        "scope_policy_invalid"
    )


def test_plaintext_hash_needs_the_ciphertext_hash() -> None:
    with pytest.raises(ValidationError, match="together with the ciphertext hash"):
        expectations(output_ciphertext_sha256=None)
    with pytest.raises(ValidationError, match="allowed_compose_hashes"):
        expectations(allowed_compose_hashes=set())


def test_artifact_hashes_checked() -> None:
    receipt = verify_receipt(SIGNED, attested_sign_pub=RUNNER_PUB, expected=expectations())
    verify_artifact(receipt, "chart.png", ciphertext_sha256="e1" * 32, plaintext_sha256="e2" * 32)
    with pytest.raises(ReceiptError, match=r"receipt artifacts\[chart.png\].ciphertext_sha256"):
        verify_artifact(receipt, "chart.png", ciphertext_sha256="e3" * 32, plaintext_sha256="e2" * 32)
    with pytest.raises(ReceiptError, match=r"receipt artifacts\[chart.png\].plaintext_sha256"):
        verify_artifact(receipt, "chart.png", ciphertext_sha256="e1" * 32, plaintext_sha256="e3" * 32)
    with pytest.raises(ReceiptError, match=r"no artifact named 'other\.csv'"):
        verify_artifact(receipt, "other.csv", ciphertext_sha256="e1" * 32, plaintext_sha256="e2" * 32)


def test_signing_with_a_key_other_than_signer_pub_refused() -> None:
    with pytest.raises(InvalidInput, match="signer_pub"):
        sign_receipt(make_receipt(), OTHER_KEY)


def test_bad_attested_key_is_a_caller_error() -> None:
    with pytest.raises(InvalidInput, match="attested signing key"):
        verify_receipt(SIGNED, attested_sign_pub="short", expected=expectations())


# --- the receipt's own rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"status": RunStatus.RUNNING}, "status"),
        ({"error_code": "boom"}, "a completed run has an output"),
        ({"output": None}, "a completed run has an output"),
        ({"scope_policy_hash": None}, "a completed run has an output"),
        ({"status": RunStatus.FAILED, "error_code": None, "output": None, "artifacts": []}, "a failed run"),
        ({"status": RunStatus.FAILED, "error_code": "timeout"}, "a failed run"),
        ({"totals": UsageTotals.of(USAGE[:2])}, "totals are not the sums of usage"),
        ({"finished_at": 1_749_999_999}, "finished_at is before started_at"),
        (
            {"usage": [USAGE[0], USAGE[0]], "totals": UsageTotals.of([USAGE[0], USAGE[0]])},
            "lists a stage twice",
        ),
        (
            {
                "artifacts": [
                    ArtifactDigests.model_construct(
                        name="../x", ciphertext_sha256="e1" * 32, plaintext_sha256="e2" * 32
                    ).model_dump()
                ]
            },
            "name",
        ),
        (
            {"error_code": "Not A Code", "status": RunStatus.FAILED, "output": None, "artifacts": []},
            "error_code",
        ),
    ],
)
def test_inconsistent_receipt_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_receipt(**overrides)


@pytest.mark.parametrize(
    "path",
    [
        ["started_at"],
        ["usage", 0, "duration_ms"],
        ["totals", "prompt_tokens"],
        ["usage", 1, "tool_calls", "sql"],
    ],
)
def test_float_anywhere_refused(path: list[Any]) -> None:
    document = json.loads(SIGNED.to_json())
    target = document["receipt"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = float(target[path[-1]])
    with pytest.raises(FloatInSignedDocument):
        SignedReceipt.from_json(json.dumps(document))


def test_malformed_signed_receipt_refused() -> None:
    document = json.loads(SIGNED.to_json())
    document["receipt"]["extra"] = 1
    with pytest.raises(ReceiptError, match="not a valid signed receipt"):
        SignedReceipt.from_json(json.dumps(document))
    with pytest.raises(ReceiptError, match="not a valid signed receipt"):
        SignedReceipt.from_json("{}")
