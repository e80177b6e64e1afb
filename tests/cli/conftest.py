"""Fixtures for ``hmctl`` tests: a private configuration directory, a fake service, and a CLI runner.

    def test_something(cli: Cli, fake: FakeService) -> None:
        cli.signup("owner")                                 # a tenant and a profile called "owner"
        me = cli.ok("--profile", "owner", "whoami", "--json")
        assert me["kind"] == "tenant"

``cli`` (tests/cli/hmctl_harness.py) runs the real typer app in-process with the fake service's
``httpx.MockTransport`` (tests/cli/hmctl_fakes.py). The integration tests against the real API app
(``test_cli_integration.py``) bring their own fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import typer.main
import typer.testing
from hmctl_fakes import FakeService
from hmctl_harness import Cli, write_agent

from hmctl.main import app


@pytest.fixture(scope="session", autouse=True)
def _build_the_command_once() -> Iterator[None]:
    """Typer rebuilds the click command of ``app`` on every invoke (a quarter second); build it once."""
    command = typer.main.get_command(app)
    original = typer.testing._get_command
    typer.testing._get_command = lambda typer_app: command if typer_app is app else original(typer_app)
    yield
    typer.testing._get_command = original


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "hmctl-config"
    monkeypatch.setenv("HMCTL_CONFIG_DIR", str(directory))
    for name in ("HMCTL_PROFILE", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "HMCTL_NO_INPUT"):
        monkeypatch.delenv(name, raising=False)
    return directory


@pytest.fixture
def fake() -> FakeService:
    return FakeService()


@pytest.fixture
def cli(config_dir: Path, fake: FakeService) -> Cli:
    return Cli.for_service(fake)


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    return write_agent(tmp_path / "agent")


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.md"
    path.write_text("Only aggregate answers; groups of at least 5.\n")
    return path
