"""Fault injection: runs are submitted through the API and executed by the runner's real lifecycle (fake
pipeline), settled by the real settle function, swept by the real janitor. Whatever fails, and wherever,
no data is lost, nothing is charged twice and no hold stays stuck."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from runner_scenarios import make_test_runner
from security_support import deployment_snapshot, snapshot_difference
from support.runner_harness import FakePipeline, HarnessRunner

from hivemind.envelope import HpkeSuite, RunEnvelope, seal_run_envelope
from hivemind.keys import public_bytes, wrap_key
from hivemind.models import Stage
from hivemind.store import Store
from hivemind.store.runners import RunnerRecord
from hivemind.store.schema import QueueRole, item_key, run_envelope_key, run_receipt_key
from hivemind_functions.janitor import Janitor
from hivemind_functions.settle import Settler
from hivemind_runner.pipeline import PipelineInputs, PipelineResult

pytestmark = pytest.mark.moto_server

CREDIT = 10_000_000


class _Killed(BaseException):
    """Raised inside the pipeline: nothing in the runner may catch it, as nothing survives a kill."""


class KillingPipeline(FakePipeline):
    """Dies when the given stage starts, the first time only (the taken-over attempt completes)."""

    def __init__(self, store: Store, kill_at: Stage) -> None:
        super().__init__(store=store)
        self.kill_at: Stage | None = kill_at

    def run(self, inputs: PipelineInputs, on_stage: Callable[[Stage], None]) -> PipelineResult:
        def stage_then_maybe_die(stage: Stage) -> None:
            on_stage(stage)
            if stage is self.kill_at:
                self.kill_at = None
                raise _Killed

        return super().run(inputs, stage_then_maybe_die)


def _live(store: Store, runner: HarnessRunner) -> None:
    now = store.clock()
    store.runners.publish(
        RunnerRecord(
            runner_id=runner.runner_id,
            tee=runner.document.tee,
            compose_hash=runner.document.compose_hash,
            version=runner.document.version,
            attestation=runner.document.model_dump(mode="json"),
            started_at=now,
            heartbeat_at=now,
        )
    )


def _body(hm: Any, room: Any, runner: HarnessRunner, *, key: str | None = None) -> dict[str, Any]:
    owner = room.owner
    envelope = RunEnvelope.create(
        room_id=room.room_id,
        manifest_hash=room.manifest_hash,
        bearer_id=owner.bearer_id,
        wrap_key=wrap_key(owner.secret, room.room_id),
        prompt="how many rows?",
        reply_pub=public_bytes(X25519PrivateKey.generate()),
        budgets=room.manifest.budgets.defaults,
        now=hm.store.clock(),
    )
    sealed = seal_run_envelope(runner.keys.hpke_public_keys, envelope, suite=HpkeSuite.X25519)
    return {
        "envelope": sealed.model_dump(mode="json"),
        "runner_id": runner.runner_id,
        "prompt_sha256": envelope.prompt_sha256(),
        "idempotency_key": key or uuid.uuid4().hex,
    }


def _setup(hm: Any, tmp_path: Path, pipeline: FakePipeline | None = None) -> tuple[Any, HarnessRunner]:
    store: Store = hm.store
    store.prices.set_runner_fee(1, updated_by="test")
    # The fake pipeline reports LLM usage of openrouter/m1 (operator keys): it must have a price.
    store.prices.set_price(
        "openrouter", "m1", prompt_per_million=1_000_000, completion_per_million=2_000_000, updated_by="test"
    )
    alice = hm.tenant("alice")
    store.billing.grant(alice.tenant_id, CREDIT)
    runner = make_test_runner(store, tmp_path, pipeline or FakePipeline(store=store))
    _live(store, runner)
    room = hm.room(alice, mediator=hm.agent(alice, name="mediator"))
    hm.add_item(room, b"region,amount\nnorth,10\nsouth,20\n", name="sales.csv")
    return room, runner


def _submit(hm: Any, room: Any, runner: HarnessRunner) -> str:
    return hm.api.post(
        f"/v1/rooms/{room.room_id}/runs", token=room.owner.token, json=_body(hm, room, runner)
    ).ok(201)["run_id"]


def _settle_all(store: Store) -> list[Any]:
    settler = Settler(store, logger=Logger(service="test-settle"))
    url = store.clients.queue_url(QueueRole.SETTLEMENTS)
    outcomes = []
    while True:
        messages = store.clients.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        if not messages:
            return outcomes
        for message in messages:
            outcomes.append(settler.settle(message["Body"]))
            store.clients.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


def _charges(store: Store, tenant_id: str, run_id: str) -> list[int]:
    return [
        entry.amount
        for entry in store.billing.entries(tenant_id)
        if entry.ref == run_id and entry.kind == "usage_charge"
    ]


def _delete_every_version(store: Store, key: str) -> None:
    s3, bucket = store.clients.s3, store.config.bucket
    for version in s3.list_object_versions(Bucket=bucket, Prefix=key).get("Versions", []):
        s3.delete_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])


def _receipt_versions(store: Store, run_id: str) -> int:
    listing = store.clients.s3.list_object_versions(
        Bucket=store.config.bucket, Prefix=run_receipt_key(run_id)
    )
    return len(listing.get("Versions", []))


@pytest.mark.parametrize("stage", [Stage.SCOPE, Stage.QUERY, Stage.MEDIATOR], ids=lambda s: s.value)
def test_a_runner_killed_at_each_stage_is_taken_over_and_charged_once(
    hm_lambda: Any, tmp_path: Path, stage: Stage
) -> None:
    hm = hm_lambda
    store: Store = hm.store
    pipeline = KillingPipeline(store, stage)
    room, runner = _setup(hm, tmp_path, pipeline)
    run_id = _submit(hm, room, runner)
    with pytest.raises(_Killed):
        runner.lifecycle.execute(run_id, receive_count=1)
    assert store.runs.require(run_id).status.value == "running"
    runner.lifecycle.execute(run_id, receive_count=2)  # SQS redelivery after the visibility timeout
    runner.lifecycle.execute(run_id, receive_count=3)  # and a late duplicate: changes nothing
    run = store.runs.require(run_id)
    assert run.status.value == "completed" and run.attempts == 2
    assert _receipt_versions(store, run_id) == 1
    outcomes = _settle_all(store)
    assert sum(outcome.applied for outcome in outcomes) == 1
    assert len(_charges(store, room.owner.tenant_id, run_id)) == 1
    assert store.billing.account(room.owner.tenant_id).held == 0
    store.billing.verify(room.owner.tenant_id)


def test_settlement_crash_after_the_transaction_and_redelivery_charge_once(
    hm_lambda: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hm = hm_lambda
    store: Store = hm.store
    room, runner = _setup(hm, tmp_path)
    run_id = _submit(hm, room, runner)
    runner.lifecycle.execute(run_id, receive_count=1)
    url = store.clients.queue_url(QueueRole.SETTLEMENTS)
    body = store.clients.sqs.receive_message(QueueUrl=url)["Messages"][0]["Body"]
    settler = Settler(store, logger=Logger(service="test-settle"))
    original = store.billing.settle

    def settle_then_crash(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)
        raise RuntimeError("the Lambda died after the transaction committed")

    monkeypatch.setattr(store.billing, "settle", settle_then_crash)
    with pytest.raises(RuntimeError):
        settler.settle(body)
    monkeypatch.setattr(store.billing, "settle", original)
    for _ in range(2):  # SQS redelivers, twice
        assert settler.settle(body).applied is False
    assert len(_charges(store, room.owner.tenant_id, run_id)) == 1
    assert store.billing.account(room.owner.tenant_id).held == 0
    store.billing.verify(room.owner.tenant_id)


def test_a_duplicated_run_message_executes_once(hm_lambda: Any, tmp_path: Path) -> None:
    hm = hm_lambda
    store: Store = hm.store
    pipeline = FakePipeline(store=store)
    room, runner = _setup(hm, tmp_path, pipeline)
    other = make_test_runner(store, tmp_path / "second", pipeline)
    run_id = _submit(hm, room, runner)
    runner.lifecycle.execute(run_id, receive_count=1)
    other.lifecycle.execute(run_id, receive_count=1)  # the same message delivered twice
    assert len(pipeline.seen) == 1
    assert _receipt_versions(store, run_id) == 1
    _settle_all(store)
    assert len(_charges(store, room.owner.tenant_id, run_id)) == 1


def test_a_retried_submission_holds_once(hm_lambda: Any, tmp_path: Path) -> None:
    hm = hm_lambda
    store: Store = hm.store
    room, runner = _setup(hm, tmp_path)
    body = _body(hm, room, runner, key="retry-me")
    first = hm.api.post(f"/v1/rooms/{room.room_id}/runs", token=room.owner.token, json=body).ok(201)
    again = hm.api.post(f"/v1/rooms/{room.room_id}/runs", token=room.owner.token, json=body)
    assert again.status in (200, 201) and again.json()["run_id"] == first["run_id"]
    holds = [entry for entry in store.billing.entries(room.owner.tenant_id) if entry.kind == "usage_hold"]
    assert len(holds) == 1


def test_throttled_storage_during_submission_is_503_and_writes_nothing(
    hm_lambda: Any, tmp_path: Path
) -> None:
    hm = hm_lambda
    store: Store = hm.store
    room, runner = _setup(hm, tmp_path)
    body = _body(hm, room, runner)
    before = deployment_snapshot(store)

    def throttle(**_: Any) -> None:
        raise ClientError(
            {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow down"}},
            "TransactWriteItems",
        )

    events = store.clients.dynamodb.meta.events
    events.register("before-call.dynamodb.TransactWriteItems", throttle)
    try:
        response = hm.api.post(f"/v1/rooms/{room.room_id}/runs", token=room.owner.token, json=body)
    finally:
        events.unregister("before-call.dynamodb.TransactWriteItems", throttle)
    assert response.status == 503, response.body[:300]
    assert response.error in {"service_unavailable", "ledger_busy"}
    assert snapshot_difference(before, deployment_snapshot(store)) == {}
    # The retry, once storage answers again, goes through.
    hm.api.post(f"/v1/rooms/{room.room_id}/runs", token=room.owner.token, json=body).ok(201)


@pytest.mark.parametrize("missing", ["envelope", "item"])
def test_a_missing_object_fails_the_run_and_releases_the_hold(
    hm_lambda: Any, tmp_path: Path, missing: str
) -> None:
    hm = hm_lambda
    store: Store = hm.store
    room, runner = _setup(hm, tmp_path)
    run_id = _submit(hm, room, runner)
    if missing == "envelope":
        _delete_every_version(store, run_envelope_key(run_id))
    else:
        for item in store.rooms.list_items(room.room_id).items:
            _delete_every_version(store, item_key(room.room_id, item.item_id))
    runner.lifecycle.execute(run_id, receive_count=1)
    run = store.runs.require(run_id)
    assert run.status.value == "failed" and run.error_code
    assert run.output_key is None
    _settle_all(store)
    assert store.billing.account(room.owner.tenant_id).held == 0
    store.billing.verify(room.owner.tenant_id)


def test_the_janitor_releases_the_hold_of_a_run_that_ended_unsettled(
    hm_lambda: Any, tmp_path: Path, clock: Any, function_settings: Any
) -> None:
    hm = hm_lambda
    store: Store = hm.store
    room, runner = _setup(hm, tmp_path)
    run_id = _submit(hm, room, runner)
    runner.lifecycle.execute(run_id, receive_count=1)
    url = store.clients.queue_url(QueueRole.SETTLEMENTS)
    store.clients.sqs.purge_queue(QueueUrl=url)  # the settlement message is lost
    assert store.billing.account(room.owner.tenant_id).held > 0
    clock.advance(2 * 3600)
    janitor = Janitor(store, function_settings, logger=Logger(service="test-janitor"))
    released = [
        run
        for segment in range(janitor.limits.scan_segments)
        for run in janitor.run(segment=segment).released_stale_holds.acted_on
    ]
    assert released == [run_id]
    assert store.billing.account(room.owner.tenant_id).held == 0
    assert _charges(store, room.owner.tenant_id, run_id) == []
    store.billing.verify(room.owner.tenant_id)
