"""One stack per environment (DESIGN §15): storage, queues, functions, API, runner role, alarms.

cdk-nag's AwsSolutions pack runs on every synth (``app.py``); the few findings that do not apply are
suppressed here, each next to the resource it concerns and each with the reason (:func:`suppressions`).
"""

from __future__ import annotations

from aws_cdk import App, Aspects, CfnOutput, Environment, Stack, Tags
from cdk_nag import AwsSolutionsChecks, NagPackSuppression, NagSuppressions
from constructs import Construct

from hivemind.store.schema import QueueRole, TableRole
from hivemind_infra.alarms import Alarms
from hivemind_infra.api import HttpApi
from hivemind_infra.config import LAMBDA_PYTHON_VERSION, ConfigError, EnvironmentConfig, load_environments
from hivemind_infra.functions import FUNCTION_SPECS, AssetPaths, Functions
from hivemind_infra.queues import Queues
from hivemind_infra.runner_access import RUNNER_READ_KEYS, RUNNER_WRITE_KEYS, RunnerAccess
from hivemind_infra.storage import Storage


class HivemindStack(Stack):
    def __init__(
        self, scope: Construct, construct_id: str, *, config: EnvironmentConfig, assets: AssetPaths
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            stack_name=config.stack_name,
            description=f"Hivemind rooms control plane ({config.name})",
            env=Environment(account=config.account, region=config.region),
            termination_protection=config.deletion_protection,
        )
        self.config = config
        Tags.of(self).add("hivemind:environment", config.name)
        self.storage = Storage(self, "Storage", config=config)
        self.queues = Queues(self, "Queues", config=config)
        self.functions = Functions(
            self, "Functions", config=config, storage=self.storage, queues=self.queues, assets=assets
        )
        self.http_api = HttpApi(self, "Http", config=config, handler=self.functions.api)
        self.runner_access = RunnerAccess(
            self, "Runners", config=config, storage=self.storage, queues=self.queues
        )
        self.alarms = Alarms(
            self,
            "Alarms",
            config=config,
            runs_queue=self.queues.queue(QueueRole.RUNS),
            runs_dlq=self.queues.queue(QueueRole.RUNS_DLQ),
            settlements_dlq=self.queues.queue(QueueRole.SETTLEMENTS_DLQ),
            api_server_errors=self.http_api.api.metric_server_error(),
            settle=self.functions.settle,
            janitor=self.functions.janitor,
            runners_table=self.storage.table(TableRole.RUNNERS),
        )
        self._outputs()
        self._suppress()

    def _outputs(self) -> None:
        outputs = {
            "ApiUrl": (self.http_api.url, "base URL of the API (hmctl profiles point here)"),
            "Prefix": (self.config.prefix, "deployment prefix: resources are <prefix>-<role>"),
            "BucketName": (self.storage.bucket.bucket_name, "the blob bucket (HIVEMIND_BUCKET)"),
            "RunsQueueUrl": (self.queues.queue(QueueRole.RUNS).queue_url, "runs queue (runners receive)"),
            "SettlementsQueueUrl": (
                self.queues.queue(QueueRole.SETTLEMENTS).queue_url,
                "settlements queue (runners send)",
            ),
            "RunnerRoleArn": (
                self.runner_access.role.role_arn,
                "runners assume this role; their base credentials are a dstack encrypted secret",
            ),
            "RunnerCount": (str(self.config.runner_count), "runner CVMs this environment expects"),
            "AlarmTopicArn": (self.alarms.topic.topic_arn, "subscribe operators here"),
        }
        for name, (value, description) in outputs.items():
            CfnOutput(self, name, value=value, description=description)

    def _suppress(self) -> None:
        for path, rules in suppressions(self).items():
            NagSuppressions.add_resource_suppressions_by_path(
                self,
                f"/{self.node.id}/{path}",
                [
                    NagPackSuppression(id=rule, reason=reason, applies_to=applies_to)
                    for rule, reason, applies_to in rules
                ],
                apply_to_children=False,
            )


OBJECT_WILDCARD_REASON = (
    "Object keys contain ids chosen at run time (rooms/<room>/..., runs/<run>/...), so IAM can only "
    "name them by a key pattern with a wildcard. Each pattern is built from the key functions of "
    "hivemind.store.schema and is the narrowest that layout allows."
)


def object_findings(
    stack: HivemindStack, statements: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]
) -> list[str]:
    """The IAM5 finding ids cdk-nag reports for the object key patterns of ``statements``."""
    bucket = stack.resolve(stack.get_logical_id(stack.storage.bucket.node.default_child))  # type: ignore[arg-type]
    patterns = sorted({pattern for _, key_patterns in statements for pattern in key_patterns})
    return [f"Resource::<{bucket}.Arn>/{pattern}" for pattern in patterns]


def suppressions(stack: HivemindStack) -> dict[str, list[tuple[str, str, list[str] | None]]]:
    """Construct path below the stack -> [(rule, reason, the exact findings it covers or None)]."""
    runtime_reason = (
        f"Pinned to Python {LAMBDA_PYTHON_VERSION}, the version the dependency layer is built for "
        "(scripts/build_layers.py, hivemind_infra.config.LAMBDA_PYTHON_VERSION); upgrade both together."
    )
    found: dict[str, list[tuple[str, str, list[str] | None]]] = {
        "Http/Api/DefaultRoute/Resource": [
            (
                "AwsSolutions-APIG4",
                "Every request is authenticated in the application with bearer tokens looked up by hash "
                "(DESIGN section 3): tenants, invitees and admins are not IAM or Cognito principals, and "
                "a Lambda authorizer would repeat the same lookup without adding a check.",
                None,
            ),
        ],
        "Runners/RunnerPolicy/Resource": [
            (
                "AwsSolutions-IAM5",
                OBJECT_WILDCARD_REASON,
                object_findings(stack, ((("read",), RUNNER_READ_KEYS), (("write",), RUNNER_WRITE_KEYS))),
            ),
        ],
    }
    for spec in FUNCTION_SPECS:
        name = spec.name.capitalize()
        found[f"Functions/{name}Function/Resource"] = [("AwsSolutions-L1", runtime_reason, None)]
        if spec.objects:
            found[f"Functions/{name}Role/DefaultPolicy/Resource"] = [
                ("AwsSolutions-IAM5", OBJECT_WILDCARD_REASON, object_findings(stack, spec.objects))
            ]
    return found


def build_app(
    *,
    context: dict[str, object],
    assets: AssetPaths,
    outdir: str | None = None,
    only: tuple[str, ...] = (),
) -> tuple[App, dict[str, HivemindStack]]:
    """The CDK app with one stack per environment of ``context`` (all, or those named in ``only``),
    with cdk-nag's AwsSolutions checks attached."""
    environments = load_environments(context)
    unknown = set(only) - set(environments)
    if unknown:
        raise ConfigError(f"unknown environments {sorted(unknown)}; cdk.json defines {sorted(environments)}")
    app = App(context=context, outdir=outdir)
    stacks = {
        name: HivemindStack(app, config.stack_name, config=config, assets=assets)
        for name, config in environments.items()
        if not only or name in only
    }
    Aspects.of(app).add(AwsSolutionsChecks(verbose=True))
    return app, stacks
