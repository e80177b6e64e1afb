"""TEE providers: the simulated seed file and compose hash, and dstack through a fake guest agent."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from dstack_sdk import GetKeyResponse, GetQuoteResponse, get_compose_hash

from hivemind.attestation import (
    APP_ID_EVENT,
    COMPOSE_HASH_EVENT,
    DSTACK_RUNTIME_EVENT_TYPE,
    INSTANCE_ID_EVENT,
    SYSTEM_READY_EVENT,
    check_document_identity,
    dstack_identity_from_event_log,
    replay_event_log,
    runtime_event_digest,
)
from hivemind.models import TeeKind
from hivemind_runner.attestation import build_attestation
from hivemind_runner.keys import RunnerKeys
from hivemind_runner.tee import (
    DEFAULT_APP_COMPOSE,
    RUNNER_KEY_PATH,
    DstackTee,
    SimulatedTee,
    TeeError,
    TeeUnavailable,
    compose_hash_of,
)

COMPOSE = "ab" * 32
APP_ID = "c0ffee" * 4
INSTANCE = "1234abcd" * 5


# --- simulated ----------------------------------------------------------------------------------------


def test_seed_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    seed_file = tmp_path / "state" / "runner-seed"
    tee = SimulatedTee(seed_file)
    seed = tee.seed()
    assert len(seed) == 32
    assert stat.S_IMODE(seed_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(seed_file.parent.stat().st_mode) == 0o700
    assert SimulatedTee(seed_file).seed() == seed  # a restart keeps its keys
    assert SimulatedTee(tmp_path / "other").seed() != seed


def test_seed_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    seed_file = tmp_path / "seed"
    SimulatedTee(seed_file).seed()
    seed_file.chmod(0o640)
    with pytest.raises(TeeError, match="chmod 600"):
        SimulatedTee(seed_file).seed()


def test_seed_file_of_wrong_size_or_symlink_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"x" * 31)
    short.chmod(0o600)
    with pytest.raises(TeeError, match="31 bytes"):
        SimulatedTee(short).seed()
    target = tmp_path / "target"
    SimulatedTee(target).seed()
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(TeeUnavailable):
        SimulatedTee(link).seed()


def test_simulated_compose_hash_is_dstacks_hash_of_the_deployed_app_compose(tmp_path: Path) -> None:
    raw = DEFAULT_APP_COMPOSE.read_bytes()
    expected = get_compose_hash(json.loads(raw))
    assert compose_hash_of(DEFAULT_APP_COMPOSE) == expected
    # The file is stored in dstack's deterministic form, so its plain SHA-256 is the same hash: what
    # dstack measures when it boots this exact file.
    assert hashlib.sha256(raw).hexdigest() == expected
    assert SimulatedTee(tmp_path / "seed").identity().compose_hash == expected
    # The embedded docker-compose file is the one in agent-runner/deploy/.
    compose_file = DEFAULT_APP_COMPOSE.parent / "docker-compose.yaml"
    assert json.loads(raw)["docker_compose_file"] == compose_file.read_text()


def test_simulated_compose_hash_override_and_quote(tmp_path: Path) -> None:
    tee = SimulatedTee(tmp_path / "seed", compose_hash=COMPOSE)
    assert tee.kind is TeeKind.SIMULATED
    assert tee.identity().compose_hash == COMPOSE
    assert tee.identity().instance_id is None
    assert tee.quote(bytes(64)) == (b"", [])
    with pytest.raises(TeeError):
        tee.quote(bytes(32))
    with pytest.raises(TeeError):
        SimulatedTee(tmp_path / "seed", compose_hash="AB" * 32)


def test_missing_app_compose_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TeeUnavailable, match="app compose"):
        SimulatedTee(tmp_path / "seed", app_compose=tmp_path / "missing.json")


# --- dstack -------------------------------------------------------------------------------------------


def runtime_event(name: str, payload: bytes) -> dict[str, Any]:
    return {
        "imr": 3,
        "event_type": DSTACK_RUNTIME_EVENT_TYPE,
        "digest": runtime_event_digest(name, payload).hex(),
        "event": name,
        "event_payload": payload.hex(),
    }


def boot_log() -> list[dict[str, Any]]:
    return [
        {"imr": 0, "event_type": 1, "digest": "11" * 48, "event": "", "event_payload": ""},
        runtime_event(APP_ID_EVENT, bytes.fromhex(APP_ID)),
        runtime_event(COMPOSE_HASH_EVENT, bytes.fromhex(COMPOSE)),
        runtime_event(INSTANCE_ID_EVENT, bytes.fromhex(INSTANCE)),
        runtime_event(SYSTEM_READY_EVENT, b""),
    ]


class FakeDstackClient:
    """Answers like dstack_sdk.DstackClient, with the SDK's own response types."""

    def __init__(self, *, key: bytes = bytes(range(32)), events: list[dict[str, Any]] | None = None) -> None:
        self.key = key
        self.events = boot_log() if events is None else events
        self.calls: list[tuple[str, Any]] = []

    def get_key(self, path: str | None = None, purpose: str | None = None, algorithm: str = "secp256k1"):
        self.calls.append(("get_key", path))
        return GetKeyResponse(key=self.key.hex(), signature_chain=[])

    def get_quote(self, report_data: bytes):
        self.calls.append(("get_quote", report_data))
        return GetQuoteResponse(quote=(b"QUOTE" + report_data).hex(), event_log=json.dumps(self.events))

    def info(self):
        self.calls.append(("info", None))
        return SimpleNamespace(app_id=APP_ID, compose_hash=COMPOSE, instance_id=INSTANCE.upper())


