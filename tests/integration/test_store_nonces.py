"""Run envelope nonces that remember the run that spent them: resume is not replay."""

from __future__ import annotations

import pytest

from hivemind.encoding import b64encode
from hivemind.errors import ExpiredError, InvalidInput, ReplayError
from hivemind.store import AwsClients, Store
from hivemind.store.schema import TableRole

from .conftest import FakeClock

pytestmark = pytest.mark.moto_server


def test_same_run_may_open_its_envelope_again(clocked_store: Store, clock: FakeClock) -> None:
    nonce = b64encode(bytes(range(16)))
    guard = clocked_store.nonces.guard_for_run("run_abc")
    guard.check_and_record(nonce, clock.now + 300)
    # A redelivered message for the same run: a resume, accepted.
    clocked_store.nonces.guard_for_run("run_abc").check_and_record(nonce, clock.now + 300)
    # The same nonce for any other run is a replay.
    with pytest.raises(ReplayError):
        clocked_store.nonces.guard_for_run("run_other").check_and_record(nonce, clock.now + 300)
    # And so is spending it without naming a run.
    with pytest.raises(ReplayError):
        clocked_store.nonces.check_and_record(nonce, clock.now + 300)


def test_a_nonce_spent_without_a_run_cannot_be_resumed(clocked_store: Store, clock: FakeClock) -> None:
    nonce = b64encode(bytes([7]) * 16)
    clocked_store.nonces.check_and_record(nonce, clock.now + 300)
    with pytest.raises(ReplayError):
        clocked_store.nonces.guard_for_run("run_abc").check_and_record(nonce, clock.now + 300)


def test_resume_keeps_first_record_time_and_run(
    clocked_store: Store, clock: FakeClock, aws: AwsClients
) -> None:
    nonce = b64encode(bytes([3]) * 16)
    clocked_store.nonces.guard_for_run("run_abc").check_and_record(nonce, clock.now + 300)
    first = clock.now
    clock.advance(30)
    clocked_store.nonces.guard_for_run("run_abc").check_and_record(nonce, clock.now + 270)
    stored = aws.dynamodb.get_item(
        TableName=aws.config.table_name(TableRole.NONCES), Key={"nonce": {"S": nonce}}
    )["Item"]
    assert stored["run_id"]["S"] == "run_abc"
    assert int(stored["recorded_at"]["N"]) == first


def test_expired_and_malformed_are_refused_before_writing(clocked_store: Store, clock: FakeClock) -> None:
    guard = clocked_store.nonces.guard_for_run("run_abc")
    with pytest.raises(ExpiredError):
        guard.check_and_record(b64encode(bytes([1]) * 16), clock.now)
    with pytest.raises(InvalidInput):
        clocked_store.nonces.guard_for_run("not a run id")
    with pytest.raises(InvalidInput):
        clocked_store.nonces.check_and_record(b64encode(bytes([2]) * 16), clock.now + 60, run_id="RUN|x")
