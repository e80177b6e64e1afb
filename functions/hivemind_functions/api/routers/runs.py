"""Runs (DESIGN §7, §12): submit through the admission chain, list, long-poll, fetch outputs.

Visibility is enforced on every read: an invite sees only its own runs; a room's owner sees the
metadata of every run of the room, and outputs only when the manifest says ``owner_and_querier``;
admins see metadata only. A run the caller may not see is ``run_not_found``, never ``forbidden``, so
run ids cannot be probed.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request

from hivemind.errors import Forbidden, Gone, Unauthenticated
from hivemind.keys import auth_hash_from_bearer
from hivemind.store.credentials import CredentialKind
from hivemind.store.tenants import TenantRecord, TenantStatus
from hivemind.tokens import TokenKind
from hivemind_functions.api.deps import AnyCaller, ParticipantCaller, ServicesDep
from hivemind_functions.services.runs import (
    ArtifactLink,
    LambdaContextLike,
    RunList,
    RunOutput,
    RunView,
    SubmitRunRequest,
    SubmittedRun,
    artifact_link,
    list_runs,
    run_output,
    run_view,
    submitter_for,
    visible_run,
    wait_for_change,
)

router = APIRouter(tags=["runs"])

PAYER_HEADER = "X-Hivemind-Payer"
RunId = Annotated[str, Path(pattern=r"^[a-z][a-z0-9]*_[a-z0-9]{1,64}$", max_length=80)]
RoomIdPath = Annotated[str, Path(pattern=r"^room_[a-z0-9]{1,64}$")]


def _payer(services: ServicesDep, header: str | None) -> TenantRecord | None:
    """The tenant named by ``X-Hivemind-Payer: <tenant bearer token>``, authenticated like a caller."""
    if header is None:
        return None
    try:
        kind, digest = auth_hash_from_bearer(header)
    except Unauthenticated:
        raise Unauthenticated(f"{PAYER_HEADER} is not a tenant bearer token", code="payer_invalid") from None
    if kind is not TokenKind.TENANT:
        raise Unauthenticated(f"{PAYER_HEADER} must carry a tenant (hmk_) token", code="payer_invalid")
    store = services.store
    try:
        credential = store.credentials.authenticate(digest, kind=CredentialKind.TENANT)
    except Unauthenticated:
        raise Unauthenticated(f"{PAYER_HEADER}: unknown key", code="payer_invalid") from None
    except Gone as exc:
        raise Unauthenticated(f"{PAYER_HEADER}: {exc.message}", code="payer_invalid") from None
    tenant = store.tenants.get(credential.tenant_id) if credential.tenant_id else None
    if tenant is None:
        raise Unauthenticated(f"{PAYER_HEADER}: unknown key", code="payer_invalid")
    if tenant.status is not TenantStatus.ACTIVE:
        raise Forbidden(f"the paying tenant {tenant.tenant_id} is suspended", code="payer_unavailable")
    return tenant


def _lambda_context(request: Request) -> LambdaContextLike | None:
    context = request.scope.get("aws.context")
    return context if callable(getattr(context, "get_remaining_time_in_millis", None)) else None


@router.post(
    "/v1/rooms/{room_id}/runs",
    status_code=201,
    summary="Submit a run (admission chain, billing hold, envelope, queue)",
)
def submit_run(
    *,
    room_id: RoomIdPath,
    body: SubmitRunRequest,
    request: Request,
    caller: ParticipantCaller,
    services: ServicesDep,
    x_hivemind_payer: Annotated[str | None, Header(alias=PAYER_HEADER)] = None,
) -> SubmittedRun:
    payer = _payer(services, x_hivemind_payer)
    services.logger.append_keys(room_id=room_id)
    submitter = submitter_for(services.store, services.settings, services.logger.info)
    submitted = submitter.submit(
        credential=caller.credential,
        room_id=room_id,
        request=body,
        payer_override=payer,
        lambda_context=_lambda_context(request),
    )
    services.logger.append_keys(run_id=submitted.run_id)
    return submitted


@router.get("/v1/runs", summary="Runs the caller may see")
def get_runs(
    caller: AnyCaller,
    services: ServicesDep,
    room_id: Annotated[str | None, Query(pattern=r"^room_[a-z0-9]{1,64}$")] = None,
    cursor: Annotated[str | None, Query(max_length=2048)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> RunList:
    return list_runs(services.store, caller.credential, room_id=room_id, cursor=cursor, limit=limit)


@router.get("/v1/runs/{run_id}", summary="A run's status; ?wait=N long-polls up to N seconds for a change")
def get_run(
    run_id: RunId,
    caller: AnyCaller,
    services: ServicesDep,
    wait: Annotated[int, Query(ge=0, le=3600, description="seconds; capped at the deployment's maximum")] = 0,
) -> RunView:
    services.logger.append_keys(run_id=run_id)
    run, access = visible_run(services.store, caller.credential, run_id)
    wait_s = min(wait, services.settings.long_poll_max_s)
    if wait_s > 0:
        run = wait_for_change(services.store, run, wait_s)
    return run_view(run, access)


@router.get("/v1/runs/{run_id}/output", summary="Receipt, output URL and sealed output key of a finished run")
def get_run_output(run_id: RunId, caller: AnyCaller, services: ServicesDep) -> RunOutput:
    services.logger.append_keys(run_id=run_id)
    run, access = visible_run(services.store, caller.credential, run_id)
    return run_output(services.store, run, access, expires_in=services.settings.presign_get_expires_s)


@router.get("/v1/runs/{run_id}/artifacts/{name}", summary="A presigned GET of one sealed artifact")
def get_run_artifact(
    run_id: RunId,
    name: Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")],
    caller: AnyCaller,
    services: ServicesDep,
) -> ArtifactLink:
    services.logger.append_keys(run_id=run_id)
    run, access = visible_run(services.store, caller.credential, run_id)
    return artifact_link(
        services.store, run, access, name, expires_in=services.settings.presign_get_expires_s
    )
