"""``hmctl doctor [ROOM]``: check, line by line, everything a run depends on, and say how to fix each
failure.

Checks, in order (a failed check skips the ones that need it):

1. ``profile``: the profile exists, its file is private, its key parses;
2. ``service``: ``GET /v1/healthz`` answers (for a link-only profile and a ``ROOM`` link: the link's service);
3. ``auth``: the profile's key (and, for ``ROOM`` given as a link or joined by one, the invite) is
   accepted (``GET /v1/whoami``);
4. ``balance``: a tenant's available credit (zero is a warning: invite runs are paid by the room owner);
5. ``runners``: the live runner set, each runner's attestation verified as ``room ask`` would (without
   a room's trust list);
6. with ``ROOM``: ``room``: the signed manifest verifies against the pinned owner key, without rollback;
7. ``trust``: at least one live runner passes the room's ``runner_trust``;
8. ``acceptance``: this profile accepted the room's current manifest.

Exit status: 0 when nothing failed; otherwise the exit code of the first failure (docs/exit-codes.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.markup import escape

from hivemind.attestation import is_loopback_service
from hivemind.errors import HivemindError
from hivemind.tokens import Secret
from hmctl.client import ApiClient
from hmctl.commands.common import JsonFlag, usd
from hmctl.console import Ui
from hmctl.errors import ExitCode, exit_code_for
from hmctl.profiles import Profile, ProfileKind
from hmctl.rooms import (
    SIMULATED_HINT,
    FetchedRoom,
    RoomAccess,
    accept_command,
    fetch_room,
    is_link,
    room_access,
)
from hmctl.session import AppState, app_state
from hmctl.verify import RunnerCheck, check_acceptance, check_runners, collateral_for


class Status(StrEnum):
    PASS = "pass"  # noqa: S105 - a check's outcome, not a password
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None
    error: str | None = None
    exit_code: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "detail": self.detail,
            "fix": self.fix,
            "error": self.error,
        }


def _failed(name: str, error: HivemindError, fix: str | None) -> Check:
    return Check(
        name=name,
        status=Status.FAIL,
        detail=error.message,
        fix=fix or getattr(error, "hint", None),
        error=error.code,
        exit_code=int(exit_code_for(error)),
    )


_INVITE_FIXES = {
    "credential_revoked": "this invite was revoked: ask the room owner for a new link",
    "credential_expired": "this invite expired: ask the room owner for a new link",
    "credential_exhausted": "this invite has no uses left: ask the room owner for a new link",
    "room_deleted": "the owner deleted this room",
}
_KEY_FIXES = {
    "credential_unknown": "the service does not know this key (another deployment, or a local stack that "
    "was restarted): sign up again (hmctl signup NAME --service URL)",
    "credential_revoked": "this key was replaced (tenant rotate-key or an operator reset): use the "
    "profile holding the new key",
    "tenant_suspended": "the operator suspended this tenant: contact them",
}


def _auth_fix(code: str, *, invite: bool) -> str:
    if invite:
        return _INVITE_FIXES.get(code, "check the link you were given (hmctl room inspect LINK)")
    return _KEY_FIXES.get(code, "check the profile (hmctl profile show)")


class Doctor:
    """Runs the checks against one profile; each check records its line and returns what later ones need."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.checks: list[Check] = []

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def skip(self, *names: str, because: str) -> None:
        for name in names:
            self.add(Check(name=name, status=Status.SKIP, detail=f"skipped: {because}"))

    def client(self, service: str, secret: Secret | None) -> ApiClient:
        # One retry only: doctor should report an unreachable service quickly, not back off for seconds.
        return ApiClient.for_secret(
            service, secret, transport=self.state.transport, sleep=self.state.sleep, retries=1
        )

    # --- checks ------------------------------------------------------------------------------------

    def profile(self) -> Profile | None:
        try:
            profile = self.state.profile()
            if profile.key is not None:
                profile.secret()
        except HivemindError as exc:
            self.add(_failed("profile", exc, None))
            return None
        self.add(
            Check(
                name="profile",
                status=Status.PASS,
                detail=f"{profile.name}: {profile.kind.value} profile for {profile.service} "
                f"({self.state.store.path})",
            )
        )
        return profile

    def service(self, service: str) -> bool:
        try:
            with self.client(service, None) as api:
                health = api.get("/v1/healthz")
        except HivemindError as exc:
            fix = (
                "start the local stack: hmctl dev up --background (see hmctl dev status)"
                if is_loopback_service(service)
                else "check the service URL (hmctl profile show, or the link) and your network"
            )
            self.add(_failed("service", exc, fix))
            return False
        self.add(
            Check(
                name="service",
                status=Status.PASS,
                detail=f"{service} answers (version {health.get('version', '?')})",
            )
        )
        return True

    def auth(self, profile: Profile) -> dict[str, Any] | None:
        if profile.key is None:
            self.add(Check(name="auth", status=Status.SKIP, detail="link-only profile: no key of its own"))
            return None
        try:
            with self.client(profile.service, profile.secret()) as api:
                me = api.get("/v1/whoami")
        except HivemindError as exc:
            self.add(_failed("auth", exc, _auth_fix(exc.code, invite=False)))
            return None
        who = me.get("tenant_id") or me.get("token_id")
        self.add(
            Check(name="auth", status=Status.PASS, detail=f"the {me.get('kind')} key is accepted ({who})")
        )
        return dict(me)

    def invite(self, access: RoomAccess) -> bool:
        try:
            with self.client(access.service, access.secret) as api:
                me = api.get("/v1/whoami")
        except HivemindError as exc:
            self.add(_failed("invite", exc, _auth_fix(exc.code, invite=True)))
            return False
        uses = me.get("uses")
        limit = me.get("max_uses")
        detail = f"invite {me.get('invite_id')} for room {me.get('room_id')} is accepted"
        if limit is not None:
            detail += f" ({uses or 0} of {limit} uses)"
        self.add(Check(name="invite", status=Status.PASS, detail=detail))
        return True

    def balance(self, profile: Profile) -> None:
        if profile.kind is not ProfileKind.TENANT:
            self.add(
                Check(name="balance", status=Status.SKIP, detail=f"{profile.kind.value} profile: no account")
            )
            return
        try:
            with self.client(profile.service, profile.secret()) as api:
                billing = api.get("/v1/billing")
        except HivemindError as exc:
            self.add(_failed("balance", exc, None))
            return
        account = billing.get("account") or {}
        available = int(account.get("available") or 0)
        detail = (
            f"available {usd(available)} "
            f"(balance {usd(account.get('balance'))}, held {usd(account.get('held'))})"
        )
        if available > 0 or not billing.get("credits_enforced", True):
            self.add(Check(name="balance", status=Status.PASS, detail=detail))
            return
        self.add(
            Check(
                name="balance",
                status=Status.WARN,
                detail=detail
                + ": runs this profile pays for will be refused (invite runs are paid by the owner)",
                fix="redeem a credit code (hmctl redeem-credit CODE) or ask the operator for credit",
            )
        )

    def runners(
        self,
        profile: Profile,
        service: str,
        relayed: list[dict[str, Any]],
        *,
        name: str,
        trust: Any,
        fix_untrusted: str | None,
    ) -> list[RunnerCheck]:
        checks = check_runners(
            relayed,
            trust=trust,
            allow_simulated=profile.allows_simulated(service),
            collateral=collateral_for(profile, self.state.store.collateral_dir),
            now=self.state.clock(),
        )
        verified = [check for check in checks if check.verified is not None]
        if verified:
            kinds = sorted(
                {"simulated" if check.verified and check.verified.simulated else "tdx" for check in verified}
            )
            builds = sorted({check.verified.compose_hash[:16] for check in verified if check.verified})
            self.add(
                Check(
                    name=name,
                    status=Status.PASS,
                    detail=f"{len(verified)} of {len(checks)} live runner(s) verified "
                    f"({', '.join(kinds)}; builds {', '.join(builds)})",
                )
            )
            return checks
        if not checks:
            self.add(
                Check(
                    name=name,
                    status=Status.FAIL,
                    detail="the service lists no live runner",
                    fix="start the local stack (hmctl dev up --background)"
                    if is_loopback_service(service)
                    else "retry later or ask the operator",
                    error="no_runner",
                    exit_code=int(ExitCode.VERIFICATION),
                )
            )
            return checks
        first = next(check.error for check in checks if check.error is not None)
        assert first is not None
        fix = fix_untrusted if first.code == "compose_hash_not_trusted" else None
        if first.code == "simulated_tee_refused":
            fix = SIMULATED_HINT
        reasons = "; ".join(f"{check.runner_id}: {check.error.message}" for check in checks if check.error)
        self.add(
            Check(
                name=name,
                status=Status.FAIL,
                detail=f"no runner verified ({reasons})",
                fix=fix,
                error=first.code,
                exit_code=int(exit_code_for(first)),
            )
        )
        return checks

    def live_runners(self, profile: Profile, service: str) -> None:
        try:
            with self.client(service, None) as api:
                relayed = list(api.get("/v1/attestation").get("runners") or [])
        except HivemindError as exc:
            self.add(_failed("runners", exc, None))
            return
        self.runners(profile, service, relayed, name="runners", trust=None, fix_untrusted=None)

    def room(self, profile: Profile, room: str) -> None:
        try:
            access = room_access(profile, room)
        except HivemindError as exc:
            self.add(_failed("room", exc, None))
            self.skip("trust", "acceptance", because="the room could not be resolved")
            return
        if access.link is not None and not self.invite(access):
            self.skip("room", "trust", "acceptance", because="the invite is not accepted")
            return
        accepted = self.state.store.accepted(profile.name).get(access.room_id)
        try:
            with self.client(access.service, access.secret) as api:
                fetched = fetch_room(api, access, accepted=accepted)
        except HivemindError as exc:
            self.add(
                _failed(
                    "room",
                    exc,
                    "do not use this room until its owner explains the change"
                    if exit_code_for(exc) is ExitCode.VERIFICATION
                    else None,
                )
            )
            self.skip("trust", "acceptance", because="the room's manifest did not verify")
            return
        manifest = fetched.manifest
        self.add(
            Check(
                name="room",
                status=Status.PASS,
                detail=f"{manifest.name} ({access.room_id}) revision {manifest.revision}: manifest "
                f"{fetched.signed.manifest_hash[:16]}… verifies against the owner key "
                f"{access.pinned_sign_pub[:12]}…",
            )
        )
        fix_untrusted = (
            f"update the room's runner trust: hmctl room trust {access.room_id} --from-attested"
            if access.is_owner
            else "ask the room owner to trust the current runner build "
            "(hmctl room trust ROOM --from-attested)"
        )
        self.runners(
            profile,
            access.service,
            fetched.relayed_runners,
            name="trust",
            trust=manifest.runner_trust,
            fix_untrusted=fix_untrusted,
        )
        self.acceptance(profile, access, fetched)

    def acceptance(self, profile: Profile, access: RoomAccess, fetched: FetchedRoom) -> None:
        try:
            check_acceptance(
                fetched.signed,
                accepted=fetched.accepted,
                rotations=fetched.rotations,
                accept_command=accept_command(profile, access),
            )
        except HivemindError as exc:
            self.add(_failed("acceptance", exc, None))
            return
        self.add(
            Check(
                name="acceptance",
                status=Status.PASS,
                detail=f"this profile accepted revision {fetched.manifest.revision}",
            )
        )


