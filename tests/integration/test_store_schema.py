"""The one schema: creation on a real moto server, idempotence, drift detection, names and key layout."""

from __future__ import annotations

import json
from datetime import date

import pytest

from hivemind.errors import InvalidInput, StoreError
from hivemind.store import AwsClients, Store, StoreConfig
from hivemind.store.audit import AuditKind
from hivemind.store.bootstrap import create_all
from hivemind.store.rooms import RoomRecord
from hivemind.store.schema import (
    RUNS_MAX_RECEIVE_COUNT,
    SCHEMA,
    QueueRole,
    TableRole,
    agent_source_key,
    item_key,
    ledger_export_key,
    run_artifact_key,
    run_envelope_key,
    run_output_key,
    run_receipt_key,
)

pytestmark = pytest.mark.moto_server


def test_create_all_makes_every_resource_and_is_idempotent(
    aws: AwsClients, store_config: StoreConfig
) -> None:
    create_all(aws)  # second run over the fixture's first one
    create_all(aws)
    for spec in SCHEMA.tables:
        name = store_config.table_name(spec.role)
        assert name == f"{store_config.prefix}-{spec.role.value}"
        described = aws.dynamodb.describe_table(TableName=name)["Table"]
        assert described["TableStatus"] == "ACTIVE"
        assert described["KeySchema"][0]["AttributeName"] == spec.partition_key.name

    runs = aws.dynamodb.describe_table(TableName=store_config.table_name(TableRole.RUNS))["Table"]
    assert {index["IndexName"] for index in runs["GlobalSecondaryIndexes"]} == {
        "by-room",
        "by-caller",
        "open-runs",
    }
    assert runs["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"

    ttl = aws.dynamodb.describe_time_to_live(TableName=store_config.table_name(TableRole.NONCES))
    assert ttl["TimeToLiveDescription"] == {"TimeToLiveStatus": "ENABLED", "AttributeName": "purge_at"}
    backups = aws.dynamodb.describe_continuous_backups(TableName=store_config.table_name(TableRole.LEDGER))
    pitr = backups["ContinuousBackupsDescription"]["PointInTimeRecoveryDescription"]
    assert pitr["PointInTimeRecoveryStatus"] == "ENABLED"

    assert aws.s3.get_bucket_versioning(Bucket=store_config.bucket)["Status"] == "Enabled"
    block = aws.s3.get_public_access_block(Bucket=store_config.bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values())
    rules = aws.s3.get_bucket_lifecycle_configuration(Bucket=store_config.bucket)["Rules"]
    assert any(rule["Filter"].get("Prefix") == "runs/" and rule["Expiration"]["Days"] == 30 for rule in rules)

    runs_queue = aws.queue_url(QueueRole.RUNS)
    attributes = aws.sqs.get_queue_attributes(QueueUrl=runs_queue, AttributeNames=["All"])["Attributes"]
    redrive = json.loads(attributes["RedrivePolicy"])
    dlq_arn = aws.sqs.get_queue_attributes(
        QueueUrl=aws.queue_url(QueueRole.RUNS_DLQ), AttributeNames=["QueueArn"]
    )
    assert redrive["deadLetterTargetArn"] == dlq_arn["Attributes"]["QueueArn"]
    assert int(redrive["maxReceiveCount"]) == RUNS_MAX_RECEIVE_COUNT
    assert int(attributes["VisibilityTimeout"]) >= 600

    # Re-running converges settings that drifted.
    aws.sqs.set_queue_attributes(QueueUrl=runs_queue, Attributes={"VisibilityTimeout": "5"})
    create_all(aws)
    converged = aws.sqs.get_queue_attributes(QueueUrl=runs_queue, AttributeNames=["VisibilityTimeout"])
    assert int(converged["Attributes"]["VisibilityTimeout"]) >= 600


def test_create_all_keeps_data(store: Store, aws: AwsClients) -> None:
    store.billing.grant("tenant_keep", 500)
    create_all(aws)
    assert store.billing.account("tenant_keep").balance == 500


def test_create_all_refuses_a_table_that_drifted_from_the_schema(moto_server: str) -> None:
    config = StoreConfig(prefix="drift-check", endpoint_url=moto_server)
    clients = AwsClients(config)
    clients.dynamodb.create_table(
        TableName=config.table_name(TableRole.LEDGER),
        KeySchema=[{"AttributeName": "tenant_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "tenant_id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    with pytest.raises(StoreError, match="differ from the schema"):
        create_all(clients)


def test_missing_deployment_is_a_clear_store_error(moto_server: str) -> None:
    store = Store(AwsClients(StoreConfig(prefix="never-created", endpoint_url=moto_server)))
    with pytest.raises(StoreError, match="create the deployment first"):
        store.runs.get("run_x")
    with pytest.raises(StoreError, match="does not exist"):
        store.clients.queue_url(QueueRole.RUNS)


def test_config_round_trips_through_the_environment(store_config: StoreConfig) -> None:
    assert StoreConfig.from_env(store_config.to_env()) == store_config
    assert StoreConfig.from_env({}).endpoint_url is None
    assert StoreConfig.from_env({"HIVEMIND_BUCKET": "my-global-bucket"}).bucket == "my-global-bucket"
    for bad in ("Hivemind", "a", "x--y", "ends-", "has_underscore"):
        with pytest.raises(InvalidInput):
            StoreConfig.from_env({"HIVEMIND_PREFIX": bad})
    with pytest.raises(InvalidInput):
        StoreConfig.from_env({"HIVEMIND_ENDPOINT_URL": "file:///etc/passwd"})


def test_key_layout() -> None:
    assert item_key("room_a", "item_b") == "rooms/room_a/items/item_b"
    assert agent_source_key("agent_a") == "agents/agent_a/source"
    assert run_envelope_key("run_a") == "runs/run_a/envelope"
    assert run_output_key("run_a") == "runs/run_a/output"
    assert run_artifact_key("run_a", "chart.png") == "runs/run_a/artifacts/chart.png"
    assert run_receipt_key("run_a") == "runs/run_a/receipt.json"
    assert ledger_export_key(date(2024, 2, 29)) == "exports/ledger/2024-02-29.csv"


@pytest.mark.parametrize("bad", ["../room", "a/b", "", ".hidden", "x..y", "room id", "r" * 200])
def test_key_layout_refuses_path_tricks(bad: str) -> None:
    with pytest.raises(InvalidInput):
        item_key(bad, "item_1")
    with pytest.raises(InvalidInput):
        run_artifact_key("run_1", bad)


def test_pagination_cursor_cannot_leave_its_partition(store: Store) -> None:
    for room_id in ("room_one", "room_two"):
        store.rooms.create(
            RoomRecord(
                room_id=room_id,
                tenant_id="tenant_one",
                envelope={"manifest": {"room_id": room_id}},
                manifest_hash="a" * 64,
                revision=1,
                created_at=1_700_000_000,
                updated_at=1_700_000_000,
            )
        )
    for index in range(3):
        store.audit.append("room_one", AuditKind.DATA_ADDED, actor=f"actor{index}")
    store.audit.append("room_two", AuditKind.DATA_ADDED, actor="someone")
    page = store.audit.list_events("room_one", limit=2)
    assert len(page.items) == 2 and page.cursor is not None
    rest = store.audit.list_events("room_one", cursor=page.cursor)
    assert [entry.seq for entry in rest.items] == [3]
    with pytest.raises(InvalidInput, match="another listing"):
        store.audit.list_events("room_two", cursor=page.cursor)
    with pytest.raises(InvalidInput, match="invalid pagination cursor"):
        store.audit.list_events("room_one", cursor="not-a-cursor")
