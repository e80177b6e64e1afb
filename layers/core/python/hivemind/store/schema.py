"""The one definition of every table, the bucket and the queues (DESIGN §9, §15).

This module is plain data on purpose: the CDK stack reads it to declare the cloud resources, and
:func:`hivemind.store.bootstrap.create_all` reads it to create the same resources on a moto server, so
local and cloud cannot drift. Physical names are ``<prefix>-<role>``; the prefix names a deployment.

The S3 key layout is here too, as functions, so that no caller ever formats a key by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum

from hivemind.errors import InvalidInput


class AttrType(StrEnum):
    """DynamoDB scalar types a key attribute may have."""

    STRING = "S"
    NUMBER = "N"


@dataclass(frozen=True, slots=True)
class KeyAttr:
    name: str
    type: AttrType = AttrType.STRING


@dataclass(frozen=True, slots=True)
class GlobalIndex:
    """A global secondary index; projection is always ALL (items are small, reads want whole records)."""

    name: str
    partition_key: KeyAttr
    sort_key: KeyAttr | None = None


class TableRole(StrEnum):
    CREDENTIALS = "credentials"
    TENANTS = "tenants"
    ROOMS = "rooms"
    AGENTS = "agents"
    RUNS = "runs"
    RUNNERS = "runners"
    ACCOUNTS = "accounts"
    LEDGER = "ledger"
    CREDIT_CODES = "credit-codes"
    PRICES = "prices"
    AUDIT = "audit"
    NONCES = "nonces"
    BILLING_MARKERS = "billing-markers"
    RATE_LIMITS = "rate-limits"
    IDEMPOTENCY = "idempotency"


@dataclass(frozen=True, slots=True)
class TableSpec:
    role: TableRole
    partition_key: KeyAttr
    sort_key: KeyAttr | None = None
    indexes: tuple[GlobalIndex, ...] = ()
    ttl_attribute: str | None = None
    billing_mode: str = "PAY_PER_REQUEST"
    point_in_time_recovery: bool = True
    description: str = ""

    def attribute_definitions(self) -> tuple[KeyAttr, ...]:
        """Every attribute used in a key of the table or an index, once each."""
        seen: dict[str, KeyAttr] = {}
        candidates = [self.partition_key, self.sort_key]
        for index in self.indexes:
            candidates += [index.partition_key, index.sort_key]
        for attr in candidates:
            if attr is None:
                continue
            if attr.name in seen and seen[attr.name].type is not attr.type:
                raise ValueError(f"{self.role}: attribute {attr.name} declared with two types")
            seen[attr.name] = attr
        return tuple(seen.values())


@dataclass(frozen=True, slots=True)
class LifecycleRule:
    """Expire current objects under ``prefix`` after ``expire_days`` (None: never)."""

    rule_id: str
    prefix: str
    expire_days: int | None


@dataclass(frozen=True, slots=True)
class BucketSpec:
    role: str = "blobs"
    versioned: bool = True
    block_public_access: bool = True
    enforce_tls: bool = True
    # Server-side encryption with S3-managed keys; contents are HMS1 ciphertext anyway.
    encryption: str = "AES256"
    lifecycle: tuple[LifecycleRule, ...] = ()
    noncurrent_version_expire_days: int = 30
    abort_incomplete_multipart_days: int = 1


class QueueRole(StrEnum):
    RUNS = "runs"
    RUNS_DLQ = "runs-dlq"
    SETTLEMENTS = "settlements"
    SETTLEMENTS_DLQ = "settlements-dlq"


@dataclass(frozen=True, slots=True)
class QueueSpec:
    role: QueueRole
    visibility_timeout_s: int
    retention_s: int
    receive_wait_s: int = 20
    dead_letter: QueueRole | None = None
    max_receive_count: int | None = None
    description: str = ""


@dataclass(frozen=True, slots=True)
class Schema:
    tables: tuple[TableSpec, ...]
    bucket: BucketSpec
    queues: tuple[QueueSpec, ...] = field(default=())

    def table(self, role: TableRole) -> TableSpec:
        for spec in self.tables:
            if spec.role is role:
                return spec
        raise KeyError(f"no table with role {role}")

    def queue(self, role: QueueRole) -> QueueSpec:
        for spec in self.queues:
            if spec.role is role:
                return spec
        raise KeyError(f"no queue with role {role}")

    def queues_in_creation_order(self) -> tuple[QueueSpec, ...]:
        """Dead-letter queues first: a queue's redrive policy names an existing DLQ."""
        return tuple(sorted(self.queues, key=lambda spec: spec.dead_letter is not None))


