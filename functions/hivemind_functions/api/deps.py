"""What every route depends on: the process's :class:`Services`, and who is calling (:class:`Caller`).

Authentication (DESIGN §3): ``Authorization: Bearer <prefix>_<base32(auth)>``. The server hashes the
token (:func:`hivemind.keys.auth_hash_from_bearer`) and looks the hash up in Credentials; it never sees
a secret. Each refusal has its own code:

| situation | status | code |
|---|---|---|
| no ``Authorization: Bearer`` header | 401 | ``credentials_missing`` |
| not ``<prefix>_<base32>`` of 32 bytes, or a credit code | 401 | ``credential_malformed`` |
| no such key (or a key of another kind under that hash) | 401 | ``credential_unknown`` |
| revoked key or invite | 401 | ``credential_revoked`` |
| expired invite | 401 | ``credential_expired`` |
| invite of a deleted room | 410 | ``room_deleted`` |
| suspended tenant | 403 | ``tenant_suspended`` |
| right key, wrong kind for the route | 403 | ``tenant_key_required``, ``admin_key_required``, ... |

Routes declare what they need with the ``Annotated`` aliases at the end of this module::

    @router.get("/v1/things")
    def list_things(caller: TenantCaller, services: ServicesDep) -> ThingList: ...
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Annotated

from aws_lambda_powertools import Logger
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hivemind.errors import Forbidden, Gone, Unauthenticated
from hivemind.keys import auth_hash_from_bearer
from hivemind.store import AwsClients, Store
from hivemind.store.base import Clock
from hivemind.store.credentials import CredentialKind, CredentialRecord
from hivemind.store.rooms import RoomStatus
from hivemind.store.tenants import TenantRecord, TenantStatus
from hivemind.tokens import TokenKind
from hivemind_functions.settings import FunctionSettings

SERVICE_NAME = "hivemind-api"


@dataclass(frozen=True)
class Services:
    """Everything a request handler uses, built once per process and shared by every request."""

    store: Store
    settings: FunctionSettings
    logger: Logger = field(default_factory=lambda: Logger(service=SERVICE_NAME))

    @property
    def clock(self) -> Clock:
        """The store's clock: every time the API writes or compares comes from it."""
        return self.store.clock

    def now(self) -> int:
        return self.store.clock()

    @classmethod
    def from_env(cls) -> Services:
        settings = FunctionSettings.from_env()
        logger = Logger(service=SERVICE_NAME, level=settings.log_level)
        return cls(store=Store(AwsClients(settings.store)), settings=settings, logger=logger)

    @classmethod
    def for_store(cls, store: Store, settings: FunctionSettings | None = None) -> Services:
        """Services around an existing store (tests, the local stack); settings default to the store's."""
        chosen = settings or FunctionSettings(store=store.config)
        return cls(store=store, settings=chosen, logger=Logger(service=SERVICE_NAME, level=chosen.log_level))


class ServicesHolder:
    """The app's services, built from the environment on first use when none were given.

    Lazy so that importing the Lambda handler stays cheap and reads no environment; a bad setting
    surfaces as the first request's error and in the log.
    """

    def __init__(self, services: Services | None) -> None:
        self._services = services
        self._lock = threading.Lock()

    def get(self) -> Services:
        if self._services is None:
            with self._lock:
                if self._services is None:
                    self._services = Services.from_env()
        return self._services


@dataclass(frozen=True)
class Caller:
    """The authenticated credential behind a request.

    - ``tenant``: ``tenant_id`` is the account; ``tenant`` its record.
    - ``invite``: ``room_id`` is the one room it opens, ``invite_id`` its public id (also its bearer id),
      ``tenant_id`` the tenant that issued it (the owner, or a participant that derived it).
    - ``admin``: an operator key.
    """

    credential: CredentialRecord
    tenant: TenantRecord | None = None

    @property
    def kind(self) -> CredentialKind:
        return self.credential.kind

    @property
    def auth_hash(self) -> str:
        return self.credential.auth_hash

    @property
    def tenant_id(self) -> str | None:
        return self.credential.tenant_id

    @property
    def room_id(self) -> str | None:
        return self.credential.room_id

    @property
    def invite_id(self) -> str | None:
        return self.credential.token_id if self.kind is CredentialKind.INVITE else None

    @property
    def bearer_id(self) -> str:
        """Whose room-key wrap this caller holds: the tenant id for tenant keys, else the token id."""
        if self.kind is CredentialKind.TENANT and self.credential.tenant_id is not None:
            return self.credential.tenant_id
        return self.credential.token_id

    @property
    def is_tenant(self) -> bool:
        return self.kind is CredentialKind.TENANT

    @property
    def is_invite(self) -> bool:
        return self.kind is CredentialKind.INVITE

    @property
    def is_admin(self) -> bool:
        return self.kind is CredentialKind.ADMIN

    def require_tenant_id(self) -> str:
        if self.credential.tenant_id is None:
            raise Forbidden("this key belongs to no tenant", code="tenant_key_required")
        return self.credential.tenant_id


