"""The runs and settlements queues and their dead-letter queues, declared from the schema.

Timeouts, retention, long polling and the redrive (dead-letter queue and maximum receive count) come
from :data:`hivemind.store.schema.SCHEMA`; the stack adds SQS-managed encryption (as the local
bootstrap does) and a policy that refuses requests not made over TLS.
"""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from hivemind.store.schema import SCHEMA, QueueRole, QueueSpec, resource_name
from hivemind_infra.config import EnvironmentConfig


class Queues(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, config: EnvironmentConfig) -> None:
        super().__init__(scope, construct_id)
        self.queues: dict[QueueRole, sqs.Queue] = {}
        for spec in SCHEMA.queues_in_creation_order():
            self.queues[spec.role] = self._queue(config, spec)

    def queue(self, role: QueueRole) -> sqs.Queue:
        return self.queues[role]

    def _queue(self, config: EnvironmentConfig, spec: QueueSpec) -> sqs.Queue:
        dead_letter = None
        if spec.dead_letter is not None:
            if spec.max_receive_count is None:
                raise ValueError(f"queue {spec.role}: a dead-letter queue needs max_receive_count")
            dead_letter = sqs.DeadLetterQueue(
                queue=self.queues[spec.dead_letter], max_receive_count=spec.max_receive_count
            )
        return sqs.Queue(
            self,
            f"Queue-{spec.role.value}",
            queue_name=resource_name(config.prefix, spec.role.value),
            visibility_timeout=Duration.seconds(spec.visibility_timeout_s),
            retention_period=Duration.seconds(spec.retention_s),
            receive_message_wait_time=Duration.seconds(spec.receive_wait_s),
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            dead_letter_queue=dead_letter,
            # Messages are run ids and settlement usage: the tables and the ledger are the record.
            removal_policy=RemovalPolicy.DESTROY,
        )
