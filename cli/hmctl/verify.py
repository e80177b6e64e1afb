"""Client-side verification (DESIGN §6, §7): the runner set, the room's signed manifest, acceptance.

Each step is an explicit function with its own error, in the order a run needs them:

1. :func:`verify_room`: the signed manifest against the owner key the caller pins (the invite link's,
   or the profile's own), following the owner's key-rotation certificates when the key changed, for
   the room asked for, not older than the revision this profile accepted
   (``manifest_invalid`` / ``signature_invalid`` / ``key_rotation_invalid`` / ``manifest_rollback``).
2. :func:`check_acceptance`: the manifest is the one this profile accepted (``room accept``), or
   differs from it only by an owner key rotation proven by the certificates (``manifest_not_accepted``).
3. :func:`check_runners` and :func:`choose_runner`: each live runner's attestation document through
   :func:`hivemind.attestation.verify_attestation` (DCAP quote, TCB status, report_data binding of
   its keys, RTMR3 event-log replay, and the room's ``runner_trust``); simulated runners only when the
   profile allows them (by default: loopback services only). No verified runner: the most telling
   runner's error (``compose_hash_not_trusted``, ``simulated_tee_refused``, ...), listing every one.

``--dangerously-skip-attestations`` replaces step 3 with :func:`unverified_runner`; callers must say
so loudly and record it in their output.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from hivemind.attestation import (
    AttestationDocument,
    CollateralProvider,
    PcsCollateralProvider,
    VerifiedRunner,
    runner_as_published,
    verify_attestation,
)
from hivemind.canonical import canonical_sha256
from hivemind.errors import AttestationError, HivemindError, KeyRotationError, ManifestError
from hivemind.manifest import (
    RoomManifest,
    SignedKeyRotation,
    SignedManifest,
    follow_key_rotations,
    verify_manifest,
)
from hivemind.trust import RunnerTrust
from hmctl.errors import NotAccepted
from hmctl.profiles import AcceptedManifest, AcceptedManifests, Profile

# Fields an owner key rotation changes; everything else is the room's terms.
_KEY_FIELDS = frozenset({"owner_sign_pub", "owner_box_pub", "revision"})


# --- the room ---------------------------------------------------------------------------------------


def parse_signed_manifest(document: Mapping[str, Any]) -> SignedManifest:
    try:
        return SignedManifest.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "$"
        raise ManifestError(
            f"the service sent a malformed signed manifest: {where}: {error['msg']}"
        ) from None


def parse_rotations(documents: Sequence[Any] | None) -> list[SignedKeyRotation]:
    """The owner's key-rotation certificates as the service relays them (it cannot forge them)."""
    rotations: list[SignedKeyRotation] = []
    for document in documents or []:
        try:
            rotations.append(SignedKeyRotation.model_validate(document))
        except ValidationError:
            raise KeyRotationError("the service sent a malformed key-rotation certificate") from None
    return rotations


def verify_room(
    signed: SignedManifest,
    *,
    room_id: str,
    pinned_sign_pub: str,
    accepted: AcceptedManifest | None,
    rotations: Sequence[SignedKeyRotation] = (),
) -> RoomManifest:
    """Step 1: the manifest verifies against the pinned owner key, for ``room_id``, without rollback."""
    return verify_manifest(
        signed,
        expected_owner_sign_pub=pinned_sign_pub,
        expected_room_id=room_id,
        min_revision=accepted.revision if accepted is not None else None,
        rotations=rotations,
    )


def terms_sha256(manifest: RoomManifest) -> str:
    """Hash of everything in a manifest except the owner keys and the revision."""
    return canonical_sha256(manifest.model_dump(mode="json", exclude=set(_KEY_FIELDS)))


def accepted_record(signed: SignedManifest, *, pinned_sign_pub: str, now: int) -> AcceptedManifest:
    manifest = signed.manifest
    return AcceptedManifest(
        room_id=manifest.room_id,
        manifest_hash=signed.manifest_hash,
        revision=manifest.revision,
        pinned_sign_pub=pinned_sign_pub,
        owner_sign_pub=manifest.owner_sign_pub,
        terms_sha256=terms_sha256(manifest),
        accepted_at=now,
    )


