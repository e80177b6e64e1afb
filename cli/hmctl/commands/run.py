"""``hmctl run``: follow runs, fetch and verify their outputs and artifacts, and usage statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from hivemind.envelope import OutputRecipient
from hivemind.errors import EnvelopeError, HivemindError, ReceiptError
from hivemind.keys import owner_box_key
from hivemind.receipt import SignedReceipt
from hivemind.tokens import Secret, TokenKind
from hmctl.client import ApiClient
from hmctl.commands.common import JsonFlag, short, usd, when
from hmctl.commands.room import deliver
from hmctl.console import Ui
from hmctl.errors import UsageError
from hmctl.profiles import Profile, RunTicket
from hmctl.rooms import owned_room, room_access, verified_runners
from hmctl.runs import (
    Expected,
    OutputKeyHolder,
    RunOutcome,
    charges_by_run,
    open_run_output,
    run_stats,
    save_artifacts,
)
from hmctl.session import AppState, app_state

app = typer.Typer(help="Runs: status, outputs, artifacts, statistics.", no_args_is_help=True)

RunArg = Annotated[str, typer.Argument(help="Run id.")]


def _api_for_run(state: AppState, profile: Profile, ticket: RunTicket | None) -> ApiClient:
    """The credential that started the run (its link), or the profile's own key."""
    if ticket is not None and ticket.link is not None:
        access = room_access(profile, ticket.link)
        return state.api(access.service, access.secret)
    return state.profile_api(profile)


def _show(ui: Ui, view: dict[str, Any]) -> None:
    ui.fields(
        {
            "run": view["run_id"],
            "room": view["room_id"],
            "status": view["status"] + (f" ({view['stage']})" if view.get("stage") else ""),
            "caller": view["caller_id"],
            "payer": view["payer_tenant_id"],
            "hold": usd(view.get("hold")),
            "manifest": short(view.get("manifest_hash")),
            "created": when(view.get("created_at")),
            "finished": when(view.get("finished_at")),
            "error": (view.get("error_code") or "")
            + (f": {view['error_message']}" if view.get("error_message") else ""),
            "output visible to you": "yes" if view.get("output_visible") else "no",
        }
    )
    usage = view.get("usage") or []
    if usage:
        ui.table(
            ["stage", "seconds", "tool calls", "llm calls", "tokens in", "tokens out"],
            [
                [
                    u["stage"],
                    f"{u['duration_ms'] / 1000:.2f}",
                    sum((u.get("tool_calls") or {}).values()),
                    u["llm_calls"],
                    u["prompt_tokens"],
                    u["completion_tokens"],
                ]
                for u in usage
            ],
        )


@app.command("show")
def show(ctx: typer.Context, run_id: RunArg, json_output: JsonFlag = False) -> None:
    """A run's status, stage, usage and error (metadata only)."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    with _api_for_run(state, profile, state.store.run_tickets(profile.name).get(run_id)) as api:
        view = api.get(f"/v1/runs/{run_id}")
    if json_output:
        ui.print_json(view)
        return
    _show(ui, view)


@app.command("wait")
def wait(
    ctx: typer.Context,
    run_id: RunArg,
    *,
    timeout: Annotated[int, typer.Option(help="Give up after this many seconds.")] = 1800,
    output_file: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the raw output here.")
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Wait for a run to finish; for your own runs, print the verified output (like `room ask`)."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    ticket = state.store.run_tickets(profile.name).get(run_id)
    with _api_for_run(state, profile, ticket) as api:
        if ticket is not None:
            deliver(
                state,
                ui,
                api,
                ticket_id=run_id,
                profile=profile,
                wait_timeout=timeout,
                output_file=output_file,
            )
            return
        with ui.stage_display(run_id) as update:
            view = api.wait_for_run(run_id, on_update=update, timeout_s=timeout)
    if json_output:
        ui.print_json(view)
        return
    _show(ui, view)


def _owner_outcome(
    state: AppState, profile: Profile, api: ApiClient, run_id: str
) -> tuple[RunOutcome, Expected]:
    """An owner reading a run of its room: the output key is sealed to its owner-box key (rooms that
    show outputs to their owner); the receipt is checked against a verified runner's key."""
    secret = profile.tenant_secret()
    view = api.get(f"/v1/runs/{run_id}")
    signed_manifest = owned_room(api, secret, view["room_id"])
    manifest = signed_manifest.manifest
    output_view = api.get(f"/v1/runs/{run_id}/output")
    receipt_document = output_view.get("receipt")
    if receipt_document is None:
        raise ReceiptError(f"run {run_id} has no receipt (status {output_view.get('status')})")
    signer = SignedReceipt.model_validate(receipt_document).receipt.signer_pub
    checks = verified_runners(
        api, profile=profile, store=state.store, now=state.clock(), trust=manifest.runner_trust
    )
    holders = [
        check.verified for check in checks if check.verified is not None and check.verified.sign_pub == signer
    ]
    if not holders:
        raise ReceiptError(
            f"run {run_id}'s receipt is signed by {signer}, a key no verified live runner holds; it "
            "cannot be verified now",
            details={"field": "signature"},
        )
    expected = Expected(
        run_id=run_id,
        room_id=view["room_id"],
        owner_tenant_id=manifest.tenant_id,
        manifest_hash=view["manifest_hash"],
        prompt_sha256=None,
        attested_sign_pub=signer,
        allowed_compose_hashes=sorted(
            {*manifest.runner_trust.allowed_compose_hashes, *(h.compose_hash for h in holders)}
        ),
    )
    if output_view.get("recipient") != OutputRecipient.OWNER.value:
        return open_run_output(api, output_view, expected=expected, holder=None), expected
    # Outputs sealed before a key rotation open with the retired key that was current then.
    last_error: HivemindError | None = None
    for token in [profile.key or "", *reversed(profile.retired_keys)]:
        holder = OutputKeyHolder(
            private_key=owner_box_key(Secret.parse(token, expect=TokenKind.TENANT)),
            recipient=OutputRecipient.OWNER,
        )
        try:
            return open_run_output(api, output_view, expected=expected, holder=holder), expected
        except EnvelopeError as exc:
            last_error = exc
    assert last_error is not None
    raise last_error


