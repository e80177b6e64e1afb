"""Process supervision and state of the local stack (hmctl.devstack), with trivial child processes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hivemind.tokens import Secret, TokenKind
from hmctl.devstack import processes
from hmctl.devstack.demo import DemoReport, clear_stale_demo_profiles
from hmctl.devstack.environment import find_repo
from hmctl.devstack.processes import ProcessRecord
from hmctl.devstack.stack import DevStack
from hmctl.devstack.state import (
    DevStackError,
    StackRecord,
    StackStatus,
    exclusive_lock,
    load_record,
    save_record,
    state_dir,
)
from hmctl.profiles import Profile, ProfileStore

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
# Ignores SIGTERM: only SIGKILL ends it.
STUBBORN = [
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
    "time.sleep(60)",
]
# Forks a grandchild in the same process group, then sleeps.
FORKER = [
    sys.executable,
    "-c",
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "print('up', flush=True); time.sleep(60)",
]


def _wait_for_log(path: Path, text: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"{text!r} never appeared in {path}")


@pytest.fixture
def spawned(tmp_path: Path):
    started: list[tuple[ProcessRecord, subprocess.Popen[bytes]]] = []

    def start(argv: list[str], name: str = "child") -> tuple[ProcessRecord, subprocess.Popen[bytes]]:
        record, child = processes.spawn(name, argv, env=os.environ, log_path=tmp_path / f"{name}.log")
        started.append((record, child))
        _wait_for_log(Path(record.log), "up")
        return record, child

    yield start
    for record, child in started:
        processes.stop(record, grace_s=1, child=child)


def test_spawned_child_leads_its_own_group_and_logs_privately(spawned) -> None:
    record, _ = spawned(SLEEPER)
    assert processes.is_running(record)
    assert os.getpgid(record.pid) == record.pid
    assert os.getsid(record.pid) == record.pid
    assert stat.S_IMODE(Path(record.log).stat().st_mode) == 0o600


def test_record_with_another_start_time_is_not_that_process(spawned) -> None:
    record, _ = spawned(SLEEPER)
    impostor = record.model_copy(update={"start_ticks": record.start_ticks + 1})
    assert not processes.is_running(impostor)
    # stop() of a record that does not match the live process must leave that process alone.
    assert processes.stop(impostor, grace_s=0.5)
    assert processes.is_running(record)


def test_stop_ends_the_child_and_its_grandchildren(spawned) -> None:
    record, child = spawned(FORKER)
    assert len(processes.group_members(record.pid)) == 2
    assert processes.stop(record, grace_s=5, child=child)
    assert not processes.is_running(record)
    assert processes.group_members(record.pid) == []


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(spawned) -> None:
    record, child = spawned(STUBBORN)
    started = time.monotonic()
    assert processes.stop(record, grace_s=0.5, kill_wait_s=5, child=child)
    assert child.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 5


def test_a_zombie_is_not_running(spawned) -> None:
    record, child = spawned([sys.executable, "-c", "print('up', flush=True)"])
    deadline = time.monotonic() + 5
    while processes.is_running(record) and time.monotonic() < deadline:
        time.sleep(0.02)
    # Not reaped yet (no poll()): the kernel keeps a zombie, which must not count as running.
    assert not processes.is_running(record)
    assert child.poll() == 0


def test_tail_returns_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {n}\n" for n in range(100)))
    assert processes.tail(log, 3) == "line 97\nline 98\nline 99"
    assert processes.tail(tmp_path / "missing.log") == ""


# --- state ---------------------------------------------------------------------------------------


def _status() -> StackStatus:
    return StackStatus(
        service_url="http://127.0.0.1:8700",
        aws_endpoint_url="http://127.0.0.1:5000",
        region="us-east-1",
        bucket="hivemind-blobs",
        tables={"runs": "hivemind-runs"},
        queues={"runs": "http://127.0.0.1:5000/123/hivemind-runs"},
        admin_profile="local-admin",
        runner_backend="process",
    )


def test_state_dir_lookup_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HMCTL_STATE_DIR", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert state_dir() == tmp_path / "home" / ".local" / "state" / "hmctl" / "dev"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir() == tmp_path / "xdg" / "hmctl" / "dev"
    monkeypatch.setenv("HMCTL_STATE_DIR", str(tmp_path / "explicit"))
    assert state_dir() == tmp_path / "explicit"


def test_record_round_trips_privately(tmp_path: Path) -> None:
    record = StackRecord(status=_status(), prefix="hivemind", runner_id="runner_devabc", started_at=1)
    save_record(tmp_path, record)
    assert load_record(tmp_path) == record
    assert stat.S_IMODE((tmp_path / "stack.json").stat().st_mode) == 0o600
    assert set(json.loads(record.status.model_dump_json())) == {
        "service_url",
        "aws_endpoint_url",
        "region",
        "bucket",
        "tables",
        "queues",
        "admin_profile",
        "runner_backend",
    }


@pytest.mark.parametrize("content", ["not json", '{"version": 1, "prefix": 3}', '{"version": 99}'])
def test_unreadable_record_is_an_error_not_a_guess(tmp_path: Path, content: str) -> None:
    (tmp_path / "stack.json").write_text(content)
    with pytest.raises(DevStackError) as raised:
        load_record(tmp_path)
    assert raised.value.code == "dev_state_unreadable"


def test_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        # flock locks belong to the open file description, so a second open in this process conflicts.
        with exclusive_lock(tmp_path):
            holding.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait(5)
    try:
        with pytest.raises(DevStackError) as raised, exclusive_lock(tmp_path, wait_s=0.2):
            pass
        assert raised.value.code == "dev_stack_busy"
    finally:
        release.set()
        thread.join()
    with exclusive_lock(tmp_path, wait_s=0.2):
        pass


# --- the stack's view of recorded processes ------------------------------------------------------


def test_status_of_a_stack_that_never_started(tmp_path: Path) -> None:
    with pytest.raises(DevStackError) as raised:
        DevStack(tmp_path).running_status()
    assert raised.value.code == "dev_stack_not_running"
    assert "hmctl dev up" in raised.value.message


def test_status_reports_a_dead_process(tmp_path: Path, spawned) -> None:
    alive, _ = spawned(SLEEPER, "moto")
    api, api_child = spawned(SLEEPER, "api")
    runner, _ = spawned(SLEEPER, "runner")
    record = StackRecord(
        status=_status(),
        prefix="hivemind",
        runner_id="runner_devabc",
        started_at=1,
        processes=(alive, api, runner),
    )
    save_record(tmp_path, record)
    stack = DevStack(tmp_path)
    assert stack.running_status() == _status()
    processes.stop(api, grace_s=1, child=api_child)
    with pytest.raises(DevStackError) as raised:
        stack.running_status()
    assert raised.value.code == "dev_stack_unhealthy"
    assert "api" in raised.value.message


def test_down_stops_only_recorded_processes_and_is_idempotent(tmp_path: Path, spawned) -> None:
    ours, _ = spawned(SLEEPER, "runner")
    bystander, _ = spawned(SLEEPER, "bystander")
    save_record(
        tmp_path, StackRecord(prefix="hivemind", runner_id="runner_devabc", started_at=1, processes=(ours,))
    )
    stack = DevStack(tmp_path)
    assert stack.down() == ["runner"]
    assert not processes.is_running(ours)
    assert processes.is_running(bystander)
    assert load_record(tmp_path) is None
    assert stack.down() == []


# --- the source tree, the demo's profiles and its receipt summary ------------------------------------


def test_repo_lookup_honours_hmctl_repo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HMCTL_REPO", str(tmp_path))
    with pytest.raises(DevStackError) as raised:
        find_repo()
    assert raised.value.code == "dev_repo_not_found"
    assert "build-base-image.sh" in raised.value.message
    monkeypatch.delenv("HMCTL_REPO")
    repo = find_repo()
    assert (repo / "agents" / "base" / "build-base-image.sh").is_file()


def test_demo_replaces_only_its_own_local_profiles(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "config", tmp_path / "cache")
    local = Profile(
        name="demo-owner", service="http://127.0.0.1:8700", key=Secret.generate(TokenKind.TENANT).token()
    )
    store.save(local)
    assert clear_stale_demo_profiles(store, ["demo-owner", "demo-participant"]) == ["demo-owner"]
    assert not store.exists("demo-owner")

    remote = Profile(
        name="demo-owner", service="https://api.example.com", key=Secret.generate(TokenKind.TENANT).token()
    )
    store.save(remote)
    with pytest.raises(DevStackError) as raised:
        clear_stale_demo_profiles(store, ["demo-owner"])
    assert raised.value.code == "demo_profile_taken"
    assert store.exists("demo-owner")


def test_receipt_summary_says_verified_only_for_an_attested_verified_run() -> None:
    receipt = {
        "run_id": "run_a",
        "room_id": "room_a",
        "status": "completed",
        "manifest_hash": "1" * 64,
        "compose_hash": "2" * 64,
        "agents": [
            {"stage": "scope", "agent_id": "agent_s", "source_digest": "3" * 64, "image_digest": None}
        ],
        "scope_policy_hash": "4" * 64,
        "output": {"plaintext_sha256": "5" * 64, "ciphertext_sha256": "6" * 64},
        "signer_pub": "key",
    }
    run = {
        "run_id": "run_a",
        "verified": True,
        "attestation_skipped": False,
        "output": "42",
        "receipt": receipt,
    }
    summary = DemoReport(room_id="room_a", link="hmroom://x", run=run).receipt_summary()
    assert summary["verified"] is True
    assert summary["output_sha256"] == "5" * 64
    assert summary["agents"][0]["source_digest"] == "3" * 64
    skipped = DemoReport(room_id="room_a", link="x", run={**run, "attestation_skipped": True})
    assert skipped.receipt_summary()["verified"] is False
    unverified = DemoReport(room_id="room_a", link="x", run={**run, "verified": False})
    assert unverified.receipt_summary()["verified"] is False
