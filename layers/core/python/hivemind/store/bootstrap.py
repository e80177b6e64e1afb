"""Create a deployment's tables, bucket and queues from :data:`hivemind.store.schema.SCHEMA`.

Used for the local stack and tests (against a moto server); the cloud gets the same resources from the
CDK stack, which reads the same schema. Idempotent: running it again converges settings and leaves data
alone; an existing table whose keys differ from the schema is an error, not silently reused.
"""

from __future__ import annotations

import json
import time
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from hivemind.errors import StoreError
from hivemind.store.base import raise_store_error
from hivemind.store.config import AwsClients, StoreConfig
from hivemind.store.schema import SCHEMA, TableSpec, bucket_tls_policy

_TABLE_WAIT_ATTEMPTS = 300


def create_all(target: AwsClients | StoreConfig) -> AwsClients:
    """Create (or converge) every resource of the deployment; returns the clients used."""
    clients = target if isinstance(target, AwsClients) else AwsClients(target)
    try:
        for spec in SCHEMA.tables:
            _ensure_table(clients, spec)
        _ensure_bucket(clients)
        _ensure_queues(clients)
    except (ClientError, BotoCoreError) as exc:
        raise_store_error(exc, "create deployment")
    return clients


def _key_schema(partition: str, sort: str | None) -> list[dict[str, str]]:
    schema = [{"AttributeName": partition, "KeyType": "HASH"}]
    if sort is not None:
        schema.append({"AttributeName": sort, "KeyType": "RANGE"})
    return schema


def _ensure_table(clients: AwsClients, spec: TableSpec) -> None:
    ddb = clients.dynamodb
    name = clients.config.table_name(spec.role)
    key_schema = _key_schema(spec.partition_key.name, spec.sort_key.name if spec.sort_key else None)
    indexes = [
        {
            "IndexName": index.name,
            "KeySchema": _key_schema(
                index.partition_key.name, index.sort_key.name if index.sort_key else None
            ),
            "Projection": {"ProjectionType": "ALL"},
        }
        for index in spec.indexes
    ]
    request: dict[str, Any] = {
        "TableName": name,
        "KeySchema": key_schema,
        "AttributeDefinitions": [
            {"AttributeName": attr.name, "AttributeType": attr.type.value}
            for attr in spec.attribute_definitions()
        ],
        "BillingMode": spec.billing_mode,
    }
    if indexes:
        request["GlobalSecondaryIndexes"] = indexes
    try:
        described = ddb.create_table(**request)["TableDescription"]
        created = True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ResourceInUseException":
            raise
        described = ddb.describe_table(TableName=name)["Table"]
        created = False
    if described["TableStatus"] != "ACTIVE":
        described = _wait_active(ddb, name)
    existing_indexes = {index["IndexName"] for index in described.get("GlobalSecondaryIndexes", [])}
    if described["KeySchema"] != key_schema or existing_indexes != {index.name for index in spec.indexes}:
        raise StoreError(f"table {name} exists with keys or indexes that differ from the schema")
    if spec.ttl_attribute is not None:
        ttl = {} if created else ddb.describe_time_to_live(TableName=name)["TimeToLiveDescription"]
        if ttl.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
            ddb.update_time_to_live(
                TableName=name, TimeToLiveSpecification={"Enabled": True, "AttributeName": spec.ttl_attribute}
            )
    if spec.point_in_time_recovery:
        ddb.update_continuous_backups(
            TableName=name, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True}
        )


def _wait_active(ddb: Any, name: str) -> dict[str, Any]:
    for _ in range(_TABLE_WAIT_ATTEMPTS):
        described = ddb.describe_table(TableName=name)["Table"]
        if described["TableStatus"] == "ACTIVE":
            return described
        time.sleep(1)
    raise StoreError(f"table {name} did not become active")


def _ensure_bucket(clients: AwsClients) -> None:
    s3 = clients.s3
    bucket = clients.config.bucket
    spec = SCHEMA.bucket
    request: dict[str, Any] = {"Bucket": bucket}
    if clients.config.region != "us-east-1":
        request["CreateBucketConfiguration"] = {"LocationConstraint": clients.config.region}
    try:
        s3.create_bucket(**request)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
            raise
    if spec.block_public_access:
        s3.put_public_access_block(
            Bucket=bucket,
            PublicAccessBlockConfiguration={
                "BlockPublicAcls": True,
                "IgnorePublicAcls": True,
                "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True,
            },
        )
    if spec.versioned:
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_bucket_encryption(
        Bucket=bucket,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": spec.encryption}}]
        },
    )
    rules: list[dict[str, Any]] = [
        {
            "ID": rule.rule_id,
            "Filter": {"Prefix": rule.prefix},
            "Status": "Enabled",
            "Expiration": {"Days": rule.expire_days},
        }
        for rule in spec.lifecycle
        if rule.expire_days is not None
    ]
    rules.append(
        {
            "ID": "expire-noncurrent-versions",
            "Filter": {"Prefix": ""},
            "Status": "Enabled",
            "NoncurrentVersionExpiration": {"NoncurrentDays": spec.noncurrent_version_expire_days},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": spec.abort_incomplete_multipart_days},
        }
    )
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})
    if spec.enforce_tls and clients.config.endpoint_url is None:
        # Only on AWS: a local endpoint speaks plain HTTP on loopback.
        s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(bucket_tls_policy(bucket)))


def _ensure_queues(clients: AwsClients) -> None:
    sqs = clients.sqs
    arns: dict[str, str] = {}
    for spec in SCHEMA.queues_in_creation_order():
        attributes = {
            "VisibilityTimeout": str(spec.visibility_timeout_s),
            "MessageRetentionPeriod": str(spec.retention_s),
            "ReceiveMessageWaitTimeSeconds": str(spec.receive_wait_s),
            "SqsManagedSseEnabled": "true",
        }
        if spec.dead_letter is not None:
            attributes["RedrivePolicy"] = json.dumps(
                {
                    "deadLetterTargetArn": arns[spec.dead_letter.value],
                    "maxReceiveCount": spec.max_receive_count,
                }
            )
        name = clients.config.queue_name(spec.role)
        try:
            url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("QueueAlreadyExists", "QueueNameExists"):
                raise
            url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
            sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
        arns[spec.role.value] = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
