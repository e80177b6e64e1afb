"""Room flows on the client: how a profile reaches a room, verifying it, and the owner's operations.

- :func:`room_access` resolves ``LINK`` (an ``hmroom://`` invite), a room id the profile joined by link,
  or a room id the profile owns, into a :class:`RoomAccess`: which service, which credential, which
  owner key the manifest must be signed by.
- :func:`check_room` fetches ``GET /v1/rooms/{id}/attest`` and runs the verification steps of
  :mod:`hmctl.verify` (manifest, acceptance, runners).
- Owner operations: :func:`create_room` (agents packed and uploaded, DEK made and wrapped, manifest v1
  signed), :func:`add_item` (HMS1-sealed from the file, streamed to a presigned PUT),
  :func:`create_invite` (a new ``hmq_`` secret, the DEK wrapped for it, the link built here; invite
  holders derive narrower ones), :func:`update_trust` (``revision + 1``).

The service never sees a secret or the DEK: it gets auth hashes, wraps, sealed blobs and signed
manifests.
"""

from __future__ import annotations

import io
import mimetypes
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from hivemind.attestation import VerifiedRunner
from hivemind.encoding import b64encode
from hivemind.errors import Forbidden, IntegrityError, WrapError
from hivemind.keys import (
    auth_hash,
    credential_id,
    new_dek,
    owner_box_key,
    owner_sign_key,
    public_bytes,
    unwrap_dek,
    wrap_dek,
    wrap_key,
)
from hivemind.manifest import (
    AgentRef,
    EgressRule,
    InviteLink,
    OutputRule,
    QueryRule,
    RoomManifest,
    SignedKeyRotation,
    SignedManifest,
    encode_link,
    next_revision,
    parse_link,
    rules_digest,
    sign_manifest,
)
from hivemind.models import (
    BudgetLimits,
    Budgets,
    ObjectKind,
    OutputVisibility,
    QueryMode,
    Visibility,
)
from hivemind.policy import ScopePolicy
from hivemind.seal import SealContext, seal_stream
from hivemind.tokens import Secret, TokenKind, random_id
from hivemind.trust import RunnerTrust, RunnerTrustMode
from hmctl.agents import PackedAgent, upload_agent
from hmctl.client import ApiClient, Progress
from hmctl.errors import NotAccepted, UsageError
from hmctl.profiles import AcceptedManifest, Profile, ProfileKind, ProfileStore
from hmctl.verify import (
    RunnerCheck,
    check_acceptance,
    check_runners,
    choose_runner,
    collateral_for,
    parse_rotations,
    parse_signed_manifest,
    record_acceptance,
    unverified_runner,
    verify_room,
)

Transfer = Callable[[str, int], AbstractContextManager[Progress]]


@contextmanager
def _no_progress(_description: str, _total: int) -> Iterator[Progress]:
    yield lambda _count: None


SIMULATED_HINT = (
    "simulated runners have no TEE; they are accepted by default only for a service on this machine. "
    "If you really mean it: hmctl profile set --allow-simulated"
)


# --- reaching a room --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoomAccess:
    """How this profile reaches one room."""

    service: str
    room_id: str
    secret: Secret = field(repr=False)  # the tenant key (owner) or the invite secret (link)
    pinned_sign_pub: str  # the owner key the manifest must be signed by (or rotated from)
    link: str | None = field(default=None, repr=False)

    @property
    def is_owner(self) -> bool:
        return self.secret.kind is TokenKind.TENANT and self.link is None


def owner_sign_pub(secret: Secret) -> str:
    return b64encode(public_bytes(owner_sign_key(secret)))


def owner_box_pub(secret: Secret) -> str:
    return b64encode(public_bytes(owner_box_key(secret)))


def is_link(text: str) -> bool:
    return text.strip().lower().startswith("hmroom://")


def room_access(profile: Profile, room: str) -> RoomAccess:
    """``room`` is an invite link, a room joined by link (``room accept``), or a room id this profile owns."""
    if is_link(room):
        link = parse_link(room)
        return RoomAccess(
            service=profile.resolve_service(link.service),
            room_id=link.room_id,
            secret=link.invite_secret(),
            pinned_sign_pub=link.owner_sign_pub,
            link=room.strip(),
        )
    if room in profile.links:
        return room_access(profile, profile.links[room])
    if profile.kind is not ProfileKind.TENANT:
        raise UsageError(
            f"{room} is neither an invite link nor a room this profile joined",
            hint="pass the hmroom:// link you were given, or accept it first: hmctl room accept LINK",
        )
    secret = profile.tenant_secret()
    return RoomAccess(
        service=profile.service, room_id=room, secret=secret, pinned_sign_pub=owner_sign_pub(secret)
    )