def _outcome_for(
    state: AppState, profile: Profile, api: ApiClient, run_id: str, ticket: RunTicket | None
) -> tuple[RunOutcome, Expected]:
    if ticket is None:
        return _owner_outcome(state, profile, api, run_id)
    expected = Expected.of_ticket(ticket)
    outcome = open_run_output(
        api, api.get(f"/v1/runs/{run_id}/output"), expected=expected, holder=OutputKeyHolder.querier(ticket)
    )
    return outcome, expected


@app.command("output")
def output(
    ctx: typer.Context,
    run_id: RunArg,
    *,
    output_file: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the raw output here.")
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Download, decrypt and verify a finished run's output (yours, or as owner of a room that shows it)."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    ticket = state.store.run_tickets(profile.name).get(run_id)
    with _api_for_run(state, profile, ticket) as api:
        outcome, _ = _outcome_for(state, profile, api, run_id, ticket)
    if output_file is not None and outcome.output is not None:
        output_file.write_bytes(outcome.output)
    result = outcome.as_dict(attestation_skipped=bool(ticket and ticket.attestation_skipped))
    if json_output:
        ui.print_json(result)
        return
    if outcome.output is None:
        ui.info(f"run {run_id} {outcome.status.value} ({outcome.receipt.error_code or 'no output for you'})")
    elif output_file is None:
        ui.raw(result["output"] + ("" if str(result["output"]).endswith("\n") else "\n"))
    ui.success(f"receipt of run {run_id} verified")


@app.command("artifacts")
def artifacts(
    ctx: typer.Context,
    run_id: RunArg,
    *,
    out: Annotated[Path, typer.Option("--out", help="Directory to save the artifacts in.")] = Path("."),
    name: Annotated[list[str] | None, typer.Option("--name", help="Only this artifact (repeatable).")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Download, decrypt and verify a run's artifacts into a directory."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    ticket = state.store.run_tickets(profile.name).get(run_id)
    with _api_for_run(state, profile, ticket) as api:
        outcome, expected = _outcome_for(state, profile, api, run_id, ticket)
        saved = save_artifacts(api, outcome, expected, out, names=name or [])
    if json_output:
        ui.print_json({"run_id": run_id, "artifacts": saved})
        return
    if not saved:
        ui.info(f"run {run_id} has no artifacts")
    for entry in saved:
        ui.success(f"{entry['name']} -> {entry['path']} ({entry['size']} bytes, verified)")


@app.command("stats")
def stats(
    ctx: typer.Context,
    room: Annotated[str | None, typer.Argument(help="Room id or link (default: your own runs).")] = None,
    *,
    limit: Annotated[int, typer.Option(help="Look at this many recent runs.")] = 100,
    json_output: JsonFlag = False,
) -> None:
    """Per-stage p50/p95 seconds, tool calls by name, LLM calls, tokens and cost over recent runs."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    if limit < 1:
        raise UsageError("--limit is at least 1")
    access = room_access(profile, room) if room is not None else None
    api = state.api(access.service, access.secret) if access is not None else state.profile_api(profile)
    with api:
        runs: list[dict[str, Any]] = []
        cursor: str | None = None
        while len(runs) < limit:
            page = api.get(
                "/v1/runs",
                params={
                    "room_id": access.room_id if access else None,
                    "cursor": cursor,
                    "limit": min(100, limit - len(runs)),
                },
            )
            runs.extend(page.get("runs") or [])
            cursor = page.get("cursor")
            if not cursor:
                break
        charges = None
        if profile.key is not None and profile.kind.value == "tenant" and (access is None or access.is_owner):
            charges = charges_by_run(api.get("/v1/billing", params={"limit": 100}).get("entries") or [])
    summary = run_stats(runs, charges)
    summary["room_id"] = access.room_id if access else None
    if json_output:
        ui.print_json(summary)
        return
    statuses = ", ".join(f"{name}: {count}" for name, count in summary["statuses"].items())
    ui.fields(
        {
            "runs": f"{summary['runs']} ({statuses or 'none'})",
            "LLM calls": summary["llm_calls"],
            "tokens": f"{summary['prompt_tokens']} in, {summary['completion_tokens']} out",
            "cost": usd(summary["cost_micro_usd"])
            if summary["cost_micro_usd"] is not None
            else "not visible to this key",
        }
    )
    if summary["stages"]:
        ui.table(
            ["stage", "runs", "p50 s", "p95 s"],
            [[stage, v["runs"], v["p50_s"], v["p95_s"]] for stage, v in summary["stages"].items()],
        )
    if summary["tool_calls"]:
        ui.table(["tool", "calls"], [[tool, count] for tool, count in summary["tool_calls"].items()])
