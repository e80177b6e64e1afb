"""The janitor: expires stale pending runs, fails runs whose runner vanished (idle or dead-lettered),
releases holds no settlement will close, deletes abandoned uploads, exports the closed day's ledger.
Every duty is idempotent and bounded."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aws_lambda_powertools import Logger
from support.runs import held_run

from hivemind.models import Budgets, RunStatus, Visibility
from hivemind.store import Store
from hivemind.store.agents import AgentRecord
from hivemind.store.billing import HoldState
from hivemind.store.rooms import RoomItem, RoomRecord
from hivemind.store.schema import QueueRole, agent_source_key, item_key, ledger_export_key
from hivemind.tokens import random_id
from hivemind_functions import janitor as janitor_module
from hivemind_functions.janitor import Janitor, JanitorIncomplete, JanitorLimits
from hivemind_functions.settings import FunctionSettings

TTL = 60
UPLOAD_TTL = 300
HOLD = 1_000


@pytest.fixture
def janitor_settings(store: Store) -> FunctionSettings:
    return FunctionSettings(
        store=store.config, run_pending_ttl_s=TTL, run_running_ttl_s=TTL, upload_ttl_s=UPLOAD_TTL
    )


@pytest.fixture
def janitor(store: Store, janitor_settings: FunctionSettings) -> Janitor:
    return Janitor(
        store, janitor_settings, logger=Logger(service="test-janitor"), limits=JanitorLimits(scan_segments=1)
    )


@pytest.fixture
def tenant(store: Store) -> str:
    tenant_id = random_id("tenant")
    store.billing.grant(tenant_id, 1_000_000)
    return tenant_id


def new_run(store: Store, tenant_id: str, status: RunStatus = RunStatus.PENDING) -> str:
    return held_run(
        store,
        tenant_id,
        room_id="room_janitor",
        hold=HOLD,
        budgets=Budgets(timeout_s=60, llm_calls=0, tokens=0, memory_mb=256),
        status=status,
        runner_id="runner_gone",
    )


def released(store: Store, run_id: str) -> bool:
    hold = store.billing.get_hold(run_id)
    return hold is not None and hold.state is HoldState.SETTLED and hold.charged == 0


def test_stale_pending_runs_expire_and_release_their_holds(
    janitor: Janitor, store: Store, clock, tenant: str
) -> None:
    stale = new_run(store, tenant)
    clock.advance(TTL + 1)
    fresh = new_run(store, tenant)

    report = janitor.run(segment=0)

    assert report.expired_runs.acted_on == [stale]
    run = store.runs.require(stale)
    assert (run.status, run.error_code) == (RunStatus.EXPIRED, "run_expired")
    assert released(store, stale)
    assert store.runs.require(fresh).status is RunStatus.PENDING
    assert store.billing.account(tenant).held == HOLD
    again = janitor.run(segment=0)
    assert again.expired_runs.acted_on == []
    assert store.billing.verify(tenant) == 4  # grant, 2 holds, 1 release: nothing applied twice


def test_runs_whose_runner_stopped_reporting_fail(janitor: Janitor, store: Store, clock, tenant: str) -> None:
    lost = new_run(store, tenant, RunStatus.RUNNING)
    clock.advance(TTL + 1)
    alive = new_run(store, tenant, RunStatus.RUNNING)

    report = janitor.run(segment=0)

    assert report.failed_stale_runs.acted_on == [lost]
    run = store.runs.require(lost)
    assert (run.status, run.error_code) == (RunStatus.FAILED, "runner_lost")
    assert released(store, lost)
    assert store.runs.require(alive).status is RunStatus.RUNNING


def test_each_sweep_is_bounded(store: Store, janitor_settings: FunctionSettings, clock, tenant: str) -> None:
    janitor = Janitor(
        store,
        janitor_settings,
        logger=Logger(service="test-janitor"),
        limits=JanitorLimits(scan_segments=1, runs_per_sweep=2),
    )
    runs = [new_run(store, tenant) for _ in range(3)]
    clock.advance(TTL + 1)

    first = janitor.run(segment=0).expired_runs.acted_on
    second = janitor.run(segment=0).expired_runs.acted_on

    assert len(first) == 2
    assert sorted(first + second) == sorted(runs)


def _dlq_send(store: Store, body: str) -> None:
    clients = store.clients
    clients.sqs.send_message(QueueUrl=clients.queue_url(QueueRole.RUNS_DLQ), MessageBody=body)


def _dlq_counts(store: Store) -> tuple[int, int]:
    clients = store.clients
    attributes = clients.sqs.get_queue_attributes(
        QueueUrl=clients.queue_url(QueueRole.RUNS_DLQ),
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]), int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


def test_dead_lettered_runs_fail_and_malformed_letters_stay(
    janitor: Janitor, store: Store, tenant: str
) -> None:
    dead = new_run(store, tenant, RunStatus.RUNNING)
    done = new_run(store, tenant, RunStatus.COMPLETED)
    _dlq_send(store, json.dumps({"run_id": dead}))
    _dlq_send(store, json.dumps({"run_id": done}))
    _dlq_send(store, "not a run message")

    report = janitor.run(segment=0)

    assert report.failed_dlq_runs.acted_on == [dead]
    assert report.failed_dlq_runs.skipped == 2
    run = store.runs.require(dead)
    assert (run.status, run.error_code) == (RunStatus.FAILED, "runner_unavailable")
    assert released(store, dead)
    assert store.runs.require(done).status is RunStatus.COMPLETED
    assert store.billing.get_hold(done).state is HoldState.HELD  # its settlement will close it
    assert _dlq_counts(store) == (0, 1)  # only the malformed letter is left, for an operator


def test_holds_no_settlement_will_close_are_released(
    janitor: Janitor, store: Store, clock, tenant: str
) -> None:
    unsettled = new_run(store, tenant, RunStatus.COMPLETED)
    orphan = random_id("run")  # a submission that died after its hold, before its run row
    store.billing.hold(tenant, orphan, HOLD, enforce=True)
    still_running = new_run(store, tenant, RunStatus.RUNNING)
    clock.advance(3600 + 1)
    store.runs.start(still_running, "runner_alive")  # taken over by a live runner: not stale
    recently_finished = new_run(store, tenant, RunStatus.COMPLETED)

    report = janitor.run(segment=0)

    assert sorted(report.released_stale_holds.acted_on) == sorted([unsettled, orphan])
    assert released(store, unsettled) and released(store, orphan)
    assert store.billing.get_hold(still_running).state is HoldState.HELD
    assert store.billing.get_hold(recently_finished).state is HoldState.HELD
    assert store.billing.account(tenant).held == 2 * HOLD
    assert janitor.run(segment=0).released_stale_holds.acted_on == []
    assert store.billing.verify(tenant) > 0


def test_abandoned_uploads_are_deleted_with_every_version(janitor: Janitor, store: Store, clock) -> None:
    now = store.clock()
    room_id = random_id("room")
    store.rooms.create(
        RoomRecord(
            room_id=room_id,
            tenant_id="tenant_owner",
            envelope={"manifest": "not checked by the store"},
            manifest_hash="0" * 64,
            revision=1,
            created_at=now,
            updated_at=now,
        )
    )

    def item(item_id: str) -> str:
        key = item_key(room_id, item_id)
        store.rooms.add_item(
            RoomItem(
                room_id=room_id,
                item_id=item_id,
                content_type="text/csv",
                size=4,
                sha256=_sha(b"v2.."),
                s3_key=key,
                created_at=store.clock(),
            )
        )
        store.blobs.put_bytes(key, b"v1..")
        store.blobs.put_bytes(key, b"v2..")
        return key

    abandoned_key = item("item_abc")
    committed_key = item("item_abcd")  # its key extends the abandoned one's: must survive
    store.rooms.commit_item(
        room_id, "item_abcd", store.blobs.verify_uploaded(committed_key, size=4, sha256=_sha(b"v2.."))
    )
    agent_id = random_id("agent")
    store.agents.create(
        AgentRecord(
            agent_id=agent_id,
            tenant_id="tenant_owner",
            name="never committed",
            visibility=Visibility.INSPECTABLE,
            source_digest="3" * 64,
            source_key=agent_source_key(agent_id),
            created_at=now,
            updated_at=now,
        )
    )
    store.blobs.put_bytes(agent_source_key(agent_id), b"archive")
    clock.advance(UPLOAD_TTL + 1)
    fresh_key = item("item_fresh")

    report = janitor.run(segment=0)

    assert sorted(report.deleted_uploads.acted_on) == sorted(["item_abc", agent_id])
    assert store.rooms.get_item(room_id, "item_abc") is None
    assert store.agents.get(agent_id) is None
    assert _versions(store, abandoned_key) == 0
    assert _versions(store, agent_source_key(agent_id)) == 0
    assert _versions(store, committed_key) == 2
    assert store.rooms.get_item(room_id, "item_abcd") is not None
    assert _versions(store, fresh_key) == 2


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _versions(store: Store, key: str) -> int:
    listed = store.clients.s3.list_object_versions(Bucket=store.config.bucket, Prefix=key)
    return sum(
        1 for entry in listed.get("Versions", []) + listed.get("DeleteMarkers", []) if entry["Key"] == key
    )


def _advance_to(clock: Any, moment: datetime) -> None:
    clock.advance(int(moment.timestamp()) - clock())


def test_the_closed_day_is_exported_once(janitor: Janitor, store: Store, clock, tenant: str) -> None:
    today = datetime.fromtimestamp(store.clock(), tz=UTC).date()
    midnight = datetime(today.year, today.month, today.day, tzinfo=UTC) + timedelta(days=1)
    key = ledger_export_key(today)

    _advance_to(clock, midnight + timedelta(minutes=5))
    assert janitor.run(segment=0).ledger_export.acted_on == []
    assert not store.blobs.exists(key)

    _advance_to(clock, midnight + timedelta(minutes=20))
    assert janitor.run(segment=0).ledger_export.acted_on == [key]
    rows = list(csv.DictReader(io.StringIO(store.blobs.get_bytes(key).decode())))
    assert [(row["tenant_id"], row["kind"]) for row in rows if row["tenant_id"] == tenant] == [
        (tenant, "credit_grant")
    ]

    again = janitor.run(segment=0).ledger_export
    assert (again.acted_on, again.skipped) == ([], 1)


def test_a_failing_duty_does_not_stop_the_others_and_the_handler_reports_it(
    store: Store, store_env: dict[str, str], clock, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HIVEMIND_RUN_PENDING_TTL_S", str(TTL))
    monkeypatch.setattr(janitor_module, "_JANITOR", None)
    stale = new_run(store, tenant)
    clock.advance(TTL + 1)

    def broken(self: Janitor, now: int) -> Any:
        raise RuntimeError("export target unavailable")
        yield  # pragma: no cover - makes this a generator like the real duty

    monkeypatch.setattr(Janitor, "export_closed_day", broken)
    # The handler's janitor reads the wall clock; the stale run is stale by the store's clock only,
    # so give the handler's store this test's clock.
    built = Janitor.from_env()
    built.store = store
    monkeypatch.setattr(janitor_module, "_JANITOR", built)

    with pytest.raises(JanitorIncomplete, match="ledger_export"):
        janitor_module.handler({"source": "aws.events"}, None)

    assert store.runs.require(stale).status is RunStatus.EXPIRED
    assert released(store, stale)
