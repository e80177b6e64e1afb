"""Fixtures for the control-plane tests: the app on a fresh deployment, two ways to call it, and a
client-side harness that makes tenants, agents, rooms, invites and data with real keys.

Calling the API: the ``api`` fixture is parametrized, so a test taking it runs twice::

    def test_healthz(api: ApiClient) -> None:
        assert api.get("/v1/healthz").status == 200

- ``api[lambda]``: the Lambda handler path. Each request becomes an API Gateway HTTP API v2 event
  (``version: "2.0"``, ``requestContext.http``, base64 bodies, ...) handed to ``Mangum(app)`` exactly
  as Lambda would call ``hivemind_functions.api.handler.handler``.
- ``api[http]``: real HTTP to the same app under uvicorn on 127.0.0.1 (one server per session; each
  test's app is swapped in), with ``httpx``.

``lambda_api`` and ``http_api`` give one transport each. Both return :class:`ApiResponse`
(``status``, ``headers``, ``body``, ``json()``, ``error`` = the error code or ``None``)::

    response = api.post("/v1/rooms", token=alice.token, json={...})
    assert response.status == 409 and response.error == "signature_invalid"

Fixtures below the clients:

- ``clock``: :class:`MovingClock` (real time plus an offset a test can ``advance``); the ``store`` here
  uses it, so expiry, TTLs and heartbeats can be tested without sleeping.
- ``function_settings``: the app's :class:`FunctionSettings` (self-serve signup on, other switches at
  their defaults). Override this fixture in a test module to change switches.
- ``services``, ``app``: :class:`Services` around ``store``, and ``create_app(services)``.

The harness, ``hm`` (:class:`Harness`, bound to the ``api`` of the test), does what ``hmctl`` does on the
client side, through the API, with real crypto (keys derived from real secrets, signed manifests, DEK
wraps, HMS1-sealed items, presigned uploads to the moto server)::

    alice = hm.tenant("alice")                       # Tenant: secret, token, tenant_id, keys
    room = hm.room(alice)                            # RoomHandle: room_id, dek, signed, manifest, owner
    bob = hm.invite(room)                            # InviteKey: secret, token, invite_id, room_id
    narrower = hm.invite(room, by=bob, uses=1)       # a derived invite (parent: bob)
    item = hm.add_item(room, b"a,b\\n1,2\\n", name="people.csv")   # committed sealed item id
    agent = hm.agent(alice, visibility="inspectable")              # AgentHandle, committed
    runner = hm.runner()                             # RunnerHandle: a live simulated runner
    admin = hm.admin()                               # AdminKey

``hm.tamper_room(room, mutate)`` edits the stored manifest row in DynamoDB directly (tamper tests).
``hm_lambda`` is the same harness on ``lambda_api`` only (for long refusal matrices).
``hm.room`` accepts the manifest's parts as keyword overrides (``query_mode``, ``output``,
``egress_providers``, ``runner_trust``, ``budgets``, ``mediator``, ...). Builders that do not call the
API (``hm.manifest``, ``hm.sign``, ``hm.archive``, ``hm.sealed_item``) let tests make bad requests.
"""

from __future__ import annotations

import base64
import json as jsonlib
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from mangum import Mangum
from support.rooms import Tenant, build_manifest

from hivemind.archive import pack_directory, validate_archive
from hivemind.attestation import AttestationDocument
from hivemind.encoding import b64encode, sha256_hex
from hivemind.envelope import HpkeKeyPair, HpkePublicKeys, seal_to
from hivemind.keys import (
    auth_hash,
    auth_token,
    credential_id,
    new_dek,
    owner_box_key,
    owner_sign_key,
    public_bytes,
    wrap_dek,
    wrap_key,
)
from hivemind.manifest import (
    AgentRef,
    RoomManifest,
    SignedManifest,
    next_revision,
    sign_manifest,
)
from hivemind.models import (
    DEFAULT_BUDGET_LIMITS,
    BudgetLimits,
    ObjectKind,
    OutputVisibility,
    QueryMode,
    TeeKind,
    Visibility,
)
from hivemind.seal import SealContext, seal_bytes
from hivemind.store import AwsClients, Store
from hivemind.store.base import deserialize, serialize
from hivemind.store.credentials import CredentialKind, CredentialRecord
from hivemind.store.runners import RunnerRecord
from hivemind.store.schema import TableRole
from hivemind.tokens import Secret, TokenKind, random_id
from hivemind.trust import RunnerTrust
from hivemind_functions.api.app import create_app
from hivemind_functions.api.deps import Services
from hivemind_functions.services.tenants import register_tenant
from hivemind_functions.settings import FunctionSettings

