"""An in-memory control plane and runner behind ``httpx.MockTransport``, for ``hmctl`` tests.

It speaks the API's routes and error format, keeps its own tenants, credentials, rooms, wraps, items,
invites, agents and runs, and runs each submitted run at once with a fake runner that does the real
cryptography with the core library: it opens the sealed run envelope, unwraps the room DEK with the
bearer's wrap key, decrypts the room's items, seals its output under a fresh key to the reply key (and
the owner's box key when the room says so) and signs a receipt with its attested key.

Knobs let a test play a malicious control plane or runner (``tamper_*``), and the key-rotation route
follows the contract the CLI proposes (``POST /v1/tenant/key-rotation``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hivemind.archive import validate_archive
from hivemind.attestation import AttestationDocument
from hivemind.encoding import b64decode, b64encode, sha256_hex
from hivemind.envelope import (
    HpkeKeyPair,
    MemoryReplayGuard,
    OutputRecipient,
    SealedEnvelope,
    open_run_envelope,
    seal_output_key,
)
from hivemind.errors import HivemindError
from hivemind.keys import auth_hash_from_bearer, public_bytes, unwrap_dek
from hivemind.manifest import (
    SignedKeyRotation,
    SignedManifest,
    rotated_revision,
    verify_key_rotation,
    verify_manifest,
)
from hivemind.models import ObjectKind, OutputVisibility, RunStatus, Stage, StageUsage, TeeKind
from hivemind.receipt import (
    ArtifactDigests,
    OutputDigests,
    Receipt,
    ReceiptAgent,
    UsageTotals,
    sign_receipt,
)
from hivemind.seal import SealContext, open_bytes, seal_bytes

SERVICE = "http://127.0.0.1:8765"
BUCKET = "http://bucket.test"
COMPOSE_HASH = "c0" * 32
QUOTE_HASH = sha256_hex(b"")


class Refusal(Exception):
    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


@dataclass
class Credential:
    auth_hash: str
    kind: str
    tenant_id: str | None
    room_id: str | None = None
    parent_id: str | None = None
    max_uses: int | None = None
    uses: int = 0
    expires_at: int | None = None
    budgets: dict[str, int] | None = None
    revoked: bool = False

    @property
    def token_id(self) -> str:
        return self.auth_hash[:16]

    @property
    def bearer_id(self) -> str:
        return self.tenant_id if self.kind == "tenant" and self.tenant_id else self.token_id


@dataclass
class Room:
    room_id: str
    tenant_id: str
    signed: dict[str, Any]
    wraps: dict[str, str] = field(default_factory=dict)
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    deleted: bool = False


@dataclass
class Run:
    run_id: str
    room_id: str
    caller_id: str
    status: str = "pending"
    stage: str | None = None
    manifest_hash: str = ""
    prompt_sha256: str = ""
    receipt: dict[str, Any] | None = None
    sealed_keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    output_blob: str | None = None
    usage: list[dict[str, Any]] = field(default_factory=list)
    query_agent_id: str | None = None
    artifact_names: list[str] = field(default_factory=list)
    created_at: int = 0


class FakeService:
    """See the module docstring. ``transport`` is what ``AppState(transport=...)`` takes."""

    def __init__(self, *, service: str = SERVICE, tee: TeeKind = TeeKind.SIMULATED) -> None:
        self.service = service
        self.tenants: dict[str, dict[str, Any]] = {}
        self.credentials: dict[str, Credential] = {}
        self.rooms: dict[str, Room] = {}
        self.rotations: dict[str, list[dict[str, Any]]] = {}
        self.agents: dict[str, dict[str, Any]] = {}
        self.blobs: dict[str, bytes] = {}
        self.pending_uploads: dict[str, tuple[int, str]] = {}
        self.runs: dict[str, Run] = {}
        self.provider_keys: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[httpx.Request] = []
        self.runner_keys = HpkeKeyPair.generate()
        self.runner_sign = Ed25519PrivateKey.generate()
        self.document = AttestationDocument(
            runner_id="runner_fake1",
            tee=tee,
            version="test",
            app_id="simulated",
            compose_hash=COMPOSE_HASH,
            quote="",
            event_log=[],
            hpke_public_keys=self.runner_keys.public_keys().by_suite(),
            sign_pub=b64encode(public_bytes(self.runner_sign)),
            published_at=int(time.time()),
        )
        self.guard = MemoryReplayGuard()
        self.output_text: Callable[[str, dict[str, bytes]], bytes] = default_output
        self.fail_runs_with: str | None = None
        # Tamper knobs: a malicious control plane or a runner key that is not the attested one.
        self.tamper_manifest: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.receipt_signer: Ed25519PrivateKey | None = None
        self.corrupt_output = False
        self.artifacts: dict[str, bytes] = {}
        self.corrupt_artifact = False
        self.runner_documents: list[dict[str, Any]] | None = None
        self._counter = 0

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    # --- plumbing ---------------------------------------------------------------------------------

    def _id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}_{self._counter:04d}{os.urandom(3).hex()}"

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        try:
            if str(request.url).startswith(BUCKET):
                return self._bucket(request)
            for method, pattern, handler in self._routes():
                match = re.fullmatch(pattern, request.url.path)
                if match and request.method == method:
                    body = json.loads(request.content) if request.content else {}
                    result = handler(request, body, *match.groups())
                    status = 201 if method == "POST" and handler in self._created() else 200
                    return httpx.Response(status, json=result)
            raise Refusal(404, "not_found", f"no route {request.method} {request.url.path}")
        except Refusal as refusal:
            body = {"error": refusal.code, "message": refusal.message}
            if refusal.details:
                body["details"] = refusal.details
            return httpx.Response(refusal.status, json=body)

    def _created(self) -> set[Any]:
        return {
            self.signup,
            self.create_room,
            self.create_invite,
            self.declare_item,
            self.declare_agent,
            self.submit,
        }

    def _routes(self) -> list[tuple[str, str, Callable[..., Any]]]:
        room = r"/v1/rooms/(room_[a-z0-9]+)"
        return [
            ("GET", r"/v1/whoami", self.whoami),
            ("POST", r"/v1/signup", self.signup),
            ("GET", r"/v1/attestation", self.attestation),
            ("GET", r"/v1/billing", self.billing),
            ("POST", r"/v1/room-agents", self.declare_agent),
            ("POST", r"/v1/room-agents/([a-z0-9_]+)/commit", self.commit_agent),
            ("POST", r"/v1/rooms", self.create_room),
            ("GET", r"/v1/rooms", self.list_rooms),
            ("GET", room, self.get_room),
            ("GET", room + "/attest", self.attest),
            ("GET", room + "/key", self.get_key),
            ("POST", room + "/invites", self.create_invite),
            ("DELETE", room + r"/invites/([0-9a-f]{16})", self.revoke_invite),
            ("POST", room + "/data", self.declare_item),
            ("POST", room + r"/data/([a-z0-9_]+)/commit", self.commit_item),
            ("POST", room + "/trust", self.trust),
            ("POST", room + "/query-agents", self.declare_query_agent),
            ("POST", room + "/runs", self.submit),
            ("GET", r"/v1/runs", self.list_runs),
            ("GET", r"/v1/runs/([a-z0-9_]+)", self.get_run),
            ("GET", r"/v1/runs/([a-z0-9_]+)/output", self.run_output),
            ("POST", r"/v1/tenant/key-rotation", self.rotate_key),
            ("PUT", r"/v1/tenant/provider-keys/([a-z0-9._-]+)", self.put_provider_key),
        ]

    def caller(self, request: httpx.Request) -> Credential:
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise Refusal(401, "credentials_missing", "send Authorization: Bearer <token>")
        try:
            _, digest = auth_hash_from_bearer(header.removeprefix("Bearer "))
        except HivemindError:
            raise Refusal(401, "credential_malformed", "malformed bearer token") from None
        credential = self.credentials.get(digest)
        if credential is None:
            raise Refusal(401, "credential_unknown", "unknown key")
        if credential.revoked:
            raise Refusal(401, "credential_revoked", f"credential {credential.token_id} was revoked")
        return credential

    def _room(self, caller: Credential, room_id: str, *, owner_only: bool = False) -> Room:
        room = self.rooms.get(room_id)
        visible = room is not None and (
            (caller.kind == "tenant" and caller.tenant_id == room.tenant_id) or caller.room_id == room_id
        )
        if not visible or room is None:
            raise Refusal(404, "room_not_found", f"no room {room_id}")
        if room.deleted:
            raise Refusal(410, "room_deleted", f"room {room_id} was deleted")
        if owner_only and caller.kind != "tenant":
            raise Refusal(403, "owner_only", "only the owner may do this")
        return room

    def upload_target(self, key: str, size: int, sha256: str) -> dict[str, Any]:
        self.pending_uploads[key] = (size, sha256)
        return {
            "method": "PUT",
            "url": f"{BUCKET}/{key}",
            "headers": {"Content-Length": str(size)},
            "key": key,
            "expires_at": 0,
        }

    def _bucket(self, request: httpx.Request) -> httpx.Response:
        key = request.url.path.lstrip("/")
        if "authorization" in request.headers:
            return httpx.Response(400, text="a presigned request must not carry the bearer token")
        if request.method == "PUT":
            data = request.read()
            size, digest = self.pending_uploads[key]
            if len(data) != size or sha256_hex(data) != digest:
                return httpx.Response(400, text="BadDigest")
            self.blobs[key] = data
            return httpx.Response(200)
        if key not in self.blobs:
            return httpx.Response(404, text="NoSuchKey")
        return httpx.Response(200, content=self.blobs[key])

    # --- identities -------------------------------------------------------------------------------

    def add_tenant(self, *, auth_hash: str, name: str, sign_pub: str, box_pub: str) -> str:
        tenant_id = self._id("tn")
        self.tenants[tenant_id] = {"name": name, "owner_sign_pub": sign_pub, "owner_box_pub": box_pub}
        self.credentials[auth_hash] = Credential(auth_hash=auth_hash, kind="tenant", tenant_id=tenant_id)
        return tenant_id

    def whoami(self, request: httpx.Request, body: dict[str, Any]) -> dict[str, Any]:
        caller = self.caller(request)
        tenant = self.tenants.get(caller.tenant_id or "", {})
        return {
            "kind": caller.kind,
            "token_id": caller.token_id,
            "bearer_id": caller.bearer_id,
            "tenant_id": caller.tenant_id,
            "tenant_name": tenant.get("name"),
            "owner_sign_pub": tenant.get("owner_sign_pub") if caller.kind == "tenant" else None,
            "room_id": caller.room_id,
            "invite_id": caller.token_id if caller.kind == "invite" else None,
            "parent_id": caller.parent_id,
            "budgets": caller.budgets,
            "max_uses": caller.max_uses,
            "uses": caller.uses if caller.kind == "invite" else None,
            "expires_at": caller.expires_at,
        }

    def signup(self, request: httpx.Request, body: dict[str, Any]) -> dict[str, Any]:
        _, digest = auth_hash_from_bearer(request.headers["authorization"].removeprefix("Bearer "))
        tenant_id = self.add_tenant(
            auth_hash=digest,
            name=body["name"],
            sign_pub=body["owner_sign_pub"],
            box_pub=body["owner_box_pub"],
        )
        return {
            "tenant_id": tenant_id,
            "name": body["name"],
            "token_id": digest[:16],
            "created_at": 0,
            **{"owner_sign_pub": body["owner_sign_pub"], "owner_box_pub": body["owner_box_pub"]},
        }

    def attestation(self, request: httpx.Request, body: dict[str, Any]) -> dict[str, Any]:
        return {"runners": self.relayed_runners()}

    def relayed_runners(self) -> list[dict[str, Any]]:
        if self.runner_documents is not None:
            return self.runner_documents
        return [
            {
                "runner_id": self.document.runner_id,
                "status": "active",
                "heartbeat_at": int(time.time()),
                "document": self.document.model_dump(mode="json"),
            }
        ]

    def billing(self, request: httpx.Request, body: dict[str, Any]) -> dict[str, Any]:
        caller = self.caller(request)
        account = {
            "tenant_id": caller.tenant_id,
            "balance": 5_000_000,
            "held": 0,
            "available": 5_000_000,
            "last_seq": 1,
            "last_hash": "0" * 64,
            "updated_at": 0,
        }
        return {"account": account, "entries": [], "credits_enforced": False}

    # --- agents -----------------------------------------------------------------------------------

    def declare_agent(self, request: httpx.Request, body: dict[str, Any]) -> dict[str, Any]:
        caller = self.caller(request)
        agent = {**body, "tenant_id": caller.tenant_id, "room_id": None, "state": "pending"}
        self.agents[body["agent_id"]] = agent
        return {
            "agent": agent,
            "upload": self.upload_target(f"agents/{body['agent_id']}", body["size"], body["sha256"]),
        }

    def declare_query_agent(
        self, request: httpx.Request, body: dict[str, Any], room_id: str
    ) -> dict[str, Any]:
        caller = self.caller(request)
        room = self._room(caller, room_id)
        query = room.signed["manifest"]["query"]
        if query["mode"] != "uploadable" or body["visibility"] != query["visibility"]:
            raise Refusal(409, "query_not_uploadable", "this room takes no such query agent")
        agent = {**body, "tenant_id": room.tenant_id, "room_id": room_id, "state": "pending"}
        self.agents[body["agent_id"]] = agent
        return {
            "agent": agent,
            "upload": self.upload_target(f"agents/{body['agent_id']}", body["size"], body["sha256"]),
        }

    def commit_agent(self, request: httpx.Request, body: dict[str, Any], agent_id: str) -> dict[str, Any]:
        self.caller(request)
        agent = self.agents[agent_id]
        blob = self.blobs[f"agents/{agent_id}"]
        if agent["visibility"] == "inspectable" and validate_archive(blob).digest != agent["source_digest"]:
            raise Refusal(409, "agent_digest_mismatch", "the archive does not have the declared digest")
        agent["state"] = "active"
        return agent

    # --- rooms ------------------------------------------------------------------------------------

    def create_room(self, request: httpx.Request, body: dict[str, Any]) -> dict[str, Any]:
        caller = self.caller(request)
        signed = SignedManifest.model_validate(body["signed_manifest"])
        tenant = self.tenants[caller.tenant_id or ""]
        verify_manifest(
            signed, expected_owner_sign_pub=tenant["owner_sign_pub"], expected_room_id=None, min_revision=None
        )
        room = Room(
            room_id=signed.manifest.room_id, tenant_id=caller.tenant_id or "", signed=body["signed_manifest"]
        )
        room.wraps[caller.bearer_id] = body["owner_wrap"]
        self.rooms[room.room_id] = room
        return self.room_view(room, "owner")

    def room_view(self, room: Room, role: str) -> dict[str, Any]:
        signed = (
            room.signed
            if self.tamper_manifest is None
            else self.tamper_manifest(json.loads(json.dumps(room.signed)))
        )
        return {
            "room_id": room.room_id,
            "tenant_id": room.tenant_id,
            "status": "active",
            "role": role,
            "revision": room.signed["manifest"]["revision"],
            "manifest_hash": room.signed["manifest_hash"],
            "signed_manifest": signed,
            "owner_key_rotations": self.rotations.get(room.tenant_id, []),
            "created_at": 0,
            "updated_at": 0,
        }

    def list_rooms(self, request: httpx.Request, body: dict[str, Any]) -> dict[str, Any]:
        caller = self.caller(request)
        rooms = [
            room for room in self.rooms.values() if room.tenant_id == caller.tenant_id and not room.deleted
        ]
        return {
            "rooms": [
                {
                    "room_id": r.room_id,
                    "status": "active",
                    "name": r.signed["manifest"]["name"],
                    "role": "owner",
                    "revision": r.signed["manifest"]["revision"],
                    "manifest_hash": r.signed["manifest_hash"],
                    "created_at": 0,
                    "updated_at": 0,
                }
                for r in rooms
            ],
            "cursor": None,
        }

    def get_room(self, request: httpx.Request, body: dict[str, Any], room_id: str) -> dict[str, Any]:
        caller = self.caller(request)
        room = self._room(caller, room_id)
        return self.room_view(room, "owner" if caller.kind == "tenant" else "invite")

    def attest(self, request: httpx.Request, body: dict[str, Any], room_id: str) -> dict[str, Any]:
        view = self.get_room(request, body, room_id)
        return {"room": view, "agents": [], "runners": self.relayed_runners()}

    def get_key(self, request: httpx.Request, body: dict[str, Any], room_id: str) -> dict[str, Any]:
        caller = self.caller(request)
        room = self._room(caller, room_id)
        wrapped = room.wraps.get(caller.bearer_id)
        if wrapped is None:
            raise Refusal(404, "wrap_not_found", "no wrap for this bearer")
        return {"room_id": room_id, "bearer_id": caller.bearer_id, "wrapped": wrapped}

    def create_invite(self, request: httpx.Request, body: dict[str, Any], room_id: str) -> dict[str, Any]:
        caller = self.caller(request)
        room = self._room(caller, room_id)
        constraints = body.get("constraints") or {}
        parent = caller if caller.kind == "invite" else None
        if parent is not None:
            widened = []
            if (
                parent.max_uses is not None
                and (constraints.get("uses") or 10**9) > parent.max_uses - parent.uses
            ):
                widened.append("uses")
            if (
                parent.expires_at is not None
                and (constraints.get("expires_at") or 10**12) > parent.expires_at
            ):
                widened.append("expires_at")
            if widened:
                raise Refusal(
                    403, "invite_widens", "a derived invite may only narrow its parent: " + ", ".join(widened)
                )
        credential = Credential(
            auth_hash=body["auth_hash"],
            kind="invite",
            tenant_id=room.tenant_id,
            room_id=room_id,
            parent_id=parent.token_id if parent else None,
            max_uses=constraints.get(
                "uses", parent.max_uses - parent.uses if parent and parent.max_uses else None
            ),
            expires_at=constraints.get("expires_at", parent.expires_at if parent else None),
            budgets=constraints.get("budgets"),
        )
        self.credentials[credential.auth_hash] = credential
        room.wraps[credential.token_id] = body["wrap"]
        return {
            "invite_id": credential.token_id,
            "room_id": room_id,
            "parent_id": credential.parent_id,
            "issued_by": room.tenant_id,
            "label": body.get("label"),
            "max_uses": credential.max_uses,
            "uses": 0,
            "expires_at": credential.expires_at,
            "budgets": credential.budgets,
            "revoked": False,
            "revoked_at": None,
            "created_at": 0,
        }

    def revoke_invite(
        self, request: httpx.Request, body: dict[str, Any], room_id: str, invite_id: str
    ) -> dict[str, Any]:
        caller = self.caller(request)
        room = self._room(caller, room_id)
        doomed = [invite_id]
        revoked: list[str] = []
        while doomed:
            current = doomed.pop()
            for credential in self.credentials.values():
                if credential.token_id == current and not credential.revoked:
                    credential.revoked = True
                    revoked.append(current)
                    room.wraps.pop(current, None)
                if credential.parent_id == current:
                    doomed.append(credential.token_id)
        return {"revoked": revoked}

    def declare_item(self, request: httpx.Request, body: dict[str, Any], room_id: str) -> dict[str, Any]:
        caller = self.caller(request)
        room = self._room(caller, room_id, owner_only=True)
        item = {
            "item_id": body["item_id"],
            "room_id": room_id,
            "content_type": body["content_type"],
            "size": body["size"],
            "sha256": body["sha256"],
            "metadata": {**body.get("metadata", {}), "name": body.get("name")},
            "state": "pending",
            "created_at": 0,
            "committed_at": None,
        }
        room.items[body["item_id"]] = item
        key = f"rooms/{room_id}/items/{body['item_id']}"
        return {"item": item, "upload": self.upload_target(key, body["size"], body["sha256"])}

    def commit_item(
        self, request: httpx.Request, body: dict[str, Any], room_id: str, item_id: str
    ) -> dict[str, Any]:
        caller = self.caller(request)
        room = self._room(caller, room_id, owner_only=True)
        item = room.items[item_id]
        if sha256_hex(self.blobs[f"rooms/{room_id}/items/{item_id}"]) != item["sha256"]:
            raise Refusal(409, "upload_checksum_mismatch", "not the declared object")
        item["state"] = "committed"
        return item

    def trust(self, request: httpx.Request, body: dict[str, Any], room_id: str) -> dict[str, Any]:
        caller = self.caller(request)
        room = self._room(caller, room_id, owner_only=True)
        previous = SignedManifest.model_validate(room.signed).manifest
        verify_manifest(
            SignedManifest.model_validate(body["signed_manifest"]),
            expected_owner_sign_pub=previous.owner_sign_pub,
            expected_room_id=room_id,
            min_revision=previous.revision + 1,
        )
        room.signed = body["signed_manifest"]
        return {"room": self.room_view(room, "owner"), "previous_revision": previous.revision, "warnings": []}

    # --- runs -------------------------------------------------------------------------------------

    def submit(self, request: httpx.Request, body: dict[str, Any], room_id: str) -> dict[str, Any]:
        caller = self.caller(request)
        room = self._room(caller, room_id)
        if caller.kind == "invite":
            if caller.max_uses is not None and caller.uses >= caller.max_uses:
                raise Refusal(403, "credential_exhausted", "the invite has no uses left")
            caller.uses += 1
        run = Run(
            run_id=self._id("run"),
            room_id=room_id,
            caller_id=caller.bearer_id,
            manifest_hash=room.signed["manifest_hash"],
            prompt_sha256=body["prompt_sha256"],
            created_at=int(time.time()),
        )
        self.runs[run.run_id] = run
        self.execute(run, room, SealedEnvelope.model_validate(body["envelope"]))
        return {
            "run_id": run.run_id,
            "status": "pending",
            "budgets": {},
            "hold": 0,
            "payer_tenant_id": room.tenant_id,
            "created_at": 0,
        }

    def execute(self, run: Run, room: Room, sealed: SealedEnvelope) -> None:
        """The fake runner: everything a real one does with keys, without agents."""
        manifest = SignedManifest.model_validate(room.signed).manifest
        envelope = open_run_envelope(
            self.runner_keys, sealed, room_id=room.room_id, now=int(time.time()), replay_guard=self.guard
        )
        assert envelope.manifest_hash == room.signed["manifest_hash"]
        assert envelope.bearer_id == run.caller_id
        run.query_agent_id = envelope.query_agent_id
        dek = unwrap_dek(
            envelope.wrap_key_bytes(),
            room.wraps[envelope.bearer_id],
            room_id=room.room_id,
            bearer_id=envelope.bearer_id,
        )
        items: dict[str, bytes] = {}
        for item_id, item in room.items.items():
            context = SealContext(
                tenant_id=manifest.tenant_id, room_id=room.room_id, kind=ObjectKind.ITEM, object_id=item_id
            )
            items[item["metadata"]["name"]] = open_bytes(
                self.blobs[f"rooms/{room.room_id}/items/{item_id}"], key=dek, context=context
            )
        for stage in (Stage.SCOPE, Stage.QUERY, Stage.MEDIATOR):
            run.stage = stage.value
        usage = [
            StageUsage(stage=stage, duration_ms=1000 * (index + 1), tool_calls={"sql": index}, llm_calls=0)
            for index, stage in enumerate((Stage.SCOPE, Stage.QUERY, Stage.MEDIATOR))
        ]
        agents = [
            ReceiptAgent(
                stage=Stage.SCOPE,
                agent_id=manifest.scope.agent_id,
                source_digest=manifest.scope.digest,
                image_digest=None,
            )
        ]
        now = int(time.time())
        if self.fail_runs_with is not None:
            receipt = Receipt(
                run_id=run.run_id,
                status=RunStatus.FAILED,
                room_id=room.room_id,
                manifest_hash=run.manifest_hash,
                compose_hash=COMPOSE_HASH,
                quote_hash=QUOTE_HASH,
                agents=agents,
                scope_policy_hash=None,
                prompt_sha256=envelope.prompt_sha256(),
                output=None,
                artifacts=[],
                error_code=self.fail_runs_with,
                usage=usage,
                totals=UsageTotals.of(usage),
                started_at=now,
                finished_at=now,
                signer_pub=self.document.sign_pub,
            )
            run.status = "failed"
        else:
            output = self.output_text(envelope.prompt, items)
            output_key = os.urandom(32)
            context = SealContext(
                tenant_id=manifest.tenant_id,
                room_id=room.room_id,
                kind=ObjectKind.OUTPUT,
                object_id=run.run_id,
            )
            blob = seal_bytes(output, key=output_key, context=context)
            digests = OutputDigests(ciphertext_sha256=sha256_hex(blob), plaintext_sha256=sha256_hex(output))
            if self.corrupt_output:
                blob = seal_bytes(b"something else entirely", key=output_key, context=context)
            run.output_blob = f"runs/{run.run_id}/output"
            self.blobs[run.output_blob] = blob
            artifact_digests = self._seal_artifacts(run, manifest.tenant_id, output_key)
            run.sealed_keys["querier"] = seal_output_key(
                output_key,
                envelope.reply_public_bytes(),
                run_id=run.run_id,
                recipient=OutputRecipient.QUERIER,
            ).model_dump(mode="json")
            if manifest.output.visibility is OutputVisibility.OWNER_AND_QUERIER:
                run.sealed_keys["owner"] = seal_output_key(
                    output_key,
                    b64decode(manifest.owner_box_pub),
                    run_id=run.run_id,
                    recipient=OutputRecipient.OWNER,
                ).model_dump(mode="json")
            receipt = Receipt(
                run_id=run.run_id,
                status=RunStatus.COMPLETED,
                room_id=room.room_id,
                manifest_hash=run.manifest_hash,
                compose_hash=COMPOSE_HASH,
                quote_hash=QUOTE_HASH,
                agents=agents,
                scope_policy_hash="5c" * 32,
                prompt_sha256=envelope.prompt_sha256(),
                output=digests,
                artifacts=artifact_digests,
                error_code=None,
                usage=usage,
                totals=UsageTotals.of(usage),
                started_at=now,
                finished_at=now,
                signer_pub=self.document.sign_pub,
            )
            run.status = "completed"
        signer = self.receipt_signer or self.runner_sign
        if self.receipt_signer is not None:
            receipt = receipt.model_copy(update={"signer_pub": b64encode(public_bytes(signer))})
        run.receipt = sign_receipt(receipt, signer).model_dump(mode="json")
        run.usage = [entry.model_dump(mode="json") for entry in usage]
        run.stage = None

    def _seal_artifacts(self, run: Run, owner_tenant_id: str, output_key: bytes) -> list[ArtifactDigests]:
        digests = []
        for name, data in sorted(self.artifacts.items()):
            context = SealContext(
                tenant_id=owner_tenant_id, room_id=run.room_id, kind=ObjectKind.ARTIFACT, object_id=name
            )
            sealed = seal_bytes(data, key=output_key, context=context)
            digests.append(
                ArtifactDigests(
                    name=name, ciphertext_sha256=sha256_hex(sealed), plaintext_sha256=sha256_hex(data)
                )
            )
            if self.corrupt_artifact:
                sealed = seal_bytes(data + b"!", key=output_key, context=context)
            self.blobs[f"runs/{run.run_id}/artifacts/{name}"] = sealed
            run.artifact_names.append(name)
        return digests

    def _visible_run(self, request: httpx.Request, run_id: str) -> tuple[Run, Credential, str | None]:
        caller = self.caller(request)
        run = self.runs.get(run_id)
        if run is None:
            raise Refusal(404, "run_not_found", f"no run {run_id}")
        if caller.bearer_id == run.caller_id:
            return run, caller, "querier"
        room = self.rooms[run.room_id]
        if caller.kind == "tenant" and caller.tenant_id == room.tenant_id:
            shows = (
                SignedManifest.model_validate(room.signed).manifest.output.visibility
                is OutputVisibility.OWNER_AND_QUERIER
            )
            return run, caller, "owner" if shows else None
        raise Refusal(404, "run_not_found", f"no run {run_id}")

    def get_run(self, request: httpx.Request, body: dict[str, Any], run_id: str) -> dict[str, Any]:
        run, _, role = self._visible_run(request, run_id)
        return {
            "run_id": run.run_id,
            "room_id": run.room_id,
            "caller_id": run.caller_id,
            "payer_tenant_id": "tn_x",
            "status": run.status,
            "stage": run.stage,
            "budgets": {},
            "hold": 0,
            "manifest_hash": run.manifest_hash,
            "prompt_sha256": run.prompt_sha256 if role == "querier" else None,
            "runner_id": "runner_fake1",
            "attempts": 1,
            "created_at": run.created_at,
            "updated_at": 0,
            "started_at": 0,
            "finished_at": 0,
            "usage": run.usage,
            "artifact_names": [],
            "error_code": self.fail_runs_with,
            "error_message": None,
            "output_visible": role is not None,
        }

    def list_runs(self, request: httpx.Request, body: dict[str, Any]) -> dict[str, Any]:
        caller = self.caller(request)
        room_id = request.url.params.get("room_id")
        views = []
        for run in self.runs.values():
            if room_id is not None and run.room_id != room_id:
                continue
            try:
                views.append(self.get_run(request, body, run.run_id))
            except Refusal:
                continue
        assert caller is not None
        return {"runs": views, "cursor": None}

    def run_output(self, request: httpx.Request, body: dict[str, Any], run_id: str) -> dict[str, Any]:
        run, _, role = self._visible_run(request, run_id)
        if role is None:
            raise Refusal(
                404, "output_not_visible", f"the output of run {run_id} is not visible to this caller"
            )
        completed = run.status == "completed"
        return {
            "run_id": run_id,
            "status": run.status,
            "recipient": role,
            "receipt": run.receipt,
            "output_url": f"{BUCKET}/{run.output_blob}" if completed else None,
            "sealed_output_key": run.sealed_keys.get(role) if completed else None,
            "artifacts": [
                {"name": name, "url": f"{BUCKET}/runs/{run_id}/artifacts/{name}", "expires_at": 0}
                for name in run.artifact_names
            ],
            "expires_at": 0,
        }

    # --- key rotation (the route the CLI proposes) ------------------------------------------------

    def rotate_key(self, request: httpx.Request, body: dict[str, Any]) -> dict[str, Any]:
        caller = self.caller(request)
        tenant_id = caller.tenant_id or ""
        tenant = self.tenants[tenant_id]
        signed_rotation = SignedKeyRotation.model_validate(body["rotation"])
        rotation = verify_key_rotation(signed_rotation)
        if rotation.tenant_id != tenant_id or rotation.old_sign_pub != tenant["owner_sign_pub"]:
            raise Refusal(400, "key_rotation_invalid", "the certificate does not retire this tenant's key")
        owned = {
            room.room_id: room
            for room in self.rooms.values()
            if room.tenant_id == tenant_id and not room.deleted
        }
        offered = {entry["room_id"]: entry for entry in body["rooms"]}
        if set(owned) != set(offered):
            raise Refusal(400, "rotation_incomplete", "every room must be re-signed")
        for room_id, room in owned.items():
            expected = rotated_revision(SignedManifest.model_validate(room.signed).manifest, rotation)
            resigned = SignedManifest.model_validate(offered[room_id]["signed_manifest"])
            if resigned.manifest != expected:
                raise Refusal(400, "manifest_invalid", f"room {room_id} was not re-signed as it was")
            verify_manifest(
                resigned,
                expected_owner_sign_pub=rotation.new_sign_pub,
                expected_room_id=room_id,
                min_revision=None,
            )
        for room_id, room in owned.items():
            room.signed = offered[room_id]["signed_manifest"]
            room.wraps[tenant_id] = offered[room_id]["owner_wrap"]
        self.rotations.setdefault(tenant_id, []).append(signed_rotation.model_dump(mode="json"))
        tenant.update(owner_sign_pub=rotation.new_sign_pub, owner_box_pub=rotation.new_box_pub)
        del self.credentials[caller.auth_hash]
        self.credentials[body["new_auth_hash"]] = Credential(
            auth_hash=body["new_auth_hash"], kind="tenant", tenant_id=tenant_id
        )
        return {"tenant_id": tenant_id, "token_id": body["new_auth_hash"][:16], "rooms": sorted(owned)}

    def put_provider_key(self, request: httpx.Request, body: dict[str, Any], provider: str) -> dict[str, Any]:
        caller = self.caller(request)
        self.provider_keys[(caller.tenant_id or "", provider)] = body
        return {"tenant_id": caller.tenant_id, "provider": provider, "stored": True}


def default_output(prompt: str, items: dict[str, bytes]) -> bytes:
    summary = {
        "prompt": prompt,
        "items": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(items.items())},
    }
    return json.dumps(summary, sort_keys=True).encode()
