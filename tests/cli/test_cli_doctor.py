"""``hmctl doctor [ROOM]`` against the fake service: each check passes, warns or fails with its fix, and
the exit status is the first failure's exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from hmctl_fakes import FakeService
from hmctl_harness import Cli, accepted_room, make_room

from hmctl.profiles import ProfileStore


class _WithHealth:
    """The fake service plus ``GET /v1/healthz`` (which the fake does not serve)."""

    def __init__(self, fake: FakeService, *, up: bool = True) -> None:
        self.fake = fake
        self.up = up

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/v1/healthz":
            return httpx.Response(200, json={"status": "ok", "version": "test"})
        return self.fake.handle(request)


@pytest.fixture
def health(fake: FakeService) -> _WithHealth:
    return _WithHealth(fake)


@pytest.fixture
def cli(config_dir: Path, fake: FakeService, health: _WithHealth) -> Cli:
    return Cli(ProfileStore.from_environment(), httpx.MockTransport(health), fake.service)


def run_doctor(cli: Cli, profile: str, *room: str, expect_exit: int) -> dict[str, dict[str, Any]]:
    outcome = cli.run("--profile", profile, "doctor", *room, "--json")
    assert outcome.exit_code == expect_exit, repr(outcome)
    report = outcome.json()
    assert report["ok"] is (expect_exit == 0)
    return {check["name"]: check for check in report["checks"]}


def test_a_healthy_participant_and_room_pass_every_check(cli: Cli, agent_dir: Path, rules_file: Path) -> None:
    link = accepted_room(cli, agent_dir, rules_file)
    checks = run_doctor(cli, "bob", link, expect_exit=0)
    assert list(checks) == [
        "profile",
        "service",
        "auth",
        "balance",
        "runners",
        "invite",
        "room",
        "trust",
        "acceptance",
    ]
    assert all(check["status"] == "pass" for check in checks.values()), checks
    # The owner checks its own room by id.
    (room_id,) = cli.store.load("bob").links
    owner = run_doctor(cli, "owner", room_id, expect_exit=0)
    assert "invite" not in owner
    assert owner["acceptance"]["status"] == "pass"


def test_an_unreachable_service_fails_fast_and_skips_the_rest(cli: Cli, health: _WithHealth) -> None:
    cli.signup("owner")
    health.up = False
    outcome = cli.run("--profile", "owner", "doctor")
    assert outcome.exit_code == 8, repr(outcome)
    assert "✗ service" in outcome.stdout
    # The service is on loopback: the fix is to start the local stack.
    assert "hmctl dev up --background" in outcome.stdout
    checks = run_doctor(cli, "owner", expect_exit=8)
    assert checks["service"]["error"] == "service_unreachable"
    assert {checks[name]["status"] for name in ("auth", "balance", "runners")} == {"skip"}


def test_a_missing_profile_fails_with_how_to_make_one(cli: Cli) -> None:
    checks = run_doctor(cli, "nobody", expect_exit=2)
    assert checks["profile"]["status"] == "fail"
    assert "hmctl signup nobody" in checks["profile"]["fix"]
    assert checks["service"]["status"] == "skip"


def test_a_revoked_invite_fails_with_its_code_and_fix(
    cli: Cli, fake: FakeService, agent_dir: Path, rules_file: Path
) -> None:
    link = accepted_room(cli, agent_dir, rules_file)
    invite = next(c for c in fake.credentials.values() if c.kind == "invite")
    room_id = next(iter(fake.rooms))
    cli.ok("--profile", "owner", "room", "revoke-invite", room_id, invite.token_id)
    checks = run_doctor(cli, "bob", link, expect_exit=3)
    assert checks["invite"]["status"] == "fail"
    assert checks["invite"]["error"] == "credential_revoked"
    assert "new link" in checks["invite"]["fix"]
    assert {checks[name]["status"] for name in ("room", "trust", "acceptance")} == {"skip"}


def test_a_room_not_yet_accepted_fails_with_the_accept_command(
    cli: Cli, agent_dir: Path, rules_file: Path
) -> None:
    cli.signup("owner")
    link = make_room(cli, agent_dir, rules_file)["link"]
    cli.signup("carol")
    checks = run_doctor(cli, "carol", link, expect_exit=9)
    assert checks["room"]["status"] == "pass"
    assert checks["acceptance"]["error"] == "manifest_not_accepted"
    assert "room accept" in checks["acceptance"]["fix"]


def test_a_tampered_manifest_fails_verification(
    cli: Cli, fake: FakeService, agent_dir: Path, rules_file: Path
) -> None:
    link = accepted_room(cli, agent_dir, rules_file)

    def tamper(signed: dict[str, Any]) -> dict[str, Any]:
        signed["manifest"]["rules"] = "Anything goes."
        return signed

    fake.tamper_manifest = tamper
    checks = run_doctor(cli, "bob", link, expect_exit=5)
    assert checks["room"]["status"] == "fail"
    assert checks["acceptance"]["status"] == "skip"


def test_no_live_runner_fails_the_runner_check(cli: Cli, fake: FakeService) -> None:
    cli.signup("owner")
    fake.runner_documents = []
    checks = run_doctor(cli, "owner", expect_exit=5)
    assert checks["runners"]["error"] == "no_runner"
    assert "hmctl dev up" in checks["runners"]["fix"]


def test_an_untrusted_runner_build_fails_trust_with_the_owner_fix(
    cli: Cli, fake: FakeService, agent_dir: Path, rules_file: Path
) -> None:
    link = accepted_room(cli, agent_dir, rules_file)
    fake.document = fake.document.model_copy(update={"compose_hash": "ab" * 32})
    checks = run_doctor(cli, "bob", link, expect_exit=5)
    assert checks["runners"]["status"] == "pass"  # the runner itself verifies...
    assert checks["trust"]["error"] == "compose_hash_not_trusted"  # ...but the room does not trust it
    assert "ask the room owner" in checks["trust"]["fix"]