COMPOSE_HASH = "c0" * 32
AGENT_SEALED_KEY_INFO_PREFIX = b"hivemind-agent-v1|"

# --- clock -----------------------------------------------------------------------------------------


class MovingClock:
    """Integer Unix seconds: real time plus an offset that only grows (``advance``)."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self) -> int:
        return int(time.time()) + self.offset

    def advance(self, seconds: int) -> None:
        self.offset += seconds


@pytest.fixture
def clock() -> MovingClock:
    return MovingClock()


@pytest.fixture
def store(aws: AwsClients, clock: MovingClock) -> Store:
    """The deployment's store on the test's :class:`MovingClock` (overrides the root ``store``)."""
    return Store(aws, clock=clock)


@pytest.fixture
def function_settings(store: Store) -> FunctionSettings:
    return FunctionSettings(store=store.config, self_serve_signup=True)


@pytest.fixture
def services(store: Store, function_settings: FunctionSettings) -> Services:
    return Services.for_store(store, function_settings)


@pytest.fixture
def app(services: Services) -> FastAPI:
    return create_app(services)


# --- responses and clients -------------------------------------------------------------------------

_UNSET: Any = object()


@dataclass(frozen=True)
class ApiResponse:
    status: int
    headers: dict[str, str]  # lowercase names
    body: bytes

    def json(self) -> Any:
        return jsonlib.loads(self.body)

    @property
    def error(self) -> str | None:
        """The ``error`` code of an error response, else ``None``."""
        if self.status < 400:
            return None
        try:
            return self.json().get("error")
        except ValueError:
            return None

    def ok(self, status: int = 200) -> Any:
        """The body (parsed when it is JSON), after asserting the status (shown when it differs)."""
        assert self.status == status, f"expected {status}, got {self.status}: {self.body[:2000]!r}"
        if not self.headers.get("content-type", "").startswith("application/json"):
            return self.body
        return self.json() if self.body else None


class ApiClient:
    """Calls the app. ``token`` is sent as ``Authorization: Bearer <token>``; ``json`` is serialized,
    ``content`` sent as is (for malformed bodies)."""

    transport: str

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = _UNSET,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> ApiResponse:
        all_headers = {key.lower(): value for key, value in (headers or {}).items()}
        if token is not None:
            all_headers["authorization"] = f"Bearer {token}"
        body = content
        if json is not _UNSET:
            body = jsonlib.dumps(json).encode()
            all_headers.setdefault("content-type", "application/json")
        query = {key: str(value) for key, value in (params or {}).items()}
        return self._send(method.upper(), path, all_headers, body, query)

    def get(self, path: str, **kwargs: Any) -> ApiResponse:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> ApiResponse:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> ApiResponse:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> ApiResponse:
        return self.request("DELETE", path, **kwargs)

    def _send(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None, query: dict[str, str]
    ) -> ApiResponse:
        raise NotImplementedError


@dataclass
class _LambdaContext:
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_name: str = "hivemind-api"
    memory_limit_in_mb: int = 1024
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:hivemind-api"

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 30_000


class LambdaApiClient(ApiClient):
    """Invokes ``Mangum(app)`` with API Gateway HTTP API (payload format 2.0) events."""

    transport = "lambda"

    def __init__(self, app: FastAPI) -> None:
        self.handler = Mangum(app, lifespan="off")
        self.last_event: dict[str, Any] | None = None

    def _send(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None, query: dict[str, str]
    ) -> ApiResponse:
        now = time.time()
        event: dict[str, Any] = {
            "version": "2.0",
            "routeKey": "$default",
            "rawPath": path,
            "rawQueryString": urlencode(query),
            "headers": {
                "host": "api.hivemind.test",
                "x-forwarded-proto": "https",
                "x-forwarded-port": "443",
                "user-agent": "pytest",
                **({"content-length": str(len(body))} if body is not None else {}),
                **headers,
            },
            "requestContext": {
                "accountId": "123456789012",
                "apiId": "hivemindapi",
                "domainName": "api.hivemind.test",
                "domainPrefix": "api",
                "http": {
                    "method": method,
                    "path": path,
                    "protocol": "HTTP/1.1",
                    "sourceIp": "192.0.2.10",
                    "userAgent": "pytest",
                },
                "requestId": uuid.uuid4().hex,
                "routeKey": "$default",
                "stage": "$default",
                "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
                "timeEpoch": int(now * 1000),
            },
            "isBase64Encoded": body is not None,
        }
        if query:
            event["queryStringParameters"] = query
        if body is not None:
            event["body"] = base64.b64encode(body).decode()
        self.last_event = event
        result = self.handler(event, _LambdaContext())
        raw = result.get("body", "")
        data = base64.b64decode(raw) if result.get("isBase64Encoded") else raw.encode()
        response_headers = {key.lower(): value for key, value in (result.get("headers") or {}).items()}
        return ApiResponse(status=result["statusCode"], headers=response_headers, body=data)


class _AppSwitch:
    """The ASGI app the session's uvicorn serves: forwards to the current test's app."""

    def __init__(self) -> None:
        self.target: FastAPI | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        if self.target is None:
            raise RuntimeError("no app is mounted on the test HTTP server")
        await self.target(scope, receive, send)


@dataclass
class _HttpServer:
    base_url: str
    switch: _AppSwitch


@pytest.fixture(scope="session")
def _http_server() -> Iterator[_HttpServer]:
    switch = _AppSwitch()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(switch, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield _HttpServer(base_url=f"http://127.0.0.1:{port}", switch=switch)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class HttpApiClient(ApiClient):
    """Real HTTP to uvicorn on loopback."""

    transport = "http"

    def __init__(self, base_url: str) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=60)

    def _send(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None, query: dict[str, str]
    ) -> ApiResponse:
        response = self.client.request(method, path, headers=headers, content=body, params=query or None)
        return ApiResponse(
            status=response.status_code,
            headers={key.lower(): value for key, value in response.headers.items()},
            body=response.content,
        )

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def lambda_api(app: FastAPI) -> LambdaApiClient:
    return LambdaApiClient(app)


@pytest.fixture
def lambda_client_for() -> Callable[[FastAPI], LambdaApiClient]:
    """A Lambda-event client for an app a test built itself (e.g. with extra test routes)."""
    return LambdaApiClient


@pytest.fixture
def http_api(app: FastAPI, _http_server: _HttpServer) -> Iterator[HttpApiClient]:
    _http_server.switch.target = app
    client = HttpApiClient(_http_server.base_url)
    try:
        yield client
    finally:
        client.close()
        _http_server.switch.target = None


@pytest.fixture(params=["lambda", "http"])
def api(request: pytest.FixtureRequest) -> ApiClient:
    """The app through Mangum with API Gateway v2 events, then over HTTP through uvicorn."""
    name = "lambda_api" if request.param == "lambda" else "http_api"
    return request.getfixturevalue(name)


# --- client-side keys and handles ------------------------------------------------------------------


@dataclass(frozen=True)
class InviteKey:
    """An invite's ``hmq_`` secret (what a link carries) for one room."""

    secret: Secret = field(repr=False)
    room_id: str
    parent_id: str | None = None

    @property
    def token(self) -> str:
        return auth_token(self.secret)

    @property
    def auth_hash(self) -> str:
        return auth_hash(self.secret)

    @property
    def invite_id(self) -> str:
        return credential_id(self.secret)

    @property
    def bearer_id(self) -> str:
        return self.invite_id

    def wrap(self, dek: bytes) -> str:
        return wrap_dek(
            wrap_key(self.secret, self.room_id), dek, room_id=self.room_id, bearer_id=self.invite_id
        )


