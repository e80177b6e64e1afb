"""Client-side helpers for tests: what ``hmctl`` does for owners and participants, without HTTP.

Everything is built with the core library exactly as a client would: tenant keys from an ``hmk_``
secret, a signed manifest, sealed items and wraps, uploaded agents (inspectable or sealed to the runner),
a sealed run envelope posted as the control plane would post it (envelope in the bucket, run row,
queue message), and opening a run's output with the reply key.

    owner = Tenant.create(store, "owner")
    room = create_room(store, owner, scope=agent_ref, query=..., compose_hashes=[...])
    seal_item(store, room, "item_sales", b"region,amount\\n...", content_type="text/csv")
    run = submit_run(store, room, runner_keys=..., prompt="top 3 regions")
    ... the runner works ...
    output = open_output(store, run)
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from hivemind.archive import pack_directory, validate_archive
from hivemind.encoding import b64encode
from hivemind.envelope import (
    HpkePublicKeys,
    HpkeSuite,
    OutputRecipient,
    RunEnvelope,
    SealedEnvelope,
    open_output_key,
    seal_run_envelope,
    seal_to,
)
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
    EgressRule,
    OutputRule,
    QueryRule,
    RoomManifest,
    SignedManifest,
    rules_digest,
    sign_manifest,
)
from hivemind.models import (
    DEFAULT_BUDGET_LIMITS,
    BudgetLimits,
    Budgets,
    ObjectKind,
    OutputVisibility,
    QueryMode,
    Visibility,
)
from hivemind.receipt import SignedReceipt
from hivemind.seal import SealContext, open_bytes, seal_bytes
from hivemind.store import Store
from hivemind.store.agents import AgentRecord
from hivemind.store.rooms import RoomItem, RoomRecord, RoomWrap
from hivemind.store.runs import RunRecord
from hivemind.store.schema import QueueRole, agent_source_key, item_key, run_envelope_key
from hivemind.store.tenants import TenantRecord
from hivemind.tokens import Secret, TokenKind, random_id
from hivemind.trust import RunnerTrust, RunnerTrustMode

AGENT_KEY_INFO_PREFIX = b"hivemind-agent-v1|"


def _ident(prefix: str) -> str:
    return random_id(prefix)


@dataclass(frozen=True)
class Tenant:
    """A tenant as its CLI profile knows it: the ``hmk_`` secret and what derives from it."""

    tenant_id: str
    secret: Secret = field(repr=False)
    name: str = "tenant"

    @classmethod
    def create(cls, store: Store | None = None, name: str = "tenant") -> Tenant:
        tenant = cls(tenant_id=_ident("tenant"), secret=Secret.generate(TokenKind.TENANT), name=name)
        if store is not None:
            now = store.clock()
            store.tenants.create(
                TenantRecord(
                    tenant_id=tenant.tenant_id,
                    name=name,
                    owner_sign_pub=tenant.sign_pub,
                    owner_box_pub=tenant.box_pub,
                    created_at=now,
                    updated_at=now,
                )
            )
        return tenant

    @property
    def token(self) -> str:
        return auth_token(self.secret)

    @property
    def auth_hash(self) -> str:
        return auth_hash(self.secret)

    @property
    def sign_key(self) -> Ed25519PrivateKey:
        return owner_sign_key(self.secret)

    @property
    def box_key(self) -> X25519PrivateKey:
        return owner_box_key(self.secret)

    @property
    def sign_pub(self) -> str:
        return b64encode(public_bytes(self.sign_key))

    @property
    def box_pub(self) -> str:
        return b64encode(public_bytes(self.box_key))

    @property
    def bearer_id(self) -> str:
        """The owner's wraps are filed under its tenant id."""
        return self.tenant_id

    def wrap(self, room_id: str, dek: bytes) -> str:
        """The room's DEK wrapped for this tenant, as its CLI uploads it."""
        return wrap_dek(wrap_key(self.secret, room_id), dek, room_id=room_id, bearer_id=self.tenant_id)


