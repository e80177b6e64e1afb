"""Runner attestation: report_data binding, DCAP quote verification against real Intel-signed quotes,
TCB policy, RTMR3 event-log replay, and the whole chain (DESIGN §6, §16.2).

The real quotes in shared/test-vectors/tdx/ were not produced by our runner, so their report_data does
not bind our keys and their RTMR3 is zero: the full chain runs on them up to the report_data step, and
the event-log steps are tested on synthetic logs built here with dstack's digest rule.
"""

import hashlib
import json
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from hivemind import attestation
from hivemind.attestation import (
    AttestationDocument,
    EventLogEntry,
    PcsCollateralProvider,
    QuoteCollateral,
    StaticCollateral,
    TcbPolicy,
    VerifiedQuote,
    check_report_data,
    check_tcb_status,
    compose_hash_from_event_log,
    dstack_identity_from_event_log,
    hpke_public_keys_encoding,
    is_loopback_service,
    replay_event_log,
    report_data,
    runner_key_binding,
    verify_attestation,
    verify_quote,
)
from hivemind.encoding import b64encode
from hivemind.errors import (
    CollateralUnavailable,
    ComposeHashNotTrusted,
    EventLogError,
    InvalidInput,
    QuoteVerificationError,
    ReportDataMismatch,
    SimulatedTeeRefused,
    TcbStatusError,
)
from hivemind.models import TeeKind
from hivemind.trust import ReleaseStatement, RunnerTrust, RunnerTrustMode, operator_public_key, sign_release

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "test-vectors" / "tdx"
GOOD_AT = 1750377600  # 2025-06-20: the good quote verifies, UpToDate
BEFORE_TCB_INFO = 1704067200  # 2024-01-01: TCB info issued in the future
OUTDATED_AT = 1772323200  # 2026-03-01: the outdated quote has no matching TCB level
SIGNED_BODY = 48 + 584  # TD quote v4: header + TD 1.0 report body, covered by the QE's signature

RUNTIME = 0x08000001
ZERO48 = bytes(48)

COMPOSE_HASH = hashlib.sha256(b'{"manifest_version": 2, "name": "hivemind-runner"}').hexdigest()
APP_ID = "ab" * 20
INSTANCE_ID = "cd" * 20

HPKE_KEYS = {
    "mlkem768-x25519": b64encode(bytes(range(256)) * 4 + bytes(192)),
    "x25519": b64encode(bytes(range(100, 132))),
}
SIGN_PUB = b64encode(bytes(range(200, 232)))


@pytest.fixture(scope="module")
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.skip(
            f"real TDX quote vectors not found at {VECTORS} (expected the shared/ folder next to the repo)"
        )
    return VECTORS


@pytest.fixture(scope="module")
def good_quote(vectors: Path) -> bytes:
    return (vectors / "tdx_quote").read_bytes()


@pytest.fixture(scope="module")
def good_collateral(vectors: Path) -> dict:
    return json.loads((vectors / "tdx_quote_collateral.json").read_text())


# --- synthetic dstack event logs ----------------------------------------------------------------


def dstack_digest(name: str, payload: bytes) -> bytes:
    """dstack cc-eventlog v1, written out independently of the code under test."""
    return hashlib.sha384((0x08000001).to_bytes(4, "little") + b":" + name.encode() + b":" + payload).digest()


def runtime_event(name: str, payload: bytes, *, with_digest: bool = True) -> EventLogEntry:
    digest = dstack_digest(name, payload).hex() if with_digest else ""
    return EventLogEntry(imr=3, event_type=RUNTIME, digest=digest, event=name, event_payload=payload.hex())


def firmware_event(imr: int, seed: bytes) -> EventLogEntry:
    return EventLogEntry(
        imr=imr,
        event_type=0x80000001,
        digest=hashlib.sha384(seed).hexdigest(),
        event="",
        event_payload=seed.hex(),
    )


