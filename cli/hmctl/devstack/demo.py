"""``hmctl dev demo``: the owner -> participant story on the local stack, step by step (DESIGN §14).

Each step runs ``hmctl`` itself, as a user or a script would (``--json``, explicit profiles, the
non-interactive ``room accept LINK --manifest-hash HASH``), so the demo shows exactly the commands of
the quickstart and fails exactly where they would. The data and agents are the bundled ones:
``agents/examples/sample-data/`` (people.csv and its rules) and ``agents/default-{scope,query,mediator}``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivemind.attestation import is_loopback_service
from hmctl.devstack.state import DevStackError
from hmctl.errors import ExitCode
from hmctl.profiles import ProfileKind, ProfileStore

DEFAULT_QUESTION = "average salary by department"
OWNER_PROFILE = "demo-owner"
PARTICIPANT_PROFILE = "demo-participant"
DEMO_CREDIT_USD = "5"
# Runs hmctl with this interpreter (no reliance on PATH), named hmctl in its messages.
_HMCTL = "import sys; from hmctl.main import app; sys.argv[0] = 'hmctl'; app()"
_EXIT_CODES = {int(code): code for code in ExitCode}


@dataclass(frozen=True)
class DemoPaths:
    scope: Path
    query: Path
    mediator: Path
    rules: Path
    data: Path

    @classmethod
    def in_repo(cls, repo: Path) -> DemoPaths:
        paths = cls(
            scope=repo / "agents" / "default-scope",
            query=repo / "agents" / "default-query",
            mediator=repo / "agents" / "default-mediator",
            rules=repo / "agents" / "examples" / "sample-data" / "rules.md",
            data=repo / "agents" / "examples" / "sample-data" / "people.csv",
        )
        missing = [str(path) for path in vars(paths).values() if not path.exists()]
        if missing:
            raise DevStackError(
                f"the bundled demo files are missing: {', '.join(missing)}",
                code="dev_repo_not_found",
                exit_code=ExitCode.USAGE,
            )
        return paths


@dataclass(frozen=True)
class DemoReport:
    """The end of the story: the verified answer and the receipt that proves it."""

    room_id: str
    link: str
    run: dict[str, Any]

    @property
    def answer(self) -> str:
        return str(self.run.get("output") or "")

    def receipt_summary(self) -> dict[str, Any]:
        receipt = self.run.get("receipt") or {}
        output = receipt.get("output") or {}
        return {
            "run_id": receipt.get("run_id") or self.run.get("run_id"),
            "room_id": receipt.get("room_id"),
            "status": receipt.get("status"),
            "manifest_hash": receipt.get("manifest_hash"),
            "compose_hash": receipt.get("compose_hash"),
            "agents": [
                {
                    "stage": agent.get("stage"),
                    "agent_id": agent.get("agent_id"),
                    "source_digest": agent.get("source_digest"),
                    "image_digest": agent.get("image_digest"),
                }
                for agent in receipt.get("agents") or []
            ],
            "scope_policy_hash": receipt.get("scope_policy_hash"),
            "output_sha256": output.get("plaintext_sha256"),
            "output_ciphertext_sha256": output.get("ciphertext_sha256"),
            "signer_pub": receipt.get("signer_pub"),
            "verified": bool(self.run.get("verified")) and not self.run.get("attestation_skipped"),
        }


class HmctlRunner:
    """Runs ``hmctl ... --json`` in a child process and returns its parsed stdout."""

    def __init__(self, *, show_command: Callable[[str], None], env: dict[str, str] | None = None) -> None:
        self._show = show_command
        self._env = dict(os.environ if env is None else env)
        # The demo never waits for a person: prompts answer "no" and scripts use explicit commands.
        self._env["HMCTL_NO_INPUT"] = "1"
        self._env.pop("HMCTL_PROFILE", None)

    def __call__(self, *args: str, display: Sequence[str] | None = None) -> dict[str, Any]:
        shown = display if display is not None else args
        command = "hmctl " + " ".join(shlex.quote(part) for part in shown)
        self._show(command)
        completed = subprocess.run(  # noqa: S603 - this very interpreter running hmctl
            [sys.executable, "-c", _HMCTL, *args],
            env=self._env,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if completed.returncode != 0:
            raise DevStackError(
                f"`{command}` failed (exit {completed.returncode}):\n" + completed.stderr.strip(),
                code="demo_step_failed",
                exit_code=_EXIT_CODES.get(completed.returncode),
            )
        try:
            parsed = json.loads(completed.stdout)
        except ValueError:
            raise DevStackError(
                f"`{command}` printed no JSON: {completed.stdout[:300]!r}",
                code="demo_step_failed",
            ) from None
        if not isinstance(parsed, dict):
            raise DevStackError(f"`{command}` printed {type(parsed).__name__}, not an object")
        return parsed


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def clear_stale_demo_profiles(store: ProfileStore, names: Sequence[str]) -> list[str]:
    """Remove earlier demo profiles so signup can make fresh ones. Only tenant profiles of a loopback
    service (a previous local stack, whose data went with it) are removed; anything else is refused."""
    removed: list[str] = []
    for name in names:
        if not store.exists(name):
            continue
        profile = store.load(name)
        if profile.kind is not ProfileKind.TENANT or not is_loopback_service(profile.service):
            raise DevStackError(
                f"profile {name} exists and does not belong to a local stack; the demo will not replace it",
                hint=f"rename or remove it (hmctl profile rm {name}) and run the demo again",
                code="demo_profile_taken",
                exit_code=ExitCode.USAGE,
            )
        store.remove(name)
        removed.append(name)
    return removed


def run_demo(
    *,
    service_url: str,
    admin_profile: str,
    paths: DemoPaths,
    hmctl: HmctlRunner,
    step: Callable[[int, str], None],
    note: Callable[[str], None],
    question: str = DEFAULT_QUESTION,
) -> DemoReport:
    """The story, step by step; returns the verified answer. Any failed step raises DevStackError."""
    step(1, "The owner signs up (a fresh hmk_ key, generated and kept on this machine)")
    owner = hmctl("signup", OWNER_PROFILE, "--service", service_url, "--json")
    note(f"tenant {owner['tenant_id']}, profile {OWNER_PROFILE}")

    step(2, "The operator grants the owner credit (the owner sponsors its invitees' runs)")
    granted = hmctl(
        "--profile",
        admin_profile,
        "admin",
        "billing",
        "grant",
        owner["tenant_id"],
        "--usd",
        DEMO_CREDIT_USD,
        "--json",
    )
    balance = (granted.get("account") or {}).get("balance")
    note(f"${DEMO_CREDIT_USD} granted" + (f" (balance {balance} micro-USD)" if balance is not None else ""))

    step(3, "The owner creates a room: default scope, query and mediator agents; rules with a policy")
    created = hmctl(
        "--profile",
        OWNER_PROFILE,
        "room",
        "create",
        str(paths.scope),
        "--name",
        "people",
        "--rules-file",
        str(paths.rules),
        "--query-agent",
        str(paths.query),
        "--mediator-agent",
        str(paths.mediator),
        "--no-llm",
        "--no-invite",
        "--json",
        display=[
            "--profile",
            OWNER_PROFILE,
            "room",
            "create",
            _relative(paths.scope),
            "--name",
            "people",
            "--rules-file",
            _relative(paths.rules),
            "--query-agent",
            _relative(paths.query),
            "--mediator-agent",
            _relative(paths.mediator),
            "--no-llm",
            "--no-invite",
            "--json",
        ],
    )
    room_id = str(created["room_id"])
    note(f"room {room_id}, signed manifest {created['manifest_hash']}")

    step(4, "The owner adds the data, sealed on this machine under the room key (HMS1)")
    item = hmctl(
        "--profile",
        OWNER_PROFILE,
        "room",
        "add-data",
        room_id,
        "--file",
        str(paths.data),
        "--json",
        display=[
            "--profile",
            OWNER_PROFILE,
            "room",
            "add-data",
            room_id,
            "--file",
            _relative(paths.data),
            "--json",
        ],
    )
    note(f"item {item.get('item_id')} ({item.get('name', paths.data.name)}, {item.get('size')} bytes sealed)")

    step(5, "The owner shares the room: an invite link (a bearer credential) for 5 runs, valid a day")
    shared = hmctl(
        "--profile", OWNER_PROFILE, "room", "share", room_id, "--uses", "5", "--expires", "1d", "--json"
    )
    link = str(shared["link"])
    note(f"invite {shared.get('invite_id')}: {link[:40]}...")

    step(6, "The participant signs up")
    participant = hmctl("signup", PARTICIPANT_PROFILE, "--service", service_url, "--json")
    note(f"tenant {participant['tenant_id']}, profile {PARTICIPANT_PROFILE}")

    step(7, "The participant inspects the room: manifest signed by the link's owner key, agents, runners")
    inspected = hmctl(
        "--profile",
        PARTICIPANT_PROFILE,
        "room",
        "inspect",
        link,
        "--json",
        display=["--profile", PARTICIPANT_PROFILE, "room", "inspect", "LINK", "--json"],
    )
    runners = inspected.get("runners") or []
    verified_runners = [runner for runner in runners if runner.get("verified")]
    manifest_hash = str(inspected.get("manifest_hash") or created["manifest_hash"])
    note(
        f"manifest {manifest_hash} verified; {len(verified_runners)} of {len(runners)} runner(s) verified"
        + (
            " (simulated TEE, allowed for a loopback service)"
            if any(r.get("simulated") for r in runners)
            else ""
        )
    )

    step(8, "The participant accepts exactly the manifest it inspected")
    hmctl(
        "--profile",
        PARTICIPANT_PROFILE,
        "room",
        "accept",
        link,
        "--manifest-hash",
        manifest_hash,
        "--json",
        display=[
            "--profile",
            PARTICIPANT_PROFILE,
            "room",
            "accept",
            "LINK",
            "--manifest-hash",
            manifest_hash,
            "--json",
        ],
    )
    note("accepted; the link is remembered by this profile")

    step(9, f"The participant asks: {question!r}")
    run = hmctl(
        "--profile",
        PARTICIPANT_PROFILE,
        "room",
        "ask",
        link,
        question,
        "--json",
        display=["--profile", PARTICIPANT_PROFILE, "room", "ask", "LINK", question, "--json"],
    )
    if not run.get("verified") or run.get("status") != "completed":
        raise DevStackError(
            f"the run ended {run.get('status')} (verified: {run.get('verified')})",
            code="demo_step_failed",
            exit_code=ExitCode.RUN_FAILED,
        )
    note(f"run {run['run_id']} completed; output decrypted with the run's reply key; receipt verified")
    return DemoReport(room_id=room_id, link=link, run=run)
