"""End to end: two profiles against ``hmctl dev up --background``, driven through ``hmctl`` as a user or a
script would (subprocesses, ``--json``, the script contract of the CLI issue).

One local stack per module, in a temporary HOME (profiles, state directory, logs) on free ports:

- an owner creates a room from the bundled sample data and default agents, adds data and shares it;
- a participant inspects it, accepts the exact manifest, asks, and gets a decrypted, verified answer;
- the owner cannot read that querier-only output;
- a revoked invite fails with a clear error and the authentication exit code;
- ``hmctl doctor`` reports each check; ``dev up`` twice says it is already running;
- ``hmctl dev down`` leaves no process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "agents" / "examples" / "sample-data"
QUESTION = "average salary by department"
# Exit codes of hmctl (hmctl.errors.ExitCode; docs/exit-codes.md).
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_UNAVAILABLE = 8
EXIT_NOT_ACCEPTED = 9


def _hmctl_argv() -> list[str]:
    script = Path(sys.executable).parent / "hmctl"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from hmctl.main import app; sys.argv[0] = 'hmctl'; app()"]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass
class Cli:
    env: dict[str, str]
    home: Path

    def __call__(self, *args: str, check: bool = True, timeout: float = 180) -> Result:
        completed = subprocess.run(
            [*_hmctl_argv(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        result = Result(completed.returncode, completed.stdout, completed.stderr)
        if check and result.code != 0:
            raise AssertionError(f"hmctl {' '.join(args)} exited {result.code}:\n{result.stderr}")
        return result

    @property
    def state_dir(self) -> Path:
        return self.home / ".local" / "state" / "hmctl" / "dev"


def _alive_in_group(pgid: int) -> list[int]:
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            alive.append(int(entry.name))
    return alive


@pytest.fixture(scope="module")
def cli(request: pytest.FixtureRequest) -> Iterator[Cli]:
    # Not tmp_path_factory: other pytest sessions on this machine prune old base temp directories, and
    # the stack's state directory must outlive them. Kept (and named) when a test of this module failed.
    home = Path(tempfile.mkdtemp(prefix="hmctl-e2e-"))
    failed_before = request.session.testsfailed
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HMCTL_", "XDG_", "HIVEMIND_", "AWS_"))
    }
    env.update({"HOME": str(home), "HMCTL_NO_INPUT": "1", "COLUMNS": "200"})
    cli = Cli(env=env, home=home)
    try:
        yield cli
    finally:
        cli("dev", "down", check=False, timeout=60)
        if request.session.testsfailed == failed_before:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"\nlocal stack logs kept in {cli.state_dir / 'logs'}")


@pytest.fixture(scope="module")
def stack(cli: Cli) -> dict[str, Any]:
    started = time.monotonic()
    status = cli("dev", "up", "--background", "--port", "0", "--json", timeout=240).json()
    assert time.monotonic() - started < 90, "dev up took too long"
    return status


@dataclass
class Story:
    owner_tenant: str
    room_id: str
    link: str
    invite_id: str
    manifest_hash: str
    answer: dict[str, Any]


@pytest.fixture(scope="module")
def story(cli: Cli, stack: dict[str, Any]) -> Story:
    service = stack["service_url"]
    owner = cli("signup", "owner", "--service", service, "--json").json()
    assert owner["tenant_id"].startswith("tenant_")
    assert cli("--profile", "owner", "whoami", "--json").json()["tenant_id"] == owner["tenant_id"]
    cli("--profile", stack["admin_profile"], "admin", "billing", "grant", owner["tenant_id"], "--usd", "5")

    created = cli(
        "--profile", "owner", "room", "create", str(REPO / "agents" / "default-scope"),
        "--name", "people", "--rules-file", str(SAMPLE / "rules.md"),
        "--query-agent", str(REPO / "agents" / "default-query"),
        "--mediator-agent", str(REPO / "agents" / "default-mediator"),
        "--no-llm", "--no-invite", "--json",
    ).json()  # fmt: skip
    room_id = created["room_id"]
    assert set(created) >= {"room_id", "link", "manifest_hash"}

    item = cli(
        "--profile", "owner", "room", "add-data", room_id, "--file", str(SAMPLE / "people.csv"), "--json"
    ).json()
    assert item["item_id"]
    shared = cli(
        "--profile", "owner", "room", "share", room_id, "--uses", "3", "--expires", "1d", "--json"
    ).json()
    link = shared["link"]
    assert link.startswith("hmroom://")

    cli("signup", "participant", "--service", service, "--json")
    inspected = cli("--profile", "participant", "room", "inspect", link, "--json").json()
    assert inspected["manifest_hash"] == created["manifest_hash"]
    # Not accepted yet: asking must refuse (and never prompt: HMCTL_NO_INPUT).
    refused = cli("--profile", "participant", "room", "ask", link, QUESTION, "--json", check=False)
    assert refused.code == EXIT_NOT_ACCEPTED, refused.stderr
    cli(
        "--profile",
        "participant",
        "room",
        "accept",
        link,
        "--manifest-hash",
        created["manifest_hash"],
        "--json",
    )

    answer = cli("--profile", "participant", "room", "ask", link, QUESTION, "--json").json()
    return Story(
        owner_tenant=owner["tenant_id"],
        room_id=room_id,
        link=link,
        invite_id=shared["invite_id"],
        manifest_hash=created["manifest_hash"],
        answer=answer,
    )


def test_status_prints_exactly_the_contract(cli: Cli, stack: dict[str, Any]) -> None:
    status = cli("dev", "status", "--json").json()
    assert set(status) == {
        "service_url",
        "aws_endpoint_url",
        "region",
        "bucket",
        "tables",
        "queues",
        "admin_profile",
        "runner_backend",
    }
    assert status == stack
    assert status["service_url"].startswith("http://127.0.0.1:")
    assert status["aws_endpoint_url"].startswith("http://127.0.0.1:")
    assert {"runs", "credentials", "ledger"} <= set(status["tables"])
    assert {"runs", "settlements"} <= set(status["queues"])
    assert status["runner_backend"] in ("docker", "process")


def test_up_twice_says_it_is_already_running(cli: Cli, stack: dict[str, Any]) -> None:
    again = cli("dev", "up", "--background", "--port", "0")
    assert "already running" in again.stderr
    assert cli("dev", "status", "--json").json()["service_url"] == stack["service_url"]


def test_participant_gets_a_verified_answer(story: Story) -> None:
    answer = story.answer
    assert answer["status"] == "completed"
    assert answer["verified"] is True
    assert answer["attestation_skipped"] is False
    receipt = answer["receipt"]
    assert receipt["run_id"] == answer["run_id"]
    assert receipt["room_id"] == story.room_id
    assert receipt["manifest_hash"] == story.manifest_hash
    assert {agent["stage"] for agent in receipt["agents"]} == {"scope", "query", "mediator"}
    assert receipt["scope_policy_hash"]
    output = answer["output"]
    # Departments of at least 5 people are answered; Finance (4) and Legal (3) are withheld.
    for department in ("Engineering", "Sales", "Support", "Marketing"):
        assert department in output
    assert "Finance" not in output and "Legal" not in output
    # No individual leaves the room.
    assert "Grace Kowalski" not in output


def test_owner_cannot_read_a_querier_only_output(cli: Cli, story: Story) -> None:
    result = cli("--profile", "owner", "run", "output", story.answer["run_id"], "--json", check=False)
    assert result.code == EXIT_NOT_FOUND, result.stderr
    assert "output_not_visible" in result.stderr
    assert story.answer["output"] not in result.stdout + result.stderr


def test_revoked_invite_fails_with_a_clear_error(cli: Cli, story: Story) -> None:
    second = cli("--profile", "owner", "room", "share", story.room_id, "--uses", "1", "--json").json()
    cli("--profile", "owner", "room", "revoke-invite", story.room_id, second["invite_id"])
    cli("init", "late", "--service", "http://127.0.0.1:1", "--json")  # a link-only profile
    refused = cli("--profile", "late", "room", "inspect", second["link"], "--json", check=False)
    assert refused.code == EXIT_AUTH, refused.stderr
    assert "credential_revoked" in refused.stderr
    assert "revoked" in refused.stderr

    # doctor says the same, with the fix, and exits with the same code.
    doctor = cli("--profile", "late", "doctor", second["link"], "--json", check=False)
    assert doctor.code == EXIT_AUTH
    checks = {check["name"]: check for check in doctor.json()["checks"]}
    assert checks["invite"]["status"] == "fail"
    assert checks["invite"]["error"] == "credential_revoked"
    assert "new link" in checks["invite"]["fix"]
    # The first invite still works.
    ok = cli("--profile", "participant", "doctor", story.link, "--json").json()
    assert ok["ok"] is True


def test_dev_down_leaves_no_process_behind(cli: Cli, story: Story) -> None:
    record = json.loads((cli.state_dir / "stack.json").read_text())
    pids = [proc["pid"] for proc in record["processes"]]
    assert len(pids) == 3
    down = cli("dev", "down", "--json", timeout=60).json()
    assert sorted(down["stopped"]) == ["api", "moto", "runner"]
    for pid in pids:
        assert _alive_in_group(pid) == [], f"process group {pid} still has members"
    assert not (cli.state_dir / "stack.json").exists()
    status = cli("dev", "status", "--json", check=False)
    assert status.code == EXIT_UNAVAILABLE
    assert "not running" in status.stderr
    doctor = cli("--profile", "owner", "doctor", check=False)
    assert doctor.code == EXIT_UNAVAILABLE
    assert "hmctl dev up" in doctor.stdout
