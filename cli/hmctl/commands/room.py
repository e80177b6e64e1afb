"""``hmctl room``: create rooms, add data, share and revoke invites, inspect, accept, ask, trust, delete."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from hivemind.errors import HivemindError
from hivemind.manifest import RoomManifest
from hivemind.models import (
    DEFAULT_BUDGET_LIMITS,
    BudgetLimits,
    Budgets,
    OutputVisibility,
    QueryMode,
    Visibility,
)
from hivemind.policy import parse_policy
from hivemind.trust import RunnerTrust, RunnerTrustMode
from hmctl.agents import pack_agent, upload_agent
from hmctl.client import ApiClient
from hmctl.commands.common import JsonFlag, YesFlag, short, when
from hmctl.console import Ui
from hmctl.errors import NotAccepted, RunFailed, UsageError, exit_code_for
from hmctl.profiles import Profile, RunTicket, RunTickets
from hmctl.rooms import (
    SIMULATED_HINT,
    AgentChoice,
    FetchedRoom,
    RoomAccess,
    RoomSpec,
    accept_command,
    add_item,
    bearer_of,
    check_narrowing,
    check_room,
    create_invite,
    create_room,
    fetch_room,
    item_metadata,
    owned_room,
    parse_duration,
    read_text_file,
    room_access,
    room_dek,
    runner_trust_from,
    update_trust,
    verified_runners,
)
from hmctl.runs import Expected, OutputKeyHolder, open_run_output, submit_run
from hmctl.session import AppState, app_state
from hmctl.verify import choose_runner, record_acceptance

app = typer.Typer(help="Rooms: create, share, inspect, accept, ask.", no_args_is_help=True)

RoomArg = Annotated[
    str, typer.Argument(help="Room id (yours, or joined by link) or an hmroom:// invite link.")
]
OwnedRoomArg = Annotated[str, typer.Argument(help="Id of a room this profile owns.")]
SkipAttestations = Annotated[
    bool,
    typer.Option(
        "--dangerously-skip-attestations",
        help="Do NOT verify the runner (no TEE proof, no build check). Loud, and recorded in the output.",
    ),
]


def _owner(state: AppState) -> tuple[Profile, str]:
    profile = state.profile()
    profile.tenant_secret()
    if profile.tenant_id is None:
        raise UsageError(f"profile {profile.name} does not know its tenant id", hint="run: hmctl whoami")
    return profile, profile.tenant_id


def _budgets(path: Path | None) -> BudgetLimits:
    if path is None:
        return DEFAULT_BUDGET_LIMITS
    try:
        return BudgetLimits.model_validate_json(read_text_file(path, "budgets"))
    except ValidationError as exc:
        raise UsageError(
            f"{path}: not budget limits {{defaults, maxima}}: {exc.errors()[0]['msg']}"
        ) from None


def _danger(ui: Ui) -> None:
    ui.danger_banner(
        "--dangerously-skip-attestations: the runner is NOT verified. Nothing proves it runs in a TEE, runs "
        "a "
        "build this room trusts, or that its keys are not the operator's. Do not use this with real data."
    )


# --- create ---------------------------------------------------------------------------------------


@app.command("create")
def create(
    ctx: typer.Context,
    scope_dir: Annotated[Path, typer.Argument(help="Directory of the scope agent (with a Dockerfile).")],
    *,
    name: Annotated[str, typer.Option("--name", help="Display name of the room.")],
    rules_file: Annotated[Path, typer.Option("--rules-file", help="The rules participants read (text).")],
    policy_file: Annotated[Path | None, typer.Option(help="Policy text shown with the rules.")] = None,
    query_agent: Annotated[
        Path | None, typer.Option("--query-agent", help="Directory of the fixed query agent.")
    ] = None,
    mediator_agent: Annotated[
        Path | None, typer.Option("--mediator-agent", help="Directory of the mediator agent.")
    ] = None,
    uploadable_query: Annotated[
        bool, typer.Option("--uploadable-query", help="Participants bring their own query agent.")
    ] = False,
    uploaded_query_visibility: Annotated[
        Visibility, typer.Option(help="Visibility an uploaded query agent must have.")
    ] = Visibility.INSPECTABLE,
    sealed_scope: Annotated[
        bool, typer.Option("--sealed-scope", help="Seal the scope agent's source to the runner.")
    ] = False,
    sealed_query: Annotated[
        bool, typer.Option("--sealed-query", help="Seal the query agent's source to the runner.")
    ] = False,
    sealed_mediator: Annotated[
        bool, typer.Option("--sealed-mediator", help="Seal the mediator's source to the runner.")
    ] = False,
    output_visibility: Annotated[
        OutputVisibility, typer.Option("--output-visibility", help="Who may read outputs.")
    ] = OutputVisibility.QUERIER_ONLY,
    no_llm: Annotated[bool, typer.Option("--no-llm", help="No LLM egress at all (the default).")] = False,
    llm_provider: Annotated[
        list[str] | None, typer.Option("--llm-provider", help="Allow this LLM provider (repeatable).")
    ] = None,
    artifacts: Annotated[bool, typer.Option("--artifacts", help="Let runs return artifacts.")] = False,
    budgets_file: Annotated[Path | None, typer.Option(help="JSON {defaults, maxima} budget limits.")] = None,
    data_policy_file: Annotated[
        Path | None, typer.Option(help="JSON ScopePolicy the scope agent may only narrow.")
    ] = None,
    trust_compose: Annotated[
        list[str] | None,
        typer.Option("--trust-compose", help="Trust this runner build (compose hash; repeatable)."),
    ] = None,
    trust_mode: Annotated[
        RunnerTrustMode,
        typer.Option(help="owner_approved (update by trust updates) or pinned (never changes)."),
    ] = RunnerTrustMode.OWNER_APPROVED,
    invite: Annotated[
        bool, typer.Option("--invite/--no-invite", help="Also make a first invite link.")
    ] = True,
    uses: Annotated[int | None, typer.Option(help="Runs the first invite may start.")] = None,
    expires: Annotated[str | None, typer.Option(help="First invite's lifetime, e.g. 7d.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Create a room: pack and upload the agents, sign the manifest, make and wrap the room key.

    Runner trust defaults to the builds of the runners that verify right now (owner_approved).
    Prints {"room_id", "link", "manifest_hash"} with --json.
    """
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile, tenant_id = _owner(state)
    secret = profile.tenant_secret()
    if uploadable_query and query_agent is not None:
        raise UsageError("--uploadable-query rooms take no --query-agent")
    if not uploadable_query and query_agent is None:
        raise UsageError(
            "a room needs a query agent",
            hint="pass --query-agent DIR, or --uploadable-query to let participants bring one",
        )
    if no_llm and llm_provider:
        raise UsageError("--no-llm and --llm-provider exclude each other")
    if sealed_query and query_agent is None:
        raise UsageError("--sealed-query needs --query-agent")
    if sealed_mediator and mediator_agent is None:
        raise UsageError("--sealed-mediator needs --mediator-agent")

    def choice(path: Path, sealed: bool) -> AgentChoice:
        return AgentChoice(
            packed=pack_agent(path), visibility=Visibility.SEALED if sealed else Visibility.INSPECTABLE
        )

    data_policy = parse_policy(read_text_file(data_policy_file, "data policy")) if data_policy_file else None
    now = state.clock()
    with state.profile_api(profile) as api:
        checks = verified_runners(api, profile=profile, store=state.store, now=now, trust=None)
        trust = runner_trust_from(checks, explicit=trust_compose or [], mode=trust_mode)
        spec = RoomSpec(
            name=name,
            rules=read_text_file(rules_file, "rules"),
            policy=read_text_file(policy_file, "policy") if policy_file else "",
            scope=choice(scope_dir, sealed_scope),
            query=choice(query_agent, sealed_query) if query_agent is not None else None,
            uploaded_query_visibility=uploaded_query_visibility,
            mediator=choice(mediator_agent, sealed_mediator) if mediator_agent is not None else None,
            output=output_visibility,
            llm_providers=list(llm_provider or []),
            artifacts=artifacts,
            budgets=_budgets(budgets_file),
            runner_trust=trust,
            data_policy=data_policy,
        )
        sealing_runner = None
        if sealed_scope or sealed_query or sealed_mediator:
            sealing_runner = choose_runner(
                [
                    check
                    for check in checks
                    if check.verified and check.verified.compose_hash in trust.allowed_compose_hashes
                ],
                simulated_hint=SIMULATED_HINT,
            )
        created = create_room(api, secret, tenant_id=tenant_id, spec=spec, runner=sealing_runner, now=now)
        # The owner wrote these terms: they count as accepted by this profile.
        record_acceptance(
            state.store.accepted(profile.name),
            created.signed,
            pinned_sign_pub=created.signed.manifest.owner_sign_pub,
            now=now,
        )
        link: str | None = None
        invite_id: str | None = None
        if invite:
            new = create_invite(
                api,
                service=profile.service,
                room_id=created.room_id,
                dek=created.dek,
                pinned_sign_pub=created.signed.manifest.owner_sign_pub,
                uses=uses,
                expires_at=now + parse_duration(expires) if expires else None,
                budgets=None,
                label="created with the room",
            )
            link, invite_id = new.link, new.invite["invite_id"]
    result = {
        "room_id": created.room_id,
        "link": link,
        "invite_id": invite_id,
        "manifest_hash": created.signed.manifest_hash,
        "revision": created.signed.manifest.revision,
        "runner_trust": trust.model_dump(mode="json"),
    }
    if json_output:
        ui.print_json(result)
        return
    ui.success(f"room {created.room_id} created (manifest {short(created.signed.manifest_hash)})")
    ui.info(f"trusted runner builds: {', '.join(short(item) for item in trust.allowed_compose_hashes)}")
    if link is not None:
        ui.info("Invite link (a bearer credential: share it privately):")
        ui.print(link)


