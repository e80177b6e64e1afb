"""Runner attestation: the document a runner publishes, and the client's verification of it (DESIGN §6).

A runner proves three things with one Intel TDX quote:

- it runs on genuine, patched TDX hardware (DCAP quote verification, TCB status);
- its run-envelope and receipt keys are the ones in the quote (``report_data`` binds them, §16.2);
- it runs a dstack app whose compose hash the room trusts (RTMR3 event-log replay, runner trust).

Verification is a chain of explicit steps, each with its own function and error:

1. :func:`verify_quote`: DCAP signature chain and collateral -> ``quote_invalid`` / ``collateral_unavailable``
2. :func:`check_tcb_status`: platform TCB status and advisories -> ``tcb_status_rejected``
3. :func:`check_report_data`: the quote binds the published keys -> ``report_data_mismatch``
4. :func:`dstack_identity_from_event_log`: RTMR3 replay, compose hash / app id -> ``event_log_invalid``
5. :func:`hivemind.trust.check_runner_trust`: the room trusts the compose hash -> ``compose_hash_not_trusted``

:func:`verify_attestation` runs them in that order and returns a :class:`VerifiedRunner`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Protocol, Self
from urllib.parse import urlsplit

import dcap_qvl
from cryptography import x509
from pydantic import AfterValidator, Field, ValidationError, model_validator

from hivemind.canonical import canonical_json
from hivemind.encoding import b64decode, sha256_hex
from hivemind.errors import (
    CollateralUnavailable,
    EventLogError,
    InvalidInput,
    QuoteVerificationError,
    ReportDataMismatch,
    SimulatedTeeRefused,
    TcbStatusError,
)
from hivemind.models import (
    Ed25519PublicB64,
    Identifier,
    Sha256Hex,
    StrictModel,
    TeeKind,
    UnixSeconds,
    b64url_bytes,
)
from hivemind.trust import RunnerTrust, SignedRelease, check_runner_trust

RUNNER_BINDING_CONTEXT = b"hivemind-runner-v1"
REPORT_DATA_BYTES = 64
SIGN_PUB_BYTES = 32
RTMR_BYTES = 48

# dstack's event type for the runtime events it extends into RTMR3 (cc-eventlog).
DSTACK_RUNTIME_EVENT_TYPE = 0x08000001
COMPOSE_HASH_EVENT = "compose-hash"
APP_ID_EVENT = "app-id"
INSTANCE_ID_EVENT = "instance-id"
SYSTEM_READY_EVENT = "system-ready"
_IDENTITY_EVENTS = (COMPOSE_HASH_EVENT, APP_ID_EVENT, INSTANCE_ID_EVENT, SYSTEM_READY_EVENT)
_LOWER_HEX = re.compile(r"(?:[0-9a-f]{2})+")

HexBytes = Annotated[str, Field(pattern=r"^(?:[0-9a-fA-F]{2})*$", max_length=131_072)]
HpkeSuiteName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._+-]{0,63}$")]
# Any suite's public key, known or not (the binding covers them all); 6144 bytes is 8192 characters.
HpkePublicKeyB64 = Annotated[str, AfterValidator(b64url_bytes(1, 6144, "an HPKE public key"))]


def _utc(now: int) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- report_data: binding the runner's keys into the quote ------------------------------------


def report_data(hpke_pub: bytes, sign_pub: bytes) -> bytes:
    """``SHA-512(b"hivemind-runner-v1" || hpke_pub || sign_pub)``: the 64 bytes the quote must carry.

    ``sign_pub`` is always a 32-byte Ed25519 key, so the concatenation is unambiguous even though
    ``hpke_pub`` has no fixed length.
    """
    if len(sign_pub) != SIGN_PUB_BYTES:
        raise InvalidInput(f"sign_pub must be a {SIGN_PUB_BYTES}-byte Ed25519 public key")
    if not hpke_pub:
        raise InvalidInput("hpke_pub must not be empty")
    return hashlib.sha512(RUNNER_BINDING_CONTEXT + hpke_pub + sign_pub).digest()


def hpke_public_keys_encoding(hpke_public_keys: Mapping[str, str]) -> bytes:
    """The ``hpke_pub`` bytes of :func:`report_data`: JCS of ``{suite: base64url public key}``.

    Every published suite is bound, so the control plane cannot strip or swap the fallback suite.
    """
    if not hpke_public_keys:
        raise InvalidInput("a runner publishes at least one HPKE public key")
    return canonical_json(dict(hpke_public_keys))


def runner_key_binding(hpke_public_keys: Mapping[str, str], sign_pub: str) -> bytes:
    """The report_data for a runner's published keys; the runner and the client both call this."""
    try:
        sign_pub_raw = b64decode(sign_pub)
    except InvalidInput:
        raise InvalidInput("sign_pub is not base64url") from None
    return report_data(hpke_public_keys_encoding(hpke_public_keys), sign_pub_raw)