@dataclass(frozen=True)
class AdminKey:
    secret: Secret = field(repr=False)

    @property
    def token(self) -> str:
        return auth_token(self.secret)

    @property
    def auth_hash(self) -> str:
        return auth_hash(self.secret)


@dataclass(frozen=True)
class AgentHandle:
    agent_id: str
    digest: str  # source digest (hex) that manifests pin
    visibility: Visibility
    archive: bytes = field(repr=False)
    files: dict[str, bytes] = field(repr=False)
    agent_key: bytes | None = field(default=None, repr=False)  # sealed agents: the HMS1 key

    def ref(self) -> AgentRef:
        return AgentRef(agent_id=self.agent_id, digest=self.digest, visibility=self.visibility)


@dataclass(frozen=True)
class AgentUpload:
    """A create-agent request body and the bytes to PUT to its presigned URL."""

    body: dict[str, Any]
    blob: bytes = field(repr=False)
    archive: bytes = field(repr=False)
    digest: str
    agent_key: bytes | None = field(default=None, repr=False)

    def commit_body(self) -> dict[str, Any]:
        """``{size, sha256}`` of the uploaded bytes, as ``POST /v1/room-agents/{id}/commit`` takes it."""
        return {"size": len(self.blob), "sha256": sha256_hex(self.blob)}