# --- reading ---------------------------------------------------------------------------------------


@app.command("list")
def list_rooms(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Rooms this profile owns."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile, _ = _owner(state)
    with state.profile_api(profile) as api:
        rooms = api.get_all("/v1/rooms", "rooms")
    if json_output:
        ui.print_json({"rooms": rooms})
        return
    ui.table(
        ["room", "name", "status", "revision", "manifest", "created"],
        [
            [
                r["room_id"],
                r.get("name"),
                r["status"],
                r["revision"],
                short(r["manifest_hash"]),
                when(r["created_at"]),
            ]
            for r in rooms
        ],
    )


def _agent_rows(manifest: RoomManifest, agents: list[dict[str, Any]]) -> list[list[Any]]:
    available = {(agent["role"], agent["agent_id"]): agent.get("available") for agent in agents}
    rows: list[list[Any]] = []
    refs = [("scope", manifest.scope), ("mediator", manifest.mediator)]
    if manifest.query.mode is QueryMode.FIXED:
        rows.append(
            [
                "query",
                manifest.query.agent_id,
                manifest.query.digest,
                manifest.query.visibility.value,
                available.get(("query", manifest.query.agent_id)),
            ]
        )
    else:
        rows.append(["query", "(participant's own)", "-", manifest.query.visibility.value, "-"])
    for role, ref in refs:
        if ref is not None:
            rows.append(
                [role, ref.agent_id, ref.digest, ref.visibility.value, available.get((role, ref.agent_id))]
            )
    return rows


def room_summary(fetched: FetchedRoom) -> dict[str, Any]:
    manifest = fetched.manifest
    return {
        "room_id": manifest.room_id,
        "name": manifest.name,
        "owner_tenant_id": manifest.tenant_id,
        "revision": manifest.revision,
        "manifest_hash": fetched.signed.manifest_hash,
        "owner_sign_pub": manifest.owner_sign_pub,
        "pinned_sign_pub": fetched.access.pinned_sign_pub,
        "key_rotated": manifest.owner_sign_pub != fetched.access.pinned_sign_pub,
        "accepted": fetched.accepted is not None
        and fetched.accepted.manifest_hash == fetched.signed.manifest_hash,
        "manifest": manifest.model_dump(mode="json"),
        "agents": fetched.agents,
    }


def show_room(ui: Ui, fetched: FetchedRoom, runner_checks: list[dict[str, Any]]) -> None:
    """What a participant reviews before accepting: rules, agents and digests, trust, runners."""
    manifest = fetched.manifest
    trusted = ", ".join(manifest.runner_trust.allowed_compose_hashes) or "-"
    ui.fields(
        {
            "room": f"{manifest.name} ({manifest.room_id})",
            "owner": manifest.tenant_id,
            "revision": manifest.revision,
            "manifest hash": fetched.signed.manifest_hash,
            "signed by": manifest.owner_sign_pub
            + (
                ""
                if manifest.owner_sign_pub == fetched.access.pinned_sign_pub
                else " (rotated from the key your link pins)"
            ),
            "output shown to": "you only"
            if manifest.output.visibility is OutputVisibility.QUERIER_ONLY
            else "you and the owner",
            "LLM egress": ", ".join(manifest.egress.llm_providers) or "none",
            "artifacts": "allowed" if manifest.egress.artifacts else "no",
            "budgets (max)": ", ".join(f"{k}={v}" for k, v in manifest.budgets.maxima.model_dump().items()),
            "data policy": "set by the owner" if manifest.data_policy is not None else "from the scope agent",
            "runner trust": f"{manifest.runner_trust.mode.value}: {trusted}",
        },
        title="room",
    )
    ui.print("rules:")
    ui.print(manifest.rules)
    if manifest.policy:
        ui.print("policy:")
        ui.print(manifest.policy)
    ui.table(
        ["stage", "agent", "source digest", "visibility", "available"],
        _agent_rows(manifest, fetched.agents),
        title="agents",
    )
    if runner_checks:
        ui.table(
            ["runner", "tee", "build", "verified", "problem"],
            [
                [
                    c["runner_id"],
                    c.get("tee"),
                    short(c.get("compose_hash")),
                    "yes" if c["verified"] else "NO",
                    c.get("message", ""),
                ]
                for c in runner_checks
            ],
            title="runners",
        )


def _fetch(state: AppState, profile: Profile, room: str) -> tuple[RoomAccess, ApiClient, FetchedRoom]:
    access = room_access(profile, room)
    api = state.api(access.service, access.secret)
    try:
        fetched = fetch_room(api, access, accepted=state.store.accepted(profile.name).get(access.room_id))
    except BaseException:
        api.close()
        raise
    return access, api, fetched


@app.command("inspect")
def inspect(ctx: typer.Context, room: RoomArg, json_output: JsonFlag = False) -> None:
    """Verify and show a room: its signed rules, agents and digests, runner trust and live runners."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    access, api, fetched = _fetch(state, profile, room)
    with api:
        checks = verified_runners(
            api, profile=profile, store=state.store, now=state.clock(), trust=fetched.manifest.runner_trust
        )
    runner_checks = [check.as_dict() for check in checks]
    if json_output:
        ui.print_json({**room_summary(fetched), "runners": runner_checks})
        return
    show_room(ui, fetched, runner_checks)
    if not room_summary(fetched)["accepted"] and not access.is_owner:
        ui.info(f"not accepted yet: {accept_command(profile, access)}")


@app.command("accept")
def accept(
    ctx: typer.Context,
    room: RoomArg,
    *,
    manifest_hash: Annotated[
        str | None, typer.Option(help="Accept without a prompt, only if the manifest has exactly this hash.")
    ] = None,
    yes: YesFlag = False,
    json_output: JsonFlag = False,
) -> None:
    """Review a room's signed manifest and accept it for this profile (the link is remembered).

    Asks on the terminal, or reads the answer from stdin (`echo y | hmctl room accept LINK`). -y does
    NOT accept a manifest; for scripts, --manifest-hash pins the exact manifest you reviewed.
    """
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    access, api, fetched = _fetch(state, profile, room)
    with api:
        checks = verified_runners(
            api, profile=profile, store=state.store, now=state.clock(), trust=fetched.manifest.runner_trust
        )
    runner_checks = [check.as_dict() for check in checks]
    summary = room_summary(fetched)
    if not json_output:
        show_room(ui, fetched, runner_checks)
    if manifest_hash is not None:
        if manifest_hash != fetched.signed.manifest_hash:
            raise NotAccepted(
                f"the room's manifest is {fetched.signed.manifest_hash}, not the one you reviewed",
                hint=f"inspect it again: hmctl room inspect {'LINK' if access.link else access.room_id}",
            )
    elif not summary["accepted"]:
        if yes and not ui.interactive:
            ui.warn("-y does not accept room manifests")
        if not ui.confirm(
            f"Accept room {fetched.manifest.name} at revision {fetched.manifest.revision}?", piped=True
        ):
            raise NotAccepted(
                "the manifest was not accepted",
                hint=f"answer y to {accept_command(profile, access)} (or pass --manifest-hash HASH)",
            )
    record = record_acceptance(
        state.store.accepted(profile.name),
        fetched.signed,
        pinned_sign_pub=access.pinned_sign_pub,
        now=state.clock(),
    )
    if access.link is not None:
        links = {**profile.links, access.room_id: access.link}
        state.store.save(profile.model_copy(update={"links": links}))
    if json_output:
        ui.print_json(
            {**summary, "accepted": True, "accepted_at": record.accepted_at, "runners": runner_checks}
        )
        return
    ui.success(
        f"accepted room {access.room_id} at revision {record.revision} ({short(record.manifest_hash)})"
    )


# --- asking ----------------------------------------------------------------------------------------


def _ask_budgets(
    timeout_s: int | None, llm_calls: int | None, tokens: int | None, memory_mb: int | None, base: Budgets
) -> Budgets | None:
    asked = {"timeout_s": timeout_s, "llm_calls": llm_calls, "tokens": tokens, "memory_mb": memory_mb}
    if all(value is None for value in asked.values()):
        return None
    merged = {**base.model_dump(), **{key: value for key, value in asked.items() if value is not None}}
    try:
        return Budgets(**merged)
    except ValidationError as exc:
        raise UsageError(f"budgets: {exc.errors()[0]['msg']}") from None


def _submit(
    api: ApiClient,
    state: AppState,
    profile: Profile,
    access: RoomAccess,
    prompt: str,
    *,
    now: int,
    skip_attestations: bool,
    confirm: Callable[[FetchedRoom], bool],
    budgets: tuple[int | None, int | None, int | None, int | None],
    query_agent: Path | None,
    query_agent_id: str | None,
    tickets: RunTickets,
) -> RunTicket:
    """Every check of a run (room, acceptance, runner), the participant's query agent, the sealed run."""
    checked = check_room(
        api,
        access,
        profile=profile,
        store=state.store,
        now=now,
        skip_attestations=skip_attestations,
        confirm_acceptance=confirm,
    )
    requested = _ask_budgets(*budgets, checked.manifest.budgets.defaults)
    agent_id = query_agent_id
    if query_agent is not None:
        if checked.manifest.query.mode is not QueryMode.UPLOADABLE:
            raise UsageError("this room has a fixed query agent; it takes no --query-agent")
        view = upload_agent(
            api,
            pack_agent(query_agent),
            name=query_agent.resolve().name,
            visibility=checked.manifest.query.visibility,
            tenant_id=checked.manifest.tenant_id,
            runner=checked.runner,
            room_id=access.room_id,
        )
        agent_id = view["agent_id"]
    return submit_run(
        api,
        checked,
        prompt,
        tenant_id=profile.tenant_id,
        budgets=requested,
        query_agent_id=agent_id,
        tickets=tickets,
        now=now,
    )


@app.command("ask")
def ask(
    ctx: typer.Context,
    room: RoomArg,
    question: Annotated[str, typer.Argument(help="The question (the prompt), or - to read it from stdin.")],
    *,
    query_agent: Annotated[
        Path | None, typer.Option("--query-agent", help="Uploadable rooms: your query agent's directory.")
    ] = None,
    query_agent_id: Annotated[
        str | None, typer.Option(help="Uploadable rooms: a query agent you uploaded before.")
    ] = None,
    timeout_s: Annotated[int | None, typer.Option("--timeout-s", help="Budget: wall-clock seconds.")] = None,
    llm_calls: Annotated[int | None, typer.Option(help="Budget: LLM calls.")] = None,
    tokens: Annotated[int | None, typer.Option(help="Budget: LLM tokens.")] = None,
    memory_mb: Annotated[int | None, typer.Option(help="Budget: memory per agent (MB).")] = None,
    pay: Annotated[
        bool, typer.Option("--pay", help="Pay with this profile's tenant key instead of the room owner.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait for the answer (default) or print the run id.")
    ] = True,
    wait_timeout: Annotated[int, typer.Option(help="Give up waiting after this many seconds.")] = 1800,
    output_file: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the raw output here.")
    ] = None,
    skip_attestations: SkipAttestations = False,
    yes: YesFlag = False,
    json_output: JsonFlag = False,
) -> None:
    """Verify the room and its runner, seal the question to the runner, and print the verified answer.

    Exit 0 only when the answer was delivered and its receipt verified. --json prints
    {"run_id", "status", "output", "verified", "receipt", "attestation_skipped", ...}.
    """
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    prompt = question if question != "-" else typer.get_text_stream("stdin").read()
    access = room_access(profile, room)
    if skip_attestations:
        _danger(ui)
    payer = profile.tenant_secret() if pay else None
    now = state.clock()

    def confirm(fetched: FetchedRoom) -> bool:
        # -y never accepts a manifest; only a person at a terminal can, here.
        if not ui.interactive:
            return False
        show_room(ui.on_stderr(), fetched, [])
        accepted = ui.confirm(
            f"You have not accepted this room's manifest. Accept room {fetched.manifest.name}?"
        )
        if accepted and access.link is not None:
            state.store.save(
                profile.model_copy(update={"links": {**profile.links, access.room_id: access.link}})
            )
        return accepted

    tickets = state.store.run_tickets(profile.name)
    with state.api(access.service, access.secret, payer=payer) as api:
        try:
            ticket = _submit(
                api,
                state,
                profile,
                access,
                prompt,
                now=now,
                skip_attestations=skip_attestations,
                confirm=confirm,
                budgets=(timeout_s, llm_calls, tokens, memory_mb),
                query_agent=query_agent,
                query_agent_id=query_agent_id,
                tickets=tickets,
            )
        except HivemindError as exc:
            print_failure(ui, exc, run_id=None, status=None, skipped=skip_attestations)
            raise
        if not wait:
            result = {"run_id": ticket.run_id, "status": "pending", "attestation_skipped": skip_attestations}
            if json_output:
                ui.print_json(result)
            else:
                ui.success(f"run {ticket.run_id} submitted; follow it with: hmctl run wait {ticket.run_id}")
            return
        deliver(
            state,
            ui,
            api,
            ticket_id=ticket.run_id,
            profile=profile,
            wait_timeout=wait_timeout,
            output_file=output_file,
        )


