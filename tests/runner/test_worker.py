"""The SQS worker: message lifetime, visibility heartbeat, poison messages, giving up, shutdown."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.rooms import (
    Room,
    Tenant,
    agent_ref,
    build_manifest,
    create_room,
    seal_item,
    submit_run,
    upload_agent,
    write_agent_dir,
)
from support.runner_harness import TEST_COMPOSE_HASH, FakePipeline, HarnessRunner, make_runner

from hivemind.errors import ServiceUnavailable
from hivemind.models import RunStatus
from hivemind.store import Store
from hivemind.store.schema import QueueRole
from hivemind_runner.worker import RunWorker

pytestmark = pytest.mark.moto_server


@pytest.fixture
def pipeline(store: Store) -> FakePipeline:
    return FakePipeline(store=store)


@pytest.fixture
def runner(store: Store, tmp_path: Path, pipeline: FakePipeline) -> HarnessRunner:
    return make_runner(store, tmp_path / "runner", pipeline)


@pytest.fixture
def room(store: Store, tmp_path: Path) -> Room:
    owner = Tenant.create(store, "owner")
    scope = upload_agent(store, owner, write_agent_dir(tmp_path / "scope"))
    query = upload_agent(store, owner, write_agent_dir(tmp_path / "query"))
    manifest = build_manifest(
        owner,
        room_id="room_worker",
        scope=agent_ref(scope),
        query=agent_ref(query),
        compose_hashes=[TEST_COMPOSE_HASH],
    )
    created = create_room(store, owner, manifest)
    seal_item(store, created, b"a,b\n1,2\n", metadata={"name": "t.csv"})
    return created


def queue_counts(store: Store, role: QueueRole = QueueRole.RUNS) -> tuple[int, int]:
    attributes = store.clients.sqs.get_queue_attributes(
        QueueUrl=store.clients.queue_url(role),
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]), int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


def send_raw(store: Store, body: str) -> None:
    store.clients.sqs.send_message(QueueUrl=store.clients.queue_url(QueueRole.RUNS), MessageBody=body)


def settle_run_ids(store: Store) -> list[str]:
    url = store.clients.queue_url(QueueRole.SETTLEMENTS)
    found: list[str] = []
    while messages := store.clients.sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0
    ).get("Messages"):
        for message in messages:
            found.append(json.loads(message["Body"])["run_id"])
            store.clients.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return found


def wait_until(condition: Callable[[], bool], *, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


@contextlib.contextmanager
def serving(worker: RunWorker) -> Iterator[None]:
    """The worker's real loop (receive, heartbeat, dispatch) in a thread, stopped on exit."""
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        worker.stop()
        thread.join(timeout=30)
        assert not thread.is_alive()


def drive(worker: RunWorker, condition: Callable[[], bool], *, timeout: float = 20.0) -> None:
    """Serve the queue until ``condition`` holds and nothing is running any more."""
    with serving(worker):
        wait_until(lambda: condition() and worker.unfinished() == 0, timeout=timeout)


def test_a_run_goes_pending_running_completed_and_its_message_is_deleted(
    store: Store, runner: HarnessRunner, room: Room
) -> None:
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    worker = runner.worker()
    drive(worker, lambda: store.runs.require(submitted.run_id).status.terminal)
    assert store.runs.require(submitted.run_id).status is RunStatus.COMPLETED
    assert queue_counts(store) == (0, 0)
    assert settle_run_ids(store) == [submitted.run_id]


@pytest.mark.slow
def test_malformed_and_unknown_messages_are_left_for_the_dead_letter_queue(
    store: Store, runner: HarnessRunner
) -> None:
    send_raw(store, "not json at all")
    send_raw(store, '{"run_id": "run_nosuchrun"}')
    send_raw(store, '{"run_id": "run_x", "extra": 1}')
    worker = runner.worker(visibility_timeout_s=1, visibility_heartbeat_s=0.5)
    # Each is received and left alone; after maxReceiveCount (3) receives SQS moves it to the DLQ.
    drive(worker, lambda: queue_counts(store, QueueRole.RUNS_DLQ)[0] == 3, timeout=30)
    assert queue_counts(store) == (0, 0)


