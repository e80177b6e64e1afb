"""Tenants, agents, runners, the audit chain, replay nonces and rate limits on a real moto server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from hivemind.encoding import b64encode
from hivemind.errors import (
    Conflict,
    ExpiredError,
    IntegrityError,
    InvalidInput,
    NotFound,
    RateLimited,
    ReplayError,
)
from hivemind.models import TeeKind, Visibility
from hivemind.store import AwsClients, Store
from hivemind.store.agents import AgentRecord, AgentState
from hivemind.store.audit import AuditKind
from hivemind.store.blobs import StoredObject
from hivemind.store.rooms import RoomRecord
from hivemind.store.runners import RunnerRecord, RunnerStatus
from hivemind.store.schema import TableRole, agent_source_key
from hivemind.store.tenants import TenantRecord, TenantStatus

from .conftest import T0, FakeClock

pytestmark = pytest.mark.moto_server

PUB = b64encode(bytes(32))


def test_tenants(clocked_store: Store, clock: FakeClock) -> None:
    tenant = TenantRecord(
        tenant_id="tenant_a", name="Acme", owner_sign_pub=PUB, owner_box_pub=PUB, created_at=T0, updated_at=T0
    )
    clocked_store.tenants.create(tenant)
    with pytest.raises(Conflict):
        clocked_store.tenants.create(tenant.model_copy(update={"name": "Impostor"}))
    clock.advance(5)
    suspended = clocked_store.tenants.set_status("tenant_a", TenantStatus.SUSPENDED)
    assert (suspended.status, suspended.updated_at) == (TenantStatus.SUSPENDED, clock.now)
    new_pub = b64encode(bytes([7]) * 32)
    rotated = clocked_store.tenants.set_public_keys("tenant_a", owner_sign_pub=new_pub, owner_box_pub=new_pub)
    assert rotated.owner_sign_pub == new_pub
    with pytest.raises(ValueError, match="owner_box_pub"):
        clocked_store.tenants.set_public_keys("tenant_a", owner_sign_pub=new_pub, owner_box_pub="short")
    with pytest.raises(NotFound):
        clocked_store.tenants.set_status("tenant_missing", TenantStatus.ACTIVE)
    assert [record.tenant_id for record in clocked_store.tenants.list_all().items] == ["tenant_a"]


def test_agents_go_from_pending_to_active_with_their_verified_source(clocked_store: Store) -> None:
    key = agent_source_key("agent_a")
    record = AgentRecord(
        agent_id="agent_a",
        tenant_id="tenant_a",
        name="query",
        visibility=Visibility.INSPECTABLE,
        source_digest="1" * 64,
        source_key=key,
        created_at=T0,
        updated_at=T0,
    )
    clocked_store.agents.create(record)
    with pytest.raises(NotFound):
        clocked_store.agents.require_active("agent_a")
    stored = StoredObject(key=key, size=10, sha256="2" * 64, version_id="v1")
    with pytest.raises(IntegrityError):
        clocked_store.agents.commit(
            "agent_a", stored.model_copy(update={"key": "agents/other/source"}), file_digests={}
        )
    active = clocked_store.agents.commit("agent_a", stored, file_digests={"Dockerfile": "3" * 64})
    assert active.state is AgentState.ACTIVE and active.source_object == stored
    assert clocked_store.agents.commit("agent_a", stored, file_digests={"Dockerfile": "3" * 64}) == active
    with pytest.raises(Conflict):
        clocked_store.agents.commit(
            "agent_a", stored.model_copy(update={"version_id": "v2"}), file_digests={}
        )

    digest = "sha256:" + "4" * 64
    assert clocked_store.agents.record_image_digest("agent_a", digest).image_digest == digest
    with pytest.raises(InvalidInput):
        clocked_store.agents.record_image_digest("agent_a", "latest")
    assert [agent.agent_id for agent in clocked_store.agents.list_by_tenant("tenant_a").items] == ["agent_a"]
    clocked_store.agents.delete("agent_a")
    with pytest.raises(NotFound):
        clocked_store.agents.record_image_digest("agent_a", digest)


def runner(runner_id: str, now: int) -> RunnerRecord:
    return RunnerRecord(
        runner_id=runner_id,
        tee=TeeKind.SIMULATED,
        compose_hash="5" * 64,
        version="0.1.0",
        attestation={"tee": "simulated", "keys": {"hpke": "x", "sign": "y"}, "event_log": [{"imr": 3}]},
        started_at=now,
        heartbeat_at=now,
    )


def test_runners_are_live_while_they_heartbeat(clocked_store: Store, clock: FakeClock) -> None:
    clocked_store.runners.publish(runner("runner_a", clock.now))
    clocked_store.runners.publish(runner("runner_b", clock.now))
    clocked_store.runners.publish(runner("runner_c", clock.now))
    clocked_store.runners.set_status("runner_c", RunnerStatus.DRAINING)
    clock.advance(100)
    clocked_store.runners.heartbeat("runner_a")
    live = clocked_store.runners.list_live(max_age_s=60)
    assert [record.runner_id for record in live] == ["runner_a"]
    assert live[0].attestation["event_log"] == [{"imr": 3}]
    assert {record.runner_id for record in clocked_store.runners.list_live(max_age_s=200)} == {
        "runner_a",
        "runner_b",
    }
    with pytest.raises(NotFound):
        clocked_store.runners.heartbeat("runner_unknown")


def test_audit_chain_appends_concurrently_without_gaps_and_detects_tampering(
    clocked_store: Store, aws: AwsClients
) -> None:
    clocked_store.rooms.create(
        RoomRecord(
            room_id="room_a",
            tenant_id="owner",
            envelope={"manifest": {"room_id": "room_a"}},
            manifest_hash="a" * 64,
            revision=1,
            created_at=T0,
            updated_at=T0,
        )
    )
    audit = clocked_store.audit
    audit.append("room_a", AuditKind.ROOM_CREATED, actor="owner", details={"revision": 1})
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(
            pool.map(
                lambda index: audit.append("room_a", AuditKind.INVITE_CREATED, actor=f"inv{index}"), range(6)
            )
        )
    assert audit.verify("room_a") == 7
    entries = list(audit.entries("room_a"))
    assert [entry.seq for entry in entries] == list(range(1, 8))
    assert entries[0].details == {"revision": 1}

    aws.dynamodb.update_item(
        TableName=aws.config.table_name(TableRole.AUDIT),
        Key={"room_id": {"S": "room_a"}, "seq": {"N": "3"}},
        UpdateExpression="SET actor = :forged",
        ExpressionAttributeValues={":forged": {"S": "someone_else"}},
    )
    with pytest.raises(IntegrityError) as caught:
        audit.verify("room_a")
    assert caught.value.code == "audit_chain_invalid" and caught.value.details["seq"] == 3

    aws.dynamodb.delete_item(
        TableName=aws.config.table_name(TableRole.AUDIT), Key={"room_id": {"S": "room_a"}, "seq": {"N": "2"}}
    )
    with pytest.raises(IntegrityError, match="expected seq 2, found 3"):
        audit.verify("room_a")


def test_nonce_is_spent_once(clocked_store: Store, clock: FakeClock, aws: AwsClients) -> None:
    nonce = b64encode(bytes(range(16)))
    clocked_store.nonces.check_and_record(nonce, clock.now + 300)
    with pytest.raises(ReplayError):
        clocked_store.nonces.check_and_record(nonce, clock.now + 300)
    # Another runner instance (another Store on the same tables) is refused too.
    with pytest.raises(ReplayError):
        Store(aws, clock=clock).nonces.check_and_record(nonce, clock.now + 300)
    with pytest.raises(ExpiredError):
        clocked_store.nonces.check_and_record(b64encode(bytes(16)), clock.now)
    with pytest.raises(InvalidInput):
        clocked_store.nonces.check_and_record("short", clock.now + 300)
    stored = aws.dynamodb.get_item(
        TableName=aws.config.table_name(TableRole.NONCES), Key={"nonce": {"S": nonce}}
    )["Item"]
    assert int(stored["purge_at"]["N"]) > clock.now + 300  # kept past expiry, then purged by TTL


def test_concurrent_replays_admit_exactly_one(clocked_store: Store, clock: FakeClock) -> None:
    nonce = b64encode(bytes([9]) * 16)

    def spend(_: int) -> bool:
        try:
            clocked_store.nonces.check_and_record(nonce, clock.now + 60)
        except ReplayError:
            return False
        return True

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert sum(pool.map(spend, range(8))) == 1


def test_rate_limit_per_window(clocked_store: Store, clock: FakeClock) -> None:
    clock.now = T0 - T0 % 60  # start of a window
    assert [clocked_store.rate_limits.hit("caller_a", limit=3, window_s=60) for _ in range(3)] == [2, 1, 0]
    clock.advance(20)
    with pytest.raises(RateLimited) as caught:
        clocked_store.rate_limits.hit("caller_a", limit=3, window_s=60)
    assert caught.value.details == {"retry_after": 40}
    assert clocked_store.rate_limits.hit("caller_b", limit=3, window_s=60) == 2
    clock.advance(40)
    assert clocked_store.rate_limits.hit("caller_a", limit=3, window_s=60) == 2
