"""Self-serve signup (DESIGN §3, §11): register a new tenant key and its public keys.

The request is authenticated by the NEW key's bearer token: the server stores the hash of its ``auth``
sub-key and never sees the secret. Off unless ``HIVEMIND_SELF_SERVE_SIGNUP_ENABLED``; operators create
tenants with ``POST /v1/admin/tenants`` otherwise.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from hivemind.errors import Forbidden, InvalidInput
from hivemind.models import Ed25519PublicB64, StrictModel, UnixSeconds, X25519PublicB64
from hivemind.tokens import TokenKind
from hivemind_functions.api.deps import BearerCredentials, ServicesDep, bearer_auth_hash
from hivemind_functions.services.common import DisplayName
from hivemind_functions.services.tenants import register_tenant

router = APIRouter(tags=["billing"])


class SignupRequest(StrictModel):
    name: DisplayName
    owner_sign_pub: Ed25519PublicB64
    owner_box_pub: X25519PublicB64


class TenantView(StrictModel):
    tenant_id: str
    name: str
    owner_sign_pub: str
    owner_box_pub: str
    token_id: str
    created_at: UnixSeconds


@router.post("/v1/signup", status_code=201, summary="Register a new tenant key (self-serve)")
def signup(
    body: SignupRequest, request: Request, credentials: BearerCredentials, services: ServicesDep
) -> TenantView:
    if not services.settings.self_serve_signup:
        raise Forbidden(
            "self-serve signup is disabled on this deployment; ask an operator for a tenant",
            code="signup_disabled",
        )
    kind, auth_hash = bearer_auth_hash(request, credentials)
    if kind is not TokenKind.TENANT:
        raise InvalidInput("sign up with a tenant (hmk_) key", code="tenant_key_required")
    tenant = register_tenant(
        services.store,
        auth_hash=auth_hash,
        name=body.name,
        owner_sign_pub=body.owner_sign_pub,
        owner_box_pub=body.owner_box_pub,
    )
    return TenantView(
        tenant_id=tenant.tenant_id,
        name=tenant.name,
        owner_sign_pub=tenant.owner_sign_pub,
        owner_box_pub=tenant.owner_box_pub,
        token_id=auth_hash[:16],
        created_at=tenant.created_at,
    )
