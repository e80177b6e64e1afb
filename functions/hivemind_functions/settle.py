"""Settlement of finished runs: the handler of the settlements queue (DESIGN §11).

The runner sends, after finishing a run, ``{run_id, usage: [StageUsage], runner_seconds, llm:
[{provider, model, prompt_tokens, completion_tokens}]}``. For each message:

1. parse it strictly (unknown fields, negative counts: a failure);
2. the run must exist and be finished (a settlement that overtook the run's last write is retried);
3. a hold already settled changes nothing: the message is a redelivery, acknowledged as done;
4. price it (``store.prices.cost_of``: tokens of each model at its price plus runner seconds at the
   runner fee; a missing price fails the message, it never settles as free);
5. ``store.billing.settle(run, min(cost, hold))``: one ledger transaction releasing the hold and
   charging, idempotent per run, so a crash after it and a redelivery are safe; a run never costs more
   than its hold (the runner enforces the budgets the hold was priced from).

A message that fails is reported in ``batchItemFailures`` (Powertools ``BatchProcessor``): SQS
redelivers it, and after 5 receives moves it to the settlements DLQ for an operator. Nothing is dropped.

Entry points: ``handler`` (Lambda, SQS event source with ``ReportBatchItemFailures``), and
``python -m hivemind_functions.settle`` (the local stack's worker, polling the queue).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field, ValidationError

from hivemind.errors import Conflict, InvalidInput, NotFound
from hivemind.models import Identifier, StageUsage, StrictModel
from hivemind.store import AwsClients, Store
from hivemind.store.base import raise_store_error
from hivemind.store.billing import HoldState
from hivemind.store.prices import LlmUsage
from hivemind.store.schema import QueueRole
from hivemind_functions.settings import FunctionSettings

if TYPE_CHECKING:
    from aws_lambda_powertools import Logger, Metrics

SERVICE_NAME = "hivemind-settle"
METRICS_NAMESPACE = "Hivemind"


class SettlementMessage(StrictModel):
    """The settlements queue's message body (sent by the runner after it finished a run)."""

    run_id: Identifier
    usage: list[StageUsage] = Field(default_factory=list, max_length=3)
    runner_seconds: int = Field(ge=0, le=7 * 86_400)
    llm: list[LlmUsage] = Field(default_factory=list, max_length=256)


@dataclass(frozen=True, slots=True)
class SettleOutcome:
    run_id: str
    # False: the run was already settled (a redelivered message); nothing changed.
    applied: bool
    charged: int
    cost: int | None = None
    hold: int = 0


