"""The runners' own IAM principal: a role with exactly what DESIGN §15 gives the data plane.

Runners run in dstack CVMs outside AWS, so they cannot use an instance profile. They assume this
role (``sts:AssumeRole``, one-hour sessions) with the base credentials of a principal the environment
trusts (``runner_trusted_principals``; the account root when none is configured), optionally with an
external id. The base credentials reach the CVM as dstack encrypted environment variables, which only
the attested app can decrypt. Rotation replaces those base credentials; this role stays the same
(docs/operations.md).

What the role may do, and nothing else:

- runs queue: receive, delete, change visibility (and resolve the queue URL);
- settlements queue: send (and resolve the queue URL);
- bucket: read ``rooms/*``, ``agents/*``, ``runs/*/envelope``; write ``runs/*/output``,
  ``runs/*/artifacts/*``, ``runs/*/receipt.json`` (and abort its own multipart uploads of them);
- Runs: ``GetItem`` and ``UpdateItem`` (every state change is a conditional update);
- Runners: ``PutItem`` (publish the attestation document), ``UpdateItem`` (heartbeat, status);
- Rooms, Agents, Tenants: read (re-verify manifests, unwrap with the bearer's wrap, list items, read
  tenant public keys and sealed provider keys);
- Nonces: ``UpdateItem`` (the replay guard is one conditional update that records the nonce).

Not the ledger, accounts, credentials, credit codes or prices; no write to rooms or room objects.
"""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_iam as iam
from constructs import Construct

from hivemind.store import schema
from hivemind.store.schema import QueueRole, TableRole
from hivemind_infra.config import EnvironmentConfig
from hivemind_infra.functions import GET, PUT, QUERY, UPDATE, TableGrant
from hivemind_infra.queues import Queues
from hivemind_infra.storage import Storage, key_pattern

RUNNER_TABLES = (
    TableGrant(TableRole.RUNS, (GET, UPDATE)),
    TableGrant(TableRole.RUNNERS, (PUT, UPDATE)),
    TableGrant(TableRole.ROOMS, (GET, QUERY)),
    TableGrant(TableRole.AGENTS, (GET,)),
    TableGrant(TableRole.TENANTS, (GET,)),
    TableGrant(TableRole.NONCES, (UPDATE,)),
)
RUNNER_READ_KEYS = (
    key_pattern(schema.room_prefix, 1, "*"),
    key_pattern(schema.agent_prefix, 1, "*"),
    key_pattern(schema.run_envelope_key, 1),
)
RUNNER_WRITE_KEYS = (
    key_pattern(schema.run_output_key, 1),
    key_pattern(schema.run_artifact_key, 2),
    key_pattern(schema.run_receipt_key, 1),
)


class RunnerAccess(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: EnvironmentConfig,
        storage: Storage,
        queues: Queues,
    ) -> None:
        super().__init__(scope, construct_id)
        principals: list[iam.IPrincipal] = [iam.ArnPrincipal(arn) for arn in config.runner_trusted_principals]
        if not principals:
            principals = [iam.AccountRootPrincipal()]
        assumed_by: iam.IPrincipal = iam.CompositePrincipal(*principals)
        if config.runner_external_id is not None:
            assumed_by = iam.PrincipalWithConditions(
                assumed_by, {"StringEquals": {"sts:ExternalId": config.runner_external_id}}
            )
        self.role = iam.Role(
            self,
            "RunnerRole",
            role_name=f"{config.prefix}-runner",
            description="Hivemind agent runners (dstack CVMs): queues, run objects, run state",
            assumed_by=assumed_by,
            max_session_duration=Duration.hours(1),
        )
        policy = iam.Policy(self, "RunnerPolicy", policy_name=f"{config.prefix}-runner")
        runs = queues.queue(QueueRole.RUNS)
        settlements = queues.queue(QueueRole.SETTLEMENTS)
        policy.add_statements(
            iam.PolicyStatement(
                sid="TakeRuns",
                actions=[
                    "sqs:ChangeMessageVisibility",
                    "sqs:DeleteMessage",
                    "sqs:GetQueueUrl",
                    "sqs:ReceiveMessage",
                ],
                resources=[runs.queue_arn],
            ),
            iam.PolicyStatement(
                sid="SendSettlements",
                actions=["sqs:GetQueueUrl", "sqs:SendMessage"],
                resources=[settlements.queue_arn],
            ),
        )
        policy.add_statements(
            storage.object_statement(
                ["s3:GetObject", "s3:GetObjectVersion"],
                RUNNER_READ_KEYS,
                sid="ReadRoomAgentAndEnvelopeObjects",
            ),
            storage.object_statement(
                ["s3:AbortMultipartUpload", "s3:PutObject"], RUNNER_WRITE_KEYS, sid="WriteRunResults"
            ),
        )
        for grant in RUNNER_TABLES:
            policy.add_statements(storage.table_statement(grant.role, grant.actions, indexes=grant.indexes))
        policy.attach_to_role(self.role)
        self.policy = policy