def bearer_of(access: RoomAccess, tenant_id: str | None) -> str:
    """The bearer id of the access's wrap: the tenant id for the owner, the invite id for a link."""
    if access.is_owner:
        if tenant_id is None:
            raise UsageError("this profile does not know its tenant id", hint="run: hmctl whoami")
        return tenant_id
    return credential_id(access.secret)


def accept_command(profile: Profile, access: RoomAccess) -> str:
    """The command that accepts this room (a link is not repeated: it is a secret, and may be logged)."""
    if access.link is not None:
        return f"hmctl --profile {profile.name} room accept LINK   (the same hmroom:// link)"
    return f"hmctl --profile {profile.name} room accept {access.room_id}"


# --- verifying a room -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedRoom:
    """A room whose manifest verified and was accepted, and the runner chosen to run it."""

    access: RoomAccess
    signed: SignedManifest
    rotations: list[SignedKeyRotation]
    runner: VerifiedRunner
    runner_checks: list[RunnerCheck]
    attestation_skipped: bool
    agents: list[dict[str, Any]]

    @property
    def manifest(self) -> RoomManifest:
        return self.signed.manifest

    @property
    def allowed_compose_hashes(self) -> list[str]:
        """Builds whose receipts this client accepts: the room's list and the attested runner's."""
        return sorted({*self.manifest.runner_trust.allowed_compose_hashes, self.runner.compose_hash})


@dataclass(frozen=True)
class FetchedRoom:
    """A room's verified manifest and what the service relayed with it (before acceptance)."""

    access: RoomAccess
    signed: SignedManifest
    rotations: list[SignedKeyRotation]
    relayed_runners: list[dict[str, Any]]
    agents: list[dict[str, Any]]
    accepted: AcceptedManifest | None

    @property
    def manifest(self) -> RoomManifest:
        return self.signed.manifest


def fetch_room(api: ApiClient, access: RoomAccess, *, accepted: AcceptedManifest | None) -> FetchedRoom:
    """``GET /v1/rooms/{id}/attest`` and verification step 1 (the manifest against the pinned key)."""
    attest = api.get(f"/v1/rooms/{access.room_id}/attest")
    room = attest.get("room") or {}
    signed = parse_signed_manifest(room.get("signed_manifest") or {})
    rotations = parse_rotations(room.get("owner_key_rotations"))
    verify_room(
        signed,
        room_id=access.room_id,
        pinned_sign_pub=access.pinned_sign_pub,
        accepted=accepted,
        rotations=rotations,
    )
    return FetchedRoom(
        access=access,
        signed=signed,
        rotations=rotations,
        relayed_runners=list(attest.get("runners") or []),
        agents=list(attest.get("agents") or []),
        accepted=accepted,
    )


def check_room(
    api: ApiClient,
    access: RoomAccess,
    *,
    profile: Profile,
    store: ProfileStore,
    now: int,
    skip_attestations: bool,
    confirm_acceptance: Callable[[FetchedRoom], bool],
) -> CheckedRoom:
    """Every client-side check before a run (DESIGN §7 step 1), in order.

    ``confirm_acceptance`` is asked only when the manifest is not yet accepted; it shows the room and
    returns the user's answer (never True on its own: ``-y`` does not accept manifests). A refusal or a
    non-interactive session raises NotAccepted with the exact command to run.
    """
    accepted_store = store.accepted(profile.name)
    fetched = fetch_room(api, access, accepted=accepted_store.get(access.room_id))
    try:
        rotated = check_acceptance(
            fetched.signed,
            accepted=fetched.accepted,
            rotations=fetched.rotations,
            accept_command=accept_command(profile, access),
        )
    except NotAccepted:
        if not confirm_acceptance(fetched):
            raise
        rotated = True
    if rotated:
        record_acceptance(accepted_store, fetched.signed, pinned_sign_pub=access.pinned_sign_pub, now=now)
    manifest = fetched.manifest
    if skip_attestations:
        runner = unverified_runner(fetched.relayed_runners)
        checks: list[RunnerCheck] = []
    else:
        checks = check_runners(
            fetched.relayed_runners,
            trust=manifest.runner_trust,
            allow_simulated=profile.allows_simulated(access.service),
            collateral=collateral_for(profile, store.collateral_dir),
            now=now,
        )
        runner = choose_runner(checks, simulated_hint=SIMULATED_HINT)
    return CheckedRoom(
        access=access,
        signed=fetched.signed,
        rotations=fetched.rotations,
        runner=runner,
        runner_checks=checks,
        attestation_skipped=skip_attestations,
        agents=fetched.agents,
    )


