"""``hmctl`` (alias ``hivemind``): the command-line client of Hivemind rooms (DESIGN §13).

Every failure ends with a stable exit code (``hmctl.errors.ExitCode``, ``docs/exit-codes.md``) and a
message on stderr that says what went wrong and what to do next. Data goes to stdout (``--json`` for
scripts); progress and messages go to stderr.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated, Any

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from hivemind.errors import HivemindError
from hmctl import __version__
from hmctl.commands import account, admin, agent, dev, doctor, profile, room, run, tenant, trust
from hmctl.console import Ui
from hmctl.errors import ApiError, CliError, ExitCode, exit_code_for
from hmctl.session import AppState

DEBUG_ENV = "HMCTL_DEBUG"


def _hint_for(error: HivemindError) -> str | None:
    if isinstance(error, CliError):
        return error.hint
    code = error.code
    if code in ("credential_unknown", "credential_revoked", "credential_expired", "credentials_missing"):
        return "check the profile (hmctl profile show) or the link; revoked or expired invites stay unusable"
    if code == "room_deleted":
        return "the owner deleted this room; ask them for a new one"
    if code in ("insufficient_credit",):
        return "add credit: hmctl redeem-credit CODE, or ask an operator (hmctl admin billing grant)"
    if isinstance(error, ApiError) and error.http_status >= 500:
        suffix = f" (request id {error.request_id})" if error.request_id else ""
        return f"retry in a moment; if it persists, tell the operator{suffix}"
    return None


def report_error(error: BaseException) -> int:
    """Print ``error`` for a person (stderr) and return the exit code it means."""
    ui = Ui()
    if isinstance(error, HivemindError):
        ui.error(f"{error.message} [{error.code}]", _hint_for(error))
        return int(exit_code_for(error))
    hint = f"set {DEBUG_ENV}=1 for details and report it"
    ui.error(f"unexpected {error.__class__.__name__}: {error}", hint)
    if os.environ.get(DEBUG_ENV):
        traceback.print_exception(error, file=sys.stderr)
    return int(ExitCode.ERROR)


class HmctlGroup(TyperGroup):
    """The root group: turns every error raised by a command into a message and an exit code."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):
            raise
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except Exception as exc:  # every error leaves as an exit code, never a traceback
            raise typer.Exit(report_error(exc)) from None


app = typer.Typer(
    name="hmctl",
    cls=HmctlGroup,
    help="Hivemind rooms: attested recall agreements between parties who do not trust each other.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hmctl {__version__}")
        raise typer.Exit


@app.callback()
def main(
    ctx: typer.Context,
    profile_name: Annotated[
        str | None,
        typer.Option(
            "--profile", "-p", envvar="HMCTL_PROFILE", help="Profile to use (default: the current)."
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Global options."""
    state = ctx.find_object(AppState)
    if state is None:
        state = AppState()
        ctx.obj = state
    if profile_name is not None:
        state.profile_name = profile_name


account.register(app)
app.add_typer(profile.app, name="profile")
app.add_typer(room.app, name="room")
app.add_typer(agent.app, name="agent")
app.add_typer(run.app, name="run")
app.add_typer(trust.app, name="trust")
app.add_typer(tenant.app, name="tenant")
app.add_typer(admin.app, name="admin")

# The local stack and diagnostics (hmctl.commands.dev, hmctl.commands.doctor).
app.add_typer(dev.app, name="dev")
doctor.register(app)