def print_failure(ui: Ui, error: HivemindError, *, run_id: str | None, status: Any, skipped: bool) -> None:
    """With --json, a run that was not delivered verified still prints one JSON object (stdout)."""
    if not ui.json_output:
        return
    ui.print_json(
        {
            "run_id": run_id,
            "status": status,
            "output": None,
            "verified": False,
            "receipt": None,
            "attestation_skipped": skipped,
            "error": error.code,
            "message": error.message,
            "exit_code": int(exit_code_for(error)),
        }
    )


def deliver(
    state: AppState,
    ui: Ui,
    api: ApiClient,
    *,
    ticket_id: str,
    profile: Profile,
    wait_timeout: int,
    output_file: Path | None,
) -> None:
    """Follow a run this profile started, then open, verify and print its output (shared with ``run``)."""
    ticket = state.store.run_tickets(profile.name).get(ticket_id)
    if ticket is None:
        raise UsageError(f"this profile did not start run {ticket_id}, so it holds no key to its output")
    with ui.stage_display(ticket.run_id) as show:
        view = api.wait_for_run(ticket.run_id, on_update=show, timeout_s=wait_timeout)
    try:
        output_view = api.get(f"/v1/runs/{ticket.run_id}/output")
        if output_view.get("receipt") is None and view.get("status") != "completed":
            # No runner signed anything (it expired in the queue, or its runner vanished).
            raise RunFailed(
                f"run {ticket.run_id} {view.get('status')} without a receipt: "
                f"{view.get('error_code') or 'no runner finished it'}",
                hint="nothing was charged beyond what the service reports; ask again later",
            )
        outcome = open_run_output(
            api, output_view, expected=Expected.of_ticket(ticket), holder=OutputKeyHolder.querier(ticket)
        )
    except HivemindError as exc:
        print_failure(
            ui, exc, run_id=ticket.run_id, status=view.get("status"), skipped=ticket.attestation_skipped
        )
        raise
    result = outcome.as_dict(attestation_skipped=ticket.attestation_skipped)
    if output_file is not None and outcome.output is not None:
        output_file.write_bytes(outcome.output)
    if ui.json_output:
        ui.print_json(result)
    else:
        if outcome.output is not None and output_file is None:
            ui.raw(result["output"] + ("" if str(result["output"]).endswith("\n") else "\n"))
        receipt = outcome.receipt
        ui.success(
            f"run {ticket.run_id} {receipt.status.value}; receipt verified against the "
            + ("UNATTESTED" if ticket.attestation_skipped else "attested")
            + f" runner key (build {short(receipt.compose_hash)}, {receipt.totals.duration_ms} ms)"
        )
    if outcome.status.value != "completed":
        raise RunFailed(
            f"run {ticket.run_id} {outcome.status.value}: {outcome.receipt.error_code}",
            hint="the receipt is verified; the error code says which stage refused (see docs/exit-codes.md)",
        )


