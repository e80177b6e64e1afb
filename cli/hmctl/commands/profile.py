"""``hmctl profile``: choose, list, show, adjust and remove profiles. Secrets are never printed."""

from __future__ import annotations

from typing import Annotated

import typer

from hmctl.commands.common import JsonFlag
from hmctl.console import Ui
from hmctl.errors import UsageError
from hmctl.profiles import check_service_url
from hmctl.session import app_state

app = typer.Typer(
    help="Profiles: which service, which key, what this profile accepted.", no_args_is_help=True
)


@app.command("use")
def use(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Profile to make current.")]) -> None:
    """Make NAME the current profile."""
    state = app_state(ctx)
    state.store.use(name)
    Ui().success(f"current profile: {name}")


@app.command("list")
def list_profiles(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Every profile, with the current one marked."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    current = state.store.current()
    views = [
        {**state.store.load(name).public_view(), "current": name == current} for name in state.store.names()
    ]
    if json_output:
        ui.print_json({"current": current, "profiles": views})
        return
    if not views:
        ui.info("no profiles yet: hmctl signup NAME --service URL, or hmctl init NAME --service URL")
        return
    ui.table(
        ["", "name", "kind", "service", "tenant", "key"],
        [
            [
                "*" if view["current"] else "",
                view["name"],
                view["kind"],
                view["service"],
                view["tenant_id"],
                view["key"],
            ]
            for view in views
        ],
    )


@app.command("show")
def show(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Profile to show (default: the current one).")] = None,
    json_output: JsonFlag = False,
) -> None:
    """One profile: service, kind, tenant, key prefix and id (never the key), settings."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    view = state.store.load(name or state.profile_name).public_view()
    if json_output:
        ui.print_json(view)
        return
    ui.fields({key: value for key, value in view.items() if key not in ("service_aliases", "rooms_joined")})
    for old, new in view["service_aliases"].items():
        ui.print(f"alias: {old} -> {new}")
    if view["rooms_joined"]:
        ui.print("rooms joined by link: " + ", ".join(view["rooms_joined"]))


@app.command("set")
def set_options(
    ctx: typer.Context,
    *,
    allow_simulated: Annotated[
        bool | None,
        typer.Option("--allow-simulated/--refuse-simulated", help="Accept runners without a TEE, or never."),
    ] = None,
    default_simulated: Annotated[
        bool,
        typer.Option("--default-simulated", help="Back to the default: simulated runners on loopback only."),
    ] = False,
    pccs_url: Annotated[str | None, typer.Option(help="PCCS for DCAP collateral ('' for Intel PCS).")] = None,
    service: Annotated[str | None, typer.Option(help="Move the profile to another service URL.")] = None,
    alias: Annotated[
        list[str] | None,
        typer.Option(
            "--service-alias", help="OLD=NEW: links naming the OLD service URL go to NEW (repeatable)."
        ),
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Change settings of the current (or --profile) profile."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    update: dict[str, object] = {}
    if default_simulated and allow_simulated is not None:
        raise UsageError("--default-simulated and --allow-simulated/--refuse-simulated exclude each other")
    if default_simulated:
        update["allow_simulated"] = None
    elif allow_simulated is not None:
        update["allow_simulated"] = allow_simulated
    if pccs_url is not None:
        update["pccs_url"] = pccs_url or None
    if service is not None:
        update["service"] = check_service_url(service)
    if alias:
        aliases = dict(profile.service_aliases)
        for pair in alias:
            old, separator, new = pair.partition("=")
            if not separator:
                raise UsageError(f"--service-alias takes OLD=NEW, not {pair!r}")
            aliases[check_service_url(old)] = check_service_url(new)
        update["service_aliases"] = aliases
    if not update:
        raise UsageError("nothing to change", hint="see hmctl profile set --help")
    changed = profile.model_validate({**profile.model_dump(), **update})
    state.store.save(changed)
    if json_output:
        ui.print_json(changed.public_view())
        return
    ui.success(f"profile {profile.name} updated")


@app.command("rm")
def remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Profile to remove.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Remove a profile. Its key is gone for good unless you kept a copy: its rooms become unusable."""
    state = app_state(ctx)
    ui = Ui()
    state.store.load(name)
    if not yes and not ui.confirm(f"Remove profile {name} and the key it holds?"):
        raise UsageError("not removed", hint=f"pass -y to remove {name} without asking")
    state.store.remove(name)
    ui.success(f"profile {name} removed")
