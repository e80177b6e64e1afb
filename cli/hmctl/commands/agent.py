"""``hmctl agent``: upload agents to your library, list and inspect them, read inspectable files."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from hivemind.errors import IntegrityError
from hivemind.models import Visibility
from hmctl.agents import pack_agent, upload_agent
from hmctl.commands.common import JsonFlag, when
from hmctl.console import Ui
from hmctl.errors import UsageError
from hmctl.rooms import SIMULATED_HINT, verified_runners
from hmctl.session import app_state
from hmctl.verify import choose_runner

app = typer.Typer(help="Agents: upload, list, inspect, read files, remove.", no_args_is_help=True)

AgentArg = Annotated[str, typer.Argument(help="Agent id.")]


@app.command("upload")
def upload(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="Agent directory (with a Dockerfile at its root).")],
    *,
    name: Annotated[str | None, typer.Option(help="Display name (default: the directory's name).")] = None,
    sealed: Annotated[
        bool,
        typer.Option("--sealed", help="Seal the source to a verified runner: participants cannot read it."),
    ] = False,
    json_output: JsonFlag = False,
) -> None:
    """Pack a directory deterministically and upload it as a library agent; prints its id and digest."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    profile.tenant_secret()
    if profile.tenant_id is None:
        raise UsageError(f"profile {profile.name} does not know its tenant id", hint="run: hmctl whoami")
    packed = pack_agent(directory)
    with state.profile_api(profile) as api:
        runner = None
        if sealed:
            checks = verified_runners(api, profile=profile, store=state.store, now=state.clock(), trust=None)
            runner = choose_runner(checks, simulated_hint=SIMULATED_HINT)
        with ui.transfer(f"uploading {packed.name}", len(packed.archive)) as advance:
            view = upload_agent(
                api,
                packed,
                name=name or packed.name,
                visibility=Visibility.SEALED if sealed else Visibility.INSPECTABLE,
                tenant_id=profile.tenant_id,
                runner=runner,
                progress=advance,
            )
    if json_output:
        ui.print_json(view)
        return
    ui.success(f"agent {view['agent_id']} ({view['visibility']}), source digest {view['source_digest']}")


@app.command("list")
def list_agents(
    ctx: typer.Context,
    pending: Annotated[bool, typer.Option("--pending", help="Include uploads not committed yet.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Agents this profile may see."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    with state.profile_api(profile) as api:
        agents = api.get_all("/v1/room-agents", "agents", params={"include_pending": pending})
    if json_output:
        ui.print_json({"agents": agents})
        return
    ui.table(
        ["agent", "name", "visibility", "state", "room", "source digest", "created"],
        [
            [
                a["agent_id"],
                a["name"],
                a["visibility"],
                a["state"],
                a.get("room_id") or "-",
                a["source_digest"],
                when(a["created_at"]),
            ]
            for a in agents
        ],
    )


@app.command("inspect")
def inspect(ctx: typer.Context, agent_id: AgentArg, json_output: JsonFlag = False) -> None:
    """One agent: visibility, digests, image digest, size."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    with state.profile_api(profile) as api:
        view = api.get(f"/v1/room-agents/{agent_id}")
    if json_output:
        ui.print_json(view)
        return
    ui.fields({key: value for key, value in view.items()})


@app.command("files")
def files(
    ctx: typer.Context,
    agent_id: AgentArg,
    path: Annotated[str | None, typer.Argument(help="Print this file (raw bytes on stdout).")] = None,
    json_output: JsonFlag = False,
) -> None:
    """List an inspectable agent's files with their SHA-256, or print one file (its hash is checked)."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    with state.profile_api(profile) as api:
        listing = api.get(f"/v1/room-agents/{agent_id}/files")
        if path is None:
            if json_output:
                ui.print_json(listing)
                return
            ui.table(
                ["path", "size", "exec", "sha256"],
                [
                    [f["path"], f["size"], "x" if f["executable"] else "", f["sha256"]]
                    for f in listing["files"]
                ],
                title=f"{agent_id} (source digest {listing['source_digest']})",
            )
            return
        response = api.request("GET", f"/v1/room-agents/{agent_id}/files/{path}")
    expected = {entry["path"]: entry["sha256"] for entry in listing["files"]}.get(path)
    if expected is None:
        raise UsageError(
            f"{agent_id} has no file {path!r}", hint=f"list its files: hmctl agent files {agent_id}"
        )
    if hashlib.sha256(response.content).hexdigest() != expected:
        raise IntegrityError(
            f"{path} does not match the SHA-256 in the agent's file list", code="agent_file_mismatch"
        )
    sys.stdout.buffer.write(response.content)
    sys.stdout.buffer.flush()


@app.command("rm")
def remove(ctx: typer.Context, agent_id: AgentArg, json_output: JsonFlag = False) -> None:
    """Delete an agent (refused while a room pins it)."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    with state.profile_api(profile) as api:
        view = api.delete(f"/v1/room-agents/{agent_id}")
    if json_output:
        ui.print_json(view)
        return
    ui.success(f"agent {agent_id} deleted")
