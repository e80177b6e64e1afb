"""A runner process SIGKILLed in the middle of a run, then restarted: the run completes exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.rooms import (
    Tenant,
    agent_ref,
    build_manifest,
    create_room,
    read_receipt,
    seal_item,
    submit_run,
    upload_agent,
    write_agent_dir,
)
from support.runner_harness import TEST_COMPOSE_HASH

from hivemind.models import RunStatus
from hivemind.store import Store, StoreConfig
from hivemind.store.runners import RunnerStatus
from hivemind.store.schema import QueueRole, run_receipt_key
from hivemind_runner.keys import RunnerKeys
from hivemind_runner.tee import SimulatedTee

pytestmark = [pytest.mark.moto_server, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parent.parent / "support" / "runner_process.py"
RUNNER_ID = "runner_killtest"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_killed_runner_is_taken_over_and_the_run_completes_once(
    store: Store, store_config: StoreConfig, tmp_path: Path
) -> None:
    seed_file = tmp_path / "seed"
    keys = RunnerKeys.from_seed(SimulatedTee(seed_file, compose_hash=TEST_COMPOSE_HASH).seed())
    owner = Tenant.create(store, "owner")
    scope = upload_agent(store, owner, write_agent_dir(tmp_path / "scope"))
    query = upload_agent(store, owner, write_agent_dir(tmp_path / "query"))
    manifest = build_manifest(
        owner,
        room_id="room_kill",
        scope=agent_ref(scope),
        query=agent_ref(query),
        compose_hashes=[TEST_COMPOSE_HASH],
    )
    room = create_room(store, owner, manifest)
    seal_item(store, room, b"region,amount\nnorth,1\n", metadata={"name": "sales.csv"})
    submitted = submit_run(store, room, runner_keys=keys.hpke_public_keys)

    block, started = tmp_path / "block", tmp_path / "started"
    workspace_root = tmp_path / "ws" / RUNNER_ID
    env = {
        **os.environ,
        **store_config.to_env(),
        "HIVEMIND_TEE": "simulated",
        "HIVEMIND_RUNNER_ID": RUNNER_ID,
        "HIVEMIND_RUNNER_SEED_FILE": str(seed_file),
        "HIVEMIND_RUNNER_COMPOSE_HASH": TEST_COMPOSE_HASH,
        "HIVEMIND_RUNNER_WAIT_S": "1",
        "HIVEMIND_RUNNER_VISIBILITY_S": "3",
        "HIVEMIND_RUNNER_VISIBILITY_HEARTBEAT_S": "1",
        "HIVEMIND_RUNNER_HEARTBEAT_S": "1",
        "HIVEMIND_RUNNER_SHUTDOWN_GRACE_S": "20",
        "HIVEMIND_RUNNER_WORKSPACE_DIR": str(tmp_path / "ws"),
        "HIVEMIND_TEST_BLOCK_FILE": str(block),
        "HIVEMIND_TEST_STARTED_FILE": str(started),
    }

    def start_runner() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    # First runner: takes the run, decrypts the room into its workspace, and is killed mid-pipeline.
    block.write_text("hold")
    first = start_runner()
    try:
        wait_for(started.exists, "the first runner to reach the pipeline")
        assert store.runs.require(submitted.run_id).status is RunStatus.RUNNING
        assert (workspace_root / submitted.run_id / "items" / "item-0").exists()
        # Its heartbeat keeps the message invisible well past the 3 s visibility timeout.
        time.sleep(4)
        runs_url = store.clients.queue_url(QueueRole.RUNS)
        peek = store.clients.sqs.receive_message(QueueUrl=runs_url, VisibilityTimeout=0, WaitTimeSeconds=0)
        assert peek.get("Messages", []) == []
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    assert (workspace_root / submitted.run_id).exists()  # nobody could wipe it: the next runner will

    # Second runner: the message comes back after the visibility timeout; the run is taken over.
    block.unlink()
    started.unlink()
    second = start_runner()
    try:
        wait_for(lambda: store.runs.require(submitted.run_id).status.terminal, "the run to finish")
        wait_for(
            lambda: (
                store.runners.get(RUNNER_ID) is not None
                and store.runners.get(RUNNER_ID).status is RunnerStatus.ACTIVE
            ),
            "the runner row",
        )
    finally:
        second.send_signal(signal.SIGTERM)
        _, stderr = second.communicate(timeout=60)
    assert second.returncode == 0, stderr.decode()[-2000:]

    run = store.runs.require(submitted.run_id)
    assert (run.status, run.attempts) == (RunStatus.COMPLETED, 2)
    assert read_receipt(store, submitted.run_id).receipt.status is RunStatus.COMPLETED
    versions = store.clients.s3.list_object_versions(
        Bucket=store.config.bucket, Prefix=run_receipt_key(submitted.run_id)
    ).get("Versions", [])
    assert len(versions) == 1  # never two receipts
    settlements_url = store.clients.queue_url(QueueRole.SETTLEMENTS)
    bodies = [
        json.loads(message["Body"])
        for message in store.clients.sqs.receive_message(
            QueueUrl=settlements_url, MaxNumberOfMessages=10, WaitTimeSeconds=0
        ).get("Messages", [])
    ]
    assert [body["run_id"] for body in bodies] == [submitted.run_id]
    runs_url = store.clients.queue_url(QueueRole.RUNS)
    attributes = store.clients.sqs.get_queue_attributes(QueueUrl=runs_url, AttributeNames=["All"])[
        "Attributes"
    ]
    assert (
        attributes["ApproximateNumberOfMessages"],
        attributes["ApproximateNumberOfMessagesNotVisible"],
    ) == (
        "0",
        "0",
    )
    # The killed attempt's workspace was swept at start-up and this attempt's wiped after the run.
    assert list(workspace_root.iterdir()) == []
    assert store.runners.get(RUNNER_ID).status is RunnerStatus.STOPPED
    # Logs of both processes carry no room data.
    assert b"north" not in stderr and b"region" not in stderr


def test_python_dash_m_runner_publishes_its_attestation_and_stops_on_sigterm(
    store: Store, store_config: StoreConfig, tmp_path: Path
) -> None:
    """The real entry point with the real pipeline assembly (backend chosen automatically)."""
    env = {
        **os.environ,
        **store_config.to_env(),
        "HIVEMIND_TEE": "simulated",
        "HIVEMIND_RUNNER_ID": "runner_entrypoint",
        "HIVEMIND_RUNNER_SEED_FILE": str(tmp_path / "seed"),
        "HIVEMIND_RUNNER_WAIT_S": "1",
        "HIVEMIND_RUNNER_WORKSPACE_DIR": str(tmp_path / "ws"),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "hivemind_runner"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: store.runners.get("runner_entrypoint") is not None, "the runner to publish")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr.decode()[-2000:]
    record = store.runners.get("runner_entrypoint")
    assert record is not None and record.status is RunnerStatus.STOPPED
    assert record.tee.value == "simulated"
    keys = RunnerKeys.from_seed((tmp_path / "seed").read_bytes())
    assert record.attestation["sign_pub"] == keys.sign_pub
    events = [json.loads(line)["event"] for line in stderr.decode().splitlines() if line.startswith("{")]
    assert events[0] == "runner_started" and "runner_stopped" in events