def verified_runners(
    api: ApiClient, *, profile: Profile, store: ProfileStore, now: int, trust: RunnerTrust | None
) -> list[RunnerCheck]:
    """The live runner set, each verified (``trust=None``: without a room, e.g. ``trust attest``)."""
    relayed = api.get("/v1/attestation").get("runners") or []
    return check_runners(
        relayed,
        trust=trust,
        allow_simulated=profile.allows_simulated(api.service),
        collateral=collateral_for(profile, store.collateral_dir),
        now=now,
    )


def owned_room(api: ApiClient, secret: Secret, room_id: str) -> SignedManifest:
    """The owner's own room, verified against the owner's current key (and its rotations)."""
    view = api.get(f"/v1/rooms/{room_id}")
    signed = parse_signed_manifest(view.get("signed_manifest") or {})
    verify_room(
        signed,
        room_id=room_id,
        pinned_sign_pub=owner_sign_pub(secret),
        accepted=None,
        rotations=parse_rotations(view.get("owner_key_rotations")),
    )
    return signed


# --- creating a room --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentChoice:
    packed: PackedAgent
    visibility: Visibility


@dataclass(frozen=True)
class RoomSpec:
    """Everything ``room create`` decides before anything is uploaded."""

    name: str
    rules: str
    policy: str
    scope: AgentChoice
    query: AgentChoice | None  # None: the room takes uploaded query agents
    uploaded_query_visibility: Visibility
    mediator: AgentChoice | None
    output: OutputVisibility
    llm_providers: list[str]
    artifacts: bool
    budgets: BudgetLimits
    runner_trust: RunnerTrust
    data_policy: ScopePolicy | None


def runner_trust_from(
    checks: Sequence[RunnerCheck], *, explicit: Sequence[str], mode: RunnerTrustMode
) -> RunnerTrust:
    """``owner_approved`` (or ``pinned``) trust in the builds of the verified runners, or the hashes given."""
    hashes = list(explicit) or sorted({check.verified.compose_hash for check in checks if check.verified})
    if not hashes:
        reasons = "; ".join(f"{check.runner_id}: {check.error.message}" for check in checks if check.error)
        raise UsageError(
            "no runner verified, so there is no build to trust" + (f" ({reasons})" if reasons else ""),
            hint="check `hmctl trust attest`, or name the builds with --trust-compose HASH",
        )
    try:
        return RunnerTrust(mode=mode, allowed_compose_hashes=sorted(set(hashes)))
    except ValidationError as exc:
        raise UsageError(f"runner trust: {exc.errors()[0]['msg']}") from None


@dataclass(frozen=True)
class CreatedRoom:
    room_id: str
    signed: SignedManifest
    dek: bytes = field(repr=False)


