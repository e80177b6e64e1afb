"""``hmctl admin``: operator commands: credit codes, billing, tenants (an admin ``hma_`` profile), and
export/import of a whole deployment (its storage, with the environment's AWS credentials)."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from pydantic import ValidationError

from hivemind.keys import auth_hash
from hivemind.tokens import Secret, TokenKind
from hmctl.client import ApiClient
from hmctl.commands.common import JsonFlag, YesFlag, parse_usd, short, usd, when
from hmctl.console import Ui
from hmctl.errors import ApiError, CliError, ExitCode, UsageError
from hmctl.profiles import write_private_text
from hmctl.rooms import owner_box_pub, owner_sign_pub, parse_duration
from hmctl.session import AppState, app_state

if TYPE_CHECKING:
    from hivemind.store import AwsClients

app = typer.Typer(help="Operator commands (an admin profile).", no_args_is_help=True)
codes_app = typer.Typer(help="Prepaid credit codes.", no_args_is_help=True)
billing_app = typer.Typer(help="Accounts, the ledger, prices, verification, grants.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants.", no_args_is_help=True)
app.add_typer(codes_app, name="credit-codes")
app.add_typer(billing_app, name="billing")
app.add_typer(tenants_app, name="tenants")


def _admin_api(state: AppState) -> ApiClient:
    profile = state.profile()
    return state.api(profile.service, profile.admin_secret())


# --- credit codes ----------------------------------------------------------------------------------


@codes_app.command("create")
def create_code(
    ctx: typer.Context,
    *,
    usd_amount: Annotated[str, typer.Option("--usd", help="Credit per redemption, in USD.")],
    uses: Annotated[int, typer.Option(help="Redemptions in total (one per tenant).")] = 1,
    expires: Annotated[str, typer.Option(help="Lifetime, e.g. 30d.")] = "30d",
    note: Annotated[str | None, typer.Option(help="A note for the listing.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Make a credit code. The code is generated here and shown once; the service stores its hash."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    secret = Secret.generate(TokenKind.CREDIT_CODE)
    body: dict[str, Any] = {
        "code_hash": auth_hash(secret),
        "credit": parse_usd(usd_amount),
        "max_uses": uses,
        "expires_at": state.clock() + parse_duration(expires),
    }
    if note is not None:
        body["note"] = note
    with _admin_api(state) as api:
        view = api.post("/v1/admin/credit-codes", body)
    if json_output:
        ui.print_json({**view, "code": secret.token()})
        return
    ui.success(
        f"credit code {view['code_id']}: {usd(view['credit'])} x {view['max_uses']}, "
        f"expires {when(view['expires_at'])}"
    )
    ui.info("The code (shown only now; whoever holds it can redeem it):")
    ui.print(secret.token())


@codes_app.command("list")
def list_codes(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Every credit code (by id and hash; the codes themselves were never stored)."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    with _admin_api(state) as api:
        codes = api.get_all("/v1/admin/credit-codes", "codes")
    if json_output:
        ui.print_json({"codes": codes})
        return
    ui.table(
        ["code", "credit", "uses", "expires", "revoked", "note"],
        [
            [
                c["code_id"],
                usd(c["credit"]),
                f"{c['uses']}/{c['max_uses']}",
                when(c["expires_at"]),
                "yes" if c["revoked"] else "",
                c.get("note") or "",
            ]
            for c in codes
        ],
    )


@codes_app.command("revoke")
def revoke_code(
    ctx: typer.Context,
    code: Annotated[
        str, typer.Argument(help="Code id (16 hex), code hash (64 hex) or the hmcc_ code itself.")
    ],
    json_output: JsonFlag = False,
) -> None:
    """Revoke a credit code."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    with _admin_api(state) as api:
        if code.startswith("hmcc_"):
            code_hash = auth_hash(Secret.parse(code, expect=TokenKind.CREDIT_CODE))
        elif len(code) == 64:
            code_hash = code
        else:
            matches = [
                c["code_hash"] for c in api.get_all("/v1/admin/credit-codes", "codes") if c["code_id"] == code
            ]
            if not matches:
                raise CliError(
                    f"no credit code {code}",
                    exit_code=ExitCode.NOT_FOUND,
                    hint="see hmctl admin credit-codes list",
                )
            code_hash = matches[0]
        view = api.post(f"/v1/admin/credit-codes/{code_hash}/revoke")
    if json_output:
        ui.print_json(view)
        return
    ui.success(f"credit code {view['code_id']} revoked")


# --- billing ---------------------------------------------------------------------------------------


