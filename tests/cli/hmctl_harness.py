"""What ``hmctl`` tests share: a CLI runner bound to a transport and a profile store, and room helpers.

``Cli`` runs the real typer app in-process (``CliRunner``) with an :class:`AppState` whose HTTP
transport is given (the fake service's ``httpx.MockTransport``, or ``None`` for real HTTP)::

    cli = Cli(ProfileStore.from_environment(), fake.transport, SERVICE)
    cli.signup("owner")
    me = cli.ok("--profile", "owner", "whoami", "--json")
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmctl_fakes import FakeService
from typer.testing import CliRunner, Result

from hmctl.main import app
from hmctl.profiles import ProfileStore
from hmctl.session import AppState

AGENT_FILES = {
    "Dockerfile": 'FROM hivemind/agent-base\nCOPY main.py /agent/main.py\nCMD ["python", "/agent/main.py"]\n',
    "main.py": "print('an agent')\n",
}


@dataclass
class Outcome:
    result: Result

    @property
    def exit_code(self) -> int:
        return self.result.exit_code

    @property
    def stdout(self) -> str:
        return self.result.stdout

    @property
    def stderr(self) -> str:
        return self.result.stderr

    def json(self) -> Any:
        return json.loads(self.result.stdout)

    def __repr__(self) -> str:
        return f"exit {self.exit_code}\nstdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-2000:]}"


class Cli:
    """Runs ``hmctl`` in-process against one transport, with one profile store."""

    def __init__(self, store: ProfileStore, transport: Any, service: str) -> None:
        self.store = store
        self.transport = transport
        self.service = service
        self.runner = CliRunner()
        # Pins "now" for attestation checks (real TDX quotes verify only at their collateral's time).
        self.clock: Callable[[], int] | None = None

    @classmethod
    def for_service(cls, fake: FakeService) -> Cli:
        """A CLI talking to ``fake``, with the profiles of ``$HMCTL_CONFIG_DIR``."""
        return cls(ProfileStore.from_environment(), fake.transport, fake.service)

    def state(self) -> AppState:
        state = AppState(store=self.store, transport=self.transport, sleep=lambda _seconds: None)
        if self.clock is not None:
            state.clock = self.clock
        return state

    def run(self, *args: str, input: str | None = None) -> Outcome:
        return Outcome(self.runner.invoke(app, list(args), input=input, obj=self.state()))

    def ok(self, *args: str, input: str | None = None) -> Any:
        """Run, assert exit 0, and return the parsed --json output (or the outcome without --json)."""
        outcome = self.run(*args, input=input)
        assert outcome.exit_code == 0, repr(outcome)
        return outcome.json() if "--json" in args else outcome

    def signup(self, name: str) -> dict[str, Any]:
        return self.ok("signup", name, "--service", self.service, "--json")


def write_agent(directory: Path, files: dict[str, str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (files or AGENT_FILES).items():
        (directory / name).write_text(text)
    return directory


def make_room(
    cli: Cli, agent_dir: Path, rules_file: Path, *extra: str, profile: str = "owner"
) -> dict[str, Any]:
    """``room create`` with ``agent_dir`` as scope and query agent; returns the --json answer."""
    return cli.ok(
        "--profile",
        profile,
        "room",
        "create",
        str(agent_dir),
        "--name",
        "Sales",
        "--rules-file",
        str(rules_file),
        "--query-agent",
        str(agent_dir),
        "--no-llm",
        *extra,
        "--json",
    )


def accepted_room(cli: Cli, agent_dir: Path, rules_file: Path) -> str:
    """Profiles "owner" (a room) and "bob" (who accepted its link); returns the link."""
    cli.signup("owner")
    room = make_room(cli, agent_dir, rules_file)
    cli.signup("bob")
    cli.ok("--profile", "bob", "room", "accept", room["link"], input="y\n")
    return str(room["link"])
