"""Top-level account commands: ``init``, ``signup``, ``whoami``, ``balance``, ``redeem-credit``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from hivemind.errors import HivemindError, InvalidToken
from hivemind.keys import auth_token, credential_id
from hivemind.tokens import Secret, TokenKind
from hmctl.commands.common import JsonFlag, usd, when
from hmctl.console import Ui
from hmctl.errors import ProfileError, UsageError
from hmctl.profiles import Profile, check_profile_name, check_service_url
from hmctl.rooms import owner_box_pub, owner_sign_pub
from hmctl.session import app_state

ServiceOption = Annotated[
    str, typer.Option("--service", "-s", help="The service's base URL (https, or http on loopback).")
]


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("signup")(signup)
    app.command("whoami")(whoami)
    app.command("balance")(balance)
    app.command("redeem-credit")(redeem_credit)


def _read_key(ui: Ui) -> Secret:
    text = ui.prompt_secret("Paste the key (hmk_… or hma_…):")
    try:
        secret = Secret.parse(text)
    except InvalidToken as exc:
        raise UsageError(f"that is not a key: {exc.message}") from None
    if secret.kind not in (TokenKind.TENANT, TokenKind.ADMIN):
        raise UsageError(f"a profile holds an hmk_ or hma_ key, not an {secret.kind.value}_ token")
    return secret


def init(
    ctx: typer.Context,
    *,
    name: Annotated[str, typer.Argument(help="Name of the new profile.")],
    service: ServiceOption,
    key_stdin: Annotated[
        bool,
        typer.Option("--key-stdin", help="Read an existing hmk_/hma_ key from stdin (or a hidden prompt)."),
    ] = False,
    allow_simulated: Annotated[
        bool | None,
        typer.Option(
            "--allow-simulated/--refuse-simulated",
            help="Accept runners without a TEE (default: only for a service on this machine).",
        ),
    ] = None,
    pccs_url: Annotated[
        str | None, typer.Option(help="PCCS to fetch DCAP collateral from (default: Intel PCS).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing profile of that name.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Create a profile for an existing key, or a link-only profile (no key) for invite links."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    check_profile_name(name)
    if state.store.exists(name) and not force:
        raise ProfileError(f"profile {name} exists", hint="pick another name, or pass --force to replace it")
    secret = _read_key(ui) if key_stdin else None
    profile = Profile(
        name=name,
        service=check_service_url(service),
        key=secret.token() if secret else None,
        allow_simulated=allow_simulated,
        pccs_url=pccs_url,
    )
    if secret is not None:
        with state.profile_api(profile) as api:
            me = api.get("/v1/whoami")
        profile = profile.model_copy(update={"tenant_id": me.get("tenant_id")})
    state.store.save(profile)
    view = profile.public_view()
    if json_output:
        ui.print_json(view)
        return
    ui.success(f"profile {name} saved in {state.store.path} ({profile.kind.value})")


def signup(
    ctx: typer.Context,
    *,
    name: Annotated[
        str, typer.Argument(help="Name of the new profile (and of the tenant, unless --tenant-name).")
    ],
    service: ServiceOption,
    tenant_name: Annotated[str | None, typer.Option(help="The account's display name.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Create a tenant on the service with a fresh key, and a profile NAME holding that key.

    The key is generated here and saved (0600) before the service is asked; the service only ever
    sees its auth hash and public keys.
    """
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    check_profile_name(name)
    if state.store.exists(name):
        raise ProfileError(f"profile {name} exists", hint="pick another profile name")
    secret = Secret.generate(TokenKind.TENANT)
    profile = Profile(name=name, service=check_service_url(service), key=secret.token())
    state.store.save(profile)
    try:
        # Signup is authenticated by the new key's own bearer token.
        with state.api(profile.service, secret) as api:
            tenant = api.post(
                "/v1/signup",
                {
                    "name": tenant_name or name,
                    "owner_sign_pub": owner_sign_pub(secret),
                    "owner_box_pub": owner_box_pub(secret),
                },
            )
    except HivemindError:
        # Nothing was created on the service: the key is worthless, drop the profile again.
        state.store.remove(name)
        raise
    profile = profile.model_copy(update={"tenant_id": tenant["tenant_id"]})
    state.store.save(profile)
    result = {
        "profile": name,
        "tenant_id": tenant["tenant_id"],
        "kind": "tenant",
        "service": profile.service,
        "key_id": credential_id(secret),
    }
    if json_output:
        ui.print_json(result)
        return
    ui.success(f"tenant {tenant['tenant_id']} created; profile {name} holds its key ({state.store.path})")
    ui.info("Keep that file private: the key in it owns your rooms and pays for runs.")


def whoami(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Who the profile's key is to the service (tenant, admin), with its public keys."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    with state.profile_api(profile) as api:
        me: dict[str, Any] = api.get("/v1/whoami")
    if profile.tenant_id is None and me.get("tenant_id"):
        state.store.save(profile.model_copy(update={"tenant_id": me["tenant_id"]}))
    if json_output:
        ui.print_json({"profile": profile.name, "service": profile.service, **me})
        return
    ui.fields(
        {
            "profile": profile.name,
            "service": profile.service,
            "kind": me.get("kind"),
            "tenant": f"{me.get('tenant_id')} ({me.get('tenant_name')})" if me.get("tenant_id") else "-",
            "key id": me.get("token_id"),
            "owner sign key": me.get("owner_sign_pub") or "-",
        }
    )


def balance(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """The account's balance, held and available credit, and recent ledger entries."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    profile.tenant_secret()
    with state.profile_api(profile) as api:
        billing = api.get("/v1/billing")
    if json_output:
        ui.print_json(billing)
        return
    account = billing["account"]
    ui.fields(
        {
            "balance": usd(account["balance"]),
            "held": usd(account["held"]),
            "available": usd(account["available"]),
            "credits enforced": "yes" if billing.get("credits_enforced") else "no",
        }
    )
    entries = billing.get("entries") or []
    if entries:
        ui.table(
            ["seq", "when", "kind", "amount", "held", "ref", "balance after"],
            [
                [
                    e["seq"],
                    when(e["created_at"]),
                    e["kind"],
                    usd(e["amount"]),
                    usd(e["held_delta"]),
                    e["ref"],
                    usd(e["balance_after"]),
                ]
                for e in entries
            ],
            title="recent entries",
        )


def redeem_credit(
    ctx: typer.Context,
    *,
    code: Annotated[
        str | None, typer.Argument(help="The hmcc_ credit code (omit to read it from stdin).")
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Redeem a credit code; only its auth token is sent, never the code itself."""
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    profile.tenant_secret()
    text = code if code is not None else ui.prompt_secret("Credit code (hmcc_…):")
    try:
        secret = Secret.parse(text, expect=TokenKind.CREDIT_CODE)
    except InvalidToken as exc:
        raise UsageError(f"that is not a credit code: {exc.message}") from None
    with state.profile_api(profile) as api:
        redemption = api.post("/v1/billing/credit-codes/redeem", {"code": auth_token(secret)})
    if json_output:
        ui.print_json(redemption)
        return
    ui.success(
        f"added {usd(redemption['entry']['amount'])}; available now {usd(redemption['account']['available'])}"
    )