def check_acceptance(
    signed: SignedManifest,
    *,
    accepted: AcceptedManifest | None,
    rotations: Sequence[SignedKeyRotation],
    accept_command: str,
) -> bool:
    """Step 2: this profile accepted these terms; else NotAccepted naming ``accept_command``.

    Returns False when it accepted exactly this manifest, True when the manifest differs from the
    accepted one only by an owner key rotation that ``rotations`` prove (the caller records the new
    revision, so it becomes the floor for rollbacks).
    """
    manifest = signed.manifest
    if accepted is not None and accepted.manifest_hash == signed.manifest_hash:
        return False
    if (
        accepted is not None
        and accepted.terms_sha256 == terms_sha256(manifest)
        and manifest.owner_sign_pub != accepted.owner_sign_pub
    ):
        # Only the owner keys changed: follow the certificates from the key that signed what we accepted.
        follow_key_rotations(
            rotations,
            tenant_id=manifest.tenant_id,
            from_sign_pub=accepted.owner_sign_pub,
            to_sign_pub=manifest.owner_sign_pub,
        )
        return True
    changed = "" if accepted is None else f" (it changed since you accepted revision {accepted.revision})"
    raise NotAccepted(
        f"the manifest of room {manifest.room_id}, revision {manifest.revision} "
        f"({signed.manifest_hash[:16]}…), is not accepted by this profile{changed}",
        hint=f"review and accept it first: {accept_command}",
    )


def record_acceptance(
    accepted_store: AcceptedManifests, signed: SignedManifest, *, pinned_sign_pub: str, now: int | None = None
) -> AcceptedManifest:
    record = accepted_record(
        signed, pinned_sign_pub=pinned_sign_pub, now=int(time.time()) if now is None else now
    )
    accepted_store.put(signed.manifest.room_id, record)
    return record


# --- runners ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunnerCheck:
    """One live runner and what verifying it gave: a :class:`VerifiedRunner` or the error."""

    runner_id: str
    document: AttestationDocument | None
    verified: VerifiedRunner | None
    error: HivemindError | None

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"runner_id": self.runner_id, "verified": self.verified is not None}
        if self.document is not None:
            result.update(
                tee=self.document.tee.value,
                compose_hash=self.document.compose_hash,
                app_id=self.document.app_id,
                version=self.document.version,
            )
        if self.verified is not None:
            result.update(tcb_status=self.verified.tcb_status, simulated=self.verified.simulated)
        if self.error is not None:
            result.update(error=self.error.code, message=self.error.message)
        return result


def collateral_for(profile: Profile, cache_dir: Any) -> CollateralProvider:
    """Intel PCS (or the profile's PCCS) collateral, cached 0600 in the profile store's cache."""
    if profile.pccs_url:
        return PcsCollateralProvider(cache_dir, pccs_url=profile.pccs_url)
    return PcsCollateralProvider(cache_dir)


def check_runners(
    relayed: Sequence[Mapping[str, Any]],
    *,
    trust: RunnerTrust | None,
    allow_simulated: bool,
    collateral: CollateralProvider | None,
    now: int,
) -> list[RunnerCheck]:
    """Step 3: verify each relayed ``{runner_id, document}``; never raises for one bad runner."""
    checks: list[RunnerCheck] = []
    for entry in relayed:
        runner_id = str(entry.get("runner_id", "?"))
        try:
            document = AttestationDocument.model_validate(entry.get("document"))
        except ValidationError:
            error = AttestationError(f"runner {runner_id} published a malformed attestation document")
            checks.append(RunnerCheck(runner_id=runner_id, document=None, verified=None, error=error))
            continue
        try:
            verified = verify_attestation(
                document, collateral=collateral, now=now, trust=trust, allow_simulated=allow_simulated
            )
        except HivemindError as exc:
            checks.append(RunnerCheck(runner_id=runner_id, document=document, verified=None, error=exc))
            continue
        checks.append(RunnerCheck(runner_id=runner_id, document=document, verified=verified, error=None))
    return checks


def choose_runner(checks: Sequence[RunnerCheck], *, simulated_hint: str) -> VerifiedRunner:
    """The first verified runner (the service lists the freshest first); else the reason none is."""
    for check in checks:
        if check.verified is not None:
            return check.verified
    if not checks:
        raise AttestationError(
            "the service lists no live runner, so there is nothing to verify or to send the run to; retry "
            "later or ask the operator",
            code="no_runner",
        )
    first = next(check.error for check in checks if check.error is not None)
    assert first is not None
    reasons = "; ".join(f"{check.runner_id}: {check.error.message}" for check in checks if check.error)
    message = f"no runner passed verification ({reasons})"
    if first.code == "simulated_tee_refused":
        message += f". {simulated_hint}"
    raise type(first)(message, code=first.code, details={"runners": [check.as_dict() for check in checks]})


def unverified_runner(relayed: Sequence[Mapping[str, Any]]) -> VerifiedRunner:
    """``--dangerously-skip-attestations``: the first runner whose document parses, NOT verified.

    Its keys are used as published: nothing proves they belong to a TEE or to a build the room trusts.
    """
    for entry in relayed:
        try:
            document = AttestationDocument.model_validate(entry.get("document"))
        except ValidationError:
            continue
        return runner_as_published(document)
    raise AttestationError(
        "the service lists no runner with a readable attestation document", code="no_runner"
    )
