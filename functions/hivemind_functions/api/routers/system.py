"""System routes: health, who am I, and the relay of live runners' attestation documents (DESIGN §6, §12)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import ValidationError

from hivemind.attestation import AttestationDocument
from hivemind.models import Budgets, StrictModel, UnixSeconds
from hivemind.store.credentials import CredentialKind
from hivemind.store.runners import RunnerRecord, RunnerStatus
from hivemind_functions import __version__
from hivemind_functions.api.deps import AnyCaller, ServicesDep

router = APIRouter(tags=["system"])


class Health(StrictModel):
    status: Literal["ok"] = "ok"
    version: str


class WhoAmI(StrictModel):
    """The authenticated credential. Invites name their room; tenants their public keys."""

    kind: CredentialKind
    token_id: str
    bearer_id: str
    tenant_id: str | None
    tenant_name: str | None = None
    owner_sign_pub: str | None = None
    owner_box_pub: str | None = None
    room_id: str | None = None
    invite_id: str | None = None
    parent_id: str | None = None
    budgets: Budgets | None = None
    max_uses: int | None = None
    uses: int | None = None
    expires_at: UnixSeconds | None = None


class RunnerAttestation(StrictModel):
    """A live runner's published attestation document. Relayed, not vouched for: clients verify it."""

    runner_id: str
    status: RunnerStatus
    heartbeat_at: UnixSeconds
    document: AttestationDocument


class AttestationList(StrictModel):
    runners: list[RunnerAttestation]


@router.get("/v1/healthz", summary="Liveness of the API")
def healthz() -> Health:
    return Health(version=__version__)


@router.get("/v1/whoami", summary="The calling credential")
def whoami(caller: AnyCaller) -> WhoAmI:
    credential = caller.credential
    tenant = caller.tenant
    return WhoAmI(
        kind=caller.kind,
        token_id=credential.token_id,
        bearer_id=caller.bearer_id,
        tenant_id=credential.tenant_id,
        tenant_name=tenant.name if tenant else None,
        owner_sign_pub=tenant.owner_sign_pub if tenant else None,
        owner_box_pub=tenant.owner_box_pub if tenant else None,
        room_id=credential.room_id,
        invite_id=caller.invite_id,
        parent_id=credential.parent_token_id,
        budgets=credential.budgets,
        max_uses=credential.max_uses,
        uses=credential.uses if caller.is_invite else None,
        expires_at=credential.expires_at,
    )


def live_attestations(services: ServicesDep) -> list[RunnerAttestation]:
    """Live runners' documents, freshest first. A malformed stored document is left out (and logged):
    clients could not verify it anyway."""
    live: list[RunnerAttestation] = []
    for record in services.store.runners.list_live(max_age_s=services.settings.runner_max_heartbeat_age_s):
        relayed = _relay(record, services)
        if relayed is not None:
            live.append(relayed)
    return live


def _relay(record: RunnerRecord, services: ServicesDep) -> RunnerAttestation | None:
    try:
        document = AttestationDocument.model_validate(record.attestation)
    except ValidationError:
        services.logger.warning(
            "runner published a malformed attestation document", extra={"runner_id": record.runner_id}
        )
        return None
    return RunnerAttestation(
        runner_id=record.runner_id, status=record.status, heartbeat_at=record.heartbeat_at, document=document
    )


@router.get("/v1/attestation", summary="Attestation documents of the live runners")
def attestation(services: ServicesDep) -> AttestationList:
    return AttestationList(runners=live_attestations(services))
