"""The settle function: SQS batches with partial failures, pricing, idempotency per run (a redelivered
message, or a crash after the ledger transaction, changes nothing), and nothing ever silently dropped."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import pytest
from aws_lambda_powertools import Logger
from support.runs import held_run

from hivemind.errors import HivemindError
from hivemind.ledger import LedgerKind
from hivemind.models import Budgets, RunStatus, Stage, StageUsage
from hivemind.store import Store
from hivemind.store.runs import RunResult
from hivemind.store.schema import QueueRole
from hivemind.tokens import random_id
from hivemind_functions import settle
from hivemind_functions.settle import Settler

FEE = 10  # micro-USD per runner second
PROMPT_PRICE, COMPLETION_PRICE = 1_000_000, 3_000_000  # micro-USD per million tokens
TENANT_CREDIT = 10_000_000


@pytest.fixture
def settler(store: Store) -> Settler:
    store.prices.set_runner_fee(FEE, updated_by="test")
    store.prices.set_price(
        "openai",
        "gpt-x",
        prompt_per_million=PROMPT_PRICE,
        completion_per_million=COMPLETION_PRICE,
        updated_by="t",
    )
    return Settler(store, logger=Logger(service="test-settle"))


@pytest.fixture
def tenant(store: Store) -> str:
    tenant_id = random_id("tenant")
    store.billing.grant(tenant_id, TENANT_CREDIT)
    return tenant_id


def finished_run(
    store: Store, tenant_id: str, *, hold: int = 100_000, status: RunStatus = RunStatus.COMPLETED
) -> str:
    return held_run(
        store,
        tenant_id,
        room_id="room_settle",
        hold=hold,
        budgets=Budgets(timeout_s=600, llm_calls=10, tokens=20_000, memory_mb=256),
        status=status,
        runner_id="runner_test",
    )


def message(run_id: str, *, seconds: int = 30, prompt: int = 1000, completion: int = 500) -> str:
    return json.dumps(
        {
            "run_id": run_id,
            "usage": [
                StageUsage(
                    stage=Stage.QUERY,
                    duration_ms=seconds * 1000,
                    llm_calls=1,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                ).model_dump(mode="json")
            ],
            "runner_seconds": seconds,
            "llm": [
                {
                    "provider": "openai",
                    "model": "gpt-x",
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                }
            ],
        }
    )


def cost(*, seconds: int = 30, prompt: int = 1000, completion: int = 500) -> int:
    return FEE * seconds + -(-(prompt * PROMPT_PRICE + completion * COMPLETION_PRICE) // 1_000_000)


def sqs_event(*bodies: str) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": str(uuid.uuid4()),
                "receiptHandle": uuid.uuid4().hex,
                "body": body,
                "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1700000000000"},
                "messageAttributes": {},
                "md5OfBody": hashlib.md5(body.encode()).hexdigest(),
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:hivemind-settlements",
                "awsRegion": "us-east-1",
            }
            for body in bodies
        ]
    }


def failed_ids(response: dict[str, Any]) -> list[str]:
    return [failure["itemIdentifier"] for failure in response["batchItemFailures"]]


def test_a_finished_run_is_released_and_charged_what_it_used(
    settler: Settler, store: Store, tenant: str
) -> None:
    run_id = finished_run(store, tenant)

    response = settler.handle(sqs_event(message(run_id)), None)

    assert failed_ids(response) == []
    account = store.billing.account(tenant)
    assert (account.balance, account.held) == (TENANT_CREDIT - cost(), 0)
    kinds = [(entry.kind, entry.amount, entry.held_delta) for entry in store.billing.entries(tenant)][-2:]
    assert kinds == [(LedgerKind.USAGE_RELEASE, 0, -100_000), (LedgerKind.USAGE_CHARGE, -cost(), 0)]
    assert store.billing.get_hold(run_id).charged == cost()
    assert store.billing.verify(tenant) == 4


def test_a_redelivered_settlement_changes_nothing(settler: Settler, store: Store, tenant: str) -> None:
    run_id = finished_run(store, tenant)
    settler.handle(sqs_event(message(run_id)), None)
    before = (store.billing.account(tenant), list(store.billing.entries(tenant)))

    response = settler.handle(sqs_event(message(run_id, seconds=500)), None)

    assert failed_ids(response) == []
    assert (store.billing.account(tenant), list(store.billing.entries(tenant))) == before


def test_a_crash_after_the_transaction_then_redelivery_is_safe(
    settler: Settler, store: Store, tenant: str
) -> None:
    run_id = finished_run(store, tenant)
    # The first delivery committed its transaction, then the function died before acknowledging.
    first = settler.settle(message(run_id))
    assert first.applied
    before = (store.billing.account(tenant), list(store.billing.entries(tenant)))

    outcome = settler.settle(message(run_id))

    assert (outcome.applied, outcome.charged) == (False, cost())
    assert (store.billing.account(tenant), list(store.billing.entries(tenant))) == before


def test_a_malformed_message_fails_alone_and_is_never_dropped(
    settler: Settler, store: Store, tenant: str
) -> None:
    run_id = finished_run(store, tenant)
    event = sqs_event(
        "not json",
        json.dumps({"run_id": run_id, "runner_seconds": -1}),
        json.dumps({"run_id": run_id, "runner_seconds": 1, "surprise": True}),
        message(run_id),
    )

    response = settler.handle(event, None)

    records = event["Records"]
    assert failed_ids(response) == [record["messageId"] for record in records[:3]]
    assert store.billing.get_hold(run_id).state.value == "settled"


def test_a_batch_of_only_failures_reports_every_message(settler: Settler) -> None:
    event = sqs_event("{}", "[]")
    response = settler.handle(event, None)
    assert failed_ids(response) == [record["messageId"] for record in event["Records"]]


@pytest.mark.parametrize("status", [RunStatus.PENDING, RunStatus.RUNNING])
def test_a_settlement_before_the_run_finished_is_retried(
    settler: Settler, store: Store, tenant: str, status: RunStatus
) -> None:
    run_id = finished_run(store, tenant, status=status)

    assert len(failed_ids(settler.handle(sqs_event(message(run_id)), None))) == 1
    assert store.billing.account(tenant).held == 100_000

    if status is RunStatus.PENDING:
        store.runs.start(run_id, "runner_test")
    store.runs.finish(run_id, RunStatus.COMPLETED, RunResult())
    assert failed_ids(settler.handle(sqs_event(message(run_id)), None)) == []
    assert store.billing.account(tenant).held == 0


def test_unknown_runs_and_unpriced_models_fail_and_change_nothing(
    settler: Settler, store: Store, tenant: str
) -> None:
    run_id = finished_run(store, tenant)
    unpriced = json.dumps(
        {
            "run_id": run_id,
            "runner_seconds": 1,
            "llm": [
                {"provider": "openai", "model": "gpt-unpriced", "prompt_tokens": 1, "completion_tokens": 1}
            ],
        }
    )
    with pytest.raises(HivemindError) as missing_price:
        settler.settle(unpriced)
    assert missing_price.value.code == "price_missing"
    with pytest.raises(HivemindError) as unknown:
        settler.settle(message("run_unknown"))
    assert unknown.value.code == "run_not_found"
    assert store.billing.account(tenant).held == 100_000


def test_a_charge_never_exceeds_the_hold(settler: Settler, store: Store, tenant: str) -> None:
    run_id = finished_run(store, tenant, hold=500)

    outcome = settler.settle(message(run_id, seconds=600))

    assert (outcome.applied, outcome.charged, outcome.cost) == (True, 500, cost(seconds=600))
    assert store.billing.account(tenant).balance == TENANT_CREDIT - 500


def test_a_failed_run_pays_only_what_it_consumed(settler: Settler, store: Store, tenant: str) -> None:
    run_id = finished_run(store, tenant, status=RunStatus.FAILED)

    outcome = settler.settle(message(run_id, seconds=3, prompt=0, completion=0))

    assert outcome.charged == FEE * 3
    assert store.billing.account(tenant).balance == TENANT_CREDIT - FEE * 3


def test_the_lambda_handler_builds_itself_from_the_environment(
    store: Store, store_env: dict[str, str], tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.prices.set_runner_fee(FEE, updated_by="test")
    monkeypatch.setattr(settle, "_SETTLER", None)
    run_id = finished_run(store, tenant)
    body = json.dumps({"run_id": run_id, "runner_seconds": 7})

    response = settle.handler(sqs_event(body), None)

    assert failed_ids(response) == []
    assert store.billing.account(tenant).balance == TENANT_CREDIT - FEE * 7


def test_the_local_worker_settles_from_the_queue_and_leaves_failures(
    settler: Settler, store: Store, tenant: str
) -> None:
    run_id = finished_run(store, tenant)
    clients = store.clients
    url = clients.queue_url(QueueRole.SETTLEMENTS)
    clients.sqs.send_message(QueueUrl=url, MessageBody=message(run_id))
    clients.sqs.send_message(QueueUrl=url, MessageBody="garbage")

    settled = failed = 0
    for _ in range(5):
        done, bad = settler.poll_once(wait_s=0)
        settled, failed = settled + done, failed + bad
        if settled + failed == 2:
            break

    assert (settled, failed) == (1, 1)
    assert store.billing.get_hold(run_id).charged == cost()
    attributes = clients.sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"]
    )
    assert attributes["Attributes"]["ApproximateNumberOfMessagesNotVisible"] == "1"  # back after the timeout