@dataclass(frozen=True)
class Room:
    """A room the owner created: its signed manifest and, client-side only, its DEK."""

    owner: Tenant
    signed: SignedManifest
    dek: bytes = field(repr=False)

    @property
    def room_id(self) -> str:
        return self.signed.manifest.room_id

    @property
    def manifest(self) -> RoomManifest:
        return self.signed.manifest


def agent_ref(record: AgentRecord) -> AgentRef:
    return AgentRef(agent_id=record.agent_id, digest=record.source_digest, visibility=record.visibility)


def build_manifest(
    owner: Tenant,
    *,
    room_id: str,
    scope: AgentRef,
    query: AgentRef | None,
    mediator: AgentRef | None = None,
    compose_hashes: list[str],
    output: OutputVisibility = OutputVisibility.QUERIER_ONLY,
    artifacts: bool = False,
    llm_providers: list[str] | None = None,
    uploadable_visibility: Visibility = Visibility.INSPECTABLE,
    rules: str = "Only aggregates leave the room.",
    created_at: int = 1_700_000_000,
    revision: int = 1,
    name: str = "Test room",
    budgets: BudgetLimits = DEFAULT_BUDGET_LIMITS,
    runner_trust: RunnerTrust | None = None,
) -> RoomManifest:
    """A manifest v1; ``query=None`` makes an uploadable room. ``runner_trust`` defaults to the owner
    approving ``compose_hashes``."""
    query_rule = (
        QueryRule(mode=QueryMode.UPLOADABLE, visibility=uploadable_visibility)
        if query is None
        else QueryRule(
            mode=QueryMode.FIXED, agent_id=query.agent_id, digest=query.digest, visibility=query.visibility
        )
    )
    return RoomManifest(
        room_id=room_id,
        tenant_id=owner.tenant_id,
        name=name,
        rules=rules,
        rules_sha256=rules_digest(rules),
        policy="",
        scope=scope,
        query=query_rule,
        mediator=mediator,
        output=OutputRule(visibility=output),
        egress=EgressRule(llm_providers=llm_providers or [], artifacts=artifacts),
        budgets=budgets,
        runner_trust=runner_trust
        or RunnerTrust(mode=RunnerTrustMode.OWNER_APPROVED, allowed_compose_hashes=compose_hashes),
        owner_sign_pub=owner.sign_pub,
        owner_box_pub=owner.box_pub,
        created_at=created_at,
        revision=revision,
    )


def create_room(store: Store, owner: Tenant, manifest: RoomManifest) -> Room:
    """Sign ``manifest``, store the room and the owner's wrap (bearer id = tenant id)."""
    signed = sign_manifest(manifest, owner.sign_key)
    now = store.clock()
    store.rooms.create(
        RoomRecord(
            room_id=manifest.room_id,
            tenant_id=owner.tenant_id,
            envelope=signed.model_dump(mode="json"),
            manifest_hash=signed.manifest_hash,
            revision=manifest.revision,
            created_at=now,
            updated_at=now,
        )
    )
    dek = new_dek()
    put_wrap(store, manifest.room_id, dek, owner.secret, bearer_id=owner.tenant_id)
    return Room(owner=owner, signed=signed, dek=dek)


def put_wrap(store: Store, room_id: str, dek: bytes, secret: Secret, *, bearer_id: str) -> None:
    wrapped = wrap_dek(wrap_key(secret, room_id), dek, room_id=room_id, bearer_id=bearer_id)
    store.rooms.put_wrap(
        RoomWrap(room_id=room_id, bearer_id=bearer_id, wrapped=wrapped, created_at=store.clock())
    )


def add_invite(store: Store, room: Room) -> tuple[Secret, str]:
    """An invite's wrap (the credential record itself is the control plane's business)."""
    invite = Secret.generate(TokenKind.INVITE)
    bearer_id = credential_id(invite)
    put_wrap(store, room.room_id, room.dek, invite, bearer_id=bearer_id)
    return invite, bearer_id


