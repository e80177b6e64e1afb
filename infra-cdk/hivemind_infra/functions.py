"""The three Lambda functions, their layers, log groups and least-privilege roles.

- ``api``: the FastAPI app behind Mangum (``hivemind_functions.api.handler.handler``);
- ``settle``: the settlements queue consumer with partial batch failures
  (``hivemind_functions.settle.handler``);
- ``janitor``: the schedule (``hivemind_functions.janitor.handler``).

Code: ``functions/`` is the function asset, ``layers/core/`` the core layer (its ``python/`` folder is
the Lambda layer layout) and ``build/layers/deps/`` the third-party dependency layer that
``scripts/build_layers.py`` builds for the Lambda platform.

Each function has its own role with no managed policy: a log statement for its own log group and one
statement per table it uses, listing the exact actions and the exact indexes (``ACCESS`` below).
A transaction (``TransactWriteItems``) is authorised per item by the put, update, delete and
condition-check actions it contains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_event_sources as event_sources
from aws_cdk import aws_logs as logs
from constructs import Construct

from hivemind.store import schema
from hivemind.store.schema import QueueRole, TableRole
from hivemind_infra.config import LAMBDA_PYTHON_VERSION, EnvironmentConfig
from hivemind_infra.queues import Queues
from hivemind_infra.storage import Storage, key_pattern

GET = "dynamodb:GetItem"
QUERY = "dynamodb:Query"
SCAN = "dynamodb:Scan"
PUT = "dynamodb:PutItem"
UPDATE = "dynamodb:UpdateItem"
DELETE = "dynamodb:DeleteItem"
BATCH_WRITE = "dynamodb:BatchWriteItem"
CHECK = "dynamodb:ConditionCheckItem"

RUNTIME: lambda_.Runtime = getattr(lambda_.Runtime, "PYTHON_" + LAMBDA_PYTHON_VERSION.replace(".", "_"))
ARCHITECTURE = lambda_.Architecture.X86_64
_ASSET_EXCLUDE = ["**/__pycache__", "**/*.pyc", "**/.pytest_cache", "**/.ruff_cache"]


@dataclass(frozen=True)
class TableGrant:
    role: TableRole
    actions: tuple[str, ...]
    indexes: tuple[str, ...] = ()


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    handler: str
    memory_mb: int
    timeout_s: int
    description: str
    tables: tuple[TableGrant, ...]
    # Object actions by key pattern, and folder prefixes it may list (for deleting a folder).
    objects: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = ()
    list_prefixes: tuple[str, ...] = ()


ROOMS_ALL = key_pattern(schema.room_prefix, 1, "*")
ROOM_ITEMS = key_pattern(schema.item_key, 2)
AGENTS_ALL = key_pattern(schema.agent_prefix, 1, "*")
AGENT_SOURCES = key_pattern(schema.agent_source_key, 1)
RUNS_ALL = key_pattern(schema.run_prefix, 1, "*")
RUN_ENVELOPES = key_pattern(schema.run_envelope_key, 1)
LEDGER_EXPORTS = schema.LEDGER_EXPORT_PREFIX + "*"
ROOMS_FOLDER = key_pattern(schema.room_prefix, 1).split("*")[0]
AGENTS_FOLDER = key_pattern(schema.agent_prefix, 1).split("*")[0]

_READ_OBJECT = ("s3:GetObject", "s3:GetObjectVersion")
_DELETE_OBJECT = ("s3:DeleteObject", "s3:DeleteObjectVersion")
# What closing a hold needs (billing.settle / billing.release): the ledger transaction of DESIGN §11.
_CLOSE_HOLDS = (
    TableGrant(TableRole.ACCOUNTS, (GET, UPDATE)),
    TableGrant(TableRole.LEDGER, (GET, PUT, QUERY)),
    TableGrant(TableRole.BILLING_MARKERS, (GET, UPDATE)),
)

API = FunctionSpec(
    name="api",
    handler="hivemind_functions.api.handler.handler",
    memory_mb=1024,
    # HTTP API integrations time out at 30 s; long polls wait at most 20 s.
    timeout_s=29,
    description="Hivemind control plane API (FastAPI behind Mangum)",
    tables=(
        TableGrant(
            TableRole.CREDENTIALS,
            (GET, PUT, UPDATE, DELETE, QUERY),
            (schema.CREDENTIALS_BY_TENANT, schema.CREDENTIALS_BY_ROOM),
        ),
        TableGrant(TableRole.TENANTS, (GET, PUT, UPDATE, SCAN)),
        TableGrant(
            TableRole.ROOMS, (GET, PUT, UPDATE, DELETE, QUERY, BATCH_WRITE, CHECK), (schema.ROOMS_BY_TENANT,)
        ),
        TableGrant(TableRole.AGENTS, (GET, PUT, UPDATE, DELETE, QUERY), (schema.AGENTS_BY_TENANT,)),
        TableGrant(TableRole.RUNS, (GET, PUT, UPDATE, QUERY), (schema.RUNS_BY_ROOM, schema.RUNS_BY_CALLER)),
        TableGrant(TableRole.RUNNERS, (GET, QUERY), (schema.RUNNERS_BY_HEARTBEAT,)),
        TableGrant(TableRole.ACCOUNTS, (GET, UPDATE, SCAN)),
        TableGrant(TableRole.LEDGER, (GET, PUT, QUERY), (schema.LEDGER_BY_DAY,)),
        TableGrant(TableRole.BILLING_MARKERS, (GET, PUT, UPDATE)),
        TableGrant(TableRole.CREDIT_CODES, (GET, PUT, UPDATE, SCAN)),
        TableGrant(TableRole.PRICES, (GET, PUT, DELETE, QUERY, SCAN)),
        TableGrant(TableRole.AUDIT, (GET, PUT, QUERY)),
        TableGrant(TableRole.RATE_LIMITS, (UPDATE,)),
        # Powertools idempotency of run submissions.
        TableGrant(TableRole.IDEMPOTENCY, (GET, PUT, UPDATE, DELETE)),
    ),
    objects=(
        # Verifying uploads, serving inspectable agent files, presigned downloads of outputs/exports.
        (_READ_OBJECT, (ROOMS_ALL, AGENTS_ALL, RUNS_ALL, LEDGER_EXPORTS)),
        # Presigned uploads of sealed items and agent sources; run envelopes.
        (("s3:PutObject",), (ROOM_ITEMS, AGENT_SOURCES, RUN_ENVELOPES)),
        # Deleting a room or an agent removes every version of its objects.
        (_DELETE_OBJECT, (ROOMS_ALL, AGENTS_ALL)),
    ),
    list_prefixes=(ROOMS_FOLDER, AGENTS_FOLDER),
)

SETTLE = FunctionSpec(
    name="settle",
    handler="hivemind_functions.settle.handler",
    memory_mb=512,
    # AWS recommends a queue visibility timeout of six times the function timeout.
    timeout_s=schema.SCHEMA.queue(QueueRole.SETTLEMENTS).visibility_timeout_s // 6,
    description="Hivemind settlement of finished runs (SQS, partial batch failures)",
    tables=(
        TableGrant(TableRole.RUNS, (GET,)),
        TableGrant(TableRole.PRICES, (GET, QUERY)),
        *_CLOSE_HOLDS,
    ),
)

JANITOR = FunctionSpec(
    name="janitor",
    handler="hivemind_functions.janitor.handler",
    memory_mb=512,
    timeout_s=240,
    description="Hivemind janitor: expired runs, released holds, abandoned uploads, ledger export",
    tables=(
        TableGrant(TableRole.RUNS, (GET, UPDATE, QUERY), (schema.RUNS_OPEN,)),
        TableGrant(TableRole.ACCOUNTS, (GET, UPDATE)),
        # The daily export reads a day's entries through the by-day index.
        TableGrant(TableRole.LEDGER, (GET, PUT, QUERY), (schema.LEDGER_BY_DAY,)),
        # Stale holds, abandoned item and agent uploads: no index lists them, so a segmented scan.
        TableGrant(TableRole.BILLING_MARKERS, (GET, UPDATE, SCAN)),
        TableGrant(TableRole.ROOMS, (GET, SCAN, DELETE)),
        TableGrant(TableRole.AGENTS, (GET, SCAN, DELETE)),
    ),
    objects=(
        # An abandoned item is one object; an abandoned agent is its whole folder.
        (_DELETE_OBJECT, (ROOM_ITEMS, AGENTS_ALL)),
        # The export checks whether the day was written already, then writes it.
        (("s3:GetObject", "s3:PutObject"), (LEDGER_EXPORTS,)),
    ),
    list_prefixes=(ROOMS_FOLDER, AGENTS_FOLDER),
)

FUNCTION_SPECS = (API, SETTLE, JANITOR)


@dataclass(frozen=True)
class AssetPaths:
    """Where the code comes from; app.py fills it from the repository, tests may point elsewhere."""

    functions: Path
    core_layer: Path
    deps_layer: Path

    def check(self) -> None:
        for what, path, inner in (
            ("functions", self.functions, "hivemind_functions"),
            ("core layer", self.core_layer, "python/hivemind"),
            ("dependency layer", self.deps_layer, "python"),
        ):
            if not (path / inner).is_dir():
                hint = " (run `make layers` first)" if what == "dependency layer" else ""
                raise FileNotFoundError(f"{what}: {path / inner} is missing{hint}")


class Functions(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: EnvironmentConfig,
        storage: Storage,
        queues: Queues,
        assets: AssetPaths,
    ) -> None:
        super().__init__(scope, construct_id)
        assets.check()
        self.config = config
        self.storage = storage
        self.core_layer = lambda_.LayerVersion(
            self,
            "CoreLayer",
            code=lambda_.Code.from_asset(str(assets.core_layer), exclude=_ASSET_EXCLUDE),
            compatible_runtimes=[RUNTIME],
            compatible_architectures=[ARCHITECTURE],
            description="hivemind core library (layers/core)",
            removal_policy=RemovalPolicy.RETAIN,
        )
        self.deps_layer = lambda_.LayerVersion(
            self,
            "DepsLayer",
            code=lambda_.Code.from_asset(str(assets.deps_layer), exclude=_ASSET_EXCLUDE),
            compatible_runtimes=[RUNTIME],
            compatible_architectures=[ARCHITECTURE],
            description="third-party dependencies of the control plane (scripts/build_layers.py)",
            removal_policy=RemovalPolicy.RETAIN,
        )
        self._code = lambda_.Code.from_asset(str(assets.functions), exclude=_ASSET_EXCLUDE)
        bucket_name = storage.bucket.bucket_name
        self.environment = {
            "HIVEMIND_PREFIX": config.prefix,
            "HIVEMIND_REGION": config.region,
            "HIVEMIND_BUCKET": bucket_name,
            **config.function_environment(),
            "HIVEMIND_LOG_LEVEL": "INFO",
            "POWERTOOLS_METRICS_NAMESPACE": "Hivemind",
            # Tracer stays off: X-Ray would need xray:PutTraceSegments on "*".
            "POWERTOOLS_TRACE_DISABLED": "true",
        }
        self.api = self._function(API)
        self.settle = self._function(SETTLE)
        self.janitor = self._function(JANITOR)

        runs = queues.queue(QueueRole.RUNS)
        self.api.role.add_to_principal_policy(  # type: ignore[union-attr]
            iam.PolicyStatement(actions=["sqs:GetQueueUrl", "sqs:SendMessage"], resources=[runs.queue_arn])
        )
        settlements = queues.queue(QueueRole.SETTLEMENTS)
        self.settle.add_event_source(
            event_sources.SqsEventSource(
                settlements,
                batch_size=10,
                report_batch_item_failures=True,
                # Settlements of one tenant contend on its ledger head; a few at a time is plenty.
                max_concurrency=5,
            )
        )
        runs_dlq = queues.queue(QueueRole.RUNS_DLQ)
        self.janitor.role.add_to_principal_policy(  # type: ignore[union-attr]
            iam.PolicyStatement(
                actions=[
                    "sqs:ChangeMessageVisibility",
                    "sqs:DeleteMessage",
                    "sqs:GetQueueUrl",
                    "sqs:ReceiveMessage",
                ],
                resources=[runs_dlq.queue_arn],
            )
        )
        self.schedule = events.Rule(
            self,
            "JanitorSchedule",
            description="Runs the Hivemind janitor",
            schedule=events.Schedule.rate(Duration.minutes(config.janitor_interval_minutes)),
            targets=[targets.LambdaFunction(self.janitor, retry_attempts=2, max_event_age=Duration.hours(1))],
        )

    def _function(self, spec: FunctionSpec) -> lambda_.Function:
        name = f"{self.config.prefix}-{spec.name}"
        log_group = logs.LogGroup(
            self,
            f"{spec.name.capitalize()}Logs",
            log_group_name=f"/aws/lambda/{name}",
            retention=log_retention(self.config.log_retention_days),
            removal_policy=RemovalPolicy.RETAIN if self.config.deletion_protection else RemovalPolicy.DESTROY,
        )
        role = iam.Role(
            self,
            f"{spec.name.capitalize()}Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"{name}: least privilege for the {spec.name} function",
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                actions=["logs:CreateLogStream", "logs:PutLogEvents"], resources=[log_group.log_group_arn]
            )
        )
        for grant in spec.tables:
            role.add_to_principal_policy(
                self.storage.table_statement(grant.role, grant.actions, indexes=grant.indexes)
            )
        for actions, patterns in spec.objects:
            role.add_to_principal_policy(self.storage.object_statement(actions, patterns))
        if spec.list_prefixes:
            role.add_to_principal_policy(self.storage.listing_statement(spec.list_prefixes))
        return lambda_.Function(
            self,
            f"{spec.name.capitalize()}Function",
            function_name=name,
            description=spec.description,
            runtime=RUNTIME,
            architecture=ARCHITECTURE,
            handler=spec.handler,
            code=self._code,
            layers=[self.core_layer, self.deps_layer],
            memory_size=spec.memory_mb,
            timeout=Duration.seconds(spec.timeout_s),
            role=role,
            log_group=log_group,
            environment={**self.environment, "POWERTOOLS_SERVICE_NAME": name},
        )


_RETENTION = {
    1: logs.RetentionDays.ONE_DAY,
    3: logs.RetentionDays.THREE_DAYS,
    5: logs.RetentionDays.FIVE_DAYS,
    7: logs.RetentionDays.ONE_WEEK,
    14: logs.RetentionDays.TWO_WEEKS,
    30: logs.RetentionDays.ONE_MONTH,
    60: logs.RetentionDays.TWO_MONTHS,
    90: logs.RetentionDays.THREE_MONTHS,
    120: logs.RetentionDays.FOUR_MONTHS,
    150: logs.RetentionDays.FIVE_MONTHS,
    180: logs.RetentionDays.SIX_MONTHS,
    365: logs.RetentionDays.ONE_YEAR,
    400: logs.RetentionDays.THIRTEEN_MONTHS,
    545: logs.RetentionDays.EIGHTEEN_MONTHS,
    731: logs.RetentionDays.TWO_YEARS,
    1096: logs.RetentionDays.THREE_YEARS,
    1827: logs.RetentionDays.FIVE_YEARS,
    2192: logs.RetentionDays.SIX_YEARS,
    2557: logs.RetentionDays.SEVEN_YEARS,
    2922: logs.RetentionDays.EIGHT_YEARS,
    3288: logs.RetentionDays.NINE_YEARS,
    3653: logs.RetentionDays.TEN_YEARS,
}


def log_retention(days: int) -> logs.RetentionDays:
    return _RETENTION[days]
