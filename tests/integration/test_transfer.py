"""Export a deployment to an archive and import it into another one (two prefixes on the moto server).

The source holds real signed manifests, wraps, sealed items (one overwritten after commit, so the
pinned version is not the current one), an agent, ledger entries from grants, a hold, a settlement and
a credit-code redemption, prices, an audit event and a nonce. After the import everything still
verifies with the secrets only the clients hold; re-importing writes nothing; newer target data wins;
a tampered archive writes nothing at all.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from hivemind.encoding import b64encode
from hivemind.errors import IntegrityError, InvalidInput
from hivemind.keys import (
    auth_hash,
    credential_id,
    new_dek,
    owner_box_key,
    owner_sign_key,
    public_bytes,
    unwrap_dek,
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
    next_revision,
    rules_digest,
    sign_manifest,
    verify_manifest,
)
from hivemind.models import DEFAULT_BUDGET_LIMITS, ObjectKind, OutputVisibility, QueryMode, Visibility
from hivemind.seal import SealContext, open_bytes, seal_bytes
from hivemind.store import AwsClients, Store, StoreConfig, transfer
from hivemind.store.agents import AgentRecord
from hivemind.store.audit import AuditKind
from hivemind.store.billing import CreditCode
from hivemind.store.bootstrap import create_all
from hivemind.store.credentials import CredentialKind, CredentialRecord
from hivemind.store.rooms import RoomItem, RoomRecord, RoomWrap
from hivemind.store.schema import SCHEMA, TableRole, agent_source_key, item_key, run_receipt_key
from hivemind.store.tenants import TenantRecord
from hivemind.store.transfer import (
    SHA256_METADATA,
    export_deployment,
    import_archive,
    read_manifest,
    verify_deployment,
)
from hivemind.tokens import Secret, TokenKind
from hivemind.trust import RunnerTrust, RunnerTrustMode

from .conftest import T0, FakeClock

# About 15 s in all: two deployments per test on the moto server, one populated source per module.
pytestmark = [pytest.mark.moto_server, pytest.mark.slow]

ROOM = "room_transfer1"
TENANT = "tn_owner1"
ITEM = "it_orders"
AGENT = "ag_scope1"
RUN = "run_abc123"
PLAINTEXT = b"country,orders\nFR,12\nDE,30\n"


@dataclass
class World:
    owner: Secret
    invite: Secret
    dek: bytes
    signed: SignedManifest
    item_sha256: str
    ledger_entries: int


def _manifest(owner: Secret, revision: int = 1) -> RoomManifest:
    rules = "Only aggregate counts by country."
    return RoomManifest(
        room_id=ROOM,
        tenant_id=TENANT,
        name="Orders",
        rules=rules,
        rules_sha256=rules_digest(rules),
        policy="aggregate only",
        scope=AgentRef(agent_id=AGENT, digest="11" * 32, visibility=Visibility.INSPECTABLE),
        query=QueryRule(
            mode=QueryMode.FIXED, agent_id="ag_query1", digest="22" * 32, visibility=Visibility.INSPECTABLE
        ),
        mediator=None,
        output=OutputRule(visibility=OutputVisibility.QUERIER_ONLY),
        egress=EgressRule(llm_providers=[], artifacts=False),
        budgets=DEFAULT_BUDGET_LIMITS,
        runner_trust=RunnerTrust(mode=RunnerTrustMode.OWNER_APPROVED, allowed_compose_hashes=["c0" * 32]),
        owner_sign_pub=b64encode(public_bytes(owner_sign_key(owner))),
        owner_box_pub=b64encode(public_bytes(owner_box_key(owner))),
        created_at=T0,
        revision=revision,
    )


def _room_record(signed: SignedManifest, clock: FakeClock) -> RoomRecord:
    return RoomRecord(
        room_id=ROOM,
        tenant_id=TENANT,
        envelope=signed.model_dump(mode="json"),
        manifest_hash=signed.manifest_hash,
        revision=signed.manifest.revision,
        created_at=T0,
        updated_at=clock(),
    )


def populate(store: Store, clock: FakeClock) -> World:
    owner = Secret.generate(TokenKind.TENANT)
    invite = Secret.generate(TokenKind.INVITE)
    store.tenants.create(
        TenantRecord(
            tenant_id=TENANT,
            name="Owner",
            owner_sign_pub=b64encode(public_bytes(owner_sign_key(owner))),
            owner_box_pub=b64encode(public_bytes(owner_box_key(owner))),
            created_at=T0,
            updated_at=T0,
        )
    )
    for secret, kind, room in ((owner, CredentialKind.TENANT, None), (invite, CredentialKind.INVITE, ROOM)):
        digest = auth_hash(secret)
        store.credentials.put(
            CredentialRecord(
                auth_hash=digest,
                kind=kind,
                token_id=digest[:16],
                tenant_id=TENANT,
                room_id=room,
                created_at=T0,
            )
        )
    signed = sign_manifest(_manifest(owner), owner_sign_key(owner))
    store.rooms.create(_room_record(signed, clock))
    dek = new_dek()
    for secret, bearer in ((owner, TENANT), (invite, credential_id(invite))):
        wrapped = wrap_dek(wrap_key(secret, ROOM), dek, room_id=ROOM, bearer_id=bearer)
        store.rooms.put_wrap(RoomWrap(room_id=ROOM, bearer_id=bearer, wrapped=wrapped, created_at=T0))
    sealed = seal_bytes(
        PLAINTEXT,
        key=dek,
        context=SealContext(tenant_id=TENANT, room_id=ROOM, kind=ObjectKind.ITEM, object_id=ITEM),
    )
    key = item_key(ROOM, ITEM)
    item = RoomItem(
        room_id=ROOM,
        item_id=ITEM,
        content_type="text/csv",
        size=len(sealed),
        sha256=hashlib.sha256(sealed).hexdigest(),
        metadata={"table": "orders"},
        s3_key=key,
        created_at=T0,
    )
    store.rooms.add_item(item)
    store.rooms.commit_item(ROOM, ITEM, store.blobs.put_bytes(key, sealed))
    # The still-valid upload URL was used again after commit: the pinned version is no longer current.
    store.blobs.put_bytes(key, b"overwritten after commit")
    source = b"agent source archive bytes"
    store.agents.create(
        AgentRecord(
            agent_id=AGENT,
            tenant_id=TENANT,
            name="scope",
            visibility=Visibility.INSPECTABLE,
            source_digest="11" * 32,
            source_key=agent_source_key(AGENT),
            created_at=T0,
            updated_at=T0,
        )
    )
    store.agents.commit(AGENT, store.blobs.put_bytes(agent_source_key(AGENT), source), file_digests={})
    store.blobs.put_bytes(run_receipt_key(RUN), b'{"receipt": "signed"}', content_type="application/json")
    store.prices.set_price(
        "openai", "gpt-test", prompt_per_million=1_000, completion_per_million=2_000, updated_by="op"
    )
    store.prices.set_runner_fee(10, updated_by="op")
    store.billing.grant(TENANT, 5_000_000)
    store.billing.hold(TENANT, RUN, 1_000, enforce=True)
    store.billing.settle(RUN, 400)
    code_hash = hashlib.sha256(b"credit code").hexdigest()
    store.billing.create_credit_code(
        CreditCode(
            code_hash=code_hash,
            credit=100,
            max_uses=2,
            expires_at=T0 + 86_400,
            created_by="op",
            created_at=T0,
        )
    )
    store.billing.redeem_credit_code(TENANT, code_hash)
    store.audit.append(ROOM, AuditKind.ROOM_CREATED, actor=TENANT)
    store.nonces.check_and_record("n" * 22, T0 + 600, run_id=RUN)
    return World(
        owner=owner,
        invite=invite,
        dek=dek,
        signed=signed,
        item_sha256=item.sha256,
        ledger_entries=sum(store.billing.verify_all().values()),
    )


def _deployment(moto_server: str, session: boto3.session.Session, clock: FakeClock) -> Store:
    config = StoreConfig(prefix=f"t{uuid.uuid4().hex[:12]}", region="us-east-1", endpoint_url=moto_server)
    clients = AwsClients(config, session=session)
    create_all(clients)
    return Store(clients, clock=clock)


@pytest.fixture(scope="module")
def source(moto_server: str, _boto_session: boto3.session.Session) -> tuple[Store, World]:
    """One populated source deployment for the module; tests only read it (or import into it: a no-op)."""
    clock = FakeClock()
    store = _deployment(moto_server, _boto_session, clock)
    return store, populate(store, clock)


@pytest.fixture(scope="module")
def exported(source: tuple[Store, World], tmp_path_factory: pytest.TempPathFactory) -> Path:
    archive = tmp_path_factory.mktemp("export") / "deployment.tar"
    export_deployment(source[0].clients, archive, clock=lambda: T0)
    return archive


@pytest.fixture
def target(moto_server: str, _boto_session: boto3.session.Session, clock: FakeClock) -> Store:
    """A second, empty deployment on the same moto server."""
    return _deployment(moto_server, _boto_session, clock)


def _item_counts(store: Store) -> dict[str, int]:
    ddb = store.clients.dynamodb
    return {
        spec.role.value: ddb.scan(TableName=store.config.table_name(spec.role), Select="COUNT")["Count"]
        for spec in SCHEMA.tables
    }


def _object_versions(store: Store) -> list[tuple[str, str]]:
    response = store.clients.s3.list_object_versions(Bucket=store.config.bucket)
    return sorted((version["Key"], version["VersionId"]) for version in response.get("Versions", []))


def test_export_then_import_keeps_every_envelope_wrap_seal_and_ledger_chain_valid(
    source: tuple[Store, World], exported: Path, target: Store
) -> None:
    clocked_store, world = source
    archive = exported
    manifest = read_manifest(archive)
    assert manifest.created_at == T0
    counts = _item_counts(clocked_store)
    assert {entry.role.value: entry.items for entry in manifest.tables} == counts
    # Current versions of three keys, plus the pinned older version of the overwritten item.
    assert manifest.objects.count == 4

    report = import_archive(target.clients, archive)
    assert report.clean, report.conflicts
    assert _item_counts(target) == counts
    assert report.objects_written == 4

    verified = verify_deployment(target)
    assert verified.rooms == 1 and verified.items == 1 and verified.agents == 1 and verified.audit_events == 1
    assert verified.ledger_entries == world.ledger_entries
    # The manifest verifies under the owner key the participant's link names.
    record = target.rooms.get(ROOM)
    assert record is not None and record.envelope is not None
    verify_manifest(
        SignedManifest.model_validate(record.envelope),
        expected_owner_sign_pub=world.signed.manifest.owner_sign_pub,
        expected_room_id=ROOM,
        min_revision=1,
    )
    # Both wraps open with the bearers' secrets and give the same DEK.
    for secret, bearer in ((world.owner, TENANT), (world.invite, credential_id(world.invite))):
        wrap = target.rooms.get_wrap(ROOM, bearer)
        assert wrap is not None
        assert unwrap_dek(wrap_key(secret, ROOM), wrap.wrapped, room_id=ROOM, bearer_id=bearer) == world.dek
    # The item record points at the imported copy of the pinned version, which opens to the plaintext.
    item = target.rooms.get_item(ROOM, ITEM)
    assert item is not None and item.version_id is not None
    sealed = target.blobs.get_bytes(item.s3_key, version_id=item.version_id)
    assert hashlib.sha256(sealed).hexdigest() == world.item_sha256
    context = SealContext(tenant_id=TENANT, room_id=ROOM, kind=ObjectKind.ITEM, object_id=ITEM)
    assert open_bytes(sealed, key=world.dek, context=context) == PLAINTEXT
    # ... while the current version stays what it was in the source.
    assert target.blobs.get_bytes(item.s3_key) == b"overwritten after commit"
    # The ledger is the same chain, entry by entry.
    source_entries = clocked_store.billing.list_ledger(TENANT).items
    assert target.billing.list_ledger(TENANT).items == source_entries
    assert target.billing.account(TENANT) == clocked_store.billing.account(TENANT)


def test_reimport_writes_nothing(exported: Path, target: Store) -> None:
    archive = exported
    import_archive(target.clients, archive)
    items, versions = _item_counts(target), _object_versions(target)

    again = import_archive(target.clients, archive)
    assert again.clean
    assert again.objects_written == 0 and again.objects_unchanged == 4
    assert all(counts.written == 0 and counts.conflicts == 0 for counts in again.tables.values())
    assert sum(counts.unchanged for counts in again.tables.values()) == sum(items.values())
    assert _item_counts(target) == items
    assert _object_versions(target) == versions
    head = target.clients.s3.head_object(Bucket=target.config.bucket, Key=run_receipt_key(RUN))
    assert head["Metadata"][SHA256_METADATA] == hashlib.sha256(b'{"receipt": "signed"}').hexdigest()


def test_importing_into_the_source_itself_changes_nothing(
    source: tuple[Store, World], exported: Path
) -> None:
    clocked_store, _ = source
    archive = exported
    versions = _object_versions(clocked_store)
    report = import_archive(clocked_store.clients, archive)
    assert report.clean and report.objects_written == 0
    assert _object_versions(clocked_store) == versions
    verify_deployment(clocked_store)


def test_newer_target_data_is_kept_and_different_data_is_reported(
    source: tuple[Store, World], exported: Path, target: Store, clock: FakeClock
) -> None:
    _, world = source
    archive = exported
    import_archive(target.clients, archive)
    # The target moves on: a trust update (revision 2) and more credit.
    clock.advance(60)
    revised = sign_manifest(
        next_revision(world.signed.manifest, {"name": "Orders (revised)"}), owner_sign_key(world.owner)
    )
    target.rooms.update_manifest(
        ROOM, envelope=revised.model_dump(mode="json"), manifest_hash=revised.manifest_hash, revision=2
    )
    target.billing.grant(TENANT, 1_000)
    # And someone stored other content under the receipt's key.
    target.blobs.put_bytes(run_receipt_key(RUN), b"something else")

    report = import_archive(target.clients, archive)
    record = target.rooms.get(ROOM)
    assert record is not None and record.revision == 2
    assert report.tables["rooms"].kept_newer == 1
    assert report.tables["accounts"].kept_newer == 1
    assert [(conflict.where, conflict.key) for conflict in report.conflicts] == [
        ("object", run_receipt_key(RUN))
    ]
    assert target.blobs.get_bytes(run_receipt_key(RUN)) == b"something else"
    verify_deployment(target)


def test_write_once_items_that_differ_are_conflicts_and_records_of_conflicted_objects_are_skipped(
    source: tuple[Store, World], exported: Path, target: Store
) -> None:
    _, world = source
    archive = exported
    # The target already has another wrap for the owner, and other content under the item's key.
    other = wrap_dek(wrap_key(world.owner, ROOM), new_dek(), room_id=ROOM, bearer_id=TENANT)
    target.clients.dynamodb.put_item(
        TableName=target.config.table_name(TableRole.ROOMS),
        Item={
            "room_id": {"S": ROOM},
            "sk": {"S": f"wrap#{TENANT}"},
            "bearer_id": {"S": TENANT},
            "wrapped": {"S": other},
            "created_at": {"N": str(T0)},
        },
    )
    target.blobs.put_bytes(item_key(ROOM, ITEM), b"not the room's data")

    report = import_archive(target.clients, archive)
    where = {(conflict.where, conflict.key) for conflict in report.conflicts}
    assert ("rooms", f"{ROOM}/wrap#{TENANT}") in where
    assert ("object", item_key(ROOM, ITEM)) in where
    assert ("rooms", f"{ROOM}/item#{ITEM}") in where
    assert target.rooms.get_item(ROOM, ITEM) is None
    wrap = target.rooms.get_wrap(ROOM, TENANT)
    assert wrap is not None and wrap.wrapped == other


def _rewrite(source: Path, destination: Path, *, replace: dict[str, bytes], add: dict[str, bytes]) -> None:
    with tarfile.open(source) as old, tarfile.open(destination, "w", format=tarfile.PAX_FORMAT) as new:
        for member in old.getmembers():
            handle = old.extractfile(member)
            assert handle is not None
            data = replace.get(member.name, handle.read())
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            new.addfile(info, io.BytesIO(data))
        for name, data in add.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            new.addfile(info, io.BytesIO(data))


def _member(path: Path, name: str) -> bytes:
    with tarfile.open(path) as archive:
        handle = archive.extractfile(name)
        assert handle is not None
        return handle.read()


def _tampered_cases(archive: Path) -> dict[str, tuple[dict[str, bytes], dict[str, bytes], str]]:
    blob = bytearray(_member(archive, "blobs/000000001"))
    blob[len(blob) // 2] ^= 0x01
    ledger = _member(archive, "tables/ledger.jsonl")
    manifest: dict[str, Any] = json.loads(_member(archive, "manifest.json"))
    other_schema = {**manifest, "schema_digest": "0" * 64}
    return {
        "flipped blob byte": ({"blobs/000000001": bytes(blob)}, {}, "archive_corrupt"),
        "dropped ledger entry": (
            {"tables/ledger.jsonl": b"".join(ledger.splitlines(keepends=True)[1:])},
            {},
            "archive_corrupt",
        ),
        "other schema": ({"manifest.json": json.dumps(other_schema).encode()}, {}, "archive_schema_mismatch"),
        "smuggled member": ({}, {"../../etc/cron.d/x": b"* * * * * root true\n"}, "archive_corrupt"),
    }


def test_a_tampered_archive_is_refused_before_anything_is_written(
    exported: Path, target: Store, tmp_path: Path
) -> None:
    archive = exported
    empty = _item_counts(target)
    for name, (replace, add, code) in _tampered_cases(archive).items():
        tampered = tmp_path / f"{name.replace(' ', '-')}.tar"
        _rewrite(archive, tampered, replace=replace, add=add)
        with pytest.raises(IntegrityError) as caught:
            import_archive(target.clients, tampered)
        assert caught.value.code == code, name
        assert _item_counts(target) == empty, name
        assert _object_versions(target) == [], name


def test_an_export_never_overwrites_a_file(source: tuple[Store, World], tmp_path: Path) -> None:
    archive = tmp_path / "deployment.tar"
    archive.write_bytes(b"precious")
    with pytest.raises(InvalidInput):
        export_deployment(source[0].clients, archive)
    assert archive.read_bytes() == b"precious"
    assert not (tmp_path / "deployment.tar.partial").exists()


def test_a_file_that_is_not_an_archive_is_refused(target: Store, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file at all" * 100)
    with pytest.raises(IntegrityError) as caught:
        import_archive(target.clients, junk)
    assert caught.value.code in ("archive_invalid", "archive_corrupt")


def test_large_objects_are_imported_in_parts(
    moto_server: str,
    _boto_session: boto3.session.Session,
    target: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transfer, "_PART", 5 * 1024 * 1024)  # S3's smallest part, so 11 MiB is 3 parts
    payload = bytes(range(256)) * (11 * 4096)
    key = run_receipt_key("run_large1")
    target.blobs.put_bytes(key, payload)
    archive = tmp_path / "large.tar"
    export_deployment(target.clients, archive)
    second = _deployment(moto_server, _boto_session, FakeClock())
    report = import_archive(second.clients, archive)
    assert report.clean and report.objects_written == 1
    assert second.blobs.get_bytes(key, max_size=len(payload)) == payload
    head = second.clients.s3.head_object(Bucket=second.config.bucket, Key=key)
    assert head["Metadata"][SHA256_METADATA] == hashlib.sha256(payload).hexdigest()
    assert import_archive(second.clients, archive).objects_unchanged == 1