def seal_item(
    store: Store,
    room: Room,
    data: bytes,
    *,
    item_id: str | None = None,
    content_type: str = "text/csv",
    metadata: dict[str, str] | None = None,
) -> RoomItem:
    """Seal ``data`` under the room DEK, upload it and commit it, as ``hmctl room add-data`` does."""
    item_id = item_id or _ident("item")
    context = SealContext(
        tenant_id=room.owner.tenant_id, room_id=room.room_id, kind=ObjectKind.ITEM, object_id=item_id
    )
    sealed = seal_bytes(data, key=room.dek, context=context)
    key = item_key(room.room_id, item_id)
    store.rooms.add_item(
        RoomItem(
            room_id=room.room_id,
            item_id=item_id,
            content_type=content_type,
            size=len(sealed),
            sha256=hashlib.sha256(sealed).hexdigest(),
            metadata=metadata or {},
            s3_key=key,
            created_at=store.clock(),
        )
    )
    store.blobs.put_bytes(key, sealed)
    stored = store.blobs.verify_uploaded(key, size=len(sealed), sha256=hashlib.sha256(sealed).hexdigest())
    return store.rooms.commit_item(room.room_id, item_id, stored)


def write_agent_dir(path: Path, *, body: str = "print('hello')\n") -> Path:
    """A minimal agent directory: a Dockerfile and one script."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "Dockerfile").write_text(
        'FROM hivemind/agent-base:local\nCOPY main.py /agent/main.py\nCMD ["python3", "/agent/main.py"]\n'
    )
    (path / "main.py").write_text(body)
    return path


def upload_agent(
    store: Store,
    tenant: Tenant,
    source_dir: Path,
    *,
    visibility: Visibility = Visibility.INSPECTABLE,
    room_id: str | None = None,
    runner_keys: HpkePublicKeys | None = None,
    agent_id: str | None = None,
    archive: bytes | None = None,
) -> AgentRecord:
    """Pack, (seal,) upload and commit an agent. ``archive`` overrides the packed bytes (tampering tests);
    the declared digest is always that of ``source_dir``."""
    agent_id = agent_id or _ident("agent")
    packed = pack_directory(source_dir)
    files = validate_archive(packed)
    body = packed if archive is None else archive
    sealed_key: SealedEnvelope | None = None
    if visibility is Visibility.SEALED:
        if runner_keys is None:
            raise ValueError("a sealed agent needs the runner's attested HPKE keys")
        agent_key = os.urandom(32)
        context = SealContext(
            tenant_id=tenant.tenant_id,
            room_id=room_id or "none",
            kind=ObjectKind.AGENT_SOURCE,
            object_id=agent_id,
        )
        body = seal_bytes(body, key=agent_key, context=context)
        sealed_key = seal_to(
            runner_keys, agent_key, info=AGENT_KEY_INFO_PREFIX + agent_id.encode(), suite=HpkeSuite.X25519
        )
    now = store.clock()
    fields: dict[str, object] = {
        "agent_id": agent_id,
        "tenant_id": tenant.tenant_id,
        "name": source_dir.name,
        "room_id": room_id,
        "visibility": visibility,
        "source_digest": files.digest,
        "source_key": agent_source_key(agent_id),
        "created_at": now,
        "updated_at": now,
    }
    if sealed_key is not None:
        fields["sealed_key"] = sealed_key
    store.agents.create(AgentRecord.model_validate(fields))
    stored = store.blobs.put_bytes(agent_source_key(agent_id), body)
    return store.agents.commit(agent_id, stored, file_digests=files.file_digests())


@dataclass
class SubmittedRun:
    """A run as the client sees it: the record, and the reply key only the client holds."""

    run: RunRecord
    envelope: RunEnvelope
    reply_key: X25519PrivateKey = field(repr=False)

    @property
    def run_id(self) -> str:
        return self.run.run_id


def build_envelope(
    room: Room,
    *,
    prompt: str,
    bearer_secret: Secret | None = None,
    bearer_id: str | None = None,
    budgets: Budgets | None = None,
    query_agent_id: str | None = None,
    ttl_s: int = 3600,
    now: int | None = None,
) -> tuple[RunEnvelope, X25519PrivateKey]:
    """A run envelope for the owner (default) or an invite bearer, with a fresh reply key."""
    secret = bearer_secret or room.owner.secret
    reply_key = X25519PrivateKey.generate()
    envelope = RunEnvelope.create(
        room_id=room.room_id,
        manifest_hash=room.signed.manifest_hash,
        bearer_id=bearer_id or room.owner.tenant_id,
        wrap_key=wrap_key(secret, room.room_id),
        prompt=prompt,
        reply_pub=public_bytes(reply_key),
        budgets=budgets or room.manifest.budgets.defaults,
        query_agent_id=query_agent_id,
        ttl_s=ttl_s,
        now=int(time.time()) if now is None else now,
    )
    return envelope, reply_key


def post_run(
    store: Store,
    envelope: RunEnvelope,
    sealed: SealedEnvelope,
    *,
    payer_tenant_id: str,
    run_id: str | None = None,
    budgets: Budgets | None = None,
    enqueue: bool = True,
) -> RunRecord:
    """What ``POST /v1/rooms/{id}/runs`` does after admission: envelope to S3, pending row, message."""
    run_id = run_id or _ident("run")
    key = run_envelope_key(run_id)
    store.blobs.put_bytes(key, sealed.to_json().encode(), content_type="application/json")
    now = store.clock()
    record = store.runs.create(
        RunRecord(
            run_id=run_id,
            room_id=envelope.room_id,
            caller_id=envelope.bearer_id,
            payer_tenant_id=payer_tenant_id,
            budgets=budgets or envelope.budgets,
            hold=0,
            prompt_sha256=envelope.prompt_sha256(),
            manifest_hash=envelope.manifest_hash,
            envelope_key=key,
            created_at=now,
            updated_at=now,
        )
    )
    if enqueue:
        enqueue_run(store, run_id)
    return record


def enqueue_run(store: Store, run_id: str) -> None:
    store.clients.sqs.send_message(
        QueueUrl=store.clients.queue_url(QueueRole.RUNS), MessageBody=f'{{"run_id": "{run_id}"}}'
    )


def submit_run(
    store: Store,
    room: Room,
    *,
    runner_keys: HpkePublicKeys,
    prompt: str = "how many rows?",
    suite: HpkeSuite = HpkeSuite.MLKEM768_X25519,
    **envelope_options: object,
) -> SubmittedRun:
    """Build, seal and post a run for the owner (or ``bearer_secret``/``bearer_id``)."""
    envelope, reply_key = build_envelope(room, prompt=prompt, **envelope_options)  # type: ignore[arg-type]
    sealed = seal_run_envelope(runner_keys, envelope, suite=suite)
    record = post_run(store, envelope, sealed, payer_tenant_id=room.owner.tenant_id)
    return SubmittedRun(run=record, envelope=envelope, reply_key=reply_key)


def read_receipt(store: Store, run_id: str) -> SignedReceipt:
    run = store.runs.require(run_id)
    assert run.receipt_key is not None, f"run {run_id} has no receipt"
    return SignedReceipt.from_json(store.blobs.get_bytes(run.receipt_key))


def open_output(
    store: Store,
    run_id: str,
    recipient_key: X25519PrivateKey,
    *,
    room: Room,
    recipient: OutputRecipient = OutputRecipient.QUERIER,
) -> bytes:
    """Open a completed run's output as its querier (or the room owner) would."""
    run = store.runs.require(run_id)
    assert run.output_key is not None, f"run {run_id} has no output"
    sealed_key = SealedEnvelope.model_validate(run.sealed_output_keys[recipient.value])
    output_key = open_output_key(recipient_key, sealed_key, run_id=run_id, recipient=recipient)
    context = SealContext(
        tenant_id=room.owner.tenant_id, room_id=room.room_id, kind=ObjectKind.OUTPUT, object_id=run_id
    )
    return open_bytes(store.blobs.get_bytes(run.output_key), key=output_key, context=context)
