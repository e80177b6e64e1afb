"""``hmctl trust attest``: verify the live runners' attestations on this machine."""

from __future__ import annotations

from typing import Annotated

import typer

from hmctl.commands.common import JsonFlag, short
from hmctl.console import Ui
from hmctl.errors import CliError, ExitCode
from hmctl.rooms import fetch_room, room_access, verified_runners
from hmctl.session import app_state

app = typer.Typer(help="Runner attestation.", no_args_is_help=True)


@app.command("attest")
def attest(
    ctx: typer.Context,
    room: Annotated[
        str | None, typer.Option("--room", help="Also check each runner against this room's runner trust.")
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Verify every live runner: DCAP quote and collateral, TCB status, key binding, event log, build.

    Exits 5 when no runner verifies.
    """
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    trust = None
    if room is not None:
        access = room_access(profile, room)
        with state.api(access.service, access.secret) as api:
            fetched = fetch_room(api, access, accepted=state.store.accepted(profile.name).get(access.room_id))
            trust = fetched.manifest.runner_trust
            checks = verified_runners(api, profile=profile, store=state.store, now=state.clock(), trust=trust)
    else:
        with state.profile_api(profile) as api:
            checks = verified_runners(api, profile=profile, store=state.store, now=state.clock(), trust=None)
    rows = [check.as_dict() for check in checks]
    if json_output:
        ui.print_json({"room_id": room, "runners": rows})
    else:
        ui.table(
            ["runner", "tee", "version", "build (compose hash)", "tcb", "verified", "problem"],
            [
                [
                    row["runner_id"],
                    row.get("tee"),
                    row.get("version"),
                    short(row.get("compose_hash"), 20),
                    row.get("tcb_status") or "-",
                    "yes" if row["verified"] else "NO",
                    row.get("message", ""),
                ]
                for row in rows
            ],
        )
    if not any(row["verified"] for row in rows):
        raise CliError(
            "no live runner verified" if rows else "the service lists no live runner",
            hint="see the problems listed; simulated runners need a loopback service or --allow-simulated",
            exit_code=ExitCode.VERIFICATION,
            code="no_verified_runner",
        )
