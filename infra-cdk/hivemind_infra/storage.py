"""Tables and the bucket, declared from :data:`hivemind.store.schema.SCHEMA` (never restated here).

Encryption choices (docs/operations.md explains them):

- tables: the AWS-managed KMS key ``aws/dynamodb``. Every use of it is logged in CloudTrail, and
  there is no key policy to get wrong. A customer-managed key would not protect anything more: the
  operator controls it, and the operator is exactly whom the design does not trust. Room data,
  sealed sources and outputs are encrypted client-side or in the TEE before they reach AWS;
  server-side encryption here is defence in depth for bookkeeping.
- bucket: what the schema says (SSE-S3, ``AES256``): its objects are HMS1 ciphertext and signed
  JSON, and SSE-KMS would make every presigned upload and download also need KMS permissions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aws_cdk import Aws, Duration, RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import Construct

from hivemind.store.schema import (
    SCHEMA,
    AttrType,
    KeyAttr,
    TableRole,
    TableSpec,
    bucket_tls_policy,
    resource_name,
)
from hivemind_infra.config import EnvironmentConfig

_ATTRIBUTE_TYPES = {
    AttrType.STRING: dynamodb.AttributeType.STRING,
    AttrType.NUMBER: dynamodb.AttributeType.NUMBER,
}
_BUCKET_ENCRYPTION = {"AES256": s3.BucketEncryption.S3_MANAGED}
# Lifecycle rules whose prefix starts here expire run objects; the environment sets their TTL.
RUN_OBJECTS_PREFIX = "runs/"


def key_pattern(build: Callable[..., str], arity: int, suffix: str = "") -> str:
    """The IAM key pattern of a schema key function, e.g. ``item_key`` -> ``rooms/*/items/*``.

    Built by calling the schema's own function with marker ids, so IAM follows the key layout instead
    of restating it. In an IAM resource ``*`` also matches ``/``.
    """
    markers = [f"KEYMARKER{index}" for index in range(arity)]
    key = build(*markers)
    for marker in markers:
        key = key.replace(marker, "*")
    return key + suffix


def _attribute(attr: KeyAttr) -> dynamodb.Attribute:
    return dynamodb.Attribute(name=attr.name, type=_ATTRIBUTE_TYPES[attr.type])


def _removal(config: EnvironmentConfig) -> RemovalPolicy:
    return RemovalPolicy.RETAIN if config.deletion_protection else RemovalPolicy.DESTROY


class Storage(Construct):
    """Every table of the schema, the blob bucket and its access-log bucket."""

    def __init__(self, scope: Construct, construct_id: str, *, config: EnvironmentConfig) -> None:
        super().__init__(scope, construct_id)
        self.config = config
        self.tables: dict[TableRole, dynamodb.Table] = {
            spec.role: self._table(spec) for spec in SCHEMA.tables
        }
        self.log_bucket = self._log_bucket()
        self.bucket = self._bucket()

    def table(self, role: TableRole) -> dynamodb.Table:
        return self.tables[role]

    def table_statement(
        self, role: TableRole, actions: Iterable[str], *, indexes: Iterable[str] = (), sid: str | None = None
    ) -> iam.PolicyStatement:
        """Allow ``actions`` on one table and the named indexes of it (never ``index/*``)."""
        known = {index.name for index in SCHEMA.table(role).indexes}
        wanted = tuple(indexes)
        if not set(wanted) <= known:
            raise ValueError(f"table {role} has no index {sorted(set(wanted) - known)}")
        actions = tuple(actions)
        if not actions or not all(action.startswith("dynamodb:") and "*" not in action for action in actions):
            raise ValueError(f"table {role}: actions must be explicit dynamodb actions, got {actions}")
        arn = self.tables[role].table_arn
        return iam.PolicyStatement(
            sid=sid or "Table" + "".join(part.capitalize() for part in role.value.split("-")),
            actions=sorted(set(actions)),
            resources=[arn, *(f"{arn}/index/{name}" for name in wanted)],
        )

    def object_statement(
        self, actions: Iterable[str], key_patterns: Iterable[str], *, sid: str | None = None
    ) -> iam.PolicyStatement:
        """Allow ``actions`` on objects whose keys match ``key_patterns`` (see :func:`key_pattern`)."""
        return iam.PolicyStatement(
            sid=sid,
            actions=sorted(set(actions)),
            resources=[self.bucket.arn_for_objects(pattern) for pattern in key_patterns],
        )

    def listing_statement(self, prefixes: Iterable[str]) -> iam.PolicyStatement:
        """Allow listing object versions, only under ``prefixes`` (deleting a folder lists it first)."""
        return iam.PolicyStatement(
            sid="ListFoldersToDelete",
            actions=["s3:ListBucket", "s3:ListBucketVersions"],
            resources=[self.bucket.bucket_arn],
            conditions={"StringLike": {"s3:prefix": [f"{prefix}*" for prefix in prefixes]}},
        )

    def _table(self, spec: TableSpec) -> dynamodb.Table:
        if spec.billing_mode != "PAY_PER_REQUEST":
            raise ValueError(
                f"table {spec.role}: only on-demand billing is supported, not {spec.billing_mode}"
            )
        table = dynamodb.Table(
            self,
            f"Table-{spec.role.value}",
            table_name=resource_name(self.config.prefix, spec.role.value),
            partition_key=_attribute(spec.partition_key),
            sort_key=_attribute(spec.sort_key) if spec.sort_key is not None else None,
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=spec.point_in_time_recovery
            ),
            encryption=dynamodb.TableEncryption.AWS_MANAGED,
            time_to_live_attribute=spec.ttl_attribute,
            deletion_protection=self.config.deletion_protection,
            removal_policy=_removal(self.config),
        )
        for index in spec.indexes:
            table.add_global_secondary_index(
                index_name=index.name,
                partition_key=_attribute(index.partition_key),
                sort_key=_attribute(index.sort_key) if index.sort_key is not None else None,
                projection_type=dynamodb.ProjectionType.ALL,
            )
        return table

    def _log_bucket(self) -> s3.Bucket:
        # Server access logs of the blob bucket. S3 log delivery supports SSE-S3 only.
        return s3.Bucket(
            self,
            "AccessLogs",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            versioned=False,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="expire-access-logs",
                    enabled=True,
                    expiration=Duration.days(self.config.access_log_retention_days),
                )
            ],
            removal_policy=_removal(self.config),
        )

    def _bucket(self) -> s3.Bucket:
        spec = SCHEMA.bucket
        if spec.encryption not in _BUCKET_ENCRYPTION:
            raise ValueError(f"bucket encryption {spec.encryption!r} is not supported by the stack")
        name = (
            self.config.bucket_name
            or f"{resource_name(self.config.prefix, spec.role)}-{Aws.ACCOUNT_ID}-{Aws.REGION}"
        )
        rules = [
            s3.LifecycleRule(
                id=rule.rule_id,
                enabled=True,
                prefix=rule.prefix,
                expiration=Duration.days(self._expire_days(rule.prefix, rule.expire_days)),
            )
            for rule in spec.lifecycle
            if rule.expire_days is not None
        ]
        rules.append(
            s3.LifecycleRule(
                id="expire-noncurrent-versions",
                enabled=True,
                noncurrent_version_expiration=Duration.days(spec.noncurrent_version_expire_days),
                abort_incomplete_multipart_upload_after=Duration.days(spec.abort_incomplete_multipart_days),
            )
        )
        bucket = s3.Bucket(
            self,
            "Blobs",
            bucket_name=name,
            versioned=spec.versioned,
            encryption=_BUCKET_ENCRYPTION[spec.encryption],
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL if spec.block_public_access else None,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            server_access_logs_bucket=self.log_bucket,
            server_access_logs_prefix="blobs/",
            lifecycle_rules=rules,
            removal_policy=_removal(self.config),
        )
        if spec.enforce_tls:
            for statement in bucket_tls_policy(bucket.bucket_name)["Statement"]:  # type: ignore[index]
                bucket.add_to_resource_policy(iam.PolicyStatement.from_json(statement))
        return bucket

    def _expire_days(self, prefix: str, schema_days: int) -> int:
        if prefix.startswith(RUN_OBJECTS_PREFIX):
            return self.config.artifact_ttl_days
        return schema_days