def boot_log(compose_hash: str = COMPOSE_HASH) -> list[EventLogEntry]:
    """The shape of a dstack boot: firmware events, then the runtime events of RTMR3."""
    return [
        firmware_event(0, b"td-hob"),
        firmware_event(0, b"cfv"),
        firmware_event(1, b"kernel"),
        firmware_event(2, b"cmdline"),
        runtime_event("system-preparing", b""),
        runtime_event("app-id", bytes.fromhex(APP_ID)),
        runtime_event("compose-hash", bytes.fromhex(compose_hash)),
        runtime_event("instance-id", bytes.fromhex(INSTANCE_ID)),
        runtime_event("boot-mr-done", b""),
        runtime_event("key-provider", b'{"type":"kms"}'),
        runtime_event("system-ready", b""),
        # Extended by the app after boot: must not be able to override the boot-time compose hash.
        runtime_event("compose-hash", hashlib.sha256(b"app-chosen").digest()),
    ]


def fold(digests: list[bytes]) -> bytes:
    register = ZERO48
    for digest in digests:
        register = hashlib.sha384(register + digest).digest()
    return register


def rtmr3_of(events: list[EventLogEntry]) -> bytes:
    return fold(
        [dstack_digest(entry.event, bytes.fromhex(entry.event_payload)) for entry in events if entry.imr == 3]
    )


def replaced(events: list[EventLogEntry], index: int, **changes: object) -> list[EventLogEntry]:
    copy = list(events)
    copy[index] = copy[index].model_copy(update=changes)
    return copy


def synthetic_verified_quote(**changes: object) -> VerifiedQuote:
    fields: dict[str, object] = {
        "quote_sha256": "00" * 32,
        "tcb_status": "UpToDate",
        "advisory_ids": (),
        "report_data": runner_key_binding(HPKE_KEYS, SIGN_PUB),
        "mr_td": ZERO48,
        "mr_config_id": ZERO48,
        "mr_owner": ZERO48,
        "mr_owner_config": ZERO48,
        "mr_seam": ZERO48,
        "rtmr0": ZERO48,
        "rtmr1": ZERO48,
        "rtmr2": ZERO48,
        "rtmr3": rtmr3_of(boot_log()),
        "td_attributes": bytes(8),
        "tee_tcb_svn": bytes(16),
    }
    fields.update(changes)
    return VerifiedQuote(**fields)  # type: ignore[arg-type]


def tdx_document(quote: bytes, **changes: object) -> AttestationDocument:
    fields: dict[str, object] = {
        "runner_id": "runner_abc123",
        "tee": TeeKind.TDX,
        "version": "0.1.0",
        "app_id": APP_ID,
        "compose_hash": COMPOSE_HASH,
        "instance_id": INSTANCE_ID,
        "quote": quote.hex(),
        "event_log": [entry.model_dump() for entry in boot_log()],
        "hpke_public_keys": HPKE_KEYS,
        "sign_pub": SIGN_PUB,
        "published_at": GOOD_AT,
    }
    fields.update(changes)
    return AttestationDocument.model_validate(fields)


def simulated_document(**changes: object) -> AttestationDocument:
    fields: dict[str, object] = {
        "runner_id": "runner_local1",
        "tee": TeeKind.SIMULATED,
        "version": "0.1.0",
        "app_id": "simulated",
        "compose_hash": COMPOSE_HASH,
        "quote": "",
        "event_log": [],
        "hpke_public_keys": HPKE_KEYS,
        "sign_pub": SIGN_PUB,
        "published_at": GOOD_AT,
    }
    fields.update(changes)
    return AttestationDocument.model_validate(fields)


def trust_for(*hashes: str) -> RunnerTrust:
    return RunnerTrust(mode=RunnerTrustMode.OWNER_APPROVED, allowed_compose_hashes=list(hashes))


# --- report_data ---------------------------------------------------------------------------------


def test_report_data_is_sha512_of_context_hpke_and_sign_keys() -> None:
    expected = hashlib.sha512(
        b"hivemind-runner-v1"
        + json.dumps(HPKE_KEYS, sort_keys=True, separators=(",", ":")).encode()
        + bytes(range(200, 232))
    ).digest()
    assert runner_key_binding(HPKE_KEYS, SIGN_PUB) == expected
    assert len(expected) == 64


def test_hpke_encoding_binds_every_suite_regardless_of_order() -> None:
    reordered = dict(reversed(list(HPKE_KEYS.items())))
    assert hpke_public_keys_encoding(reordered) == hpke_public_keys_encoding(HPKE_KEYS)
    assert runner_key_binding(reordered, SIGN_PUB) == runner_key_binding(HPKE_KEYS, SIGN_PUB)