# --- the attestation document ------------------------------------------------------------------


class EventLogEntry(StrictModel):
    """One event of the TDX event log, in the shape dstack's guest agent reports it (hex bytes)."""

    imr: int = Field(ge=0, le=3)
    event_type: int = Field(ge=0, le=0xFFFFFFFF)
    # dstack leaves the digest empty for runtime events it derives from name and payload.
    digest: str = Field(pattern=r"^(?:[0-9a-fA-F]{96})?$")
    event: str = Field(max_length=256)
    event_payload: HexBytes

    def payload_bytes(self) -> bytes:
        return bytes.fromhex(self.event_payload)


def quote_sha256(quote: bytes) -> str:
    """Hex SHA-256 of the raw quote: what receipts record as the runner's quote hash."""
    return sha256_hex(quote)


class AttestationDocument(StrictModel):
    """What a runner publishes to the Runners table on start and on heartbeat (§6).

    The control plane relays it and cannot forge it: every field that matters is either bound into the
    quote (keys via report_data; compose hash, app id and instance id via RTMR3) or checked against it.
    """

    runner_id: Identifier
    tee: TeeKind
    version: str = Field(min_length=1, max_length=64)
    app_id: str = Field(min_length=1, max_length=128)
    compose_hash: Sha256Hex
    instance_id: str | None = Field(default=None, min_length=1, max_length=128)
    quote: HexBytes  # hex of the raw TDX quote; empty for a simulated runner
    event_log: list[EventLogEntry] = Field(max_length=4096)
    hpke_public_keys: dict[HpkeSuiteName, HpkePublicKeyB64] = Field(min_length=1, max_length=8)
    sign_pub: Ed25519PublicB64
    published_at: UnixSeconds
    release: SignedRelease | None = None  # operator release statement, for operator_updates rooms

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.tee is TeeKind.SIMULATED:
            if self.quote or self.event_log:
                raise ValueError("a simulated attestation document carries no quote and no event log")
        else:
            if not self.quote or not self.event_log:
                raise ValueError("a TDX attestation document needs its quote and its event log")
            if not _LOWER_HEX.fullmatch(self.app_id) or (
                self.instance_id is not None and not _LOWER_HEX.fullmatch(self.instance_id)
            ):
                raise ValueError(
                    "a TDX runner's app_id and instance_id are lowercase hex, as dstack reports them"
                )
        return self

    def quote_bytes(self) -> bytes:
        return bytes.fromhex(self.quote)

    @property
    def quote_sha256(self) -> str:
        return quote_sha256(self.quote_bytes())


# --- step 1: DCAP quote verification -----------------------------------------------------------


