"""The generated command reference is current, and every exit code is documented."""

from __future__ import annotations

from pathlib import Path

from hmctl.docgen import render
from hmctl.errors import ExitCode

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_cli_reference_is_generated_from_the_current_commands() -> None:
    current = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert current == render(), "docs/cli.md is out of date: run `python -m hmctl.docgen docs/cli.md`"


def test_every_exit_code_is_documented_with_its_number() -> None:
    text = (DOCS / "exit-codes.md").read_text(encoding="utf-8")
    for member in ExitCode:
        assert f"| {member.value} | `{member.name}` |" in text, member