class Settler:
    """Settles runs from settlement messages; one per process, shared by every batch."""

    def __init__(self, store: Store, *, logger: Logger, metrics: Metrics | None = None) -> None:
        self.store = store
        self.logger = logger
        self.metrics = metrics

    @classmethod
    def from_env(cls) -> Settler:
        from aws_lambda_powertools import Logger, Metrics  # noqa: PLC0415 - cold start: only when invoked

        settings = FunctionSettings.from_env()
        return cls(
            Store(AwsClients(settings.store)),
            logger=Logger(service=SERVICE_NAME, level=settings.log_level),
            metrics=Metrics(namespace=METRICS_NAMESPACE, service=SERVICE_NAME),
        )

    def settle(self, body: str) -> SettleOutcome:
        """Settle the run one message names; raises (so the message is retried) when it cannot."""
        try:
            message = SettlementMessage.model_validate_json(body)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "body"
            raise InvalidInput(f"malformed settlement message: {where}: {error['msg']}") from None
        store = self.store
        run = store.runs.get(message.run_id)
        if run is None:
            raise NotFound(f"settlement for unknown run {message.run_id}", code="run_not_found")
        if not run.status.terminal:
            raise Conflict(
                f"run {message.run_id} is still {run.status.value}; settling after it finishes",
                code="run_not_finished",
            )
        hold = store.billing.get_hold(message.run_id)
        if hold is None:
            raise NotFound(f"run {message.run_id} has no hold to settle", code="hold_missing")
        if hold.state is HoldState.SETTLED:
            return SettleOutcome(
                run_id=run.run_id, applied=False, charged=hold.charged or 0, hold=hold.amount
            )
        cost = store.prices.cost_of(message.llm, runner_seconds=message.runner_seconds)
        charge = min(cost, hold.amount)
        if cost > hold.amount:
            # Prices changed after the hold was taken, or the runner overran: never charge above it.
            self.logger.warning("charge capped at the hold", run_id=run.run_id, cost=cost, hold=hold.amount)
        settlement = store.billing.settle(message.run_id, charge)
        return SettleOutcome(
            run_id=run.run_id,
            applied=settlement.applied,
            charged=settlement.hold.charged or 0,
            cost=cost,
            hold=hold.amount,
        )

    def settle_record(self, body: str, message_id: str) -> SettleOutcome:
        """:meth:`settle` with its log line and metrics."""
        try:
            outcome = self.settle(body)
        except Exception as exc:
            code = getattr(exc, "code", type(exc).__name__)
            self.logger.error("settlement failed", message_id=message_id, error=code, reason=str(exc)[:500])
            self._metric("SettlementFailures", 1)
            raise
        self.logger.info(
            "run settled" if outcome.applied else "settlement redelivered; already settled",
            message_id=message_id,
            run_id=outcome.run_id,
            charged=outcome.charged,
            cost=outcome.cost,
            hold=outcome.hold,
            applied=outcome.applied,
        )
        if outcome.applied:
            self._metric("RunsSettled", 1)
            self._metric("MicroUsdCharged", outcome.charged)
        else:
            self._metric("SettlementsRedelivered", 1)
        return outcome

    def _metric(self, name: str, value: int) -> None:
        if self.metrics is not None:
            from aws_lambda_powertools.metrics import MetricUnit  # noqa: PLC0415 - see from_env

            self.metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)

    # --- Lambda ---------------------------------------------------------------------------------

    def handle(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        """Process an SQS batch; the answer lists the messages to redeliver (partial batch failures)."""
        from aws_lambda_powertools.utilities.batch import (  # noqa: PLC0415 - see from_env
            BatchProcessor,
            EventType,
            process_partial_response,
        )

        processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
        try:
            return dict(
                process_partial_response(
                    event=event,
                    record_handler=lambda record: self.settle_record(record.body, record.message_id),
                    processor=processor,
                    context=context,
                )
            )
        finally:
            if self.metrics is not None:
                self.metrics.flush_metrics()

    # --- local worker ---------------------------------------------------------------------------

    def poll_once(self, *, wait_s: int = 1, max_messages: int = 10) -> tuple[int, int]:
        """Receive one batch from the settlements queue and settle it; settled messages are deleted,
        failed ones become visible again after the queue's visibility timeout (and reach the DLQ after
        its max receives), exactly as on Lambda. Returns (settled, failed)."""
        clients = self.store.clients
        url = clients.queue_url(QueueRole.SETTLEMENTS)
        try:
            received = clients.sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=max_messages, WaitTimeSeconds=wait_s
            )
        except (ClientError, BotoCoreError) as exc:
            raise_store_error(exc, "receive settlements")
        settled = failed = 0
        for message in received.get("Messages", []):
            try:
                self.settle_record(message["Body"], message["MessageId"])
            except Exception:  # logged by settle_record; the queue redelivers it
                failed += 1
                continue
            try:
                clients.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            except (ClientError, BotoCoreError) as exc:
                raise_store_error(exc, "delete settlement")
            settled += 1
        return settled, failed

    def serve(self, stop: threading.Event, *, wait_s: int = 5) -> None:
        """Poll until ``stop`` is set (the local stack's settle worker)."""
        while not stop.is_set():
            self.poll_once(wait_s=wait_s)


_SETTLER: Settler | None = None
_SETTLER_LOCK = threading.Lock()


def _settler() -> Settler:
    global _SETTLER  # noqa: PLW0603 - one per execution environment, built on the first invocation
    with _SETTLER_LOCK:
        if _SETTLER is None:
            _SETTLER = Settler.from_env()
        return _SETTLER


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda entry point ``hivemind_functions.settle.handler``."""
    return _settler().handle(event, context)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Settle finished runs from the settlements queue (local stack)."
    )
    parser.add_argument("--once", action="store_true", help="settle one batch and exit")
    parser.add_argument("--wait", type=int, default=5, help="long-poll seconds per receive (0-20)")
    args = parser.parse_args(argv)
    settler = Settler.from_env()
    if args.once:
        settled, failed = settler.poll_once(wait_s=max(0, min(args.wait, 20)))
        print(json.dumps({"settled": settled, "failed": failed}))
        return 0 if failed == 0 else 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    settler.serve(stop, wait_s=max(1, min(args.wait, 20)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