# --- data ------------------------------------------------------------------------------------------


@app.command("add-data")
def add_data(
    ctx: typer.Context,
    room: OwnedRoomArg,
    *,
    file: Annotated[Path, typer.Option("--file", "-f", help="File to seal and upload (streamed, any size).")],
    meta: Annotated[
        list[str] | None,
        typer.Option("--meta", help="key=value metadata (repeatable); table defaults to the file stem."),
    ] = None,
    content_type: Annotated[
        str | None, typer.Option(help="Content type (default: guessed from the name).")
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Seal a file under the room key (HMS1) on this machine and upload it; prints the committed item."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile, tenant_id = _owner(state)
    secret = profile.tenant_secret()
    if not file.is_file():
        raise UsageError(f"{file} is not a file")
    metadata = item_metadata(file, meta or [])
    with state.profile_api(profile) as api:
        signed = owned_room(api, secret, room)
        dek = room_dek(api, secret, room, tenant_id)
        item = add_item(
            api,
            room_id=room,
            owner_tenant_id=signed.manifest.tenant_id,
            dek=dek,
            path=file,
            metadata=metadata,
            content_type=content_type,
            transfer=ui.transfer,
        )
    if json_output:
        ui.print_json(item)
        return
    ui.success(f"added {file.name} as {item['item_id']} ({item['size']} bytes sealed)")


@app.command("data")
def data(
    ctx: typer.Context,
    room: OwnedRoomArg,
    pending: Annotated[bool, typer.Option("--pending", help="Include uploads not committed yet.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """The room's sealed items (names, sizes and metadata; the content stays sealed)."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile, _ = _owner(state)
    with state.profile_api(profile) as api:
        items = api.get_all(f"/v1/rooms/{room}/data", "items", params={"include_pending": pending})
    if json_output:
        ui.print_json({"items": items})
        return
    ui.table(
        ["item", "name", "table", "type", "size", "state", "added"],
        [
            [
                i["item_id"],
                i["metadata"].get("name"),
                i["metadata"].get("table"),
                i["content_type"],
                i["size"],
                i["state"],
                when(i["created_at"]),
            ]
            for i in items
        ],
    )


@app.command("rm-data")
def rm_data(
    ctx: typer.Context,
    room: OwnedRoomArg,
    item_id: Annotated[str, typer.Argument(help="Item to remove.")],
    json_output: JsonFlag = False,
) -> None:
    """Remove an item and its sealed object."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile, _ = _owner(state)
    with state.profile_api(profile) as api:
        removed = api.delete(f"/v1/rooms/{room}/data/{item_id}")
    if json_output:
        ui.print_json(removed)
        return
    ui.success(f"removed {item_id} from {room}")


# --- invites ---------------------------------------------------------------------------------------


@app.command("share")
def share(
    ctx: typer.Context,
    room: RoomArg,
    *,
    uses: Annotated[
        int | None,
        typer.Option(help="Runs the invite may start (default: unlimited, or what yours has left)."),
    ] = None,
    expires: Annotated[
        str | None, typer.Option(help="Lifetime, e.g. 7d, 12h (default: none, or your invite's).")
    ] = None,
    label: Annotated[str | None, typer.Option(help="A note for your own listing.")] = None,
    max_timeout_s: Annotated[int | None, typer.Option(help="Budget cap per run: seconds.")] = None,
    max_llm_calls: Annotated[int | None, typer.Option(help="Budget cap per run: LLM calls.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Budget cap per run: tokens.")] = None,
    max_memory_mb: Annotated[int | None, typer.Option(help="Budget cap per run: memory (MB).")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Make an invite link. The owner shares its room; a participant derives a narrower invite from its link.

    Prints {"link", "invite_id", ...} with --json. The link carries a secret: share it privately.
    """
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    access = room_access(profile, room)
    now = state.clock()
    expires_at = now + parse_duration(expires) if expires else None
    with state.api(access.service, access.secret) as api:
        if access.is_owner:
            signed = owned_room(api, access.secret, access.room_id)
            pinned = signed.manifest.owner_sign_pub
            parent: dict[str, Any] | None = None
        else:
            fetched = fetch_room(api, access, accepted=state.store.accepted(profile.name).get(access.room_id))
            signed, pinned = fetched.signed, access.pinned_sign_pub
            parent = api.get("/v1/whoami")
        maxima = signed.manifest.budgets.maxima
        caps = {
            "timeout_s": max_timeout_s,
            "llm_calls": max_llm_calls,
            "tokens": max_tokens,
            "memory_mb": max_memory_mb,
        }
        budgets = None
        if any(value is not None for value in caps.values()):
            base = Budgets.model_validate(parent["budgets"]) if parent and parent.get("budgets") else maxima
            budgets = Budgets(**{**base.model_dump(), **{k: v for k, v in caps.items() if v is not None}})
        if parent is not None:
            check_narrowing(parent, uses=uses, expires_at=expires_at, budgets=budgets)
        dek = room_dek(api, access.secret, access.room_id, bearer_of(access, profile.tenant_id))
        new = create_invite(
            api,
            service=access.service,
            room_id=access.room_id,
            dek=dek,
            pinned_sign_pub=pinned,
            uses=uses,
            expires_at=expires_at,
            budgets=budgets,
            label=label,
        )
    result = {
        "link": new.link,
        "room_id": access.room_id,
        "invite_id": new.invite["invite_id"],
        "parent_id": new.invite.get("parent_id"),
        "uses": new.invite.get("max_uses"),
        "expires_at": new.invite.get("expires_at"),
        "budgets": new.invite.get("budgets"),
    }
    if json_output:
        ui.print_json(result)
        return
    ui.success(
        f"invite {result['invite_id']} for {access.room_id}"
        + (f" (derived from {result['parent_id']})" if result["parent_id"] else "")
        + f"; uses: {result['uses'] or 'unlimited'}; expires: {when(result['expires_at'])}"
    )
    ui.info("Invite link (a bearer credential: share it privately):")
    ui.print(new.link)


@app.command("invites")
def invites(ctx: typer.Context, room: OwnedRoomArg, json_output: JsonFlag = False) -> None:
    """The room's invites (owner)."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile, _ = _owner(state)
    with state.profile_api(profile) as api:
        entries = api.get_all(f"/v1/rooms/{room}/invites", "invites")
    if json_output:
        ui.print_json({"invites": entries})
        return
    ui.table(
        ["invite", "parent", "label", "uses", "expires", "revoked", "created"],
        [
            [
                i["invite_id"],
                i.get("parent_id") or "-",
                i.get("label") or "",
                f"{i['uses']}/{i.get('max_uses') or '∞'}",
                when(i.get("expires_at")),
                "yes" if i["revoked"] else "",
                when(i["created_at"]),
            ]
            for i in entries
        ],
    )


@app.command("revoke-invite")
def revoke_invite(
    ctx: typer.Context,
    room: RoomArg,
    invite_id: Annotated[str, typer.Argument(help="The invite to revoke (its descendants go with it).")],
    json_output: JsonFlag = False,
) -> None:
    """Revoke an invite and every invite derived from it; their links stop working at once."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    access = room_access(state.profile(), room)
    with state.api(access.service, access.secret) as api:
        revoked = api.delete(f"/v1/rooms/{access.room_id}/invites/{invite_id}")
    if json_output:
        ui.print_json({"room_id": access.room_id, **revoked})
        return
    ids = revoked.get("revoked") or []
    ui.success(f"revoked {', '.join(ids) if ids else 'nothing new (already revoked)'}")


# --- trust, delete, runs ---------------------------------------------------------------------------


@app.command("trust")
def trust(
    ctx: typer.Context,
    room: OwnedRoomArg,
    *,
    add: Annotated[
        list[str] | None, typer.Option("--add", help="Trust this runner build (compose hash).")
    ] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", help="Stop trusting this build.")] = None,
    from_attested: Annotated[
        bool, typer.Option("--from-attested", help="Trust the builds of the runners that verify right now.")
    ] = False,
    mode: Annotated[RunnerTrustMode | None, typer.Option(help="Change the trust mode.")] = None,
    yes: YesFlag = False,
    json_output: JsonFlag = False,
) -> None:
    """Update which runner builds may open the room's data (re-signed at revision + 1).

    Participants must accept the new revision before their next run.
    """
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile, _ = _owner(state)
    secret = profile.tenant_secret()
    with state.profile_api(profile) as api:
        current = owned_room(api, secret, room)
        old = current.manifest.runner_trust
        hashes = set(old.allowed_compose_hashes) | set(add or [])
        if from_attested:
            checks = verified_runners(api, profile=profile, store=state.store, now=state.clock(), trust=None)
            hashes |= {check.verified.compose_hash for check in checks if check.verified}
        hashes -= set(remove or [])
        chosen_mode = mode or old.mode
        try:
            new_trust = RunnerTrust(
                mode=chosen_mode,
                allowed_compose_hashes=sorted(hashes),
                operator_sign_pub=old.operator_sign_pub
                if chosen_mode is RunnerTrustMode.OPERATOR_UPDATES
                else None,
            )
        except ValidationError as exc:
            raise UsageError(f"runner trust: {exc.errors()[0]['msg']}") from None
        if new_trust == old:
            raise UsageError("that changes nothing", hint="pass --add, --remove, --from-attested or --mode")
        if old.mode is RunnerTrustMode.PINNED and not yes:
            if not ui.confirm(
                "This room PINNED its runner trust; participants were promised it would not change. Continue?"
            ):
                raise UsageError("not changed", hint="pass -y to change a pinned room's trust anyway")
        updated, warnings = update_trust(api, secret, current, new_trust)
    record_acceptance(
        state.store.accepted(profile.name),
        updated,
        pinned_sign_pub=updated.manifest.owner_sign_pub,
        now=state.clock(),
    )
    result = {
        "room_id": room,
        "revision": updated.manifest.revision,
        "manifest_hash": updated.manifest_hash,
        "runner_trust": new_trust.model_dump(mode="json"),
        "warnings": warnings,
    }
    if json_output:
        ui.print_json(result)
        return
    for warning in warnings:
        ui.warn(warning)
    ui.success(
        f"room {room} is at revision {result['revision']}; trusted builds: "
        + (", ".join(short(h) for h in new_trust.allowed_compose_hashes) or "none")
    )


@app.command("delete")
def delete(
    ctx: typer.Context, room: OwnedRoomArg, yes: YesFlag = False, json_output: JsonFlag = False
) -> None:
    """Delete a room: every invite is revoked, the wraps and sealed data go, old links get "room deleted"."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile, _ = _owner(state)
    if not yes and not ui.confirm(
        f"Delete room {room}, its data and all its invites? This cannot be undone."
    ):
        raise UsageError("not deleted", hint=f"pass -y to delete {room} without asking")
    with state.profile_api(profile) as api:
        deleted = api.delete(f"/v1/rooms/{room}")
    if json_output:
        ui.print_json(deleted)
        return
    ui.success(
        f"room {room} deleted: {deleted['invites_revoked']} invites revoked, "
        f"{deleted['objects_deleted']} objects removed"
    )


@app.command("runs")
def runs(
    ctx: typer.Context,
    room: RoomArg,
    limit: Annotated[int, typer.Option(help="At most this many runs (newest first).")] = 50,
    json_output: JsonFlag = False,
) -> None:
    """Runs of a room: all of them for its owner, your own for an invite."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    access = room_access(state.profile(), room)
    with state.api(access.service, access.secret) as api:
        page = api.get("/v1/runs", params={"room_id": access.room_id, "limit": min(limit, 100)})
    entries = page.get("runs") or []
    if json_output:
        ui.print_json({"runs": entries})
        return
    ui.table(
        ["run", "status", "stage", "caller", "created", "finished", "error"],
        [
            [
                r["run_id"],
                r["status"],
                r.get("stage") or "-",
                r["caller_id"],
                when(r["created_at"]),
                when(r.get("finished_at")),
                r.get("error_code") or "",
            ]
            for r in entries
        ],
    )
