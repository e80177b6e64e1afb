"""The synthesized stack: every resource against core's schema and the environment, IAM, and cdk-nag.

One synth is shared by the session (``synthesized`` in conftest.py); it takes several seconds, so the
module is marked slow.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hivemind.store.schema import SCHEMA, QueueRole, TableRole, resource_name

from .conftest import ALARM_EMAIL, INFRA, RUNNER_EXTERNAL_ID, RUNNER_PRINCIPAL, Synthesized
from .iam import as_list, grants, identity_statements, render, role_statements

pytestmark = pytest.mark.slow


def _by_name(
    synth: Synthesized, resource_type: str, name_property: str
) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        resource["Properties"][name_property]: (logical_id, resource)
        for logical_id, resource in synth.resources(resource_type).items()
    }


def _table_ids(synth: Synthesized) -> dict[TableRole, str]:
    tables = _by_name(synth, "AWS::DynamoDB::Table", "TableName")
    return {
        spec.role: tables[resource_name(synth.config.prefix, spec.role.value)][0] for spec in SCHEMA.tables
    }


def _queue_ids(synth: Synthesized) -> dict[QueueRole, str]:
    queues = _by_name(synth, "AWS::SQS::Queue", "QueueName")
    return {
        spec.role: queues[resource_name(synth.config.prefix, spec.role.value)][0] for spec in SCHEMA.queues
    }


def _bucket_id(synth: Synthesized) -> str:
    return synth.logical_id(synth.stack.storage.bucket)


def _role_id(synth: Synthesized, role: Any) -> str:
    return synth.logical_id(role)


# --- tables ---------------------------------------------------------------------------------------


def _key_schema(partition: str, sort: str | None) -> list[dict[str, str]]:
    schema = [{"AttributeName": partition, "KeyType": "HASH"}]
    if sort is not None:
        schema.append({"AttributeName": sort, "KeyType": "RANGE"})
    return schema


def test_every_table_of_the_schema_and_no_other(synthesized: Synthesized) -> None:
    tables = _by_name(synthesized, "AWS::DynamoDB::Table", "TableName")
    expected = {resource_name(synthesized.config.prefix, spec.role.value) for spec in SCHEMA.tables}
    assert set(tables) == expected


@pytest.mark.parametrize("spec", SCHEMA.tables, ids=lambda spec: spec.role.value)
def test_table_matches_the_schema(synthesized: Synthesized, spec: Any) -> None:
    _, table = _by_name(synthesized, "AWS::DynamoDB::Table", "TableName")[
        resource_name(synthesized.config.prefix, spec.role.value)
    ]
    properties = table["Properties"]
    assert properties["KeySchema"] == _key_schema(
        spec.partition_key.name, spec.sort_key.name if spec.sort_key else None
    )
    assert sorted(properties["AttributeDefinitions"], key=lambda attr: attr["AttributeName"]) == sorted(
        (
            {"AttributeName": attr.name, "AttributeType": attr.type.value}
            for attr in spec.attribute_definitions()
        ),
        key=lambda attr: attr["AttributeName"],
    )
    indexes = {index["IndexName"]: index for index in properties.get("GlobalSecondaryIndexes", [])}
    assert set(indexes) == {index.name for index in spec.indexes}
    for index in spec.indexes:
        assert indexes[index.name]["KeySchema"] == _key_schema(
            index.partition_key.name, index.sort_key.name if index.sort_key else None
        )
        assert indexes[index.name]["Projection"] == {"ProjectionType": "ALL"}
    assert properties["BillingMode"] == spec.billing_mode == "PAY_PER_REQUEST"
    assert properties["PointInTimeRecoverySpecification"] == {
        "PointInTimeRecoveryEnabled": spec.point_in_time_recovery
    }
    # AWS-managed KMS key (aws/dynamodb): SSE on, no customer key named.
    assert properties["SSESpecification"] == {"SSEEnabled": True}
    if spec.ttl_attribute is None:
        assert "TimeToLiveSpecification" not in properties
    else:
        assert properties["TimeToLiveSpecification"] == {"AttributeName": spec.ttl_attribute, "Enabled": True}
    assert properties["DeletionProtectionEnabled"] is synthesized.config.deletion_protection is True
    assert table["DeletionPolicy"] == "Retain"


# --- bucket ---------------------------------------------------------------------------------------


def test_blob_bucket_is_private_versioned_encrypted_logged_and_expires_run_objects(
    synthesized: Synthesized,
) -> None:
    bucket = synthesized.template["Resources"][_bucket_id(synthesized)]
    properties = bucket["Properties"]
    spec = SCHEMA.bucket
    assert properties["VersioningConfiguration"] == {"Status": "Enabled"} and spec.versioned
    assert properties["BucketEncryption"] == {
        "ServerSideEncryptionConfiguration": [
            {"ServerSideEncryptionByDefault": {"SSEAlgorithm": spec.encryption}}
        ]
    }
    assert properties["PublicAccessBlockConfiguration"] == dict.fromkeys(
        ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"), True
    )
    assert properties["OwnershipControls"] == {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
    log_bucket = synthesized.logical_id(synthesized.stack.storage.log_bucket)
    assert properties["LoggingConfiguration"] == {
        "DestinationBucketName": {"Ref": log_bucket},
        "LogFilePrefix": "blobs/",
    }
    rules = {rule["Id"]: rule for rule in properties["LifecycleConfiguration"]["Rules"]}
    [run_rule] = [rule for rule in spec.lifecycle if rule.prefix == "runs/"]
    # The environment's artifact TTL replaces the schema default for run objects.
    assert rules[run_rule.rule_id] == {
        "Id": run_rule.rule_id,
        "Prefix": "runs/",
        "ExpirationInDays": synthesized.config.artifact_ttl_days,
        "Status": "Enabled",
    }
    assert rules["expire-noncurrent-versions"]["NoncurrentVersionExpiration"] == {
        "NoncurrentDays": spec.noncurrent_version_expire_days
    }
    assert rules["expire-noncurrent-versions"]["AbortIncompleteMultipartUpload"] == {
        "DaysAfterInitiation": spec.abort_incomplete_multipart_days
    }
    assert bucket["DeletionPolicy"] == "Retain"


def _bucket_policy(synth: Synthesized, bucket_id: str) -> list[dict[str, Any]]:
    [policy] = [
        resource["Properties"]["PolicyDocument"]["Statement"]
        for resource in synth.resources("AWS::S3::BucketPolicy").values()
        if resource["Properties"]["Bucket"] == {"Ref": bucket_id}
    ]
    return policy


def _denies_insecure_transport(statements: list[dict[str, Any]]) -> bool:
    return any(
        statement["Effect"] == "Deny"
        and statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
        and statement["Principal"] in ("*", {"AWS": "*"})
        and statement["Action"] in ("s3:*", "sqs:*", "sns:Publish")
        for statement in statements
    )


def test_both_buckets_refuse_plain_http(synthesized: Synthesized) -> None:
    blobs = _bucket_policy(synthesized, _bucket_id(synthesized))
    assert _denies_insecure_transport(blobs)
    # The blob bucket's policy is the schema's bucket_tls_policy, rendered with the bucket's name.
    [statement] = blobs
    assert [render(resource) for resource in statement["Resource"]] == [
        f"arn:aws:s3:::<{_bucket_id(synthesized)}>",
        f"arn:aws:s3:::<{_bucket_id(synthesized)}>/*",
    ]
    log_bucket = synthesized.logical_id(synthesized.stack.storage.log_bucket)
    logs_policy = _bucket_policy(synthesized, log_bucket)
    assert _denies_insecure_transport(logs_policy)
    [delivery] = [statement for statement in logs_policy if statement["Effect"] == "Allow"]
    assert delivery["Principal"] == {"Service": "logging.s3.amazonaws.com"}
    assert delivery["Action"] == "s3:PutObject"
    properties = synthesized.template["Resources"][log_bucket]["Properties"]
    assert properties["PublicAccessBlockConfiguration"]["BlockPublicPolicy"] is True
    assert properties["LifecycleConfiguration"]["Rules"][0]["ExpirationInDays"] == (
        synthesized.config.access_log_retention_days
    )


# --- queues ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SCHEMA.queues, ids=lambda spec: spec.role.value)
def test_queue_matches_the_schema(synthesized: Synthesized, spec: Any) -> None:
    queue_ids = _queue_ids(synthesized)
    properties = synthesized.template["Resources"][queue_ids[spec.role]]["Properties"]
    assert properties["VisibilityTimeout"] == spec.visibility_timeout_s
    assert properties["MessageRetentionPeriod"] == spec.retention_s
    assert properties["ReceiveMessageWaitTimeSeconds"] == spec.receive_wait_s
    assert properties["SqsManagedSseEnabled"] is True
    if spec.dead_letter is None:
        assert "RedrivePolicy" not in properties
    else:
        assert properties["RedrivePolicy"] == {
            "deadLetterTargetArn": {"Fn::GetAtt": [queue_ids[spec.dead_letter], "Arn"]},
            "maxReceiveCount": spec.max_receive_count,
        }
    [policy] = [
        resource["Properties"]["PolicyDocument"]["Statement"]
        for resource in synthesized.resources("AWS::SQS::QueuePolicy").values()
        if {"Ref": queue_ids[spec.role]} in resource["Properties"]["Queues"]
    ]
    assert _denies_insecure_transport(policy)


# --- functions ------------------------------------------------------------------------------------


def _functions(synth: Synthesized) -> dict[str, tuple[str, dict[str, Any]]]:
    return _by_name(synth, "AWS::Lambda::Function", "FunctionName")


@pytest.mark.parametrize(
    ("name", "handler", "memory", "timeout"),
    [
        ("api", "hivemind_functions.api.handler.handler", 1024, 29),
        ("settle", "hivemind_functions.settle.handler", 512, 20),
        ("janitor", "hivemind_functions.janitor.handler", 512, 240),
    ],
)
def test_function_settings(
    synthesized: Synthesized, name: str, handler: str, memory: int, timeout: int
) -> None:
    config = synthesized.config
    _, function = _functions(synthesized)[f"{config.prefix}-{name}"]
    properties = function["Properties"]
    assert properties["Handler"] == handler
    assert properties["Runtime"] == "python3.12"
    assert properties["Architectures"] == ["x86_64"]
    assert properties["MemorySize"] == memory
    assert properties["Timeout"] == timeout
    layers = synthesized.stack.functions
    assert properties["Layers"] == [
        {"Ref": synthesized.logical_id(layers.core_layer)},
        {"Ref": synthesized.logical_id(layers.deps_layer)},
    ]
    environment = properties["Environment"]["Variables"]
    assert environment == {
        "HIVEMIND_PREFIX": config.prefix,
        "HIVEMIND_REGION": config.region,
        "HIVEMIND_BUCKET": {"Ref": _bucket_id(synthesized)},
        "HIVEMIND_BILLING_ENFORCE_CREDITS": "true",
        "HIVEMIND_SELF_SERVE_SIGNUP_ENABLED": "false",
        "HIVEMIND_ALLOWED_LLM_PROVIDERS": ",".join(config.allowed_llm_providers),
        "HIVEMIND_LOG_LEVEL": "INFO",
        "POWERTOOLS_METRICS_NAMESPACE": "Hivemind",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_SERVICE_NAME": f"{config.prefix}-{name}",
    }
    log_group_id = properties["LoggingConfig"]["LogGroup"]["Ref"]
    log_group = synthesized.template["Resources"][log_group_id]["Properties"]
    assert log_group["LogGroupName"] == f"/aws/lambda/{config.prefix}-{name}"
    assert log_group["RetentionInDays"] == config.log_retention_days


def test_settle_consumes_settlements_with_partial_batch_failures(synthesized: Synthesized) -> None:
    [mapping] = synthesized.resources("AWS::Lambda::EventSourceMapping").values()
    properties = mapping["Properties"]
    settle_id, settle = _functions(synthesized)[f"{synthesized.config.prefix}-settle"]
    assert properties["FunctionName"] == {"Ref": settle_id}
    assert properties["EventSourceArn"] == {
        "Fn::GetAtt": [_queue_ids(synthesized)[QueueRole.SETTLEMENTS], "Arn"]
    }
    assert properties["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert properties["BatchSize"] == 10
    # SQS needs the visibility timeout to cover the function timeout (AWS recommends six times).
    visibility = SCHEMA.queue(QueueRole.SETTLEMENTS).visibility_timeout_s
    assert settle["Properties"]["Timeout"] * 6 <= visibility


def test_janitor_runs_on_the_configured_schedule(synthesized: Synthesized) -> None:
    [rule] = synthesized.resources("AWS::Events::Rule").values()
    janitor_id, _ = _functions(synthesized)[f"{synthesized.config.prefix}-janitor"]
    assert (
        rule["Properties"]["ScheduleExpression"]
        == f"rate({synthesized.config.janitor_interval_minutes} minutes)"
    )
    [target] = rule["Properties"]["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": [janitor_id, "Arn"]}
    assert target["RetryPolicy"] == {"MaximumEventAgeInSeconds": 3600, "MaximumRetryAttempts": 2}


# --- API ------------------------------------------------------------------------------------------


def test_http_api_sends_every_route_to_the_api_function(synthesized: Synthesized) -> None:
    [api_id] = synthesized.resources("AWS::ApiGatewayV2::Api")
    [route] = synthesized.resources("AWS::ApiGatewayV2::Route").values()
    [(integration_id, integration)] = synthesized.resources("AWS::ApiGatewayV2::Integration").items()
    api_function_id, _ = _functions(synthesized)[f"{synthesized.config.prefix}-api"]
    assert route["Properties"]["RouteKey"] == "$default"
    assert render(route["Properties"]["Target"]) == f"integrations/<{integration_id}>"
    assert integration["Properties"]["IntegrationType"] == "AWS_PROXY"
    assert integration["Properties"]["PayloadFormatVersion"] == "2.0"
    assert integration["Properties"]["IntegrationUri"] == {"Fn::GetAtt": [api_function_id, "Arn"]}
    [permission] = [
        resource["Properties"]
        for resource in synthesized.resources("AWS::Lambda::Permission").values()
        if resource["Properties"]["Principal"] == "apigateway.amazonaws.com"
    ]
    assert permission["FunctionName"] == {"Fn::GetAtt": [api_function_id, "Arn"]}
    assert render(permission["SourceArn"]).endswith(f":<{api_id}>/*/*")


def test_stage_throttles_and_logs_without_headers(synthesized: Synthesized) -> None:
    [stage] = synthesized.resources("AWS::ApiGatewayV2::Stage").values()
    properties = stage["Properties"]
    assert properties["StageName"] == "$default" and properties["AutoDeploy"] is True
    assert properties["DefaultRouteSettings"] == {
        "ThrottlingBurstLimit": synthesized.config.api_throttle_burst,
        "ThrottlingRateLimit": synthesized.config.api_throttle_rate,
    }
    access_logs = synthesized.logical_id(synthesized.stack.http_api.access_logs)
    assert properties["AccessLogSettings"]["DestinationArn"] == {"Fn::GetAtt": [access_logs, "Arn"]}
    fields = json.loads(properties["AccessLogSettings"]["Format"])
    assert {"requestId", "status", "routeKey", "ip"} <= set(fields)
    # A bearer token must never reach a log: no request header, query string or body variables.
    assert not any(
        marker in value
        for value in fields.values()
        for marker in ("header", "querystring", "body", "authorizer")
    )


# --- alarms ---------------------------------------------------------------------------------------


def _alarms(synth: Synthesized) -> dict[str, dict[str, Any]]:
    return {
        name: synth.template["Resources"][synth.logical_id(alarm)]["Properties"]
        for name, alarm in synth.stack.alarms.alarms.items()
    }


def test_alarms_watch_dead_letters_backlog_runners_and_errors(synthesized: Synthesized) -> None:
    alarms = _alarms(synthesized)
    queues = _queue_ids(synthesized)
    functions = _functions(synthesized)
    prefix = synthesized.config.prefix
    watched = {
        name: (alarm["Namespace"], alarm["MetricName"], alarm["Dimensions"], alarm["Threshold"])
        for name, alarm in alarms.items()
    }
    [api_id] = synthesized.resources("AWS::ApiGatewayV2::Api")
    assert watched == {
        "RunsDeadLetters": (
            "AWS/SQS",
            "ApproximateNumberOfMessagesVisible",
            [{"Name": "QueueName", "Value": {"Fn::GetAtt": [queues[QueueRole.RUNS_DLQ], "QueueName"]}}],
            1,
        ),
        "SettlementsDeadLetters": (
            "AWS/SQS",
            "ApproximateNumberOfMessagesVisible",
            [
                {
                    "Name": "QueueName",
                    "Value": {"Fn::GetAtt": [queues[QueueRole.SETTLEMENTS_DLQ], "QueueName"]},
                }
            ],
            1,
        ),
        "RunsBacklog": (
            "AWS/SQS",
            "ApproximateAgeOfOldestMessage",
            [{"Name": "QueueName", "Value": {"Fn::GetAtt": [queues[QueueRole.RUNS], "QueueName"]}}],
            synthesized.config.runs_backlog_alarm_age_s,
        ),
        "RunnersMissing": (
            "AWS/DynamoDB",
            "SuccessfulRequestLatency",
            [
                {"Name": "Operation", "Value": "UpdateItem"},
                {"Name": "TableName", "Value": {"Ref": _table_ids(synthesized)[TableRole.RUNNERS]}},
            ],
            # Heartbeats of (runner_count - 0.5) runners in five minutes.
            (synthesized.config.runner_count - 0.5) * 300 / synthesized.config.runner_heartbeat_s,
        ),
        "ApiServerErrors": (
            "AWS/ApiGateway",
            "5xx",
            [{"Name": "ApiId", "Value": {"Ref": api_id}}],
            synthesized.config.api_5xx_alarm_threshold,
        ),
        "SettleErrors": (
            "AWS/Lambda",
            "Errors",
            [{"Name": "FunctionName", "Value": {"Ref": functions[f"{prefix}-settle"][0]}}],
            1,
        ),
        "JanitorErrors": (
            "AWS/Lambda",
            "Errors",
            [{"Name": "FunctionName", "Value": {"Ref": functions[f"{prefix}-janitor"][0]}}],
            1,
        ),
    }
    assert alarms["RunnersMissing"]["ComparisonOperator"] == "LessThanThreshold"
    assert alarms["RunnersMissing"]["Statistic"] == "SampleCount"
    assert alarms["RunnersMissing"]["TreatMissingData"] == "breaching"
    assert alarms["RunsDeadLetters"]["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"


def test_every_alarm_notifies_the_encrypted_topic(synthesized: Synthesized) -> None:
    topic_id = synthesized.logical_id(synthesized.stack.alarms.topic)
    key_id = synthesized.logical_id(synthesized.stack.alarms.key)
    for name, alarm in _alarms(synthesized).items():
        assert alarm["AlarmActions"] == [{"Ref": topic_id}], name
        assert alarm["OKActions"] == [{"Ref": topic_id}], name
    topic = synthesized.template["Resources"][topic_id]["Properties"]
    assert topic["KmsMasterKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}
    key = synthesized.template["Resources"][key_id]["Properties"]
    assert key["EnableKeyRotation"] is True
    [cloudwatch] = [
        statement
        for statement in key["KeyPolicy"]["Statement"]
        if statement.get("Principal") == {"Service": "cloudwatch.amazonaws.com"}
    ]
    assert sorted(as_list(cloudwatch["Action"])) == ["kms:Decrypt", "kms:GenerateDataKey"]
    [subscription] = synthesized.resources("AWS::SNS::Subscription").values()
    assert subscription["Properties"]["Endpoint"] == ALARM_EMAIL
    assert subscription["Properties"]["TopicArn"] == {"Ref": topic_id}


# --- outputs --------------------------------------------------------------------------------------


def test_outputs_name_everything_an_operator_and_a_runner_need(synthesized: Synthesized) -> None:
    outputs = synthesized.template["Outputs"]
    assert set(outputs) >= {
        "ApiUrl",
        "BucketName",
        "RunsQueueUrl",
        "SettlementsQueueUrl",
        "RunnerRoleArn",
        "Prefix",
        "AlarmTopicArn",
    }
    assert outputs["BucketName"]["Value"] == {"Ref": _bucket_id(synthesized)}
    assert outputs["RunsQueueUrl"]["Value"] == {"Ref": _queue_ids(synthesized)[QueueRole.RUNS]}
    runner_role = _role_id(synthesized, synthesized.stack.runner_access.role)
    assert outputs["RunnerRoleArn"]["Value"] == {"Fn::GetAtt": [runner_role, "Arn"]}
    assert outputs["Prefix"]["Value"] == synthesized.config.prefix


# --- IAM ------------------------------------------------------------------------------------------

# The only wildcards an identity policy may contain, and why AWS requires them:
# - object key patterns in the blob bucket: keys hold run-time ids (rooms/<room>/..., runs/<run>/...),
#   and IAM names objects only by patterns; each pattern comes from hivemind.store.schema's key builders;
# - (implicitly) the log group ARNs the functions log to: CloudFormation's LogGroup Arn ends in ":*"
#   because Lambda names log streams at run time. It is a reference here, so no literal "*" appears.
JUSTIFIED_OBJECT_PATTERNS = {
    "rooms/*/*",
    "rooms/*/items/*",
    "agents/*/*",
    "agents/*/source",
    "runs/*/*",
    "runs/*/envelope",
    "runs/*/output",
    "runs/*/artifacts/*",
    "runs/*/receipt.json",
    "exports/ledger/*",
}


def test_no_managed_policies_and_no_wildcard_actions(synthesized: Synthesized) -> None:
    for logical_id, role in synthesized.resources("AWS::IAM::Role").items():
        assert "ManagedPolicyArns" not in role["Properties"], logical_id
    assert not synthesized.resources("AWS::IAM::ManagedPolicy")
    for statement in identity_statements(synthesized.template):
        assert statement["Effect"] == "Allow"
        for action in as_list(statement["Action"]):
            assert "*" not in action, statement


def test_wildcard_resources_are_only_the_justified_object_patterns(synthesized: Synthesized) -> None:
    bucket_arn = f"<{_bucket_id(synthesized)}.Arn>/"
    wildcards: set[str] = set()
    for statement in identity_statements(synthesized.template):
        for resource in as_list(statement["Resource"]):
            rendered = render(resource)
            assert rendered != "*", statement
            if "*" in rendered:
                assert rendered.startswith(bucket_arn), rendered
                wildcards.add(rendered.removeprefix(bucket_arn))
    assert wildcards == JUSTIFIED_OBJECT_PATTERNS


def test_runner_role_has_exactly_the_design_permissions(synthesized: Synthesized) -> None:
    tables = _table_ids(synthesized)
    queues = _queue_ids(synthesized)
    bucket = f"<{_bucket_id(synthesized)}.Arn>"
    role_id = _role_id(synthesized, synthesized.stack.runner_access.role)
    read = {"s3:GetObject", "s3:GetObjectVersion"}
    write = {"s3:AbortMultipartUpload", "s3:PutObject"}
    assert grants(role_statements(synthesized.template, role_id)) == {
        f"<{queues[QueueRole.RUNS]}.Arn>": {
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:ChangeMessageVisibility",
            "sqs:GetQueueUrl",
        },
        f"<{queues[QueueRole.SETTLEMENTS]}.Arn>": {"sqs:SendMessage", "sqs:GetQueueUrl"},
        f"{bucket}/rooms/*/*": read,
        f"{bucket}/agents/*/*": read,
        f"{bucket}/runs/*/envelope": read,
        f"{bucket}/runs/*/output": write,
        f"{bucket}/runs/*/artifacts/*": write,
        f"{bucket}/runs/*/receipt.json": write,
        f"<{tables[TableRole.RUNS]}.Arn>": {"dynamodb:GetItem", "dynamodb:UpdateItem"},
        f"<{tables[TableRole.RUNNERS]}.Arn>": {"dynamodb:PutItem", "dynamodb:UpdateItem"},
        f"<{tables[TableRole.ROOMS]}.Arn>": {"dynamodb:GetItem", "dynamodb:Query"},
        f"<{tables[TableRole.AGENTS]}.Arn>": {"dynamodb:GetItem"},
        f"<{tables[TableRole.TENANTS]}.Arn>": {"dynamodb:GetItem"},
        f"<{tables[TableRole.NONCES]}.Arn>": {"dynamodb:UpdateItem"},
    }


def test_runner_cannot_touch_money_or_credentials_nor_write_rooms(synthesized: Synthesized) -> None:
    tables = _table_ids(synthesized)
    role_id = _role_id(synthesized, synthesized.stack.runner_access.role)
    granted = grants(role_statements(synthesized.template, role_id))
    for role in (TableRole.LEDGER, TableRole.ACCOUNTS, TableRole.CREDENTIALS, TableRole.CREDIT_CODES):
        assert not any(tables[role] in resource for resource in granted), role
    rooms = granted[f"<{tables[TableRole.ROOMS]}.Arn>"]
    assert not rooms & {
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "dynamodb:DeleteItem",
        "dynamodb:BatchWriteItem",
    }
    for resource, actions in granted.items():
        if "/rooms/" in resource or "/agents/" in resource:
            assert not any(action.startswith(("s3:Put", "s3:Delete")) for action in actions), resource


def test_runner_role_trusts_only_the_configured_principal_with_external_id(synthesized: Synthesized) -> None:
    role = synthesized.template["Resources"][_role_id(synthesized, synthesized.stack.runner_access.role)]
    [statement] = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert statement["Principal"] == {"AWS": RUNNER_PRINCIPAL}
    assert statement["Action"] == "sts:AssumeRole"
    assert statement["Condition"] == {"StringEquals": {"sts:ExternalId": RUNNER_EXTERNAL_ID}}
    assert role["Properties"]["MaxSessionDuration"] == 3600


def _function_grants(synth: Synthesized, name: str) -> dict[str, set[str]]:
    function = getattr(synth.stack.functions, name)
    return grants(role_statements(synth.template, _role_id(synth, function.role)))


def _tables_touched(synth: Synthesized, name: str) -> set[TableRole]:
    tables = _table_ids(synth)
    granted = _function_grants(synth, name)
    return {
        role
        for role, logical in tables.items()
        if any(f"<{logical}.Arn>" in resource for resource in granted)
    }


def test_settle_touches_only_runs_prices_and_billing(synthesized: Synthesized) -> None:
    assert _tables_touched(synthesized, "settle") == {
        TableRole.RUNS,
        TableRole.PRICES,
        TableRole.ACCOUNTS,
        TableRole.LEDGER,
        TableRole.BILLING_MARKERS,
    }
    granted = _function_grants(synthesized, "settle")
    assert not any(action.startswith("s3:") for actions in granted.values() for action in actions)
    settlements = f"<{_queue_ids(synthesized)[QueueRole.SETTLEMENTS]}.Arn>"
    assert {"sqs:ReceiveMessage", "sqs:DeleteMessage"} <= granted[settlements]


def test_janitor_never_reads_credentials_nor_room_objects(synthesized: Synthesized) -> None:
    touched = _tables_touched(synthesized, "janitor")
    assert not touched & {
        TableRole.CREDENTIALS,
        TableRole.TENANTS,
        TableRole.CREDIT_CODES,
        TableRole.NONCES,
        TableRole.RUNNERS,
    }
    granted = _function_grants(synthesized, "janitor")
    readable = {resource for resource, actions in granted.items() if "s3:GetObject" in actions}
    assert readable == {f"<{_bucket_id(synthesized)}.Arn>/exports/ledger/*"}
    runs_dlq = f"<{_queue_ids(synthesized)[QueueRole.RUNS_DLQ]}.Arn>"
    assert {"sqs:ReceiveMessage", "sqs:DeleteMessage"} <= granted[runs_dlq]


def test_api_cannot_forge_run_results_nor_spend_nonces(synthesized: Synthesized) -> None:
    assert TableRole.NONCES not in _tables_touched(synthesized, "api")
    granted = _function_grants(synthesized, "api")
    bucket = f"<{_bucket_id(synthesized)}.Arn>"
    writable = {resource for resource, actions in granted.items() if "s3:PutObject" in actions}
    assert writable == {f"{bucket}/rooms/*/items/*", f"{bucket}/agents/*/source", f"{bucket}/runs/*/envelope"}
    runners = _table_ids(synthesized)[TableRole.RUNNERS]
    assert granted[f"<{runners}.Arn>"] == {"dynamodb:GetItem", "dynamodb:Query"}
    runs = f"<{_queue_ids(synthesized)[QueueRole.RUNS]}.Arn>"
    assert granted[runs] == {"sqs:SendMessage", "sqs:GetQueueUrl"}


def test_folder_listing_is_limited_to_rooms_and_agents(synthesized: Synthesized) -> None:
    for name in ("api", "janitor"):
        function = getattr(synthesized.stack.functions, name)
        statements = role_statements(synthesized.template, _role_id(synthesized, function.role))
        [listing] = [
            statement for statement in statements if "s3:ListBucketVersions" in as_list(statement["Action"])
        ]
        assert listing["Condition"] == {"StringLike": {"s3:prefix": ["rooms/*", "agents/*"]}}


# --- cdk-nag --------------------------------------------------------------------------------------


def test_cdk_nag_reports_no_unsuppressed_finding(synthesized: Synthesized) -> None:
    errors = [message for message in synthesized.messages if message[0] == "error"]
    assert errors == []
    assert synthesized.nag_report, "cdk-nag wrote no report: the AwsSolutions pack did not run"
    open_findings = [row for row in synthesized.nag_report if row["Compliance"] == "Non-Compliant"]
    assert open_findings == []


def test_every_suppression_has_a_reason_and_is_used(synthesized: Synthesized) -> None:
    suppressed = {
        (row["Rule ID"], row["Exception Reason"])
        for row in synthesized.nag_report
        if row["Compliance"] == "Suppressed"
    }
    declared = 0
    for logical_id, resource in synthesized.template["Resources"].items():
        for rule in resource.get("Metadata", {}).get("cdk_nag", {}).get("rules_to_suppress", []):
            declared += 1
            reason = rule["reason"]
            assert len(reason) >= 60, (logical_id, rule)
            findings = rule.get("applies_to")
            if findings:
                for finding in findings:
                    assert (rule["id"], f"[{finding}] {reason}") in suppressed, (logical_id, finding)
            else:
                assert (rule["id"], reason) in suppressed, (logical_id, rule["id"])
    assert declared > 0
    assert {rule for rule, _ in suppressed} == {"AwsSolutions-IAM5", "AwsSolutions-L1", "AwsSolutions-APIG4"}


# --- app.py ---------------------------------------------------------------------------------------


def _app_module() -> Any:
    spec = importlib.util.spec_from_file_location("hivemind_cdk_app", INFRA / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_app_refuses_an_unknown_environment(capsys: pytest.CaptureFixture[str]) -> None:
    assert _app_module().main(["--only", "staging"]) == 2
    assert "unknown environments ['staging']" in capsys.readouterr().err


def test_app_refuses_to_synth_without_the_dependency_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = _app_module()
    app.ASSETS = replace(app.ASSETS, deps_layer=tmp_path / "missing")
    assert app.main(["--only", "dev", "--outdir", str(tmp_path / "out")]) == 2
    assert "make layers" in capsys.readouterr().err
