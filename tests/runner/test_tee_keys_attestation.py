"""Runner keys from the seed, the attestation document they go into, and its publication."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hivemind.attestation import (
    VerifiedQuote,
    check_report_data,
    report_data,
    runner_key_binding,
    verify_attestation,
)
from hivemind.encoding import b64decode
from hivemind.envelope import HpkeSuite, seal_to
from hivemind.errors import (
    ComposeHashNotTrusted,
    EnvelopeError,
    InvalidInput,
    ReceiptError,
    ReportDataMismatch,
)
from hivemind.models import TeeKind
from hivemind.receipt import ReceiptExpectations, verify_receipt
from hivemind.store import Store
from hivemind.store.runners import RunnerStatus
from hivemind.store.schema import TableRole
from hivemind.trust import RunnerTrust, RunnerTrustMode
from hivemind_runner.attestation import AttestationPublisher, build_attestation
from hivemind_runner.keys import RunnerKeys
from hivemind_runner.outputs import RunnerIdentity, build_receipt
from hivemind_runner.tee import SimulatedTee
from hivemind_runner.telemetry import StructuredLogger

SEED = bytes(range(32))


def trust(*hashes: str) -> RunnerTrust:
    return RunnerTrust(mode=RunnerTrustMode.OWNER_APPROVED, allowed_compose_hashes=list(hashes))


def test_keys_are_deterministic_per_seed_and_differ_across_seeds() -> None:
    one, again, other = (
        RunnerKeys.from_seed(SEED),
        RunnerKeys.from_seed(SEED),
        RunnerKeys.from_seed(bytes(32)),
    )
    assert one.sign_pub == again.sign_pub
    assert one.hpke_public_keys == again.hpke_public_keys
    assert one.sign_pub != other.sign_pub
    assert one.hpke_public_keys.x25519 != other.hpke_public_keys.x25519
    # The published HPKE keys are core's derivation (docs/formats.md vector for seed 00..1f).
    assert one.hpke_public_keys.x25519 == "WkITRkFVJh8_jOx9zuMPTnFOijgc7rwrrm_oSA1LdwA"
    # The receipt key is its own derivation, not the HPKE X25519 key reused.
    assert b64decode(one.sign_pub) != b64decode(one.hpke_public_keys.x25519)


def test_keys_open_what_is_sealed_to_them_and_nothing_else() -> None:
    keys = RunnerKeys.from_seed(SEED)
    for suite in HpkeSuite:
        sealed = seal_to(keys.hpke_public_keys, b"agent key", info=b"hivemind-agent-v1|agent_a", suite=suite)
        assert keys.open(sealed, info=b"hivemind-agent-v1|agent_a") == b"agent key"
        with pytest.raises(EnvelopeError):
            keys.open(sealed, info=b"hivemind-agent-v1|agent_b")
        with pytest.raises(EnvelopeError):
            RunnerKeys.from_seed(bytes(32)).open(sealed, info=b"hivemind-agent-v1|agent_a")


def test_repr_shows_no_secret() -> None:
    keys = RunnerKeys.from_seed(SEED)
    text = repr(keys)
    assert keys.sign_pub in text
    assert SEED.hex() not in text and "HpkeKeyPair" not in text
    assert not hasattr(keys, "__dict__")  # nothing to dump by accident


def test_seed_of_wrong_size_is_refused() -> None:
    with pytest.raises(InvalidInput, match="32 bytes"):
        RunnerKeys.from_seed(bytes(31))


def test_report_data_binds_both_keys() -> None:
    keys = RunnerKeys.from_seed(SEED)
    assert keys.report_data() == runner_key_binding(keys.hpke_public_keys.by_suite(), keys.sign_pub)
    other = RunnerKeys.from_seed(bytes(32))
    swapped_sign = runner_key_binding(keys.hpke_public_keys.by_suite(), other.sign_pub)
    assert swapped_sign != keys.report_data()
    assert len(report_data(b"x", b64decode(keys.sign_pub))) == 64


def test_simulated_document_verifies_and_binds_the_keys(tmp_path: Path) -> None:
    tee = SimulatedTee(tmp_path / "seed")
    keys = RunnerKeys.from_seed(tee.seed())
    document = build_attestation(runner_id="runner_local", tee=tee, keys=keys, version="0.1.0", now=100)
    assert document.tee is TeeKind.SIMULATED and document.quote == "" and document.event_log == []
    compose = tee.identity().compose_hash
    verified = verify_attestation(
        document, collateral=None, now=200, trust=trust(compose), allow_simulated=True
    )
    assert verified.sign_pub == keys.sign_pub
    assert verified.hpke_public_keys == keys.hpke_public_keys.by_suite()
    # Receipts signed by the runner verify under the attested key, and only under it.
    receipt = build_receipt(
        run_id="run_a",
        room_id="room_a",
        manifest_hash="11" * 32,
        prompt_sha256="22" * 32,
        runner=RunnerIdentity(compose_hash=compose, quote_sha256=document.quote_sha256),
        signer_pub=keys.sign_pub,
        agents=[],
        scope_policy_hash=None,
        outputs=None,
        error_code="expired",
        usage=[],
        started_at=1,
        finished_at=2,
    )
    signed = keys.sign_receipt(receipt)
    expected = ReceiptExpectations(
        run_id="run_a",
        room_id="room_a",
        manifest_hash="11" * 32,
        prompt_sha256="22" * 32,
        output_ciphertext_sha256=None,
        output_plaintext_sha256=None,
        allowed_compose_hashes=frozenset({compose}),
    )
    assert (
        verify_receipt(signed, attested_sign_pub=verified.sign_pub, expected=expected).error_code == "expired"
    )
    with pytest.raises(ReceiptError):
        verify_receipt(signed, attested_sign_pub=RunnerKeys.from_seed(SEED).sign_pub, expected=expected)
    with pytest.raises(ComposeHashNotTrusted):
        verify_attestation(document, collateral=None, now=200, trust=trust("00" * 32), allow_simulated=True)


def test_tdx_style_document_with_swapped_key_fails_report_data(tmp_path: Path) -> None:
    # The binding the runner quotes is exactly what the client recomputes: swapping a key breaks it.
    keys = RunnerKeys.from_seed(SEED)
    other = RunnerKeys.from_seed(bytes(32))
    tee = SimulatedTee(tmp_path / "seed")
    document = build_attestation(runner_id="runner_local", tee=tee, keys=keys, version="0.1.0", now=1)
    register = bytes(48)
    quoted = VerifiedQuote(
        quote_sha256="00" * 32,
        tcb_status="UpToDate",
        advisory_ids=(),
        report_data=keys.report_data(),
        mr_td=register,
        mr_config_id=register,
        mr_owner=register,
        mr_owner_config=register,
        mr_seam=register,
        rtmr0=register,
        rtmr1=register,
        rtmr2=register,
        rtmr3=register,
        td_attributes=bytes(8),
        tee_tcb_svn=bytes(16),
    )
    check_report_data(quoted, document)
    forged = document.model_copy(update={"sign_pub": other.sign_pub})
    with pytest.raises(ReportDataMismatch):
        check_report_data(quoted, forged)


def test_publish_heartbeat_republish_and_stop(store: Store, tmp_path: Path) -> None:
    tee = SimulatedTee(tmp_path / "seed")
    keys = RunnerKeys.from_seed(tee.seed())
    document = build_attestation(
        runner_id="runner_pub", tee=tee, keys=keys, version="0.1.0", now=store.clock()
    )
    publisher = AttestationPublisher(store, document, interval_s=0.05, logger=StructuredLogger())
    publisher.publish()
    live = store.runners.list_live()
    assert [runner.runner_id for runner in live] == ["runner_pub"]
    assert live[0].attestation == document.model_dump(mode="json")

    # The row disappears (table restored, janitor): the next heartbeat publishes it again.
    store.clients.dynamodb.delete_item(
        TableName=store.config.table_name(TableRole.RUNNERS),
        Key={"runner_id": {"S": "runner_pub"}},
    )
    publisher.start()
    deadline = time.monotonic() + 5
    while store.runners.get("runner_pub") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.runners.get("runner_pub") is not None
    publisher.stop(RunnerStatus.STOPPED)
    assert store.runners.get("runner_pub").status is RunnerStatus.STOPPED
    assert store.runners.list_live() == []
