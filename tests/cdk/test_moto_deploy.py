"""Deploy the synthesized template, with its real assets, into the moto server's CloudFormation.

moto 5.2 has CloudFormation models for most resource types of the stack, but not for the ones in
``MOTO_LACKS``: the test strips those and everything that references them (listed in the assertion
message), deploys the rest, and then checks that the tables, the bucket and the queues CloudFormation
created are the ones core's schema describes, in two ways: ``describe_table`` / queue attributes
compared field by field with ``SCHEMA``, and ``hivemind.store.bootstrap.create_all`` run on top of the
deployment, which refuses any table whose keys or indexes differ from the schema.

What moto's CloudFormation ignores is checked on the template in test_stack.py instead: table TTL,
point-in-time recovery and encryption (moto reads the API's key ``Enabled``, not CloudFormation's
``SSEEnabled``), and every bucket property except its name, encryption and tags (versioning, public
access block, lifecycle, logging).
"""

from __future__ import annotations

import io
import json
import re
import uuid
import zipfile
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.cloudformation.parsing import NULL_MODELS, get_model_map

from hivemind.store import AwsClients, Store, StoreConfig
from hivemind.store.bootstrap import create_all
from hivemind.store.schema import SCHEMA, resource_name
from hivemind.store.tenants import TenantRecord

from .conftest import Synthesized

pytestmark = pytest.mark.slow

ACCOUNT = "123456789012"  # moto's default account
REGION = "us-east-1"
# Resource types of the stack that moto's CloudFormation cannot create (moto 5.2). The test fails if
# this list goes stale in either direction, so a moto upgrade that adds one is noticed.
MOTO_LACKS = {
    "AWS::ApiGatewayV2::Api",
    "AWS::ApiGatewayV2::Integration",
    "AWS::ApiGatewayV2::Route",
    "AWS::ApiGatewayV2::Stage",
    "AWS::CloudWatch::Alarm",
    "AWS::S3::BucketPolicy",
    "AWS::SNS::Subscription",
    "AWS::SNS::TopicPolicy",
    "AWS::SQS::QueuePolicy",
}


