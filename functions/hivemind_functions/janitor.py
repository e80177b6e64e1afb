"""The janitor: scheduled housekeeping of runs, holds, abandoned uploads and the ledger export (DESIGN §7,
§11). Every duty is idempotent (running it twice, or two janitors at once, changes nothing more) and
bounded per invocation; each logs what it did as structured JSON and the invocation returns a report.

Duties, in order:

1. **expire pending runs** idle past ``HIVEMIND_RUN_PENDING_TTL_S`` (status ``expired``, error
   ``run_expired``) and release their holds;
2. **fail running runs** whose runner stopped reporting for ``HIVEMIND_RUN_RUNNING_TTL_S`` (``failed``,
   ``runner_lost``) and release their holds;
3. **drain the runs DLQ**: a run message SQS gave up on after its maximum receives; the run is marked
   ``failed`` (``runner_unavailable``) and its hold released;
4. **sweep stale holds**: a run hold still held an hour after its run finished (the settlement never
   came) or whose run row never appeared (a submission interrupted after its hold) is released;
5. **delete abandoned uploads**: item and agent records never committed within
   ``HIVEMIND_UPLOAD_TTL_S``, and their objects (every version);
6. **export yesterday's ledger** to ``exports/ledger/YYYY-MM-DD.csv`` once the day is closed.

Duties 4 and 5 look for records no index lists, so they scan: each invocation scans one segment of a
parallel scan (``segment = invocation time / interval mod segments``), so the whole table is covered
every ``segments`` invocations and no invocation reads more than one segment.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, Field

from hivemind.errors import Conflict, NotFound
from hivemind.models import RunStatus, StrictModel
from hivemind.store import AwsClients, Store
from hivemind.store.agents import AgentState
from hivemind.store.base import deserialize, raise_store_error, serialize
from hivemind.store.billing import HoldState
from hivemind.store.rooms import ITEM_PREFIX, ItemState
from hivemind.store.runs import RunResult
from hivemind.store.schema import QueueRole, TableRole, agent_prefix, item_key, ledger_export_key
from hivemind_functions.settings import FunctionSettings

if TYPE_CHECKING:
    from aws_lambda_powertools import Logger, Metrics

SERVICE_NAME = "hivemind-janitor"
METRICS_NAMESPACE = "Hivemind"
_DAY_S = 86_400


class JanitorLimits(BaseModel):
    """How much one invocation may do."""

    runs_per_sweep: int = Field(default=100, ge=1, le=1000)
    dlq_batches: int = Field(default=5, ge=0, le=100)
    scan_segments: int = Field(default=256, ge=1, le=1_000_000)
    scan_pages_per_segment: int = Field(default=50, ge=1, le=1000)
    # How often the schedule fires: picks the segment of this invocation.
    schedule_interval_s: int = Field(default=300, ge=1)
    # A held hold is released this long after its run finished (or its submission started).
    stale_hold_grace_s: int = Field(default=3600, ge=60)
    # Yesterday's ledger is exported once this long past midnight UTC (late writers have committed).
    export_delay_s: int = Field(default=900, ge=0, le=_DAY_S - 1)


class DutyReport(StrictModel):
    """What one duty did: ids acted on, and an error code if it stopped early."""

    acted_on: list[str] = Field(default_factory=list)
    skipped: int = 0
    error: str | None = None


class JanitorReport(StrictModel):
    now: int
    segment: int
    expired_runs: DutyReport
    failed_stale_runs: DutyReport
    failed_dlq_runs: DutyReport
    released_stale_holds: DutyReport
    deleted_uploads: DutyReport
    ledger_export: DutyReport

    @property
    def ok(self) -> bool:
        return all(getattr(self, name).error is None for name in _DUTIES)


_DUTIES = (
    "expired_runs",
    "failed_stale_runs",
    "failed_dlq_runs",
    "released_stale_holds",
    "deleted_uploads",
    "ledger_export",
)


class JanitorIncomplete(RuntimeError):
    """A duty failed; the others ran. Raised after logging so the schedule's error metric shows it."""