@dataclass
class RoomHandle:
    room_id: str
    owner: Tenant
    dek: bytes = field(repr=False)
    signed: SignedManifest
    agents: dict[str, AgentHandle]

    @property
    def manifest(self) -> RoomManifest:
        return self.signed.manifest

    @property
    def manifest_hash(self) -> str:
        return self.signed.manifest_hash


@dataclass(frozen=True)
class RunnerHandle:
    runner_id: str
    keys: HpkeKeyPair = field(repr=False)
    sign_key: Ed25519PrivateKey = field(repr=False)
    document: AttestationDocument
    compose_hash: str

    @property
    def public_keys(self) -> HpkePublicKeys:
        return self.keys.public_keys()


DEFAULT_AGENT_FILES: dict[str, bytes] = {
    "Dockerfile": b'FROM hivemind/agent-base\nCOPY agent.py /agent/agent.py\nCMD ["python", "agent.py"]\n',
    "agent.py": b"print('hello from an agent')\n",
}


class Harness:
    """Client-side helpers on one API client (see the module docstring)."""

    def __init__(self, api: ApiClient, store: Store) -> None:
        self.api = api
        self.store = store
        self._http = httpx.Client(timeout=60)

    def close(self) -> None:
        self._http.close()

    # --- identities ----------------------------------------------------------------------------

    def tenant(self, name: str = "alice") -> Tenant:
        """A registered tenant (the server half done directly: signup is tested on its own)."""
        secret = Secret.generate(TokenKind.TENANT)
        record = register_tenant(
            self.store,
            auth_hash=auth_hash(secret),
            name=name,
            owner_sign_pub=b64encode(public_bytes(owner_sign_key(secret))),
            owner_box_pub=b64encode(public_bytes(owner_box_key(secret))),
        )
        return Tenant(tenant_id=record.tenant_id, secret=secret, name=name)

    def admin(self) -> AdminKey:
        secret = Secret.generate(TokenKind.ADMIN)
        digest = auth_hash(secret)
        self.store.credentials.put(
            CredentialRecord(
                auth_hash=digest,
                kind=CredentialKind.ADMIN,
                token_id=digest[:16],
                created_at=self.store.clock(),
            )
        )
        return AdminKey(secret=secret)

    # --- runners -------------------------------------------------------------------------------

    def runner(self, *, compose_hash: str = COMPOSE_HASH, runner_id: str | None = None) -> RunnerHandle:
        """Publish a live simulated runner (fresh keys) to the Runners table."""
        keys = HpkeKeyPair.generate()
        sign_key = Ed25519PrivateKey.generate()
        now = self.store.clock()
        document = AttestationDocument(
            runner_id=runner_id or random_id("runner"),
            tee=TeeKind.SIMULATED,
            version="0.1.0",
            app_id="simulated",
            compose_hash=compose_hash,
            quote="",
            event_log=[],
            hpke_public_keys=keys.public_keys().by_suite(),
            sign_pub=b64encode(public_bytes(sign_key)),
            published_at=now,
        )
        self.store.runners.publish(
            RunnerRecord(
                runner_id=document.runner_id,
                tee=TeeKind.SIMULATED,
                compose_hash=compose_hash,
                version=document.version,
                attestation=document.model_dump(mode="json"),
                started_at=now,
                heartbeat_at=now,
            )
        )
        return RunnerHandle(
            runner_id=document.runner_id,
            keys=keys,
            sign_key=sign_key,
            document=document,
            compose_hash=compose_hash,
        )

    # --- agents --------------------------------------------------------------------------------

    @staticmethod
    def archive(files: Mapping[str, bytes] | None = None) -> bytes:
        """A deterministic agent archive (``hivemind.archive.pack_directory``) of ``files``."""
        with tempfile.TemporaryDirectory() as directory:
            root = Path(directory)
            for name, data in (files or DEFAULT_AGENT_FILES).items():
                path = root / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            return pack_directory(root)

    def put_upload(self, upload: Mapping[str, Any], data: bytes) -> httpx.Response:
        """PUT ``data`` to a presigned upload (``{url, headers}``) as the CLI does."""
        response = self._http.put(upload["url"], headers=dict(upload["headers"]), content=data)
        assert response.status_code == 200, response.text
        return response

    def agent(
        self,
        owner: Tenant | InviteKey,
        *,
        visibility: Visibility | str = Visibility.INSPECTABLE,
        files: Mapping[str, bytes] | None = None,
        name: str = "agent",
        room: RoomHandle | None = None,
        runner: RunnerHandle | None = None,
        commit: bool = True,
    ) -> AgentHandle:
        """Upload (and commit) an agent. ``room`` makes it that room's query agent
        (``POST /v1/rooms/{id}/query-agents``); sealed agents are sealed to ``runner`` (default: a
        fresh live runner)."""
        files = dict(files or DEFAULT_AGENT_FILES)
        upload = self.agent_upload(
            owner, archive=self.archive(files), visibility=visibility, name=name, room=room, runner=runner
        )
        path = f"/v1/rooms/{room.room_id}/query-agents" if room is not None else "/v1/room-agents"
        created = self.api.post(path, token=owner.token, json=upload.body).ok(201)
        agent_id = created["agent"]["agent_id"]
        self.put_upload(created["upload"], upload.blob)
        if commit:
            self.api.post(
                f"/v1/room-agents/{agent_id}/commit", token=owner.token, json=upload.commit_body()
            ).ok()
        return AgentHandle(
            agent_id=agent_id,
            digest=upload.digest,
            visibility=Visibility(visibility),
            archive=upload.archive,
            files=files,
            agent_key=upload.agent_key,
        )

    def agent_upload(
        self,
        owner: Tenant | InviteKey,
        *,
        archive: bytes,
        visibility: Visibility | str = Visibility.INSPECTABLE,
        name: str = "agent",
        room: RoomHandle | None = None,
        runner: RunnerHandle | None = None,
    ) -> AgentUpload:
        """The create-agent body for ``archive`` and the bytes to upload (sealed when asked)."""
        digest = validate_archive(archive).digest
        agent_id = random_id("agent")
        if Visibility(visibility) is Visibility.INSPECTABLE:
            body: dict[str, Any] = {
                "agent_id": agent_id,
                "name": name,
                "visibility": "inspectable",
                "size": len(archive),
                "sha256": sha256_hex(archive),
                "source_digest": digest,
            }
            return AgentUpload(body=body, blob=archive, archive=archive, digest=digest)
        runner = runner or self.runner()
        if room is not None:
            tenant_id = room.owner.tenant_id
        else:
            assert isinstance(owner, Tenant), "a library agent belongs to a tenant"
            tenant_id = owner.tenant_id
        agent_key = os.urandom(32)
        context = SealContext(
            tenant_id=tenant_id,
            room_id=room.room_id if room is not None else "none",
            kind=ObjectKind.AGENT_SOURCE,
            object_id=agent_id,
        )
        sealed = seal_bytes(archive, key=agent_key, context=context)
        sealed_key = seal_to(
            runner.public_keys, agent_key, info=AGENT_SEALED_KEY_INFO_PREFIX + agent_id.encode()
        )
        body = {
            "agent_id": agent_id,
            "name": name,
            "visibility": "sealed",
            "size": len(sealed),
            "sha256": sha256_hex(sealed),
            "source_digest": digest,
            "sealed_key": sealed_key.model_dump(mode="json"),
        }
        return AgentUpload(body=body, blob=sealed, archive=archive, digest=digest, agent_key=agent_key)

    # --- rooms ---------------------------------------------------------------------------------

    def manifest(
        self,
        owner: Tenant,
        *,
        room_id: str | None = None,
        scope: AgentHandle | AgentRef,
        query: AgentHandle | AgentRef | None = None,
        query_mode: QueryMode | str = QueryMode.FIXED,
        query_visibility: Visibility | str = Visibility.INSPECTABLE,
        mediator: AgentHandle | AgentRef | None = None,
        output: OutputVisibility | str = OutputVisibility.QUERIER_ONLY,
        egress_providers: list[str] | None = None,
        artifacts: bool = False,
        budgets: BudgetLimits = DEFAULT_BUDGET_LIMITS,
        runner_trust: RunnerTrust | None = None,
        name: str = "Test room",
        rules: str = "Only aggregate answers.",
        revision: int = 1,
        **overrides: Any,
    ) -> RoomManifest:
        def ref(agent: AgentHandle | AgentRef) -> AgentRef:
            return agent.ref() if isinstance(agent, AgentHandle) else agent

        fixed = QueryMode(query_mode) is QueryMode.FIXED
        manifest = build_manifest(
            owner,
            room_id=room_id or random_id("room"),
            scope=ref(scope),
            query=ref(query if query is not None else scope) if fixed else None,
            uploadable_visibility=Visibility(query_visibility),
            mediator=ref(mediator) if mediator is not None else None,
            compose_hashes=[COMPOSE_HASH],
            output=OutputVisibility(output),
            artifacts=artifacts,
            llm_providers=egress_providers,
            rules=rules,
            created_at=self.store.clock(),
            revision=revision,
            name=name,
            budgets=budgets,
            runner_trust=runner_trust,
        )
        return RoomManifest.model_validate({**manifest.model_dump(), **overrides})

    @staticmethod
    def sign(owner: Tenant, manifest: RoomManifest) -> SignedManifest:
        return sign_manifest(manifest, owner.sign_key)

    def room(
        self,
        owner: Tenant,
        *,
        scope: AgentHandle | None = None,
        query: AgentHandle | None = None,
        **manifest_fields: Any,
    ) -> RoomHandle:
        """Create a room through ``POST /v1/rooms`` (uploading a default scope agent when none is given)."""
        scope = scope or self.agent(owner, name="scope")
        agents = {"scope": scope}
        if query is not None:
            agents["query"] = query
        mediator = manifest_fields.get("mediator")
        if isinstance(mediator, AgentHandle):
            agents["mediator"] = mediator
        manifest = self.manifest(owner, scope=scope, query=query, **manifest_fields)
        signed = self.sign(owner, manifest)
        dek = new_dek()
        self.api.post(
            "/v1/rooms",
            token=owner.token,
            json={
                "signed_manifest": signed.model_dump(mode="json"),
                "owner_wrap": owner.wrap(manifest.room_id, dek),
            },
        ).ok(201)
        return RoomHandle(room_id=manifest.room_id, owner=owner, dek=dek, signed=signed, agents=agents)

    def trust_update(self, room: RoomHandle, **changes: Any) -> SignedManifest:
        """Re-sign the room's manifest at ``revision + 1`` with ``changes`` and post it."""
        updated = self.sign(room.owner, next_revision(room.manifest, changes))
        self.api.post(
            f"/v1/rooms/{room.room_id}/trust",
            token=room.owner.token,
            json={"signed_manifest": updated.model_dump(mode="json")},
        ).ok()
        room.signed = updated
        return updated

    def tamper_room(self, room: RoomHandle | str, mutate: Callable[[dict[str, Any]], None]) -> None:
        """Change the room's stored manifest row directly in DynamoDB, as an attacker with table access
        would: ``mutate`` gets the row (``envelope``, ``manifest_hash``, ``revision``, ...) and edits it."""
        room_id = room if isinstance(room, str) else room.room_id
        table = self.store.config.table_name(TableRole.ROOMS)
        client = self.store.clients.dynamodb
        key = serialize({"room_id": room_id, "sk": "manifest"})
        row = deserialize(client.get_item(TableName=table, Key=key, ConsistentRead=True)["Item"])
        mutate(row)
        client.put_item(TableName=table, Item=serialize(row))

    # --- invites -------------------------------------------------------------------------------

    def invite(
        self,
        room: RoomHandle,
        *,
        by: Tenant | InviteKey | None = None,
        uses: int | None = None,
        expires_at: int | None = None,
        budgets: Mapping[str, int] | None = None,
        label: str | None = None,
    ) -> InviteKey:
        """Create an invite (the owner's, or one derived from the invite ``by``) with its DEK wrap."""
        issuer = by or room.owner
        invite = self.invite_key(room, parent=issuer if isinstance(issuer, InviteKey) else None)
        self.api.post(
            f"/v1/rooms/{room.room_id}/invites",
            token=issuer.token,
            json=self.invite_body(
                invite, room.dek, uses=uses, expires_at=expires_at, budgets=budgets, label=label
            ),
        ).ok(201)
        return invite

    @staticmethod
    def invite_key(room: RoomHandle, *, parent: InviteKey | None = None) -> InviteKey:
        """A fresh invite secret for ``room`` (not registered: see :meth:`invite`)."""
        return InviteKey(
            secret=Secret.generate(TokenKind.INVITE),
            room_id=room.room_id,
            parent_id=parent.invite_id if parent is not None else None,
        )

    @staticmethod
    def invite_body(
        invite: InviteKey,
        dek: bytes,
        *,
        uses: int | None = None,
        expires_at: int | None = None,
        budgets: Mapping[str, int] | None = None,
        label: str | None = None,
    ) -> dict[str, Any]:
        constraints: dict[str, Any] = {}
        if uses is not None:
            constraints["uses"] = uses
        if expires_at is not None:
            constraints["expires_at"] = expires_at
        if budgets is not None:
            constraints["budgets"] = dict(budgets)
        body: dict[str, Any] = {
            "auth_hash": invite.auth_hash,
            "wrap": invite.wrap(dek),
            "constraints": constraints,
        }
        if label is not None:
            body["label"] = label
        return body

    # --- data ----------------------------------------------------------------------------------

    @staticmethod
    def sealed_item(room: RoomHandle, item_id: str, data: bytes) -> bytes:
        """``data`` sealed (HMS1) under the room DEK for ``item_id``, as the owner's CLI does."""
        context = SealContext(
            tenant_id=room.owner.tenant_id, room_id=room.room_id, kind=ObjectKind.ITEM, object_id=item_id
        )
        return seal_bytes(data, key=room.dek, context=context)

    def add_item(
        self,
        room: RoomHandle,
        data: bytes,
        *,
        name: str = "data.csv",
        content_type: str = "text/csv",
        metadata: Mapping[str, str] | None = None,
        commit: bool = True,
    ) -> str:
        """Seal, declare, upload and (by default) commit an item; returns its id."""
        item_id = random_id("item")
        sealed = self.sealed_item(room, item_id, data)
        created = self.api.post(
            f"/v1/rooms/{room.room_id}/data",
            token=room.owner.token,
            json={
                "item_id": item_id,
                "name": name,
                "content_type": content_type,
                "size": len(sealed),
                "sha256": sha256_hex(sealed),
                "metadata": dict(metadata or {}),
            },
        ).ok(201)
        self.put_upload(created["upload"], sealed)
        if commit:
            self.api.post(f"/v1/rooms/{room.room_id}/data/{item_id}/commit", token=room.owner.token).ok()
        return item_id


@pytest.fixture
def hm(api: ApiClient, store: Store) -> Iterator[Harness]:
    """The harness on the parametrized ``api`` (the test runs once per transport)."""
    harness = Harness(api, store)
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def hm_lambda(lambda_api: LambdaApiClient, store: Store) -> Iterator[Harness]:
    """The harness on ``lambda_api`` only: for refusal matrices that need not run twice."""
    harness = Harness(lambda_api, store)
    try:
        yield harness
    finally:
        harness.close()