@pytest.mark.parametrize(
    ("hpke_keys", "sign_pub"),
    [
        ({**HPKE_KEYS, "x25519": b64encode(bytes(range(101, 133)))}, SIGN_PUB),  # fallback suite swapped
        ({**HPKE_KEYS, "mlkem768-x25519": b64encode(bytes(1216))}, SIGN_PUB),  # hybrid suite swapped
        ({"mlkem768-x25519": HPKE_KEYS["mlkem768-x25519"]}, SIGN_PUB),  # fallback suite stripped
        (
            {"x25519-v2": HPKE_KEYS["x25519"], "mlkem768-x25519": HPKE_KEYS["mlkem768-x25519"]},
            SIGN_PUB,
        ),  # renamed
        (HPKE_KEYS, b64encode(bytes(range(201, 233)))),  # receipt key swapped
    ],
)
def test_swapping_any_key_breaks_report_data(hpke_keys: dict[str, str], sign_pub: str) -> None:
    verified = synthetic_verified_quote()
    check_report_data(verified, tdx_document(b"\x01"))
    with pytest.raises(ReportDataMismatch):
        check_report_data(verified, tdx_document(b"\x01", hpke_public_keys=hpke_keys, sign_pub=sign_pub))


def test_report_data_with_one_flipped_byte_is_refused() -> None:
    binding = bytearray(runner_key_binding(HPKE_KEYS, SIGN_PUB))
    binding[17] ^= 0x80
    with pytest.raises(ReportDataMismatch):
        check_report_data(synthetic_verified_quote(report_data=bytes(binding)), tdx_document(b"\x01"))


def test_report_data_context_is_part_of_the_binding() -> None:
    other_context = hashlib.sha512(
        b"hivemind-runner-v0" + hpke_public_keys_encoding(HPKE_KEYS) + bytes(range(200, 232))
    )
    with pytest.raises(ReportDataMismatch):
        check_report_data(synthetic_verified_quote(report_data=other_context.digest()), tdx_document(b"\x01"))


def test_report_data_refuses_a_sign_key_of_the_wrong_size() -> None:
    with pytest.raises(InvalidInput):
        report_data(b"hpke", bytes(31))
    with pytest.raises(ValidationError):
        tdx_document(b"\x01", sign_pub=b64encode(bytes(33)))


# --- DCAP quote verification with the real Intel-signed quotes -----------------------------------


def test_good_quote_verifies_up_to_date(good_quote: bytes, good_collateral: dict) -> None:
    verified = verify_quote(good_quote, good_collateral, now=GOOD_AT)
    assert verified.tcb_status == "UpToDate"
    assert verified.advisory_ids == ()
    assert verified.report_data.hex().startswith("9a9d48e7f6799642d3d1b34e")
    assert verified.rtmr3 == ZERO48
    assert verified.mr_config_id == ZERO48
    assert verified.quote_sha256 == hashlib.sha256(good_quote).hexdigest()
    check_tcb_status(verified)


def test_good_quote_verifies_with_a_collateral_model(good_quote: bytes, vectors: Path) -> None:
    collateral = StaticCollateral.from_file(vectors / "tdx_quote_collateral.json").collateral_for(
        good_quote, now=0
    )
    assert verify_quote(good_quote, collateral, now=GOOD_AT).tcb_status == "UpToDate"


def test_quote_refused_before_its_tcb_info_was_issued(good_quote: bytes, good_collateral: dict) -> None:
    with pytest.raises(QuoteVerificationError, match="issue date is in the future"):
        verify_quote(good_quote, good_collateral, now=BEFORE_TCB_INFO)


def test_quote_refused_now_because_the_collateral_expired(good_quote: bytes, good_collateral: dict) -> None:
    with pytest.raises(QuoteVerificationError, match="Expired"):
        verify_quote(good_quote, good_collateral, now=int(time.time()))


def test_outdated_quote_refused(vectors: Path) -> None:
    quote = (vectors / "tdx_quote_outdated").read_bytes()
    collateral = json.loads((vectors / "tdx_quote_outdated_collateral.json").read_text())
    with pytest.raises(QuoteVerificationError, match="No matching TCB level"):
        verify_quote(quote, collateral, now=OUTDATED_AT)