def _service_of(profile: Profile, room: str | None) -> str:
    """The service to check: a link-only profile reaches rooms at their link's service."""
    if profile.key is None and room is not None and is_link(room):
        try:
            return room_access(profile, room).service
        except HivemindError:
            return profile.service  # the room check reports the malformed link
    return profile.service


def run_checks(state: AppState, room: str | None) -> list[Check]:
    doctor = Doctor(state)
    profile = doctor.profile()
    later = ("service", "auth", "balance", "runners") + (("room", "trust", "acceptance") if room else ())
    if profile is None:
        doctor.skip(*later, because="no usable profile")
        return doctor.checks
    service = _service_of(profile, room)
    if not doctor.service(service):
        doctor.skip(*later[1:], because="the service does not answer")
        return doctor.checks
    me = doctor.auth(profile)
    if me is None and profile.key is not None:
        doctor.skip("balance", because="the key is not accepted")
    else:
        doctor.balance(profile)
    doctor.live_runners(profile, service)
    if room:
        doctor.room(profile, room)
    return doctor.checks


_MARKS: dict[Status, Callable[[str], str]] = {
    Status.PASS: lambda name: f"[green]✓ {name:<11}[/green]",
    Status.WARN: lambda name: f"[yellow]! {name:<11}[/yellow]",
    Status.FAIL: lambda name: f"[bold red]✗ {name:<11}[/bold red]",
    Status.SKIP: lambda name: f"[dim]- {name:<11}[/dim]",
}


def doctor(
    ctx: typer.Context,
    room: Annotated[str | None, typer.Argument(help="Also check this room (id or hmroom:// link).")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Check everything a run depends on, each line pass or fail with how to fix it.

    The profile, the service, authentication, balance and runner attestation; with ROOM also its
    signed manifest, runner trust and this profile's acceptance. Exits non-zero on any failure (the
    exit code of the first one).
    """
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    checks = run_checks(state, room)
    failures = [check for check in checks if check.status is Status.FAIL]
    if json_output:
        ui.print_json({"ok": not failures, "checks": [check.as_dict() for check in checks]})
    else:
        for check in checks:
            ui.out.print(f"{_MARKS[check.status](check.name)} {escape(check.detail)}")
            if check.fix and check.status in (Status.FAIL, Status.WARN):
                ui.out.print(f"  [cyan]fix:[/cyan] {escape(check.fix)}")
    if failures:
        raise typer.Exit(failures[0].exit_code or int(ExitCode.ERROR))


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