def _references(value: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "Ref" and isinstance(item, str):
                found.add(item)
            elif key == "Fn::GetAtt":
                found.add(item[0])
            elif key == "Fn::Sub":
                template = item if isinstance(item, str) else item[0]
                found |= {match.split(".")[0] for match in re.findall(r"\$\{([^}!]+)\}", template)}
            found |= _references(item)
    elif isinstance(value, list):
        for item in value:
            found |= _references(item)
    return found


def adapt_for_moto(resource: dict[str, Any]) -> dict[str, Any]:
    """Work around moto quirks that are not properties of the template.

    moto 5.2 reads the tags of an ``AWS::KMS::Key`` in the KMS API shape (``TagKey``/``TagValue``)
    instead of CloudFormation's (``Key``/``Value``) and crashes; the key's tags are dropped here.
    """
    if resource["Type"] == "AWS::KMS::Key":
        properties = {key: value for key, value in resource["Properties"].items() if key != "Tags"}
        return {**resource, "Properties": properties}
    return resource


def strip_unsupported(template: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The template without resources moto cannot create and without whatever refers to them."""
    supported = set(get_model_map()) | set(NULL_MODELS)
    resources = dict(template["Resources"])
    removed = {logical: res["Type"] for logical, res in resources.items() if res["Type"] not in supported}
    while True:
        dependent = {
            logical: res["Type"]
            for logical, res in resources.items()
            if logical not in removed and (_references(res) | set(res.get("DependsOn", []))) & set(removed)
        }
        if not dependent:
            break
        removed |= dependent
    kept = {logical: adapt_for_moto(res) for logical, res in resources.items() if logical not in removed}
    outputs = {
        name: output
        for name, output in template.get("Outputs", {}).items()
        if not _references(output) & set(removed)
    }
    return {**template, "Resources": kept, "Outputs": outputs}, removed


def _upload_assets(session: boto3.session.Session, endpoint: str, synth: Synthesized) -> None:
    """Zip every staged asset directory of the cloud assembly into moto's CDK assets bucket."""
    s3 = session.client("s3", endpoint_url=endpoint, region_name=REGION)
    bucket = f"cdk-hnb659fds-assets-{ACCOUNT}-{REGION}"
    s3.create_bucket(Bucket=bucket)
    for staged in synth.outdir.glob("asset.*"):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(Path(staged).rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(staged).as_posix())
        s3.put_object(Bucket=bucket, Key=f"{staged.name.removeprefix('asset.')}.zip", Body=buffer.getvalue())


@pytest.fixture(scope="module")
def deployed(moto_server: str, synthesized: Synthesized) -> dict[str, Any]:
    session = boto3.session.Session(region_name=REGION)
    template, removed = strip_unsupported(synthesized.template)
    present = {res["Type"] for res in synthesized.template["Resources"].values()}
    assert {kind for kind in removed.values() if kind not in get_model_map()} == MOTO_LACKS & present, removed
    ssm = session.client("ssm", endpoint_url=moto_server)
    ssm.put_parameter(Name="/cdk-bootstrap/hnb659fds/version", Value="30", Type="String", Overwrite=True)
    _upload_assets(session, moto_server, synthesized)
    cloudformation = session.client("cloudformation", endpoint_url=moto_server)
    name = f"hivemind-test-{uuid.uuid4().hex[:8]}"
    cloudformation.create_stack(
        StackName=name,
        TemplateBody=json.dumps(template),
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"],
    )
    [stack] = cloudformation.describe_stacks(StackName=name)["Stacks"]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    outputs = {output["OutputKey"]: output["OutputValue"] for output in stack.get("Outputs", [])}
    return {"session": session, "outputs": outputs, "removed": removed, "stack": name}


def test_only_the_types_moto_lacks_and_their_dependents_were_left_out(deployed: dict[str, Any]) -> None:
    removed: dict[str, str] = deployed["removed"]
    dependents = {kind for kind in removed.values() if kind not in MOTO_LACKS}
    # The API Gateway invoke permission refers to the HTTP API; nothing else may depend on a missing type.
    assert dependents == {"AWS::Lambda::Permission"}, removed


def test_tables_created_by_cloudformation_match_the_schema(
    moto_server: str, deployed: dict[str, Any], synthesized: Synthesized
) -> None:
    ddb = deployed["session"].client("dynamodb", endpoint_url=moto_server)
    for spec in SCHEMA.tables:
        table = ddb.describe_table(TableName=resource_name(synthesized.config.prefix, spec.role.value))[
            "Table"
        ]
        expected_keys = [{"AttributeName": spec.partition_key.name, "KeyType": "HASH"}]
        if spec.sort_key is not None:
            expected_keys.append({"AttributeName": spec.sort_key.name, "KeyType": "RANGE"})
        assert table["KeySchema"] == expected_keys, spec.role
        indexes = {index["IndexName"]: index for index in table.get("GlobalSecondaryIndexes", [])}
        assert set(indexes) == {index.name for index in spec.indexes}, spec.role
        for index in spec.indexes:
            keys = [{"AttributeName": index.partition_key.name, "KeyType": "HASH"}]
            if index.sort_key is not None:
                keys.append({"AttributeName": index.sort_key.name, "KeyType": "RANGE"})
            assert indexes[index.name]["KeySchema"] == keys
            assert indexes[index.name]["Projection"] == {"ProjectionType": "ALL"}
        assert {(attr["AttributeName"], attr["AttributeType"]) for attr in table["AttributeDefinitions"]} == {
            (attr.name, attr.type.value) for attr in spec.attribute_definitions()
        }
        assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        assert table["DeletionProtectionEnabled"] is True


def test_queues_created_by_cloudformation_match_the_schema(
    moto_server: str, deployed: dict[str, Any], synthesized: Synthesized
) -> None:
    sqs = deployed["session"].client("sqs", endpoint_url=moto_server)
    arns: dict[str, str] = {}
    attributes: dict[str, dict[str, str]] = {}
    for spec in SCHEMA.queues:
        url = sqs.get_queue_url(QueueName=resource_name(synthesized.config.prefix, spec.role.value))[
            "QueueUrl"
        ]
        attributes[spec.role.value] = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])[
            "Attributes"
        ]
        arns[spec.role.value] = attributes[spec.role.value]["QueueArn"]
    for spec in SCHEMA.queues:
        got = attributes[spec.role.value]
        assert int(got["VisibilityTimeout"]) == spec.visibility_timeout_s
        assert int(got["MessageRetentionPeriod"]) == spec.retention_s
        assert int(got["ReceiveMessageWaitTimeSeconds"]) == spec.receive_wait_s
        if spec.dead_letter is None:
            assert "RedrivePolicy" not in got
        else:
            assert json.loads(got["RedrivePolicy"]) == {
                "deadLetterTargetArn": arns[spec.dead_letter.value],
                "maxReceiveCount": spec.max_receive_count,
            }
    assert deployed["outputs"]["RunsQueueUrl"].endswith(
        "/" + resource_name(synthesized.config.prefix, "runs")
    )