@pytest.mark.parametrize(
    "position", [0, 8, 28, 47, 48, 64, 200, 48 + 136, 48 + 520, 48 + 583, SIGNED_BODY - 1]
)
def test_quote_with_a_flipped_signed_byte_is_refused(
    good_quote: bytes, good_collateral: dict, position: int
) -> None:
    tampered = bytearray(good_quote)
    tampered[position] ^= 0x01
    with pytest.raises(QuoteVerificationError):
        verify_quote(bytes(tampered), good_collateral, now=GOOD_AT)


def test_quote_with_another_platforms_collateral_is_refused(good_quote: bytes, vectors: Path) -> None:
    other = json.loads((vectors / "tdx_quote_outdated_collateral.json").read_text())
    with pytest.raises(QuoteVerificationError):
        verify_quote(good_quote, other, now=GOOD_AT)


def test_quote_with_tampered_collateral_is_refused(good_quote: bytes, good_collateral: dict) -> None:
    tcb_info = json.loads(good_collateral["tcb_info"])
    tcb_info["tcbLevels"][0]["tcbStatus"] = "UpToDate"
    tcb_info["nextUpdate"] = "2099-01-01T00:00:00Z"
    tampered = {**good_collateral, "tcb_info": json.dumps(tcb_info, separators=(",", ":"))}
    with pytest.raises(QuoteVerificationError):
        verify_quote(good_quote, tampered, now=GOOD_AT)


def test_malformed_collateral_fails_closed(good_quote: bytes, good_collateral: dict) -> None:
    incomplete = {key: value for key, value in good_collateral.items() if key != "tcb_info"}
    with pytest.raises(CollateralUnavailable):
        verify_quote(good_quote, incomplete, now=GOOD_AT)
    with pytest.raises(CollateralUnavailable):
        StaticCollateral(incomplete)


def test_verified_report_of_a_debug_td_is_refused(good_quote: bytes, good_collateral: dict) -> None:
    report = json.loads(
        attestation.dcap_qvl.verify(
            good_quote, QuoteCollateral(**good_collateral).to_dcap(), GOOD_AT
        ).to_json()
    )
    report["report"]["TD10"]["td_attributes"] = "01" + report["report"]["TD10"]["td_attributes"][2:]
    with pytest.raises(QuoteVerificationError, match="debug TD"):
        attestation._verified_quote_from_report(json.dumps(report), good_quote)


def test_verified_report_of_an_sgx_enclave_is_refused(good_quote: bytes) -> None:
    report = {"status": "UpToDate", "advisory_ids": [], "report": {"SgxEnclave": {"report_data": "00" * 64}}}
    with pytest.raises(QuoteVerificationError, match="not an Intel TDX quote"):
        attestation._verified_quote_from_report(json.dumps(report), good_quote)


# --- TCB status policy ---------------------------------------------------------------------------


def test_default_tcb_policy_accepts_only_up_to_date() -> None:
    check_tcb_status(synthetic_verified_quote())
    for status in ("SWHardeningNeeded", "ConfigurationNeeded", "OutOfDate", "Revoked", "SomethingNew"):
        with pytest.raises(TcbStatusError, match=status):
            check_tcb_status(synthetic_verified_quote(tcb_status=status))