def _rfc3339_seconds(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


class QuoteCollateral(StrictModel):
    """Intel DCAP collateral in the JSON form ``dcap_qvl.QuoteCollateralV3.from_json`` reads.

    Binary fields (CRLs, signatures) are hex; chains are PEM; TCB info and QE identity are Intel's JSON.
    """

    pck_crl_issuer_chain: str
    root_ca_crl: str
    pck_crl: str
    tcb_info_issuer_chain: str
    tcb_info: str
    tcb_info_signature: str
    qe_identity_issuer_chain: str
    qe_identity: str
    qe_identity_signature: str
    pck_certificate_chain: str | None = None  # attached by dcap_qvl.get_collateral for some quote types

    @classmethod
    def from_dcap(cls, collateral: dcap_qvl.QuoteCollateralV3) -> QuoteCollateral:
        return cls.model_validate_json(collateral.to_json())

    def to_dcap(self) -> dcap_qvl.QuoteCollateralV3:
        return dcap_qvl.QuoteCollateralV3.from_json(self.model_dump_json(exclude_none=True))

    def next_update(self) -> int:
        """Earliest ``nextUpdate`` of the TCB info, QE identity and both CRLs; 0 if any is unreadable.

        Past this time verification fails (collateral expired), so a cache must fetch again.
        """
        try:
            times = [
                _rfc3339_seconds(json.loads(self.tcb_info)["nextUpdate"]),
                _rfc3339_seconds(json.loads(self.qe_identity)["nextUpdate"]),
            ]
            for crl_hex in (self.root_ca_crl, self.pck_crl):
                crl_next = x509.load_der_x509_crl(bytes.fromhex(crl_hex)).next_update_utc
                if crl_next is None:
                    return 0
                times.append(int(crl_next.timestamp()))
        except (ValueError, KeyError, TypeError):
            return 0
        return min(times)


@dataclass(frozen=True)
class VerifiedQuote:
    """What a DCAP-verified TDX quote says. Only :func:`verify_quote` makes these."""

    quote_sha256: str
    tcb_status: str
    advisory_ids: tuple[str, ...]
    report_data: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    mr_seam: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    td_attributes: bytes
    tee_tcb_svn: bytes


_TD_DEBUG_BIT = 0x01  # bit 0 of TD attributes (TUD.DEBUG): the host can read and write TD memory


def _verified_quote_from_report(report_json: str, quote: bytes) -> VerifiedQuote:
    """Turn dcap_qvl's verified report into a :class:`VerifiedQuote`; refuse non-TDX and debug TDs."""
    try:
        verified = json.loads(report_json)
        variants = verified["report"]
        ((variant, body),) = variants.items()
    except (ValueError, KeyError, TypeError, AttributeError):
        raise QuoteVerificationError("the verifier's report has an unexpected shape") from None
    if not variant.startswith("TD"):
        raise QuoteVerificationError(f"the quote is a {variant} quote, not an Intel TDX quote")

    def field(name: str, size: int) -> bytes:
        try:
            value = bytes.fromhex(body[name])
        except (KeyError, TypeError, ValueError):
            raise QuoteVerificationError(f"the verified TD report has no valid {name}") from None
        if len(value) != size:
            raise QuoteVerificationError(f"the verified TD report's {name} is {len(value)} bytes, not {size}")
        return value

    td_attributes = field("td_attributes", 8)
    if td_attributes[0] & _TD_DEBUG_BIT:
        raise QuoteVerificationError("the quote comes from a debug TD, whose memory the host can read")
    status = verified.get("status")
    advisories = verified.get("advisory_ids", [])
    if not isinstance(status, str) or not isinstance(advisories, list):
        raise QuoteVerificationError("the verifier's report has no TCB status")
    return VerifiedQuote(
        quote_sha256=quote_sha256(quote),
        tcb_status=status,
        advisory_ids=tuple(str(advisory) for advisory in advisories),
        report_data=field("report_data", REPORT_DATA_BYTES),
        mr_td=field("mr_td", RTMR_BYTES),
        mr_config_id=field("mr_config_id", RTMR_BYTES),
        mr_owner=field("mr_owner", RTMR_BYTES),
        mr_owner_config=field("mr_owner_config", RTMR_BYTES),
        mr_seam=field("mr_seam", RTMR_BYTES),
        rtmr0=field("rt_mr0", RTMR_BYTES),
        rtmr1=field("rt_mr1", RTMR_BYTES),
        rtmr2=field("rt_mr2", RTMR_BYTES),
        rtmr3=field("rt_mr3", RTMR_BYTES),
        td_attributes=td_attributes,
        tee_tcb_svn=field("tee_tcb_svn", 16),
    )


def verify_quote(quote: bytes, collateral: QuoteCollateral | Mapping[str, Any], *, now: int) -> VerifiedQuote:
    """DCAP-verify ``quote`` with ``collateral`` as of ``now`` (Unix seconds).

    Checks Intel's certificate chain and CRLs, the TCB info and QE identity signatures and validity
    windows, the QE report and the quote signature. Any failure raises QuoteVerificationError. The TCB
    status is returned, not judged: :func:`check_tcb_status` does that.
    """
    if isinstance(now, bool) or not isinstance(now, int) or now < 0:
        raise InvalidInput("now is integer Unix seconds")
    if not quote:
        raise QuoteVerificationError("the attestation has no quote")
    if not isinstance(collateral, QuoteCollateral):
        try:
            collateral = QuoteCollateral.model_validate(collateral)
        except ValidationError as exc:
            raise CollateralUnavailable(
                f"the DCAP collateral is malformed: {exc.error_count()} errors"
            ) from None
    try:
        dcap_collateral = collateral.to_dcap()
    except ValueError as exc:
        raise CollateralUnavailable(f"the DCAP collateral does not parse: {exc}") from None
    try:
        report = dcap_qvl.verify(quote, dcap_collateral, now)
        report_json = report.to_json()
    except (ValueError, RuntimeError) as exc:
        raise QuoteVerificationError(
            f"DCAP verification of the quote failed as of {_utc(now)}: {exc}"
        ) from None
    return _verified_quote_from_report(report_json, quote)


class CollateralProvider(Protocol):
    """Where verification gets DCAP collateral for a quote; injectable for tests and offline use."""

    def collateral_for(self, quote: bytes, *, now: int) -> QuoteCollateral: ...


class StaticCollateral:
    """A fixed collateral (tests, offline verification with collateral the user fetched themselves)."""

    def __init__(self, collateral: QuoteCollateral | Mapping[str, Any]):
        if isinstance(collateral, QuoteCollateral):
            self._collateral = collateral
            return
        try:
            self._collateral = QuoteCollateral.model_validate(collateral)
        except ValidationError as exc:
            raise CollateralUnavailable(
                f"the DCAP collateral is malformed: {exc.error_count()} errors"
            ) from None

    @classmethod
    def from_file(cls, path: Path) -> StaticCollateral:
        try:
            return cls(QuoteCollateral.model_validate_json(path.read_bytes()))
        except (OSError, ValidationError) as exc:
            raise CollateralUnavailable(f"cannot read DCAP collateral from {path}: {exc}") from None

    def collateral_for(self, quote: bytes, *, now: int) -> QuoteCollateral:
        return self._collateral


CollateralFetcher = Callable[[str, bytes], QuoteCollateral]


def fetch_collateral(pccs_url: str, quote: bytes) -> QuoteCollateral:
    """Fetch collateral for ``quote`` from a PCS/PCCS over the network (dcap_qvl.get_collateral)."""
    return QuoteCollateral.from_dcap(asyncio.run(dcap_qvl.get_collateral(pccs_url, quote)))


class PcsCollateralProvider:
    """Collateral from Intel PCS (or a PCCS), cached per platform in ``cache_dir`` (files 0600).

    A cached collateral is used until its earliest ``nextUpdate``; then it is fetched again. If it can
    be neither fetched nor read fresh from the cache, verification fails closed (CollateralUnavailable).
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        pccs_url: str = dcap_qvl.INTEL_PCS_URL,
        fetch: CollateralFetcher = fetch_collateral,
    ):
        self._cache_dir = cache_dir
        self._pccs_url = pccs_url
        self._fetch = fetch

    def _cache_path(self, quote: bytes) -> Path:
        # Collateral depends on the platform family (FMSPC), the issuing CA and, when dcap_qvl attaches
        # it, the platform's PCK chain; the key covers all three.
        try:
            parsed = dcap_qvl.parse_quote(quote)
            key = "|".join([parsed.fmspc(), parsed.ca(), sha256_hex(parsed.cert_chain_pem_bytes() or b"")])
        except ValueError as exc:
            raise QuoteVerificationError(f"the quote does not parse: {exc}") from None
        return self._cache_dir / f"collateral-{sha256_hex(key.encode())[:32]}.json"

    def _read_cache(self, path: Path) -> QuoteCollateral | None:
        try:
            return QuoteCollateral.model_validate_json(path.read_bytes())
        except (OSError, ValidationError):
            return None

    def _write_cache(self, path: Path, collateral: QuoteCollateral) -> None:
        self._cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(collateral.model_dump_json(exclude_none=True).encode())
        os.replace(temporary, path)

    def collateral_for(self, quote: bytes, *, now: int) -> QuoteCollateral:
        path = self._cache_path(quote)
        cached = self._read_cache(path)
        if cached is not None and cached.next_update() > now:
            return cached
        try:
            fresh = self._fetch(self._pccs_url, quote)
        except (ValueError, RuntimeError, OSError) as exc:
            stale = " (the cached copy has expired)" if cached is not None else ""
            raise CollateralUnavailable(
                f"cannot fetch DCAP collateral from {self._pccs_url}{stale}: {exc}; without it the runner "
                "cannot be verified"
            ) from None
        with contextlib.suppress(OSError):
            # A cache that cannot be written only costs a refetch next time.
            self._write_cache(path, fresh)
        return fresh


# --- step 2: TCB status policy -----------------------------------------------------------------


class TcbStatus(StrEnum):
    """Intel's TCB statuses, as dcap_qvl reports them."""

    UP_TO_DATE = "UpToDate"
    SW_HARDENING_NEEDED = "SWHardeningNeeded"
    CONFIGURATION_NEEDED = "ConfigurationNeeded"
    CONFIGURATION_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
    OUT_OF_DATE = "OutOfDate"
    OUT_OF_DATE_CONFIGURATION_NEEDED = "OutOfDateConfigurationNeeded"
    REVOKED = "Revoked"


class TcbPolicy(StrictModel):
    """Which TCB statuses a client accepts, and which Intel advisories it knowingly tolerates.

    The default accepts only ``UpToDate`` with no advisories. Relaxing it is explicit, e.g.
    ``TcbPolicy(accepted_statuses={"UpToDate", "SWHardeningNeeded"},
    allowed_advisory_ids={"INTEL-SA-00615"})``.
    """

    accepted_statuses: frozenset[TcbStatus] = frozenset({TcbStatus.UP_TO_DATE})
    allowed_advisory_ids: frozenset[str] = frozenset()

    @model_validator(mode="after")
    def _sane(self) -> Self:
        if not self.accepted_statuses:
            raise ValueError("a TCB policy accepts at least one status")
        if TcbStatus.REVOKED in self.accepted_statuses:
            raise ValueError("a revoked platform is never acceptable")
        return self


DEFAULT_TCB_POLICY = TcbPolicy()


def check_tcb_status(verified: VerifiedQuote, policy: TcbPolicy = DEFAULT_TCB_POLICY) -> None:
    """Raise TcbStatusError unless the platform's TCB status and every advisory are accepted."""
    accepted = sorted(status.value for status in policy.accepted_statuses)
    if verified.tcb_status not in accepted:
        raise TcbStatusError(
            f"the runner's platform TCB status is {verified.tcb_status}; "
            f"this client accepts {', '.join(accepted)}"
        )
    unexpected = sorted(set(verified.advisory_ids) - policy.allowed_advisory_ids)
    if unexpected:
        raise TcbStatusError(
            f"the runner's platform is affected by Intel advisories {', '.join(unexpected)}, which the TCB "
            "policy does not allow"
        )


# --- step 3: report_data -----------------------------------------------------------------------


def check_report_data(verified: VerifiedQuote, document: AttestationDocument) -> None:
    """Raise ReportDataMismatch unless the quote's report_data binds exactly the document's keys."""
    expected = runner_key_binding(document.hpke_public_keys, document.sign_pub)
    if not hmac.compare_digest(verified.report_data, expected):
        raise ReportDataMismatch(
            "the quote's report_data does not bind the published HPKE and signing keys: the keys were "
            "swapped, or the quote belongs to another runner"
        )


# --- step 4: event-log replay ------------------------------------------------------------------


@dataclass(frozen=True)
class Rtmrs:
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes


@dataclass(frozen=True)
class DstackIdentity:
    """What the RTMR3-verified event log says the TD booted: app, compose file, instance."""

    compose_hash: str
    app_id: str
    instance_id: str | None


def runtime_event_digest(event: str, payload: bytes) -> bytes:
    """dstack's (v1) runtime-event digest: ``SHA-384(u32le(event_type) ":" event ":" payload)``."""
    return hashlib.sha384(
        DSTACK_RUNTIME_EVENT_TYPE.to_bytes(4, "little") + b":" + event.encode() + b":" + payload
    ).digest()


def _extended_digest(index: int, entry: EventLogEntry) -> bytes:
    """The digest this entry extended into its register; a runtime event's is recomputed from its payload."""
    if entry.event_type == DSTACK_RUNTIME_EVENT_TYPE:
        computed = runtime_event_digest(entry.event, entry.payload_bytes())
        if entry.digest and not hmac.compare_digest(bytes.fromhex(entry.digest), computed):
            raise EventLogError(
                f"event {index} ({entry.event!r}) has a digest that does not match its payload"
            )
        return computed
    if not entry.digest:
        raise EventLogError(f"event {index} ({entry.event!r}, type {entry.event_type:#x}) has no digest")
    return bytes.fromhex(entry.digest)


def replay_event_log(events: Sequence[EventLogEntry]) -> Rtmrs:
    """Replay every register: ``rtmr = SHA-384(rtmr || digest)`` from 48 zero bytes, in log order."""
    registers = [bytes(RTMR_BYTES)] * 4
    for index, entry in enumerate(events):
        registers[entry.imr] = hashlib.sha384(registers[entry.imr] + _extended_digest(index, entry)).digest()
    return Rtmrs(*registers)


def _boot_payload(boot_events: Sequence[EventLogEntry], name: str, *, required: bool) -> bytes | None:
    matches = [entry for entry in boot_events if entry.event == name]
    if len(matches) > 1:
        # A second claim could only have been appended to muddle which one counts: refuse both.
        raise EventLogError(f"the event log records {name!r} {len(matches)} times")
    if not matches:
        if required:
            raise EventLogError(f"the event log has no {name!r} event before {SYSTEM_READY_EVENT!r}")
        return None
    return matches[0].payload_bytes()


def dstack_identity_from_event_log(events: Sequence[EventLogEntry], expected_rtmr3: bytes) -> DstackIdentity:
    """Replay the log, require RTMR3 to equal the quote's, and read the boot-time identity events.

    Only RTMR3 runtime events before ``system-ready`` count: dstack records app id, compose hash and
    instance id while booting, and anything the app extends later cannot override them.
    """
    if len(expected_rtmr3) != RTMR_BYTES:
        raise EventLogError(f"RTMR3 is {RTMR_BYTES} bytes, got {len(expected_rtmr3)}")
    replayed = replay_event_log(events).rtmr3
    if not hmac.compare_digest(replayed, expected_rtmr3):
        raise EventLogError(
            f"the event log replays to RTMR3 {replayed.hex()} but the quote says {expected_rtmr3.hex()}: the "
            "log was altered, reordered or truncated"
        )
    boot_events: list[EventLogEntry] = []
    for entry in events:
        if entry.imr != 3:
            continue
        if entry.event in _IDENTITY_EVENTS and entry.event_type != DSTACK_RUNTIME_EVENT_TYPE:
            raise EventLogError(f"event {entry.event!r} in RTMR3 is not a dstack runtime event")
        if entry.event == SYSTEM_READY_EVENT:
            break
        boot_events.append(entry)
    else:
        raise EventLogError(
            f"the event log has no {SYSTEM_READY_EVENT!r} event: the TD did not finish booting"
        )
    compose_hash = _boot_payload(boot_events, COMPOSE_HASH_EVENT, required=True)
    app_id = _boot_payload(boot_events, APP_ID_EVENT, required=True)
    instance_id = _boot_payload(boot_events, INSTANCE_ID_EVENT, required=False)
    if compose_hash is None or len(compose_hash) != hashlib.sha256().digest_size:
        raise EventLogError("the compose-hash event does not carry a 32-byte SHA-256")
    if not app_id:
        raise EventLogError("the app-id event is empty")
    return DstackIdentity(
        compose_hash=compose_hash.hex(),
        app_id=app_id.hex(),
        instance_id=instance_id.hex() if instance_id else None,
    )


def compose_hash_from_event_log(events: Sequence[EventLogEntry], expected_rtmr3: bytes) -> str:
    """The compose hash the RTMR3-verified event log records (hex)."""
    return dstack_identity_from_event_log(events, expected_rtmr3).compose_hash


def check_document_identity(identity: DstackIdentity, document: AttestationDocument) -> None:
    """Raise EventLogError unless the document claims the same compose hash, app id and instance id."""
    claims = (
        ("compose hash", document.compose_hash, identity.compose_hash),
        ("app id", document.app_id, identity.app_id),
        ("instance id", document.instance_id, identity.instance_id),
    )
    for what, claimed, attested in claims:
        if claimed != attested:
            raise EventLogError(
                f"the document claims {what} {claimed} but the attested event log records {attested}"
            )


# --- all steps ---------------------------------------------------------------------------------


class VerifiedRunner(StrictModel):
    """A runner whose attestation verified (or a simulated runner the caller chose to allow)."""

    runner_id: str
    tee: TeeKind
    version: str
    app_id: str
    instance_id: str | None
    compose_hash: Sha256Hex
    hpke_public_keys: dict[str, str]
    sign_pub: str
    quote_sha256: Sha256Hex
    tcb_status: str | None  # None for a simulated runner
    advisory_ids: tuple[str, ...]
    simulated: bool
    trust_checked: bool  # False when verified without a room's runner_trust (inspection only)


def verify_attestation(
    document: AttestationDocument,
    *,
    collateral: CollateralProvider | None,
    now: int,
    trust: RunnerTrust | None,
    tcb_policy: TcbPolicy = DEFAULT_TCB_POLICY,
    allow_simulated: bool,
) -> VerifiedRunner:
    """Run every verification step in order; the first failure raises its own error.

    ``trust=None`` verifies the runner without a room (``hmctl trust attest``); the result then says
    ``trust_checked=False`` and must not be used to seal a run.
    """
    if document.tee is TeeKind.SIMULATED:
        if not allow_simulated:
            raise SimulatedTeeRefused(
                f"runner {document.runner_id} is simulated (no TEE, no quote); this profile does not allow "
                "simulated runners"
            )
        if trust is not None:
            check_runner_trust(document.compose_hash, trust, document.release, app_id=document.app_id)
        return _verified_runner(document, tcb_status=None, advisory_ids=(), trust_checked=trust is not None)

    quote = document.quote_bytes()
    if collateral is None:
        raise CollateralUnavailable("no DCAP collateral source is configured; the runner cannot be verified")
    verified = verify_quote(quote, collateral.collateral_for(quote, now=now), now=now)
    check_tcb_status(verified, tcb_policy)
    check_report_data(verified, document)
    identity = dstack_identity_from_event_log(document.event_log, verified.rtmr3)
    check_document_identity(identity, document)
    if trust is not None:
        check_runner_trust(identity.compose_hash, trust, document.release, app_id=identity.app_id)
    return _verified_runner(
        document,
        tcb_status=verified.tcb_status,
        advisory_ids=verified.advisory_ids,
        trust_checked=trust is not None,
    )


def runner_as_published(document: AttestationDocument) -> VerifiedRunner:
    """The document's runner with nothing verified (``hmctl --dangerously-skip-attestations``): no TCB
    status, ``trust_checked`` False. Its keys are the document's word only."""
    return _verified_runner(document, tcb_status=None, advisory_ids=(), trust_checked=False)


def _verified_runner(
    document: AttestationDocument,
    *,
    tcb_status: str | None,
    advisory_ids: tuple[str, ...],
    trust_checked: bool,
) -> VerifiedRunner:
    return VerifiedRunner(
        runner_id=document.runner_id,
        tee=document.tee,
        version=document.version,
        app_id=document.app_id,
        instance_id=document.instance_id,
        compose_hash=document.compose_hash,
        hpke_public_keys=dict(document.hpke_public_keys),
        sign_pub=document.sign_pub,
        quote_sha256=document.quote_sha256,
        tcb_status=tcb_status,
        advisory_ids=advisory_ids,
        simulated=document.tee is TeeKind.SIMULATED,
        trust_checked=trust_checked,
    )


def is_loopback_service(url: str) -> bool:
    """True if ``url`` points at this machine (127.0.0.0/8, ::1, localhost): simulated runners are
    allowed by default only there."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    if not host:
        return False
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