# --- index names used by the repositories ---------------------------------------------------------

CREDENTIALS_BY_TENANT = "by-tenant"
CREDENTIALS_BY_ROOM = "by-room"
ROOMS_BY_TENANT = "by-tenant"
AGENTS_BY_TENANT = "by-tenant"
RUNS_BY_ROOM = "by-room"
RUNS_BY_CALLER = "by-caller"
RUNS_OPEN = "open-runs"
RUNNERS_BY_HEARTBEAT = "by-heartbeat"
LEDGER_BY_DAY = "by-day"

# Maximum run timeout is 600 s (models.DEFAULT_BUDGET_LIMITS); the runs queue's visibility timeout
# leaves room for image builds and output upload before SQS redelivers to another runner.
RUNS_VISIBILITY_TIMEOUT_S = 900
RUNS_MAX_RECEIVE_COUNT = 3
SETTLEMENTS_MAX_RECEIVE_COUNT = 5
RUN_OBJECTS_TTL_DAYS = 30

_S = AttrType.STRING
_N = AttrType.NUMBER
_DAY_S = 86_400

SCHEMA = Schema(
    tables=(
        TableSpec(
            TableRole.CREDENTIALS,
            KeyAttr("auth_hash"),
            indexes=(
                GlobalIndex(CREDENTIALS_BY_TENANT, KeyAttr("tenant_id"), KeyAttr("token_id")),
                GlobalIndex(CREDENTIALS_BY_ROOM, KeyAttr("room_id"), KeyAttr("token_id")),
            ),
            description="sha256(auth) of every tenant, invite and admin key; constraints, uses, revocation",
        ),
        TableSpec(TableRole.TENANTS, KeyAttr("tenant_id"), description="accounts: name, public keys, status"),
        TableSpec(
            TableRole.ROOMS,
            KeyAttr("room_id"),
            KeyAttr("sk"),
            # Sparse: only the manifest item carries tenant_id.
            indexes=(GlobalIndex(ROOMS_BY_TENANT, KeyAttr("tenant_id"), KeyAttr("room_id")),),
            description="manifest (signed envelope, revision, status), wrap#<bearer>, item#<id>",
        ),
        TableSpec(
            TableRole.AGENTS,
            KeyAttr("agent_id"),
            indexes=(GlobalIndex(AGENTS_BY_TENANT, KeyAttr("tenant_id"), KeyAttr("agent_id")),),
            description="agent source objects, digests, visibility, image digest",
        ),
        TableSpec(
            TableRole.RUNS,
            KeyAttr("run_id"),
            indexes=(
                GlobalIndex(RUNS_BY_ROOM, KeyAttr("room_id"), KeyAttr("created_at", _N)),
                GlobalIndex(RUNS_BY_CALLER, KeyAttr("caller_id"), KeyAttr("created_at", _N)),
                # Sparse: open_status exists only while a run is pending or running (janitor sweeps).
                GlobalIndex(RUNS_OPEN, KeyAttr("open_status"), KeyAttr("updated_at", _N)),
            ),
            description="run state machine, budgets, payer, hold, usage, receipt and output keys",
        ),
        TableSpec(
            TableRole.RUNNERS,
            KeyAttr("runner_id"),
            indexes=(GlobalIndex(RUNNERS_BY_HEARTBEAT, KeyAttr("fleet"), KeyAttr("heartbeat_at", _N)),),
            description="published attestation documents and heartbeats",
        ),
        TableSpec(TableRole.ACCOUNTS, KeyAttr("tenant_id"), description="balance, held, ledger chain head"),
        TableSpec(
            TableRole.LEDGER,
            KeyAttr("tenant_id"),
            KeyAttr("seq", _N),
            indexes=(GlobalIndex(LEDGER_BY_DAY, KeyAttr("day"), KeyAttr("created_at", _N)),),
            description="append-only hash-chained billing entries per tenant",
        ),
        TableSpec(
            TableRole.CREDIT_CODES, KeyAttr("code_hash"), description="prepaid credit codes (hash only)"
        ),
        TableSpec(
            TableRole.PRICES,
            KeyAttr("provider"),
            KeyAttr("model"),
            description="micro-USD per million prompt/completion tokens; the runner fee row",
        ),
        TableSpec(
            TableRole.AUDIT,
            KeyAttr("room_id"),
            KeyAttr("seq", _N),
            description="hash-chained room events",
        ),
        TableSpec(
            TableRole.NONCES,
            KeyAttr("nonce"),
            ttl_attribute="purge_at",
            description="run envelope nonces already opened (replay protection)",
        ),
        TableSpec(
            TableRole.BILLING_MARKERS,
            KeyAttr("marker"),
            description="per-run holds and settlements, credit code redemptions, idempotency keys of grants",
        ),
        TableSpec(
            TableRole.RATE_LIMITS,
            KeyAttr("window_key"),
            ttl_attribute="purge_at",
            description="fixed-window request counters per caller",
        ),
        TableSpec(
            TableRole.IDEMPOTENCY,
            KeyAttr("id"),
            ttl_attribute="expiration",
            description="AWS Lambda Powertools idempotency records (its default attribute names)",
        ),
    ),
    bucket=BucketSpec(
        lifecycle=(LifecycleRule("expire-run-objects", "runs/", RUN_OBJECTS_TTL_DAYS),),
    ),
    queues=(
        QueueSpec(
            QueueRole.RUNS_DLQ,
            visibility_timeout_s=60,
            retention_s=14 * _DAY_S,
            description="runs that failed every delivery; the janitor marks them failed",
        ),
        QueueSpec(
            QueueRole.RUNS,
            visibility_timeout_s=RUNS_VISIBILITY_TIMEOUT_S,
            retention_s=4 * _DAY_S,
            dead_letter=QueueRole.RUNS_DLQ,
            max_receive_count=RUNS_MAX_RECEIVE_COUNT,
            description="run ids for the runners",
        ),
        QueueSpec(
            QueueRole.SETTLEMENTS_DLQ,
            visibility_timeout_s=60,
            retention_s=14 * _DAY_S,
            description="settlements that kept failing; operators replay them",
        ),
        QueueSpec(
            QueueRole.SETTLEMENTS,
            visibility_timeout_s=120,
            retention_s=4 * _DAY_S,
            dead_letter=QueueRole.SETTLEMENTS_DLQ,
            max_receive_count=SETTLEMENTS_MAX_RECEIVE_COUNT,
            description="finished runs to settle (idempotent per run)",
        ),
    ),
)


