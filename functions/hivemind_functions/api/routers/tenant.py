"""The caller's own tenant (DESIGN §3, §8, §16.11): owner key rotation and LLM provider keys.

Every route takes a tenant (``hmk_``) key; invites and admin keys get 403 ``tenant_key_required``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path
from pydantic import Field

from hivemind.envelope import RoomId, SealedEnvelope
from hivemind.manifest import SignedKeyRotation, SignedManifest
from hivemind.models import Sha256Hex, StrictModel, UnixSeconds
from hivemind_functions.api.deps import ServicesDep, TenantCaller
from hivemind_functions.api.routers.rooms import WrapText
from hivemind_functions.services import tenants as service

router = APIRouter(tags=["tenant"])

ProviderPath = Annotated[
    str, Path(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="LLM provider name, e.g. openrouter")
]


# --- key rotation ------------------------------------------------------------------------------------


class RotatedRoomBody(StrictModel):
    room_id: RoomId
    signed_manifest: SignedManifest = Field(
        description="the stored manifest with the new owner keys and revision + 1, signed by the new key"
    )
    owner_wrap: WrapText = Field(description="the room DEK wrapped under the new secret's room-wrap key")


class KeyRotationRequest(StrictModel):
    new_auth_hash: Sha256Hex = Field(description="sha256(HKDF(new hmk_ secret, 'auth')), hex")
    rotation: SignedKeyRotation = Field(description="the key-rotation certificate, signed with the OLD key")
    rooms: list[RotatedRoomBody] = Field(
        max_length=1000, description="every active room of the tenant, re-signed and re-wrapped"
    )


class KeyRotationResponse(StrictModel):
    tenant_id: str
    token_id: str = Field(description="public id of the new key")
    rooms: list[str] = Field(description="the rooms re-signed and re-wrapped")


@router.post(
    "/v1/tenant/key-rotation",
    summary="Rotate the tenant key: re-signed rooms, new wraps, certificate and auth swap, atomically",
)
def rotate_key(body: KeyRotationRequest, caller: TenantCaller, services: ServicesDep) -> KeyRotationResponse:
    result = service.rotate_owner_key(
        services,
        caller,
        new_auth_hash=body.new_auth_hash,
        certificate=body.rotation,
        rooms=[
            service.OfferedRoom(
                room_id=room.room_id, signed_manifest=room.signed_manifest, owner_wrap=room.owner_wrap
            )
            for room in body.rooms
        ],
    )
    return KeyRotationResponse(tenant_id=result.tenant_id, token_id=result.token_id, rooms=result.rooms)


# --- provider keys -----------------------------------------------------------------------------------


class ProviderKeyRequest(StrictModel):
    sealed_key: SealedEnvelope = Field(
        description="the API key HPKE-sealed to the runner's attested keys, info "
        "'hivemind-provider-key-v1|<tenant_id>|<provider>'"
    )
    runner_id: str = Field(min_length=1, max_length=80, description="the runner it was sealed to")


class ProviderKeyStored(StrictModel):
    tenant_id: str
    provider: str
    runner_id: str
    updated_at: UnixSeconds
    stored: Literal[True] = True


class ProviderKeyView(StrictModel):
    provider: str
    runner_id: str
    updated_at: UnixSeconds


class ProviderKeyList(StrictModel):
    provider_keys: list[ProviderKeyView] = Field(
        description="providers with a stored key (the sealed keys themselves are not served)"
    )


class ProviderKeyRemoved(StrictModel):
    tenant_id: str
    provider: str
    removed: bool = Field(description="false when there was no key (a repeated delete)")


@router.put(
    "/v1/tenant/provider-keys/{provider}", summary="Store your LLM provider key, sealed to the runner"
)
def put_provider_key(
    provider: ProviderPath, body: ProviderKeyRequest, caller: TenantCaller, services: ServicesDep
) -> ProviderKeyStored:
    key = service.put_provider_key(
        services, caller, provider, sealed_key=body.sealed_key, runner_id=body.runner_id
    )
    return ProviderKeyStored(
        tenant_id=caller.require_tenant_id(),
        provider=provider,
        runner_id=key.runner_id,
        updated_at=key.updated_at,
    )


@router.get("/v1/tenant/provider-keys", summary="The providers you stored a key for")
def list_provider_keys(caller: TenantCaller) -> ProviderKeyList:
    keys = service.provider_keys(caller)
    return ProviderKeyList(
        provider_keys=[
            ProviderKeyView(provider=name, runner_id=key.runner_id, updated_at=key.updated_at)
            for name, key in sorted(keys.items())
        ]
    )


@router.delete("/v1/tenant/provider-keys/{provider}", summary="Remove your key for a provider")
def delete_provider_key(
    provider: ProviderPath, caller: TenantCaller, services: ServicesDep
) -> ProviderKeyRemoved:
    removed = service.delete_provider_key(services, caller, provider)
    return ProviderKeyRemoved(tenant_id=caller.require_tenant_id(), provider=provider, removed=removed)