def test_bucket_created_by_cloudformation_has_its_name_and_encryption(
    moto_server: str, deployed: dict[str, Any], synthesized: Synthesized
) -> None:
    s3 = deployed["session"].client("s3", endpoint_url=moto_server)
    bucket = deployed["outputs"]["BucketName"]
    assert bucket == f"{resource_name(synthesized.config.prefix, SCHEMA.bucket.role)}-{ACCOUNT}-{REGION}"
    [rule] = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == SCHEMA.bucket.encryption


def test_runner_role_was_created_with_its_policy(
    moto_server: str, deployed: dict[str, Any], synthesized: Synthesized
) -> None:
    iam = deployed["session"].client("iam", endpoint_url=moto_server)
    name = f"{synthesized.config.prefix}-runner"
    role = iam.get_role(RoleName=name)["Role"]
    assert role["Arn"] == deployed["outputs"]["RunnerRoleArn"]
    assert role["MaxSessionDuration"] == 3600
    policy = iam.get_role_policy(RoleName=name, PolicyName=name)["PolicyDocument"]
    sids = {statement["Sid"] for statement in policy["Statement"]}
    assert {
        "TakeRuns",
        "SendSettlements",
        "ReadRoomAgentAndEnvelopeObjects",
        "WriteRunResults",
        "TableRuns",
    } <= sids


def test_the_store_bootstrap_accepts_the_deployment_and_the_store_works_on_it(
    moto_server: str, deployed: dict[str, Any], synthesized: Synthesized
) -> None:
    config = StoreConfig(
        prefix=synthesized.config.prefix,
        region=REGION,
        endpoint_url=moto_server,
        bucket_name=deployed["outputs"]["BucketName"],
    )
    clients = AwsClients(config, session=deployed["session"])
    # Refuses (StoreError) any existing table whose keys or indexes differ from the schema.
    create_all(clients)
    store = Store(clients, clock=lambda: 1_700_000_000)
    tenant = TenantRecord(
        tenant_id="tenant_cdk",
        name="CDK deployment check",
        owner_sign_pub="A" * 43,
        owner_box_pub="B" * 43,
        created_at=1_700_000_000,
        updated_at=1_700_000_000,
    )
    store.tenants.create(tenant)
    assert store.tenants.get("tenant_cdk") == tenant
    stored = store.blobs.put_bytes("runs/run_cdk/receipt.json", b"{}")
    assert stored.version_id is not None  # the CloudFormation bucket is versioned