@pytest.mark.slow
def test_visibility_is_extended_while_a_run_is_going(
    store: Store, runner: HarnessRunner, room: Room, pipeline: FakePipeline
) -> None:
    peeked: list[int] = []

    def slow(inputs: Any) -> None:
        # The visibility timeout is 1.5 s; the run takes 4 s. Nobody else may receive the message.
        for _ in range(8):
            time.sleep(0.5)
            response = store.clients.sqs.receive_message(
                QueueUrl=store.clients.queue_url(QueueRole.RUNS), VisibilityTimeout=0, WaitTimeSeconds=0
            )
            peeked.append(len(response.get("Messages", [])))

    pipeline.during = slow
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    worker = runner.worker(visibility_timeout_s=2, visibility_heartbeat_s=0.5)
    drive(worker, lambda: store.runs.require(submitted.run_id).status.terminal, timeout=30)
    assert peeked == [0] * 8
    assert len(pipeline.seen) == 1
    assert store.runs.require(submitted.run_id).status is RunStatus.COMPLETED
    assert queue_counts(store) == (0, 0)


def test_a_message_received_more_often_than_allowed_fails_the_run_and_settles(
    store: Store, tmp_path: Path, pipeline: FakePipeline, room: Room
) -> None:
    runner = make_runner(store, tmp_path / "strict", pipeline, max_attempts=1)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    # A first delivery whose runner vanished: received, never deleted, visible again at once.
    store.clients.sqs.receive_message(
        QueueUrl=store.clients.queue_url(QueueRole.RUNS), VisibilityTimeout=0, WaitTimeSeconds=0
    )
    drive(runner.worker(), lambda: store.runs.require(submitted.run_id).status.terminal)
    run = store.runs.require(submitted.run_id)
    assert (run.status, run.error_code) == (RunStatus.FAILED, "runner_gave_up")
    assert pipeline.seen == []
    assert settle_run_ids(store) == [submitted.run_id]
    assert queue_counts(store) == (0, 0)


@pytest.mark.slow
def test_transient_trouble_leaves_the_message_for_a_retry(
    store: Store, runner: HarnessRunner, room: Room, pipeline: FakePipeline
) -> None:
    failures = [ServiceUnavailable("storage is busy")]

    def flaky(inputs: Any) -> None:
        if failures:
            raise failures.pop()

    pipeline.during = flaky
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    worker = runner.worker(retry_delay_s=1)
    drive(worker, lambda: store.runs.require(submitted.run_id).status.terminal, timeout=30)
    run = store.runs.require(submitted.run_id)
    assert (run.status, run.attempts) == (RunStatus.COMPLETED, 2)
    assert settle_run_ids(store) == [submitted.run_id]


def test_runs_execute_concurrently_up_to_the_configured_slots(
    store: Store, runner: HarnessRunner, room: Room, pipeline: FakePipeline
) -> None:
    together = threading.Barrier(2, timeout=15)
    pipeline.during = lambda inputs: together.wait()
    runs = [submit_run(store, room, runner_keys=runner.keys.hpke_public_keys) for _ in range(2)]
    worker = runner.worker(concurrency=2)
    drive(worker, lambda: all(store.runs.require(run.run_id).status.terminal for run in runs), timeout=30)
    assert {store.runs.require(run.run_id).status for run in runs} == {RunStatus.COMPLETED}


def test_stop_lets_the_running_run_finish_then_returns(
    store: Store, runner: HarnessRunner, room: Room, pipeline: FakePipeline
) -> None:
    started, release = threading.Event(), threading.Event()

    def hold(inputs: Any) -> None:
        started.set()
        assert release.wait(15)

    pipeline.during = hold
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    worker = runner.worker()
    thread = threading.Thread(target=worker.serve)
    thread.start()
    assert started.wait(20)
    worker.stop()
    time.sleep(0.5)
    assert thread.is_alive()  # waiting for the run, not abandoning it
    release.set()
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert store.runs.require(submitted.run_id).status is RunStatus.COMPLETED
    assert worker.unfinished() == 0
    assert queue_counts(store) == (0, 0)