def create_room(
    api: ApiClient,
    secret: Secret,
    *,
    tenant_id: str,
    spec: RoomSpec,
    runner: VerifiedRunner | None,
    now: int,
) -> CreatedRoom:
    """Sign the manifest (revision 1), upload the agents it pins, create the room with the owner's wrap.

    The manifest is built and checked before anything is uploaded (agent ids are chosen here), so a
    mistake in the room's terms costs no upload.
    """
    chosen: dict[tuple[str, Visibility], tuple[AgentRef, AgentChoice, str]] = {}

    def pin(choice: AgentChoice | None, role: str) -> AgentRef | None:
        if choice is None:
            return None
        key = (choice.packed.digest, choice.visibility)
        if key not in chosen:
            # The same directory in two roles is one agent.
            ref = AgentRef(
                agent_id=random_id("agent"), digest=choice.packed.digest, visibility=choice.visibility
            )
            chosen[key] = (ref, choice, role)
        return chosen[key][0]

    scope = pin(spec.scope, "scope")
    query_ref = pin(spec.query, "query")
    mediator = pin(spec.mediator, "mediator")
    if query_ref is not None:
        query = QueryRule(
            mode=QueryMode.FIXED,
            agent_id=query_ref.agent_id,
            digest=query_ref.digest,
            visibility=query_ref.visibility,
        )
    else:
        query = QueryRule(mode=QueryMode.UPLOADABLE, visibility=spec.uploaded_query_visibility)
    room_id = random_id("room")
    try:
        manifest = RoomManifest(
            room_id=room_id,
            tenant_id=tenant_id,
            name=spec.name,
            rules=spec.rules,
            rules_sha256=rules_digest(spec.rules),
            policy=spec.policy,
            scope=scope,
            query=query,
            mediator=mediator,
            output=OutputRule(visibility=spec.output),
            egress=EgressRule(llm_providers=spec.llm_providers, artifacts=spec.artifacts),
            budgets=spec.budgets,
            runner_trust=spec.runner_trust,
            data_policy=spec.data_policy,
            owner_sign_pub=owner_sign_pub(secret),
            owner_box_pub=owner_box_pub(secret),
            created_at=now,
            revision=1,
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "manifest"
        raise UsageError(f"the room's terms are not valid: {where}: {error['msg']}") from None
    signed = sign_manifest(manifest, owner_sign_key(secret))

    for ref, choice, role in chosen.values():
        view = upload_agent(
            api,
            choice.packed,
            name=f"{spec.name[:150]} {role}",
            visibility=choice.visibility,
            tenant_id=tenant_id,
            runner=runner,
            agent_id=ref.agent_id,
        )
        if view["source_digest"] != ref.digest or view["agent_id"] != ref.agent_id:
            raise IntegrityError(f"the service recorded the {role} agent as something else than was uploaded")

    dek = new_dek()
    owner_wrap = wrap_dek(wrap_key(secret, room_id), dek, room_id=room_id, bearer_id=tenant_id)
    api.post("/v1/rooms", {"signed_manifest": signed.model_dump(mode="json"), "owner_wrap": owner_wrap})
    return CreatedRoom(room_id=room_id, signed=signed, dek=dek)


# --- keys, data, invites, trust ---------------------------------------------------------------------


def room_dek(api: ApiClient, secret: Secret, room_id: str, bearer_id: str) -> bytes:
    """The room DEK, from the caller's own wrap (``GET /v1/rooms/{id}/key``) and its secret."""
    wrap = api.get(f"/v1/rooms/{room_id}/key")
    try:
        return unwrap_dek(wrap_key(secret, room_id), wrap["wrapped"], room_id=room_id, bearer_id=bearer_id)
    except WrapError as exc:
        raise WrapError(
            f"{exc.message}. The service may have swapped the wrap, or this key was rotated: check "
            "`hmctl profile show`"
        ) from None


def add_item(
    api: ApiClient,
    *,
    room_id: str,
    owner_tenant_id: str,
    dek: bytes,
    path: Path,
    metadata: Mapping[str, str],
    content_type: str | None,
    transfer: Transfer = _no_progress,
) -> dict[str, Any]:
    """Seal ``path`` (HMS1, streaming to a private temporary file), declare, upload, commit.

    Memory stays at a few chunks whatever the file size; ``transfer(description, total)`` is a context
    manager yielding a progress callback (``Ui.transfer``).
    """
    item_id = random_id("item")
    context = SealContext(tenant_id=owner_tenant_id, room_id=room_id, kind=ObjectKind.ITEM, object_id=item_id)
    chosen_type = content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    with tempfile.TemporaryFile(prefix="hmctl-seal-") as sealed, path.open("rb") as source:
        with transfer(f"sealing {path.name}", file_size(path)) as advance:
            stats = seal_stream(_CountingReader(source, advance), sealed, key=dek, context=context)
        declared = api.post(
            f"/v1/rooms/{room_id}/data",
            {
                "item_id": item_id,
                "name": path.name,
                "content_type": chosen_type,
                "size": stats.sealed_size,
                "sha256": stats.sealed_sha256,
                "metadata": dict(metadata),
            },
        )
        sealed.seek(0)
        with transfer(f"uploading {path.name}", stats.sealed_size) as advance:
            api.upload(declared["upload"], sealed, stats.sealed_size, progress=advance)
    committed: dict[str, Any] = api.post(f"/v1/rooms/{room_id}/data/{item_id}/commit")
    return committed


class _CountingReader(io.RawIOBase):
    """A read-through wrapper that reports every byte read (a sealing progress bar)."""

    def __init__(self, source: BinaryIO, advance: Progress) -> None:
        self._source = source
        self._advance = advance

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self._source.readinto(buffer)  # type: ignore[attr-defined]
        if count:
            self._advance(count)
        return count or 0


def item_metadata(path: Path, pairs: Sequence[str]) -> dict[str, str]:
    """``k=v`` pairs; ``table`` defaults to the file name's stem (the runner's SQL table name)."""
    metadata = {"table": path.stem}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise UsageError(f"--meta takes key=value, not {pair!r}")
        metadata[key] = value
    return metadata


@dataclass(frozen=True)
class NewInvite:
    link: str = field(repr=False)
    invite: dict[str, Any]


def create_invite(
    api: ApiClient,
    *,
    service: str,
    room_id: str,
    dek: bytes,
    pinned_sign_pub: str,
    uses: int | None,
    expires_at: int | None,
    budgets: Budgets | None,
    label: str | None,
) -> NewInvite:
    """A fresh ``hmq_`` secret and the DEK wrapped for it, registered by auth hash; the link is built here."""
    secret = Secret.generate(TokenKind.INVITE)
    invite_id = credential_id(secret)
    constraints: dict[str, Any] = {}
    if uses is not None:
        constraints["uses"] = uses
    if expires_at is not None:
        constraints["expires_at"] = expires_at
    if budgets is not None:
        constraints["budgets"] = budgets.model_dump()
    body: dict[str, Any] = {
        "auth_hash": auth_hash(secret),
        "wrap": wrap_dek(wrap_key(secret, room_id), dek, room_id=room_id, bearer_id=invite_id),
        "constraints": constraints,
    }
    if label is not None:
        body["label"] = label
    view = api.post(f"/v1/rooms/{room_id}/invites", body)
    link = encode_link(
        InviteLink(service=service, room_id=room_id, invite=secret.token(), owner_sign_pub=pinned_sign_pub)
    )
    return NewInvite(link=link, invite=view)


def check_narrowing(
    parent: Mapping[str, Any], *, uses: int | None, expires_at: int | None, budgets: Budgets | None
) -> None:
    """Refuse, before asking the service, a derived invite that would widen its parent (``whoami`` of
    the parent link). The service enforces the same rule."""
    widened: list[str] = []
    max_uses, used = parent.get("max_uses"), parent.get("uses") or 0
    if max_uses is not None and uses is not None and uses > max_uses - used:
        widened.append(f"--uses {uses} > the {max_uses - used} uses your invite has left")
    parent_expiry = parent.get("expires_at")
    if parent_expiry is not None and expires_at is not None and expires_at > parent_expiry:
        ends = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(parent_expiry))
        widened.append(f"--expires ends after your invite does ({ends})")
    parent_budgets = parent.get("budgets")
    if parent_budgets is not None and budgets is not None:
        for name in Budgets.model_fields:
            if getattr(budgets, name) > parent_budgets[name]:
                widened.append(
                    f"budget {name} {getattr(budgets, name)} > your invite's {parent_budgets[name]}"
                )
    if widened:
        raise Forbidden(
            "a derived invite may only narrow the invite it comes from: " + "; ".join(widened),
            code="invite_widens",
        )


def update_trust(
    api: ApiClient, secret: Secret, current: SignedManifest, trust: RunnerTrust
) -> tuple[SignedManifest, list[str]]:
    """Re-sign the room with a new ``runner_trust`` at ``revision + 1``; returns it and the warnings."""
    updated = sign_manifest(next_revision(current.manifest, {"runner_trust": trust}), owner_sign_key(secret))
    answer = api.post(
        f"/v1/rooms/{current.manifest.room_id}/trust", {"signed_manifest": updated.model_dump(mode="json")}
    )
    return updated, list(answer.get("warnings") or [])


def parse_duration(text: str) -> int:
    """``90s``, ``15m``, ``12h``, ``7d``, ``2w`` (or plain seconds) -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    text = text.strip().lower()
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    if not number.isdigit() or int(number) <= 0:
        raise UsageError(f"{text!r} is not a duration", hint="write it like 90s, 15m, 12h, 7d or 2w")
    return int(number) * units[unit]


def read_text_file(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the {what} file {path}: {exc}") from None


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