# --- names -----------------------------------------------------------------------------------------

PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9-]{1,38}[a-z0-9]$")


def resource_name(prefix: str, role: str) -> str:
    """``<prefix>-<role>``: the physical name of a table, queue or (by default) the bucket."""
    if not PREFIX_PATTERN.fullmatch(prefix) or "--" in prefix:
        raise InvalidInput(
            f"deployment prefix {prefix!r} must be 3-40 lowercase letters, digits and single hyphens, "
            "starting with a letter"
        )
    return f"{prefix}-{role}"


# --- S3 key layout (DESIGN §9) ----------------------------------------------------------------------

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _segment(value: str, what: str) -> str:
    # Ids and names become single path segments: no slash, no "..", no leading dot.
    if not isinstance(value, str) or not _SEGMENT.fullmatch(value) or ".." in value:
        raise InvalidInput(f"{what} {value!r} cannot be part of a storage key")
    return value


def room_prefix(room_id: str) -> str:
    return f"rooms/{_segment(room_id, 'room id')}/"


def item_key(room_id: str, item_id: str) -> str:
    return f"{room_prefix(room_id)}items/{_segment(item_id, 'item id')}"


def agent_prefix(agent_id: str) -> str:
    return f"agents/{_segment(agent_id, 'agent id')}/"


def agent_source_key(agent_id: str) -> str:
    return f"{agent_prefix(agent_id)}source"


def run_prefix(run_id: str) -> str:
    return f"runs/{_segment(run_id, 'run id')}/"


def run_envelope_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}envelope"


def run_output_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}output"


def run_artifact_key(run_id: str, name: str) -> str:
    return f"{run_prefix(run_id)}artifacts/{_segment(name, 'artifact name')}"


def run_receipt_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}receipt.json"


LEDGER_EXPORT_PREFIX = "exports/ledger/"


def ledger_export_key(day: date) -> str:
    return f"{LEDGER_EXPORT_PREFIX}{day.isoformat()}.csv"


def bucket_tls_policy(bucket_name: str) -> dict[str, object]:
    """Bucket policy that refuses every request not made over TLS."""
    arn = f"arn:aws:s3:::{bucket_name}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "DenyInsecureTransport",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [arn, f"{arn}/*"],
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            }
        ],
    }