# --- dependencies ----------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="Bearer <prefix>_<base32(HKDF(secret, 'auth'))>")


def services(request: Request) -> Services:
    holder: ServicesHolder = request.app.state.services_holder
    return holder.get()


def bearer_auth_hash(
    request: Request, credentials: HTTPAuthorizationCredentials | None
) -> tuple[TokenKind, str]:
    """Kind and ``sha256(auth)`` of the request's bearer token (signup uses it for a key not yet stored)."""
    if credentials is None:
        if request.headers.get("authorization"):
            raise Unauthenticated(
                "the Authorization header must be 'Bearer <token>'", code="credential_malformed"
            )
        raise Unauthenticated(
            "send Authorization: Bearer <token> (see docs/api.md, 'Secrets and tokens')",
            code="credentials_missing",
        )
    try:
        return auth_hash_from_bearer(credentials.credentials)
    except Unauthenticated:
        raise Unauthenticated(
            "the bearer token is not <prefix>_<base32 of 32 bytes>", code="credential_malformed"
        ) from None


def caller(
    request: Request,
    services: Annotated[Services, Depends(services)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The authenticated caller of any kind."""
    token_kind, auth_hash = bearer_auth_hash(request, credentials)
    try:
        kind = CredentialKind.of_token(token_kind)
    except Unauthenticated:
        raise Unauthenticated(
            f"a {token_kind.value}_ token is not an API credential", code="credential_malformed"
        ) from None
    store = services.store
    try:
        record = store.credentials.authenticate(auth_hash, kind=kind)
    except Unauthenticated:
        raise Unauthenticated("unknown key", code="credential_unknown") from None
    except Gone as exc:
        revoked = store.credentials.get(auth_hash)
        if revoked is not None and revoked.room_id is not None:
            room = store.rooms.get(revoked.room_id)
            if room is not None and room.status is RoomStatus.DELETED:
                raise Gone(
                    f"room {room.room_id} was deleted by its owner; this invite link no longer works",
                    code="room_deleted",
                ) from None
        raise Unauthenticated(exc.message, code=exc.code) from None
    tenant = None
    if kind is CredentialKind.TENANT and record.tenant_id is not None:
        tenant = store.tenants.get(record.tenant_id)
        if tenant is None:
            raise Unauthenticated("unknown key", code="credential_unknown")
        if tenant.status is not TenantStatus.ACTIVE:
            raise Forbidden(f"tenant {tenant.tenant_id} is suspended", code="tenant_suspended")
    found = Caller(credential=record, tenant=tenant)
    services.logger.append_keys(tenant_id=found.tenant_id, caller_kind=found.kind.value)
    return found


def tenant_caller(found: Annotated[Caller, Depends(caller)]) -> Caller:
    """A tenant (``hmk_``) key."""
    if not found.is_tenant:
        raise Forbidden("this route needs a tenant (hmk_) key", code="tenant_key_required")
    return found


def admin_caller(found: Annotated[Caller, Depends(caller)]) -> Caller:
    """An admin (``hma_``) key."""
    if not found.is_admin:
        raise Forbidden("this route needs an admin (hma_) key", code="admin_key_required")
    return found


def invite_or_tenant_caller(found: Annotated[Caller, Depends(caller)]) -> Caller:
    """A tenant key or an invite (the routes a room participant uses)."""
    if found.is_admin:
        raise Forbidden(
            "this route needs a tenant (hmk_) or invite (hmq_) key", code="participant_key_required"
        )
    return found


ServicesDep = Annotated[Services, Depends(services)]
AnyCaller = Annotated[Caller, Depends(caller)]
TenantCaller = Annotated[Caller, Depends(tenant_caller)]
AdminCaller = Annotated[Caller, Depends(admin_caller)]
ParticipantCaller = Annotated[Caller, Depends(invite_or_tenant_caller)]
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