@billing_app.command("accounts")
def accounts(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Every tenant's balance, held and available credit."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    with _admin_api(state) as api:
        entries = api.get_all("/v1/admin/billing/accounts", "accounts")
    if json_output:
        ui.print_json({"accounts": entries})
        return
    ui.table(
        ["tenant", "balance", "held", "available", "entries", "updated"],
        [
            [
                a["tenant_id"],
                usd(a["balance"]),
                usd(a["held"]),
                usd(a["available"]),
                a["last_seq"],
                when(a["updated_at"]),
            ]
            for a in entries
        ],
    )


@billing_app.command("ledger")
def ledger(
    ctx: typer.Context,
    *,
    tenant: Annotated[str | None, typer.Option(help="One tenant's whole ledger.")] = None,
    day: Annotated[
        str | None, typer.Option(help="Every entry of one UTC day, YYYY-MM-DD (default: today).")
    ] = None,
    format: Annotated[Literal["json", "csv"], typer.Option("--format", help="json or csv.")] = "json",
) -> None:
    """Ledger entries as JSON or CSV (on stdout; for finance)."""
    state = app_state(ctx)
    ui = Ui(json_output=format == "json")
    if tenant is not None and day is not None:
        raise UsageError("pass --tenant or --day, not both")
    if day is not None:
        try:
            datetime.date.fromisoformat(day)
        except ValueError:
            raise UsageError(f"--day {day!r} is not YYYY-MM-DD") from None
    params: dict[str, Any] = {"tenant": tenant, "day": day}
    with _admin_api(state) as api:
        if format == "json":
            entries = (
                api.get_all("/v1/admin/billing/ledger", "entries", params=params)
                if tenant
                else api.get("/v1/admin/billing/ledger", params=params)["entries"]
            )
            ui.print_json({"entries": entries})
            return
        cursor: str | None = None
        first = True
        while True:
            response = api.request(
                "GET", "/v1/admin/billing/ledger", params={**params, "format": "csv", "cursor": cursor}
            )
            text = response.text
            ui.raw(text if first else text.split("\n", 1)[1] if "\n" in text else "")
            first = False
            cursor = response.headers.get("x-hivemind-cursor")
            if not cursor:
                return


@billing_app.command("prices")
def prices(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Token prices per provider model and the runner fee."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    with _admin_api(state) as api:
        listing = api.get("/v1/admin/prices")
    if json_output:
        ui.print_json(listing)
        return
    fee = listing.get("runner_fee")
    ui.info(
        f"runner fee: {usd(fee['per_second']) + ' per second' if fee else 'NOT SET (no run can be held)'}"
    )
    ui.table(
        ["provider", "model", "prompt / 1M tokens", "completion / 1M tokens"],
        [
            [p["provider"], p["model"], usd(p["prompt_per_million"]), usd(p["completion_per_million"])]
            for p in listing["prices"]
        ],
    )


@billing_app.command("set-price")
def set_price(
    ctx: typer.Context,
    provider: Annotated[str, typer.Argument(help="Provider name.")],
    model: Annotated[str, typer.Argument(help="Model name.")],
    *,
    prompt_usd: Annotated[str, typer.Option("--prompt-usd", help="USD per million prompt tokens.")],
    completion_usd: Annotated[
        str, typer.Option("--completion-usd", help="USD per million completion tokens.")
    ],
    json_output: JsonFlag = False,
) -> None:
    """Set the price of one provider model."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    with _admin_api(state) as api:
        price = api.put(
            "/v1/admin/prices",
            {
                "provider": provider,
                "model": model,
                "prompt_per_million": _usd_or_zero(prompt_usd),
                "completion_per_million": _usd_or_zero(completion_usd),
            },
        )
    if json_output:
        ui.print_json(price)
        return
    ui.success(f"price of {provider}/{model} set")


@billing_app.command("set-runner-fee")
def set_runner_fee(
    ctx: typer.Context,
    per_second_usd: Annotated[str, typer.Argument(help="USD per second of runner time.")],
    json_output: JsonFlag = False,
) -> None:
    """Set the runner fee (without one, no run can be held or settled)."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    with _admin_api(state) as api:
        fee = api.put("/v1/admin/prices/runner-fee", {"per_second": _usd_or_zero(per_second_usd)})
    if json_output:
        ui.print_json(fee)
        return
    ui.success(f"runner fee set to {usd(fee['per_second'])} per second")


def _usd_or_zero(text: str) -> int:
    return 0 if text.strip().lstrip("$") in ("0", "0.0") else parse_usd(text)


@billing_app.command("verify")
def verify(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Recompute every tenant's ledger chain and balance. Exit 0 only when all of them check out (else 5)."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    lines: list[dict[str, Any]] = []
    cursor: str | None = None
    with _admin_api(state) as api:
        while True:
            try:
                report = api.get("/v1/admin/billing/verify", params={"cursor": cursor, "limit": 100})
            except ApiError as exc:
                if exc.code != "ledger_invalid" or not exc.details:
                    raise
                report = exc.details
            lines.extend(report.get("tenants") or [])
            cursor = report.get("cursor")
            if not cursor:
                break
    failed = [line for line in lines if not line["ok"]]
    summary = {
        "ok": not failed,
        "tenants_checked": len(lines),
        "tenants_failed": len(failed),
        "entries_checked": sum(int(line.get("entries", 0)) for line in lines),
        "tenants": lines,
    }
    if json_output:
        ui.print_json(summary)
    else:
        for line in failed:
            ui.error(
                f"tenant {line['tenant_id']}: {line.get('message')} [{line.get('error')}]"
                + (f" at seq {line['seq']}" if line.get("seq") else "")
            )
        if not failed:
            ui.success(
                f"{summary['tenants_checked']} ledgers and balances verified "
                f"({summary['entries_checked']} entries)"
            )
    if failed:
        raise CliError(
            f"{len(failed)} of {len(lines)} tenant ledgers do not verify",
            hint="investigate before settling anything: hmctl admin billing ledger --tenant TENANT",
            exit_code=ExitCode.VERIFICATION,
            code="ledger_invalid",
        )


@billing_app.command("grant")
def grant(
    ctx: typer.Context,
    tenant_id: Annotated[str, typer.Argument(help="Tenant to credit.")],
    *,
    usd_amount: Annotated[str, typer.Option("--usd", help="Amount in USD.")],
    note: Annotated[str, typer.Option(help="Recorded as the ledger entry's ref.")] = "grant",
    idempotency_key: Annotated[
        str | None, typer.Option(help="A retry with the same key grants once.")
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Grant credit to a tenant."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    body: dict[str, Any] = {"tenant_id": tenant_id, "amount": parse_usd(usd_amount), "note": note}
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    with _admin_api(state) as api:
        granted = api.post("/v1/admin/billing/grant", body)
    if json_output:
        ui.print_json(granted)
        return
    ui.success(
        f"granted {usd(granted['entry']['amount'])} to {tenant_id}; "
        f"balance {usd(granted['account']['balance'])}"
    )


# --- tenants ---------------------------------------------------------------------------------------


@tenants_app.command("list")
def list_tenants(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Every tenant."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    with _admin_api(state) as api:
        tenants = api.get_all("/v1/admin/tenants", "tenants")
    if json_output:
        ui.print_json({"tenants": tenants})
        return
    ui.table(
        ["tenant", "name", "status", "sign key", "created"],
        [
            [t["tenant_id"], t["name"], t["status"], short(t["owner_sign_pub"]), when(t["created_at"])]
            for t in tenants
        ],
    )


@tenants_app.command("reset-key")
def reset_key(
    ctx: typer.Context,
    tenant_id: Annotated[str, typer.Argument(help="Tenant that lost its key.")],
    *,
    key_file: Annotated[Path, typer.Option("--key-file", help="Write the new hmk_ key here (created 0600).")],
    yes: YesFlag = False,
    json_output: JsonFlag = False,
) -> None:
    """Give a tenant that lost its key a new one. Rooms signed and wrapped under the lost key stay
    unreadable (nothing on the service can open them); the tenant re-creates them."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    if key_file.exists():
        raise UsageError(f"{key_file} exists; choose a new file for the key")
    if not yes and not ui.confirm(f"Replace the key of tenant {tenant_id}? Its current key stops working."):
        raise UsageError("not reset", hint="pass -y to reset without asking")
    secret = Secret.generate(TokenKind.TENANT)
    write_private_text(key_file, secret.token() + "\n")
    with _admin_api(state) as api:
        reset = api.post(
            f"/v1/admin/tenants/{tenant_id}/reset-key",
            {
                "auth_hash": auth_hash(secret),
                "owner_sign_pub": owner_sign_pub(secret),
                "owner_box_pub": owner_box_pub(secret),
            },
        )
    result = {"tenant_id": tenant_id, "token_id": reset["token_id"], "key_file": str(key_file)}
    if json_output:
        ui.print_json(result)
        return
    ui.success(f"tenant {tenant_id} has a new key ({reset['token_id']}), written to {key_file}")
    ui.info(
        f"hand it over privately; they load it with: hmctl init NAME --service URL --key-stdin < {key_file}"
    )


# --- export / import -------------------------------------------------------------------------------

StorePrefix = Annotated[
    str | None, typer.Option("--prefix", help="Deployment prefix (default: $HIVEMIND_PREFIX).")
]
EndpointUrl = Annotated[
    str | None,
    typer.Option("--endpoint-url", help="AWS endpoint (default: $HIVEMIND_ENDPOINT_URL; moto locally)."),
]


def _store_clients(prefix: str | None, endpoint_url: str | None) -> AwsClients:
    """The deployment's storage, from ``HIVEMIND_*`` and the AWS credentials of the environment."""
    from hivemind.store import AwsClients, StoreConfig  # noqa: PLC0415 - boto3 is heavy; only these need it

    try:
        config = StoreConfig.from_env()
        overrides = {
            key: value for key, value in (("prefix", prefix), ("endpoint_url", endpoint_url)) if value
        }
        if overrides:
            config = StoreConfig.model_validate({**config.model_dump(), **overrides})
    except ValidationError as exc:
        raise UsageError(
            f"deployment settings: {exc.errors()[0]['msg']}", hint="check HIVEMIND_* and --prefix"
        ) from None
    return AwsClients(config)


@app.command("export")
def export(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="Archive to write (must not exist).")],
    *,
    prefix: StorePrefix = None,
    endpoint_url: EndpointUrl = None,
    json_output: JsonFlag = False,
) -> None:
    """Export the whole deployment (tables and sealed objects, nothing decrypted) to one archive.

    Works on the storage directly with the environment's AWS credentials; run it on a quiet deployment.
    """
    from hivemind.store.transfer import export_deployment  # noqa: PLC0415 - boto3 is heavy

    ui = Ui(json_output=json_output)
    manifest = export_deployment(_store_clients(prefix, endpoint_url), out)
    summary = {
        "archive": str(out),
        "source": manifest.source.model_dump(),
        "tables": {entry.role.value: entry.items for entry in manifest.tables},
        "objects": manifest.objects.count,
        "bytes": manifest.objects.bytes,
    }
    if json_output:
        ui.print_json(summary)
        return
    ui.success(f"exported {sum(summary['tables'].values())} items and {summary['objects']} objects to {out}")


@app.command("import")
def import_(
    ctx: typer.Context,
    archive: Annotated[Path, typer.Argument(help="Archive written by `hmctl admin export`.")],
    *,
    prefix: StorePrefix = None,
    endpoint_url: EndpointUrl = None,
    verify_after: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Re-verify every manifest, chain and object after.")
    ] = True,
    json_output: JsonFlag = False,
) -> None:
    """Import an export into this deployment (verified before anything is written; re-import is a no-op).

    Exits 1 when something was not imported because the target holds other data there. Invite links
    name the old service URL: participants map it with `hmctl profile set --service-alias OLD=NEW`.
    """
    from hivemind.store import Store  # noqa: PLC0415 - boto3 is heavy
    from hivemind.store.transfer import import_archive, verify_deployment  # noqa: PLC0415

    ui = Ui(json_output=json_output)
    clients = _store_clients(prefix, endpoint_url)
    report = import_archive(clients, archive)
    verification = verify_deployment(Store(clients)) if verify_after else None
    summary = {
        "archive": str(archive),
        "source": report.archive.source.model_dump(),
        "tables": {role: counts.model_dump() for role, counts in report.tables.items()},
        "objects_written": report.objects_written,
        "objects_unchanged": report.objects_unchanged,
        "conflicts": [conflict.model_dump() for conflict in report.conflicts],
        "verified": verification.model_dump() if verification is not None else None,
    }
    if json_output:
        ui.print_json(summary)
    else:
        written = sum(counts.written for counts in report.tables.values())
        ui.success(f"imported {written} items and {report.objects_written} objects from {archive}")
        for conflict in report.conflicts:
            ui.warn(f"not imported: {conflict.where} {conflict.key}: {conflict.reason}")
        ui.info(
            "Invite links made before name the old service URL; participants map it with "
            "`hmctl profile set --service-alias OLD_URL=NEW_URL`."
        )
    if report.conflicts:
        raise CliError(
            f"{len(report.conflicts)} records were not imported: the target holds other data there",
            hint="see the conflicts listed; nothing else was changed",
            exit_code=ExitCode.ERROR,
            code="import_conflicts",
        )
