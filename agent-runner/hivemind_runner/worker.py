"""The SQS worker: takes run ids off the runs queue and executes them, at most ``concurrency`` at a time.

Message semantics (docs/runner.md, "Worker"):

- long polling (``WaitTimeSeconds`` 20 in production); a receive asks only for as many messages as
  there are free slots, so no message waits, invisible, behind a busy runner;
- while a run is going its message's visibility is extended (``ChangeMessageVisibility``) on a
  heartbeat, so SQS redelivers it only if this runner died;
- the message is deleted only after the run's terminal state is durably written (or it was already
  terminal): a crash before that means redelivery, and the store's conditional writes make a
  redelivered run a takeover or a no-op, never a second execution of a finished run;
- a poison message (a body that is not ``{"run_id": ...}``, or an unknown run) is logged and left
  alone: after the queue's ``maxReceiveCount`` SQS moves it to the dead-letter queue;
- a message received more often than ``max_attempts`` ends its run ``failed`` with ``runner_gave_up``
  and a settlement that releases the hold;
- :meth:`RunWorker.stop` (SIGTERM) stops receiving, lets running runs finish within a grace period, and
  leaves anything unfinished to redelivery.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from hivemind.models import Identifier, StrictModel
from hivemind.store import Store
from hivemind.store.schema import QueueRole
from hivemind_runner.lifecycle import RunLifecycle, RunOutcome
from hivemind_runner.telemetry import StructuredLogger


class RunMessage(StrictModel):
    """The body of a runs-queue message, as the control plane sends it."""

    run_id: Identifier


@dataclass(frozen=True)
class WorkerSettings:
    concurrency: int = 2
    # SQS caps long polling at 20 s; tests poll shorter.
    wait_time_s: int = 20
    # How long a received message stays invisible, renewed every heartbeat while its run goes on.
    visibility_timeout_s: int = 900
    visibility_heartbeat_s: float = 60.0
    # After a transient failure, the message comes back this much later.
    retry_delay_s: int = 30
    # How long stop() waits for running runs before leaving them to redelivery.
    shutdown_grace_s: float = 600.0

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 64:
            raise ValueError("concurrency is 1 to 64")
        if not 0 <= self.wait_time_s <= 20:
            raise ValueError("SQS long polling waits 0 to 20 seconds")
        if not 1 <= self.visibility_timeout_s <= 43_200:
            raise ValueError("the visibility timeout is 1 s to 12 h")
        if not 0 < self.visibility_heartbeat_s < self.visibility_timeout_s:
            raise ValueError("the visibility heartbeat must come before the visibility timeout runs out")


def _aws_code(exc: ClientError | BotoCoreError) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "ClientError"))
    return type(exc).__name__


@dataclass
class _InFlight:
    receipt_handle: str
    extended_at: float


class RunWorker:
    """Polls the runs queue and hands each message to :class:`RunLifecycle` on a thread pool."""

    def __init__(
        self,
        store: Store,
        lifecycle: RunLifecycle,
        settings: WorkerSettings,
        *,
        logger: StructuredLogger | None = None,
    ) -> None:
        self._store = store
        self._sqs = store.clients.sqs
        self._queue_url = store.clients.queue_url(QueueRole.RUNS)
        self._lifecycle = lifecycle
        self._settings = settings
        self._logger = logger or StructuredLogger()
        self._stopping = threading.Event()
        self._slots = threading.Semaphore(settings.concurrency)
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="run")
        self._in_flight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()
        self._futures: set[Future[None]] = set()
        self._heartbeat: threading.Thread | None = None

    # --- main loop ---------------------------------------------------------------------------------

    def serve(self) -> None:
        """Receive and execute until :meth:`stop`; then wait for running runs (the grace period)."""
        self._heartbeat = threading.Thread(target=self._extend_loop, name="visibility-heartbeat", daemon=True)
        self._heartbeat.start()
        try:
            while not self._stopping.is_set():
                self.poll_once()
        finally:
            self._drain()

    def stop(self) -> None:
        """Stop receiving (safe from a signal handler); :meth:`serve` returns once runs are done."""
        self._stopping.set()

    def unfinished(self) -> int:
        """Runs still executing (after :meth:`serve` returned: those abandoned to redelivery)."""
        with self._lock:
            return len(self._futures)

    def poll_once(self) -> int:
        """One receive for the free slots; dispatches what came and returns how many messages."""
        free = self._acquire_free_slots()
        if free == 0:
            return 0
        try:
            messages = self._receive(free)
        except (ClientError, BotoCoreError) as exc:
            self._logger.warning("receive_failed", error_code=_aws_code(exc))
            self._release(free)
            self._stopping.wait(1.0)
            return 0
        self._release(free - len(messages))
        for message in messages:
            future = self._pool.submit(self._handle, message)
            with self._lock:
                self._futures.add(future)
            future.add_done_callback(self._done)
        return len(messages)

    def _acquire_free_slots(self) -> int:
        # Block (briefly, so stop() is noticed) until at least one slot is free, then take all free ones.
        while not self._slots.acquire(timeout=0.5):
            if self._stopping.is_set():
                return 0
        if self._stopping.is_set():
            self._slots.release()
            return 0
        free = 1
        while free < min(self._settings.concurrency, 10) and self._slots.acquire(blocking=False):
            free += 1
        return free

    def _release(self, count: int) -> None:
        for _ in range(count):
            self._slots.release()

    def _receive(self, count: int) -> list[dict[str, Any]]:
        response = self._sqs.receive_message(
            QueueUrl=self._queue_url,
            MaxNumberOfMessages=count,
            WaitTimeSeconds=self._settings.wait_time_s,
            VisibilityTimeout=self._settings.visibility_timeout_s,
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        return list(response.get("Messages", []))

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._futures.discard(future)
        self._slots.release()

    # --- one message -------------------------------------------------------------------------------

    def _handle(self, message: dict[str, Any]) -> None:
        handle = message["ReceiptHandle"]
        message_id = message.get("MessageId", "")
        try:
            receive_count = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
        except ValueError:
            receive_count = 1
        try:
            run_id = RunMessage.model_validate_json(message.get("Body", "")).run_id
        except ValidationError:
            # Poison: left alone, SQS moves it to the dead-letter queue after maxReceiveCount.
            self._logger.warning("message_malformed", message_id=message_id, receive_count=receive_count)
            return
        with self._lock:
            self._in_flight[message_id] = _InFlight(receipt_handle=handle, extended_at=time.monotonic())
        try:
            outcome = self._lifecycle.execute(run_id, receive_count=receive_count)
        except Exception as exc:
            # Storage trouble outside a run's own error handling: the message comes back later.
            self._logger.warning("run_execute_failed", run_id=run_id, error_type=type(exc).__name__)
            outcome = RunOutcome.RETRY
        finally:
            with self._lock:
                self._in_flight.pop(message_id, None)
        if outcome is RunOutcome.FINISHED:
            self._delete(handle, run_id)
        elif outcome is RunOutcome.RETRY:
            self._set_visibility(handle, self._settings.retry_delay_s)
        elif outcome is RunOutcome.UNKNOWN_RUN:
            self._logger.warning("message_for_unknown_run", run_id=run_id, receive_count=receive_count)

    def _delete(self, handle: str, run_id: str) -> None:
        try:
            self._sqs.delete_message(QueueUrl=self._queue_url, ReceiptHandle=handle)
        except (ClientError, BotoCoreError) as exc:
            # The run is finished; a redelivery finds it terminal and changes nothing.
            self._logger.warning("delete_failed", run_id=run_id, error_code=_aws_code(exc))

    def _set_visibility(self, handle: str, seconds: int) -> bool:
        try:
            self._sqs.change_message_visibility(
                QueueUrl=self._queue_url, ReceiptHandle=handle, VisibilityTimeout=seconds
            )
        except (ClientError, BotoCoreError) as exc:
            self._logger.warning("visibility_change_failed", error_code=_aws_code(exc))
            return False
        return True

    # --- visibility heartbeat ----------------------------------------------------------------------

    def _extend_loop(self) -> None:
        interval = self._settings.visibility_heartbeat_s
        while True:
            with self._lock:
                busy = bool(self._in_flight) or bool(self._futures)
            if self._stopping.is_set() and not busy:
                return
            self.extend_visibility()
            time.sleep(min(interval / 4, 1.0))

    def extend_visibility(self) -> None:
        """Renew the visibility of every in-flight message whose last renewal is a heartbeat old."""
        now = time.monotonic()
        with self._lock:
            due = [
                (message_id, entry)
                for message_id, entry in self._in_flight.items()
                if now - entry.extended_at >= self._settings.visibility_heartbeat_s
            ]
        for message_id, entry in due:
            if self._set_visibility(entry.receipt_handle, self._settings.visibility_timeout_s):
                with self._lock:
                    if message_id in self._in_flight:
                        self._in_flight[message_id].extended_at = now

    # --- shutdown ----------------------------------------------------------------------------------

    def _drain(self) -> None:
        deadline = time.monotonic() + self._settings.shutdown_grace_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._futures:
                    break
            time.sleep(0.2)
        with self._lock:
            unfinished = len(self._futures)
        if unfinished:
            self._logger.warning("shutdown_with_runs_in_flight", runs=unfinished)
        # Runs still going after the grace period are abandoned: their messages become visible again.
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._heartbeat is not None:
            with contextlib.suppress(RuntimeError):
                self._heartbeat.join(timeout=1)
