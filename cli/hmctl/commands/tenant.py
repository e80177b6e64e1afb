"""``hmctl tenant``: rotate the account key, and seal your own LLM provider key to the runner."""

from __future__ import annotations

from typing import Annotated

import typer

from hivemind.envelope import HpkePublicKeys, seal_provider_key
from hivemind.tokens import Secret
from hmctl.client import ApiClient
from hmctl.commands.common import JsonFlag, YesFlag
from hmctl.console import Ui
from hmctl.errors import UsageError
from hmctl.provider_keys import provider_key_path
from hmctl.rooms import SIMULATED_HINT, verified_runners
from hmctl.rotation import rotate_key
from hmctl.session import app_state
from hmctl.verify import choose_runner

app = typer.Typer(help="Your account: key rotation, provider keys.", no_args_is_help=True)


@app.command("rotate-key")
def rotate(
    ctx: typer.Context,
    *,
    forget_old_key: Annotated[
        bool,
        typer.Option(
            "--forget-old-key",
            help="Do not keep the old key (it opens owner outputs sealed before the rotation).",
        ),
    ] = False,
    yes: YesFlag = False,
    json_output: JsonFlag = False,
) -> None:
    """Replace the profile's tenant key; every room is re-signed and re-wrapped and keeps working.

    Invite links and accepted rooms pinning the old key keep working through a key-rotation
    certificate signed with the old key. An interrupted rotation resumes when run again.
    """
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    profile.tenant_secret()
    if profile.pending_key is None and not yes:
        if not ui.confirm(
            f"Rotate the key of profile {profile.name} (tenant {profile.tenant_id})?", piped=True
        ):
            raise UsageError("not rotated", hint="pass -y to rotate without asking")

    def api_for(secret: Secret) -> ApiClient:
        return state.api(profile.service, secret)

    result = rotate_key(
        state.store, profile, api_for=api_for, now=state.clock(), keep_old_key=not forget_old_key
    )
    view = {
        "tenant_id": result.tenant_id,
        "old_key_id": result.old_key_id,
        "new_key_id": result.new_key_id,
        "rooms": result.rooms,
        "resumed": result.resumed,
        "old_key_kept": not forget_old_key,
    }
    if json_output:
        ui.print_json(view)
        return
    ui.success(
        f"key rotated ({result.old_key_id} -> {result.new_key_id}); "
        f"{len(result.rooms)} rooms re-signed and re-wrapped"
    )


@app.command("set-provider-key")
def set_provider_key(
    ctx: typer.Context,
    provider: Annotated[str, typer.Argument(help="LLM provider name, e.g. openrouter.")],
    *,
    remove: Annotated[bool, typer.Option("--remove", help="Remove your key for this provider.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Seal your own API key for PROVIDER to the attested runner; runs you pay for then use it.

    The key is read from stdin or a hidden prompt, sealed on this machine to a verified runner's key,
    and never reaches the control plane in the clear.
    """
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    profile = state.profile()
    profile.tenant_secret()
    if profile.tenant_id is None:
        raise UsageError(f"profile {profile.name} does not know its tenant id", hint="run: hmctl whoami")
    with state.profile_api(profile) as api:
        if remove:
            answer = api.delete(provider_key_path(provider))
        else:
            checks = verified_runners(api, profile=profile, store=state.store, now=state.clock(), trust=None)
            runner = choose_runner(checks, simulated_hint=SIMULATED_HINT)
            api_key = ui.prompt_secret(f"API key for {provider}:")
            sealed = seal_provider_key(
                HpkePublicKeys.from_suites(runner.hpke_public_keys),
                tenant_id=profile.tenant_id,
                provider=provider,
                api_key=api_key,
            )
            answer = api.put(
                provider_key_path(provider),
                {"sealed_key": sealed.model_dump(mode="json"), "runner_id": runner.runner_id},
            )
    if json_output:
        ui.print_json(answer)
        return
    ui.success(f"{'removed' if remove else 'sealed and stored'} your {provider} key")