def test_dstack_seed_comes_from_the_runner_key_path() -> None:
    client = FakeDstackClient()
    assert DstackTee(client).seed() == bytes(range(32))
    assert client.calls == [("get_key", RUNNER_KEY_PATH)]
    assert RUNNER_KEY_PATH == "hivemind/runner/v1"


def test_dstack_key_of_wrong_length_is_refused() -> None:
    with pytest.raises(TeeError, match="33-byte"):
        DstackTee(FakeDstackClient(key=bytes(33))).seed()


def test_dstack_quote_is_over_exactly_the_report_data_and_carries_the_event_log() -> None:
    client = FakeDstackClient()
    report_data = bytes(range(64))
    quote, events = DstackTee(client).quote(report_data)
    assert client.calls == [("get_quote", report_data)]
    assert quote == b"QUOTE" + report_data
    identity = dstack_identity_from_event_log(events, replay_event_log(events).rtmr3)
    assert (identity.compose_hash, identity.app_id, identity.instance_id) == (COMPOSE, APP_ID, INSTANCE)
    with pytest.raises(TeeError):
        DstackTee(client).quote(report_data[:63])


def test_dstack_event_log_in_an_unknown_format_fails_closed() -> None:
    events = boot_log()
    events[1] = {**events[1], "version": 2}
    with pytest.raises(TeeError, match="event log entry"):
        DstackTee(FakeDstackClient(events=events)).quote(bytes(64))
    with pytest.raises(TeeError, match="not a list"):
        DstackTee(FakeDstackClient(events={"imr": 3})).quote(bytes(64))  # type: ignore[arg-type]


def test_dstack_identity_is_normalised_lowercase_and_matches_the_log() -> None:
    identity = DstackTee(FakeDstackClient()).identity()
    assert identity.app_id == APP_ID and identity.compose_hash == COMPOSE and identity.instance_id == INSTANCE


def test_dstack_without_a_guest_agent_socket_says_so(tmp_path: Path) -> None:
    with pytest.raises(TeeUnavailable, match="HIVEMIND_TEE=simulated"):
        DstackTee(endpoint=str(tmp_path / "dstack.sock"))


def test_dstack_default_endpoint_absent_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSTACK_SIMULATOR_ENDPOINT", raising=False)
    if any(os.path.exists(path) for path in ("/var/run/dstack.sock", "/run/dstack.sock")):
        pytest.skip("a dstack guest agent socket exists on this machine")
    with pytest.raises(TeeUnavailable, match="dstack CVM"):
        DstackTee()


def test_dstack_agent_errors_become_tee_unavailable() -> None:
    class Broken(FakeDstackClient):
        def get_key(self, *args: Any, **kwargs: Any):
            raise httpx.ConnectError("refused")

    with pytest.raises(TeeUnavailable, match="get_key"):
        DstackTee(Broken()).seed()


def test_dstack_document_identity_checks_against_its_log() -> None:
    # The runner's document (identity from info(), log from get_quote) passes the client's step 4.
    tee = DstackTee(FakeDstackClient())
    keys = RunnerKeys.from_seed(tee.seed())
    document = build_attestation(runner_id="runner_a", tee=tee, keys=keys, version="0.1.0", now=1)
    assert document.tee is TeeKind.TDX
    assert document.quote_bytes() == b"QUOTE" + keys.report_data()
    identity = dstack_identity_from_event_log(document.event_log, replay_event_log(document.event_log).rtmr3)
    check_document_identity(identity, document)
