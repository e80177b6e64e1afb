"""``python -m hivemind_functions.local``: the API, the settle worker and the janitor in one local process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from hivemind.models import Budgets, RunStatus
from hivemind.store import Store
from hivemind.store.billing import HoldState
from hivemind.store.runs import RunRecord, RunResult
from hivemind.store.schema import QueueRole, ledger_export_key
from hivemind_functions.local import loopback_socket

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "localhost", "::"])
def test_refuses_to_listen_off_loopback(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        loopback_socket(host, 0)


def test_listens_on_loopback_port_zero() -> None:
    sock = loopback_socket("127.0.0.1", 0)
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


@pytest.fixture
def local_process(store_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    ready = tmp_path / "api.ready"
    env = {**os.environ, **store_env, "HIVEMIND_SELF_SERVE_SIGNUP_ENABLED": "true"}
    log = (tmp_path / "local.log").open("wb")
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hivemind_functions.local",
            "--port",
            "0",
            "--ready-file",
            str(ready),
            "--janitor-interval",
            "1",
            "--settle-wait",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert child.poll() is None, (tmp_path / "local.log").read_text()
            assert time.monotonic() < deadline, "the local control plane did not start"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert oct(ready.stat().st_mode & 0o777) == "0o600"
        url = info["url"]
        while True:
            try:
                if httpx.get(f"{url}/v1/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "healthz never answered"
            time.sleep(0.05)
        yield url, child
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        log.close()


def _wait_until(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_serves_the_api_settles_runs_and_runs_the_janitor(
    local_process: tuple[str, subprocess.Popen[bytes]], store: Store
) -> None:
    url, child = local_process
    assert httpx.get(f"{url}/v1/healthz").json()["status"] == "ok"
    assert httpx.get(f"{url}/v1/whoami").json()["error"] == "credentials_missing"

    # A finished run with a hold, and its settlement message: the local settle worker must charge it.
    store.prices.set_runner_fee(7, updated_by="test")
    store.billing.grant("tenant_local", 10_000, ref="test")
    now = store.clock()
    store.runs.create(
        RunRecord(
            run_id="run_local1",
            room_id="room_local",
            caller_id="tenant_local",
            payer_tenant_id="tenant_local",
            budgets=Budgets(timeout_s=60, llm_calls=0, tokens=0, memory_mb=256),
            hold=420,
            prompt_sha256="0" * 64,
            manifest_hash="1" * 64,
            envelope_key="runs/run_local1/envelope",
            created_at=now,
            updated_at=now,
        )
    )
    store.billing.hold("tenant_local", "run_local1", 420, enforce=True)
    store.runs.start("run_local1", "runner_test")
    store.runs.finish("run_local1", RunStatus.COMPLETED, RunResult())
    clients = store.clients
    clients.sqs.send_message(
        QueueUrl=clients.queue_url(QueueRole.SETTLEMENTS),
        MessageBody=json.dumps({"run_id": "run_local1", "usage": [], "runner_seconds": 3, "llm": []}),
    )

    def settled() -> bool:
        hold = store.billing.get_hold("run_local1")
        return hold is not None and hold.state is HoldState.SETTLED

    _wait_until(settled)
    hold = store.billing.get_hold("run_local1")
    assert hold is not None and hold.charged == 21
    assert store.billing.account("tenant_local").balance == 10_000 - 21

    # The janitor runs on its timer: after 00:15 UTC it exports yesterday's ledger.
    moment = datetime.now(tz=UTC)
    if moment.hour == 0 and moment.minute < 16:
        pytest.skip("the janitor exports yesterday's ledger only after 00:15 UTC")
    yesterday = (moment - timedelta(days=1)).date()
    _wait_until(lambda: store.blobs.exists(ledger_export_key(yesterday)))

    # SIGTERM stops all three promptly and cleanly.
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=15) == 0