class Janitor:
    def __init__(
        self,
        store: Store,
        settings: FunctionSettings,
        *,
        logger: Logger,
        metrics: Metrics | None = None,
        limits: JanitorLimits | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.logger = logger
        self.metrics = metrics
        self.limits = limits or JanitorLimits()

    @classmethod
    def from_env(cls) -> Janitor:
        from aws_lambda_powertools import Logger, Metrics  # noqa: PLC0415 - cold start: only when invoked

        settings = FunctionSettings.from_env()
        return cls(
            Store(AwsClients(settings.store)),
            settings,
            logger=Logger(service=SERVICE_NAME, level=settings.log_level),
            metrics=Metrics(namespace=METRICS_NAMESPACE, service=SERVICE_NAME),
        )

    def run(self, *, segment: int | None = None) -> JanitorReport:
        """Every duty once; a failing duty is reported and does not stop the others."""
        now = self.store.clock()
        limits = self.limits
        if segment is None:
            segment = (now // limits.schedule_interval_s) % limits.scan_segments
        if not 0 <= segment < limits.scan_segments:
            raise ValueError(f"segment must be in 0..{limits.scan_segments - 1}")
        report = JanitorReport(
            now=now,
            segment=segment,
            expired_runs=self._duty("expired_runs", self.expire_pending_runs, now),
            failed_stale_runs=self._duty("failed_stale_runs", self.fail_stale_running_runs, now),
            failed_dlq_runs=self._duty("failed_dlq_runs", self.drain_runs_dlq, now),
            released_stale_holds=self._duty(
                "released_stale_holds", lambda at: self.release_stale_holds(at, segment), now
            ),
            deleted_uploads=self._duty(
                "deleted_uploads", lambda at: self.delete_abandoned_uploads(at, segment), now
            ),
            ledger_export=self._duty("ledger_export", self.export_closed_day, now),
        )
        self.logger.info("janitor finished", report=report.model_dump(mode="json"))
        return report

    def _duty(self, name: str, duty: Any, now: int) -> DutyReport:
        acted: list[str] = []
        skipped = 0
        error: str | None = None
        try:
            for outcome in duty(now):
                if outcome is None:
                    skipped += 1
                else:
                    acted.append(outcome)
        except Exception as exc:
            error = getattr(exc, "code", type(exc).__name__)
            self.logger.exception("janitor duty failed", duty=name, error=error)
        if acted:
            self.logger.info("janitor duty", duty=name, count=len(acted), ids=acted)
        self._metric(f"Janitor.{name}", len(acted))
        return DutyReport(acted_on=acted, skipped=skipped, error=error)

    def _metric(self, name: str, value: int) -> None:
        if self.metrics is not None:
            from aws_lambda_powertools.metrics import MetricUnit  # noqa: PLC0415 - see from_env

            self.metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)

    # --- runs -----------------------------------------------------------------------------------

    def expire_pending_runs(self, now: int) -> Iterator[str | None]:
        idle_since = now - self.settings.run_pending_ttl_s
        for run in self.store.runs.list_open(
            RunStatus.PENDING, idle_since=idle_since, limit=self.limits.runs_per_sweep
        ):
            yield self._end_run(
                run.run_id,
                RunStatus.EXPIRED,
                "run_expired",
                f"no runner took the run within {self.settings.run_pending_ttl_s} s",
            )

    def fail_stale_running_runs(self, now: int) -> Iterator[str | None]:
        idle_since = now - self.settings.run_running_ttl_s
        for run in self.store.runs.list_open(
            RunStatus.RUNNING, idle_since=idle_since, limit=self.limits.runs_per_sweep
        ):
            yield self._end_run(
                run.run_id,
                RunStatus.FAILED,
                "runner_lost",
                f"the runner stopped reporting progress for {self.settings.run_running_ttl_s} s",
            )

    def drain_runs_dlq(self, now: int) -> Iterator[str | None]:
        clients = self.store.clients
        url = clients.queue_url(QueueRole.RUNS_DLQ)
        for _ in range(self.limits.dlq_batches):
            try:
                received = clients.sqs.receive_message(
                    QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0
                )
            except (ClientError, BotoCoreError) as exc:
                raise_store_error(exc, "receive runs DLQ")
            messages = received.get("Messages", [])
            if not messages:
                return
            for message in messages:
                run_id = _run_id_of(message.get("Body", ""))
                if run_id is None:
                    # Not ours to interpret: left in the DLQ for an operator (it expires with the queue's
                    # retention), never silently deleted.
                    self.logger.error(
                        "runs DLQ message is not a run message", message_id=message.get("MessageId")
                    )
                    yield None
                    continue
                outcome = self._end_run(
                    run_id,
                    RunStatus.FAILED,
                    "runner_unavailable",
                    "no runner completed the run after the queue's maximum deliveries",
                )
                try:
                    clients.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
                except (ClientError, BotoCoreError) as exc:
                    raise_store_error(exc, "delete runs DLQ message")
                yield outcome

    def _end_run(self, run_id: str, status: RunStatus, code: str, message: str) -> str | None:
        """Move an open run to ``status`` and release its hold; None if there was nothing to do."""
        store = self.store
        run = store.runs.get(run_id)
        if run is None:
            return None
        if not run.status.terminal:
            try:
                store.runs.finish(run_id, status, RunResult(error_code=code, error_message=message))
            except Conflict:
                # The runner finished it meanwhile: its settlement releases the hold.
                return None
        elif run.status is not status or run.error_code != code:
            return None
        try:
            settlement = store.billing.release(run_id)
        except NotFound:
            return None
        self.logger.info(
            "run ended by janitor",
            run_id=run_id,
            room_id=run.room_id,
            status=status.value,
            error_code=code,
            hold_released=settlement.applied,
        )
        return run_id

    # --- holds ----------------------------------------------------------------------------------

    def release_stale_holds(self, now: int, segment: int) -> Iterator[str | None]:
        store = self.store
        cutoff = now - self.limits.stale_hold_grace_s
        for item in self._scan_segment(
            TableRole.BILLING_MARKERS,
            segment,
            filter_expression="begins_with(marker, :run) AND #state = :held AND created_at < :cutoff",
            names={"#state": "state"},
            values={":run": "run#", ":held": HoldState.HELD.value, ":cutoff": cutoff},
        ):
            run_id = str(item["run_id"])
            run = store.runs.get(run_id)
            if run is not None and not (run.status.terminal and (run.finished_at or run.updated_at) < cutoff):
                yield None
                continue
            settlement = store.billing.release(run_id)
            if not settlement.applied:
                yield None
                continue
            self.logger.info(
                "stale hold released",
                run_id=run_id,
                tenant_id=settlement.hold.tenant_id,
                amount=settlement.hold.amount,
                reason="submission interrupted"
                if run is None
                else f"run {run.status.value} without settlement",
            )
            yield run_id

    # --- uploads --------------------------------------------------------------------------------

    def delete_abandoned_uploads(self, now: int, segment: int) -> Iterator[str | None]:
        store = self.store
        cutoff = now - self.settings.upload_ttl_s
        for item in self._scan_segment(
            TableRole.ROOMS,
            segment,
            filter_expression="begins_with(sk, :item) AND #state = :pending AND created_at < :cutoff",
            names={"#state": "state"},
            values={":item": ITEM_PREFIX, ":pending": ItemState.PENDING.value, ":cutoff": cutoff},
        ):
            room_id, item_id = str(item["room_id"]), str(item["item_id"])
            # Re-read right before deleting: an item committed since the scan is kept.
            current = store.rooms.get_item(room_id, item_id)
            if current is None or current.state is not ItemState.PENDING:
                yield None
                continue
            store.rooms.remove_item(room_id, item_id)
            removed = self._delete_object_versions(item_key(room_id, item_id))
            self.logger.info(
                "abandoned item deleted", room_id=room_id, item_id=item_id, object_versions=removed
            )
            yield item_id
        for item in self._scan_segment(
            TableRole.AGENTS,
            segment,
            filter_expression="#state = :pending AND created_at < :cutoff",
            names={"#state": "state"},
            values={":pending": AgentState.PENDING.value, ":cutoff": cutoff},
        ):
            agent_id = str(item["agent_id"])
            agent = store.agents.get(agent_id)
            if agent is None or agent.state is not AgentState.PENDING:
                yield None
                continue
            store.agents.delete(agent_id)
            removed = store.blobs.delete_prefix(agent_prefix(agent_id))
            self.logger.info("abandoned agent deleted", agent_id=agent_id, object_versions=removed)
            yield agent_id

    def _delete_object_versions(self, key: str) -> int:
        """Every version and delete marker of exactly ``key`` (the bucket is versioned; an item key is
        not a folder, so ``BlobStore.delete_prefix`` does not apply: a prefix would also match longer
        item ids)."""
        clients = self.store.clients
        bucket = self.store.config.bucket
        try:
            listed = clients.s3.list_object_versions(Bucket=bucket, Prefix=key)
            targets = [
                {"Key": entry["Key"], "VersionId": entry["VersionId"]}
                for entry in listed.get("Versions", []) + listed.get("DeleteMarkers", [])
                if entry["Key"] == key
            ]
            if targets:
                clients.s3.delete_objects(Bucket=bucket, Delete={"Objects": targets, "Quiet": True})
        except (ClientError, BotoCoreError) as exc:
            raise_store_error(exc, f"delete {key}")
        return len(targets)

    # --- ledger export --------------------------------------------------------------------------

    def export_closed_day(self, now: int) -> Iterator[str | None]:
        moment = datetime.fromtimestamp(now, tz=UTC)
        midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        if (moment - midnight).total_seconds() < self.limits.export_delay_s:
            yield None
            return
        day = (midnight - timedelta(days=1)).date()
        key = ledger_export_key(day)
        if self.store.blobs.exists(key):
            yield None
            return
        stored = self.store.billing.export_day(day)
        self.logger.info("ledger exported", day=day.isoformat(), key=stored.key, size=stored.size)
        yield key

    # --- scanning -------------------------------------------------------------------------------

    def _scan_segment(
        self,
        role: TableRole,
        segment: int,
        *,
        filter_expression: str,
        names: dict[str, str],
        values: dict[str, Any],
    ) -> Iterator[dict[str, Any]]:
        """Items of one parallel-scan segment that match ``filter_expression`` (bounded in pages)."""
        client = self.store.clients.dynamodb
        request: dict[str, Any] = {
            "TableName": self.store.config.table_name(role),
            "Segment": segment,
            "TotalSegments": self.limits.scan_segments,
            "FilterExpression": filter_expression,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": serialize(values),
            "Limit": 100,
        }
        for _ in range(self.limits.scan_pages_per_segment):
            try:
                response = client.scan(**request)
            except (ClientError, BotoCoreError) as exc:
                raise_store_error(exc, f"scan {role.value}")
            for item in response.get("Items", []):
                yield deserialize(item)
            last = response.get("LastEvaluatedKey")
            if not last:
                return
            request["ExclusiveStartKey"] = last


def _run_id_of(body: str) -> str | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("run_id"), str):
        return None
    run_id: str = value["run_id"]
    return run_id if 0 < len(run_id) <= 80 else None


_JANITOR: Janitor | None = None
_JANITOR_LOCK = threading.Lock()


def _janitor() -> Janitor:
    global _JANITOR  # noqa: PLW0603 - one per execution environment, built on the first invocation
    with _JANITOR_LOCK:
        if _JANITOR is None:
            _JANITOR = Janitor.from_env()
        return _JANITOR


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda entry point ``hivemind_functions.janitor.handler`` (an EventBridge schedule)."""
    janitor = _janitor()
    try:
        report = janitor.run()
    finally:
        if janitor.metrics is not None:
            janitor.metrics.flush_metrics()
    if not report.ok:
        failed = [name for name in _DUTIES if getattr(report, name).error is not None]
        raise JanitorIncomplete(f"janitor duties failed: {', '.join(failed)} (the others completed)")
    return report.model_dump(mode="json")
