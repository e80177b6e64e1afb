"""Alarms worth waking someone for, all sent to one SNS topic (docs/operations.md says what to do).

- a run in the runs dead-letter queue: a run failed every delivery (the janitor fails it and releases
  its hold; a steady flow means runners crash);
- a settlement in the settlements dead-letter queue: a finished run is not billed (replay it);
- the oldest message in the runs queue is older than ``runs_backlog_alarm_age_s``: no runner is
  taking work;
- fewer live runners than ``runner_count``: every runner updates its row of the Runners table once per
  heartbeat (``runner_heartbeat_s``, 30 s by default) and nothing else updates that table, so the
  number of successful ``UpdateItem`` calls on it (``SampleCount`` of DynamoDB's
  ``SuccessfulRequestLatency``) counts heartbeats: with ``n`` runners, ``n * 300 / heartbeat`` per five
  minutes. The alarm fires below ``(runner_count - 0.5)`` runners' worth, and when there is no data;
- API 5xx responses above ``api_5xx_alarm_threshold`` in five minutes;
- any error of the settle or janitor functions.

The topic is encrypted with a customer-managed key (with rotation): CloudWatch cannot publish to a
topic under the AWS-managed SNS key, because that key's policy cannot grant CloudWatch.
"""

from __future__ import annotations

from aws_cdk import Aws, Duration, RemovalPolicy
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as actions
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from hivemind_infra.config import EnvironmentConfig

_PERIOD = Duration.minutes(5)
_AT_LEAST = cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD


class Alarms(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: EnvironmentConfig,
        runs_queue: sqs.IQueue,
        runs_dlq: sqs.IQueue,
        settlements_dlq: sqs.IQueue,
        api_server_errors: cloudwatch.IMetric,
        settle: lambda_.IFunction,
        janitor: lambda_.IFunction,
        runners_table: dynamodb.ITable,
    ) -> None:
        super().__init__(scope, construct_id)
        self.key = kms.Key(
            self,
            "TopicKey",
            description=f"{config.prefix}: encrypts the alarm topic",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.RETAIN if config.deletion_protection else RemovalPolicy.DESTROY,
        )
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchAlarmsPublish",
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey"],
                resources=["*"],  # in a key policy "*" means this key
                conditions={"StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID}},
            )
        )
        self.topic = sns.Topic(
            self, "Topic", topic_name=f"{config.prefix}-alarms", master_key=self.key, enforce_ssl=True
        )
        if config.alarm_email is not None:
            self.topic.add_subscription(subscriptions.EmailSubscription(config.alarm_email))
        self.alarms: dict[str, cloudwatch.Alarm] = {}

        self._alarm(
            "RunsDeadLetters",
            runs_dlq.metric_approximate_number_of_messages_visible(period=_PERIOD, statistic="Maximum"),
            threshold=1,
            description="A run failed every delivery and is in the runs dead-letter queue.",
        )
        self._alarm(
            "SettlementsDeadLetters",
            settlements_dlq.metric_approximate_number_of_messages_visible(
                period=_PERIOD, statistic="Maximum"
            ),
            threshold=1,
            description="A settlement kept failing: a finished run is not billed until it is replayed.",
        )
        self._alarm(
            "RunsBacklog",
            runs_queue.metric_approximate_age_of_oldest_message(period=_PERIOD, statistic="Maximum"),
            threshold=config.runs_backlog_alarm_age_s,
            description="Runs wait in the queue: no runner is taking work.",
        )
        beats = _PERIOD.to_seconds() / config.runner_heartbeat_s
        self._alarm(
            "RunnersMissing",
            cloudwatch.Metric(
                namespace="AWS/DynamoDB",
                metric_name="SuccessfulRequestLatency",
                dimensions_map={"TableName": runners_table.table_name, "Operation": "UpdateItem"},
                period=_PERIOD,
                statistic="SampleCount",
            ),
            threshold=(config.runner_count - 0.5) * beats,
            comparison=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
            # No heartbeat at all publishes no data point: that is every runner missing.
            missing=cloudwatch.TreatMissingData.BREACHING,
            evaluation_periods=2,
            description=f"Fewer than {config.runner_count} runners sent heartbeats in the last ten minutes.",
        )
        self._alarm(
            "ApiServerErrors",
            api_server_errors,
            threshold=config.api_5xx_alarm_threshold,
            description="The API answered with 5xx errors.",
        )
        self._alarm(
            "SettleErrors",
            settle.metric_errors(period=_PERIOD, statistic="Sum"),
            threshold=1,
            description="The settle function failed (messages are retried, then dead-lettered).",
        )
        self._alarm(
            "JanitorErrors",
            janitor.metric_errors(period=_PERIOD, statistic="Sum"),
            threshold=1,
            description="The janitor failed: holds, expiries and exports may be late.",
        )

    def _alarm(
        self,
        name: str,
        metric: cloudwatch.IMetric,
        *,
        threshold: float,
        description: str,
        comparison: cloudwatch.ComparisonOperator = _AT_LEAST,
        missing: cloudwatch.TreatMissingData = cloudwatch.TreatMissingData.NOT_BREACHING,
        evaluation_periods: int = 1,
    ) -> None:
        alarm = cloudwatch.Alarm(
            self,
            name,
            metric=metric,
            threshold=threshold,
            comparison_operator=comparison,
            evaluation_periods=evaluation_periods,
            treat_missing_data=missing,
            alarm_description=description,
        )
        alarm.add_alarm_action(actions.SnsAction(self.topic))
        alarm.add_ok_action(actions.SnsAction(self.topic))
        self.alarms[name] = alarm