def test_relaxed_policy_needs_every_advisory_named() -> None:
    policy = TcbPolicy(
        accepted_statuses={"UpToDate", "SWHardeningNeeded"}, allowed_advisory_ids={"INTEL-SA-00615"}
    )
    check_tcb_status(
        synthetic_verified_quote(tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00615",)), policy
    )
    with pytest.raises(TcbStatusError, match="INTEL-SA-00828"):
        check_tcb_status(
            synthetic_verified_quote(
                tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00615", "INTEL-SA-00828")
            ),
            policy,
        )
    with pytest.raises(TcbStatusError, match="OutOfDate"):
        check_tcb_status(synthetic_verified_quote(tcb_status="OutOfDate"), policy)


def test_up_to_date_with_an_unnamed_advisory_is_refused() -> None:
    with pytest.raises(TcbStatusError, match="INTEL-SA-00334"):
        check_tcb_status(synthetic_verified_quote(advisory_ids=("INTEL-SA-00334",)))


def test_tcb_policy_never_accepts_revoked_and_rejects_typos() -> None:
    with pytest.raises(ValidationError, match="revoked"):
        TcbPolicy(accepted_statuses={"UpToDate", "Revoked"})
    with pytest.raises(ValidationError):
        TcbPolicy(accepted_statuses={"OK"})
    with pytest.raises(ValidationError):
        TcbPolicy(accepted_statuses=set())


# --- event-log replay ----------------------------------------------------------------------------


def test_replay_extends_each_register_in_order() -> None:
    events = boot_log()
    replayed = replay_event_log(events)
    assert replayed.rtmr0 == fold([hashlib.sha384(b"td-hob").digest(), hashlib.sha384(b"cfv").digest()])
    assert replayed.rtmr1 == fold([hashlib.sha384(b"kernel").digest()])
    assert replayed.rtmr2 == fold([hashlib.sha384(b"cmdline").digest()])
    assert replayed.rtmr3 == rtmr3_of(events)
    assert replay_event_log([]).rtmr3 == ZERO48


def test_compose_hash_and_identity_come_from_the_boot_events() -> None:
    events = boot_log()
    assert compose_hash_from_event_log(events, rtmr3_of(events)) == COMPOSE_HASH
    identity = dstack_identity_from_event_log(events, rtmr3_of(events))
    assert (identity.compose_hash, identity.app_id, identity.instance_id) == (
        COMPOSE_HASH,
        APP_ID,
        INSTANCE_ID,
    )


def test_runtime_events_without_digest_are_recomputed() -> None:
    stripped = [
        entry.model_copy(update={"digest": ""}) if entry.event_type == RUNTIME else entry
        for entry in boot_log()
    ]
    assert compose_hash_from_event_log(stripped, rtmr3_of(boot_log())) == COMPOSE_HASH


def test_tampered_payload_with_its_old_digest_is_refused() -> None:
    events = boot_log()
    tampered = replaced(events, 6, event_payload=hashlib.sha256(b"evil compose").hexdigest())
    with pytest.raises(EventLogError, match="does not match its payload"):
        compose_hash_from_event_log(tampered, rtmr3_of(events))


def test_tampered_payload_with_a_matching_digest_breaks_the_replay() -> None:
    events = boot_log()
    evil = hashlib.sha256(b"evil compose").digest()
    tampered = replaced(events, 6, event_payload=evil.hex(), digest=dstack_digest("compose-hash", evil).hex())
    with pytest.raises(EventLogError, match="replays to RTMR3"):
        compose_hash_from_event_log(tampered, rtmr3_of(events))


def test_reordered_log_is_refused() -> None:
    events = boot_log()
    reordered = list(events)
    reordered[5], reordered[6] = reordered[6], reordered[5]
    with pytest.raises(EventLogError, match="replays to RTMR3"):
        compose_hash_from_event_log(reordered, rtmr3_of(events))


def test_truncated_log_is_refused() -> None:
    events = boot_log()
    with pytest.raises(EventLogError, match="replays to RTMR3"):
        compose_hash_from_event_log(events[:-1], rtmr3_of(events))


def test_rtmr3_mismatch_is_refused() -> None:
    events = boot_log()
    wrong = bytearray(rtmr3_of(events))
    wrong[0] ^= 0x01
    with pytest.raises(EventLogError, match="replays to RTMR3"):
        compose_hash_from_event_log(events, bytes(wrong))
    with pytest.raises(EventLogError):
        compose_hash_from_event_log(events, ZERO48[:32])


def test_missing_compose_hash_event_is_refused() -> None:
    events = [entry for entry in boot_log() if entry.event != "compose-hash"]
    with pytest.raises(EventLogError, match="no 'compose-hash' event"):
        compose_hash_from_event_log(events, rtmr3_of(events))


def test_compose_hash_only_after_system_ready_is_refused() -> None:
    """An app can extend RTMR3 after boot; such a claim must not count as the compose hash."""
    events = [entry for entry in boot_log() if entry.event != "compose-hash"]
    events.append(runtime_event("compose-hash", bytes.fromhex(COMPOSE_HASH)))
    with pytest.raises(EventLogError, match="no 'compose-hash' event"):
        compose_hash_from_event_log(events, rtmr3_of(events))


def test_two_boot_compose_hashes_are_refused() -> None:
    events = boot_log()
    events.insert(7, runtime_event("compose-hash", hashlib.sha256(b"second").digest()))
    with pytest.raises(EventLogError, match="2 times"):
        compose_hash_from_event_log(events, rtmr3_of(events))


def test_log_without_system_ready_is_refused() -> None:
    events = [entry for entry in boot_log() if entry.event != "system-ready"]
    with pytest.raises(EventLogError, match="system-ready"):
        compose_hash_from_event_log(events, rtmr3_of(events))


def test_compose_hash_event_from_firmware_is_refused() -> None:
    events = boot_log()
    events[6] = EventLogEntry(
        imr=3,
        event_type=0x1,
        digest=dstack_digest("compose-hash", b"x").hex(),
        event="compose-hash",
        event_payload="",
    )
    rtmr3 = replay_event_log(events).rtmr3
    with pytest.raises(EventLogError, match="not a dstack runtime event"):
        compose_hash_from_event_log(events, rtmr3)


def test_malformed_compose_hash_payload_is_refused() -> None:
    events = replaced(boot_log(), 6, digest="", event_payload="abcd")
    with pytest.raises(EventLogError, match="32-byte"):
        compose_hash_from_event_log(events, rtmr3_of(events))


def test_firmware_event_without_digest_is_refused() -> None:
    events = replaced(boot_log(), 0, digest="")
    with pytest.raises(EventLogError, match="no digest"):
        replay_event_log(events)


# --- the whole chain -----------------------------------------------------------------------------


def test_real_quote_passes_dcap_and_tcb_then_fails_report_data(
    good_quote: bytes, good_collateral: dict
) -> None:
    document = tdx_document(good_quote)
    with pytest.raises(ReportDataMismatch):
        verify_attestation(
            document,
            collateral=StaticCollateral(good_collateral),
            now=GOOD_AT,
            trust=trust_for(COMPOSE_HASH),
            allow_simulated=False,
        )


def test_real_quote_chain_stops_at_the_first_failing_step(good_quote: bytes, good_collateral: dict) -> None:
    document = tdx_document(good_quote)
    common = {"trust": trust_for(COMPOSE_HASH), "allow_simulated": True}
    with pytest.raises(QuoteVerificationError):
        verify_attestation(
            document, collateral=StaticCollateral(good_collateral), now=BEFORE_TCB_INFO, **common
        )
    with pytest.raises(CollateralUnavailable):
        verify_attestation(document, collateral=None, now=GOOD_AT, **common)
    strict = TcbPolicy(accepted_statuses={"SWHardeningNeeded"})
    with pytest.raises(TcbStatusError):
        verify_attestation(
            document, collateral=StaticCollateral(good_collateral), now=GOOD_AT, tcb_policy=strict, **common
        )


@pytest.fixture
def dcap_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand in for step 1 with a quote that binds our keys and our log: tests the later steps' wiring."""
    monkeypatch.setattr(
        attestation, "verify_quote", lambda quote, collateral, *, now: synthetic_verified_quote()
    )


@pytest.mark.usefixtures("dcap_passes")
def test_tdx_chain_after_dcap_yields_the_verified_runner(good_collateral: dict) -> None:
    runner = verify_attestation(
        tdx_document(b"\x01\x02"),
        collateral=StaticCollateral(good_collateral),
        now=GOOD_AT,
        trust=trust_for(COMPOSE_HASH),
        allow_simulated=False,
    )
    assert runner.compose_hash == COMPOSE_HASH
    assert runner.hpke_public_keys == HPKE_KEYS
    assert runner.sign_pub == SIGN_PUB
    assert runner.quote_sha256 == hashlib.sha256(b"\x01\x02").hexdigest()
    assert (runner.tcb_status, runner.simulated, runner.trust_checked) == ("UpToDate", False, True)


@pytest.mark.usefixtures("dcap_passes")
def test_tdx_chain_refuses_an_untrusted_compose_hash(good_collateral: dict) -> None:
    with pytest.raises(ComposeHashNotTrusted, match=COMPOSE_HASH):
        verify_attestation(
            tdx_document(b"\x01"),
            collateral=StaticCollateral(good_collateral),
            now=GOOD_AT,
            trust=trust_for(hashlib.sha256(b"other").hexdigest()),
            allow_simulated=False,
        )


@pytest.mark.usefixtures("dcap_passes")
@pytest.mark.parametrize(
    "claim",
    [
        {"compose_hash": hashlib.sha256(b"claimed").hexdigest()},
        {"app_id": "ef" * 20},
        {"instance_id": "ef" * 20},
        {"instance_id": None},
    ],
)
def test_tdx_chain_refuses_a_document_that_contradicts_its_log(good_collateral: dict, claim: dict) -> None:
    with pytest.raises(EventLogError, match="attested event log records"):
        verify_attestation(
            tdx_document(b"\x01", **claim),
            collateral=StaticCollateral(good_collateral),
            now=GOOD_AT,
            trust=None,
            allow_simulated=False,
        )


@pytest.mark.usefixtures("dcap_passes")
def test_tdx_chain_refuses_a_tampered_event_log(good_collateral: dict) -> None:
    events = [entry.model_dump() for entry in boot_log()]
    events[5], events[6] = events[6], events[5]
    with pytest.raises(EventLogError):
        verify_attestation(
            tdx_document(b"\x01", event_log=events),
            collateral=StaticCollateral(good_collateral),
            now=GOOD_AT,
            trust=None,
            allow_simulated=False,
        )


@pytest.mark.usefixtures("dcap_passes")
def test_tdx_chain_accepts_an_operator_release_for_the_attested_app(good_collateral: dict) -> None:
    operator = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    trust = RunnerTrust(
        mode=RunnerTrustMode.OPERATOR_UPDATES,
        allowed_compose_hashes=[],
        operator_sign_pub=operator_public_key(operator),
    )

    def document_with_release(app_id: str) -> AttestationDocument:
        statement = ReleaseStatement(
            app_id=app_id, compose_hash=COMPOSE_HASH, version="0.1.0", issued_at=GOOD_AT
        )
        return tdx_document(b"\x01", release=sign_release(statement, operator).model_dump())

    common = {"collateral": StaticCollateral(good_collateral), "now": GOOD_AT, "allow_simulated": False}
    assert verify_attestation(document_with_release(APP_ID), trust=trust, **common).trust_checked
    with pytest.raises(ComposeHashNotTrusted, match="for app"):
        verify_attestation(document_with_release("ef" * 20), trust=trust, **common)


def test_simulated_runner_refused_unless_allowed() -> None:
    with pytest.raises(SimulatedTeeRefused):
        verify_attestation(
            simulated_document(),
            collateral=None,
            now=GOOD_AT,
            trust=trust_for(COMPOSE_HASH),
            allow_simulated=False,
        )


def test_simulated_runner_allowed_is_marked_and_still_trust_checked() -> None:
    runner = verify_attestation(
        simulated_document(),
        collateral=None,
        now=GOOD_AT,
        trust=trust_for(COMPOSE_HASH),
        allow_simulated=True,
    )
    assert runner.simulated is True
    assert runner.tcb_status is None
    assert runner.trust_checked is True
    assert runner.hpke_public_keys == HPKE_KEYS
    assert runner.quote_sha256 == hashlib.sha256(b"").hexdigest()
    with pytest.raises(ComposeHashNotTrusted):
        verify_attestation(
            simulated_document(),
            collateral=None,
            now=GOOD_AT,
            trust=trust_for(hashlib.sha256(b"other").hexdigest()),
            allow_simulated=True,
        )


def test_verifying_without_a_room_says_so() -> None:
    runner = verify_attestation(
        simulated_document(), collateral=None, now=GOOD_AT, trust=None, allow_simulated=True
    )
    assert runner.trust_checked is False


def test_document_shapes_are_enforced() -> None:
    with pytest.raises(ValidationError, match="no quote"):
        simulated_document(quote="00")
    with pytest.raises(ValidationError, match="needs its quote"):
        tdx_document(b"")
    with pytest.raises(ValidationError, match="needs its quote"):
        tdx_document(b"\x01", event_log=[])
    with pytest.raises(ValidationError, match="lowercase hex"):
        tdx_document(b"\x01", app_id="AB" * 20)
    with pytest.raises(ValidationError):
        tdx_document(b"\x01", hpke_public_keys={})
    with pytest.raises(ValidationError):
        tdx_document(b"\x01", surprise="field")
    document = tdx_document(b"\x01")
    assert AttestationDocument.model_validate_json(document.model_dump_json()) == document


# --- collateral provider -------------------------------------------------------------------------


class FakePcs:
    def __init__(self, collateral: QuoteCollateral | None):
        self.collateral = collateral
        self.calls = 0

    def __call__(self, pccs_url: str, quote: bytes) -> QuoteCollateral:
        self.calls += 1
        if self.collateral is None:
            raise RuntimeError("network unreachable")
        return self.collateral


def test_pcs_provider_caches_with_private_permissions(
    tmp_path: Path, good_quote: bytes, good_collateral: dict
) -> None:
    fetch = FakePcs(QuoteCollateral(**good_collateral))
    cache = tmp_path / "collateral"
    provider = PcsCollateralProvider(cache, fetch=fetch)
    first = provider.collateral_for(good_quote, now=GOOD_AT)
    second = PcsCollateralProvider(cache, fetch=fetch).collateral_for(good_quote, now=GOOD_AT)
    assert first == second == QuoteCollateral(**good_collateral)
    assert fetch.calls == 1
    (cached,) = cache.iterdir()
    assert stat.S_IMODE(os.stat(cached).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    verify_quote(good_quote, second, now=GOOD_AT)


def test_pcs_provider_refetches_expired_and_corrupt_cache(
    tmp_path: Path, good_quote: bytes, good_collateral: dict
) -> None:
    fetch = FakePcs(QuoteCollateral(**good_collateral))
    provider = PcsCollateralProvider(tmp_path, fetch=fetch)
    provider.collateral_for(good_quote, now=GOOD_AT)
    provider.collateral_for(good_quote, now=int(time.time()))  # past nextUpdate: fetch again
    assert fetch.calls == 2
    (cached,) = tmp_path.iterdir()
    cached.write_text("{not json")
    provider.collateral_for(good_quote, now=GOOD_AT)
    assert fetch.calls == 3


def test_pcs_provider_fails_closed_without_collateral(
    tmp_path: Path, good_quote: bytes, good_collateral: dict
) -> None:
    with pytest.raises(CollateralUnavailable, match="network unreachable"):
        PcsCollateralProvider(tmp_path, fetch=FakePcs(None)).collateral_for(good_quote, now=GOOD_AT)
    PcsCollateralProvider(tmp_path, fetch=FakePcs(QuoteCollateral(**good_collateral))).collateral_for(
        good_quote, now=GOOD_AT
    )
    with pytest.raises(CollateralUnavailable, match="expired"):
        PcsCollateralProvider(tmp_path, fetch=FakePcs(None)).collateral_for(good_quote, now=int(time.time()))


def test_collateral_next_update_is_the_earliest_expiry(good_collateral: dict) -> None:
    collateral = QuoteCollateral(**good_collateral)
    assert BEFORE_TCB_INFO < GOOD_AT < collateral.next_update() < int(time.time())
    assert QuoteCollateral(**{**good_collateral, "pck_crl": "00"}).next_update() == 0


# --- loopback ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080",
        "http://127.8.9.10/v1",
        "http://[::1]:9000/v1/attestation",
        "http://localhost:8000",
        "https://LOCALHOST./",
        "http://[::ffff:127.0.0.1]:80",
    ],
)
def test_loopback_services(url: str) -> None:
    assert is_loopback_service(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.hivemind.example",
        "http://10.0.0.1",
        "http://0.0.0.0:8000",
        "http://localhost.evil.example",
        "http://127.0.0.1.nip.io",
        "http://[::2]",
        "not a url",
        "",
    ],
)
def test_non_loopback_services(url: str) -> None:
    assert not is_loopback_service(url)


def test_document_quote_hash_is_sha256_of_the_raw_quote() -> None:
    document = tdx_document(b"\xde\xad")
    assert document.quote_sha256 == hashlib.sha256(b"\xde\xad").hexdigest()
