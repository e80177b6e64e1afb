"""The run state machine on a real moto server: legal and illegal transitions, redelivery, listings."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from hivemind.errors import Conflict, InvalidInput, NotFound
from hivemind.models import Budgets, RunStatus, Stage, StageUsage
from hivemind.store import Store
from hivemind.store.runs import RunRecord, RunResult
from hivemind.store.schema import run_envelope_key, run_output_key, run_receipt_key

from .conftest import FakeClock

pytestmark = pytest.mark.moto_server

BUDGETS = Budgets(timeout_s=60, llm_calls=2, tokens=1000, memory_mb=256)


def new_run(store: Store, run_id: str, *, room_id: str = "room_a", caller_id: str = "caller_a") -> RunRecord:
    now = store.clock()
    return store.runs.create(
        RunRecord(
            run_id=run_id,
            room_id=room_id,
            caller_id=caller_id,
            payer_tenant_id="tenant_payer",
            budgets=BUDGETS,
            hold=5000,
            prompt_sha256="1" * 64,
            manifest_hash="2" * 64,
            envelope_key=run_envelope_key(run_id),
            created_at=now,
            updated_at=now,
        )
    )


def completed_result(run_id: str, marker: str = "first") -> RunResult:
    return RunResult(
        usage=[StageUsage(stage=Stage.QUERY, duration_ms=1200, tool_calls={"sql": 2}, prompt_tokens=10)],
        receipt_key=run_receipt_key(run_id),
        output_key=run_output_key(run_id),
        artifact_names=[marker],
    )


def test_happy_path_and_redelivered_completion_is_a_noop(clocked_store: Store, clock: FakeClock) -> None:
    created = new_run(clocked_store, "run_1")
    assert clocked_store.runs.get("run_1") == created
    clock.advance(2)
    started = clocked_store.runs.start("run_1", "runner_a")
    assert (started.status, started.runner_id, started.attempts, started.started_at) == (
        RunStatus.RUNNING,
        "runner_a",
        1,
        clock.now,
    )
    assert clocked_store.runs.set_stage("run_1", "runner_a", Stage.SCOPE).stage is Stage.SCOPE

    clock.advance(5)
    finished = clocked_store.runs.finish("run_1", RunStatus.COMPLETED, completed_result("run_1"))
    assert finished.applied
    assert finished.run.status is RunStatus.COMPLETED and finished.run.finished_at == clock.now
    assert finished.run.usage[0].tool_calls == {"sql": 2} and finished.run.stage is None

    clock.advance(5)
    again = clocked_store.runs.finish("run_1", RunStatus.COMPLETED, completed_result("run_1", "second"))
    assert not again.applied
    assert again.run == finished.run  # the first result stands
    assert clocked_store.runs.get("run_1") == finished.run


@pytest.mark.parametrize(
    ("setup", "target"),
    [
        ([], RunStatus.COMPLETED),  # pending -> completed: never ran
        ([RunStatus.COMPLETED], RunStatus.FAILED),
        ([RunStatus.FAILED], RunStatus.COMPLETED),
        ([RunStatus.EXPIRED], RunStatus.COMPLETED),
        ([RunStatus.COMPLETED], RunStatus.EXPIRED),
    ],
)
def test_illegal_transitions_are_refused_by_the_store(
    clocked_store: Store, setup: list[RunStatus], target: RunStatus
) -> None:
    new_run(clocked_store, "run_x")
    clocked_store.runs.start("run_x", "runner_a")
    for status in setup:
        clocked_store.runs.finish(
            "run_x", status, RunResult(error_code="boom" if status != RunStatus.COMPLETED else None)
        )
    if not setup:
        new_run(clocked_store, "run_y")
        with pytest.raises(Conflict) as caught:
            clocked_store.runs.finish("run_y", target, RunResult())
        assert clocked_store.runs.get("run_y").status is RunStatus.PENDING
    else:
        before = clocked_store.runs.get("run_x")
        with pytest.raises(Conflict) as caught:
            clocked_store.runs.finish("run_x", target, RunResult())
        assert clocked_store.runs.get("run_x") == before
    assert caught.value.code == "illegal_run_transition"


def test_finished_runs_cannot_be_started_again_but_running_ones_can_be_taken_over(
    clocked_store: Store,
) -> None:
    new_run(clocked_store, "run_1")
    clocked_store.runs.start("run_1", "runner_a")
    takeover = clocked_store.runs.start("run_1", "runner_b")
    assert (takeover.runner_id, takeover.attempts) == ("runner_b", 2)
    with pytest.raises(Conflict) as caught:
        clocked_store.runs.set_stage("run_1", "runner_a", Stage.QUERY)
    assert caught.value.code == "run_not_owned"

    clocked_store.runs.finish("run_1", RunStatus.FAILED, RunResult(error_code="runner_lost"))
    with pytest.raises(Conflict) as caught:
        clocked_store.runs.start("run_1", "runner_c")
    assert caught.value.code == "run_finished"
    with pytest.raises(NotFound):
        clocked_store.runs.start("run_missing", "runner_a")
    with pytest.raises(InvalidInput):
        clocked_store.runs.finish("run_1", RunStatus.RUNNING, RunResult())


def test_pending_runs_may_fail_or_expire(clocked_store: Store) -> None:
    new_run(clocked_store, "run_f")
    new_run(clocked_store, "run_e")
    failed = clocked_store.runs.finish("run_f", RunStatus.FAILED, RunResult(error_code="dead_lettered"))
    assert failed.run.error_code == "dead_lettered"
    assert clocked_store.runs.finish("run_e", RunStatus.EXPIRED, RunResult()).run.status is RunStatus.EXPIRED


def test_concurrent_completions_apply_exactly_once(clocked_store: Store) -> None:
    new_run(clocked_store, "run_race")
    clocked_store.runs.start("run_race", "runner_a")
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(
            pool.map(
                lambda index: clocked_store.runs.finish(
                    "run_race", RunStatus.COMPLETED, completed_result("run_race", f"m{index}")
                ),
                range(8),
            )
        )
    assert sum(outcome.applied for outcome in outcomes) == 1


def test_duplicate_create_is_refused(clocked_store: Store) -> None:
    new_run(clocked_store, "run_1")
    clocked_store.runs.start("run_1", "runner_a")
    with pytest.raises(Conflict):
        new_run(clocked_store, "run_1")
    assert clocked_store.runs.get("run_1").status is RunStatus.RUNNING


def test_listings_by_room_and_caller_are_newest_first_and_paginate(
    clocked_store: Store, clock: FakeClock
) -> None:
    for index in range(5):
        clock.advance(1)
        new_run(clocked_store, f"run_{index}", caller_id="caller_a" if index % 2 == 0 else "caller_b")
    new_run(clocked_store, "run_elsewhere", room_id="room_b", caller_id="caller_c")

    first = clocked_store.runs.list_by_room("room_a", limit=2)
    second = clocked_store.runs.list_by_room("room_a", cursor=first.cursor, limit=2)
    third = clocked_store.runs.list_by_room("room_a", cursor=second.cursor, limit=2)
    ids = [run.run_id for page in (first, second, third) for run in page.items]
    assert ids == ["run_4", "run_3", "run_2", "run_1", "run_0"]
    assert [run.run_id for run in clocked_store.runs.list_by_caller("caller_a").items] == [
        "run_4",
        "run_2",
        "run_0",
    ]


def test_open_runs_index_feeds_the_janitor(clocked_store: Store, clock: FakeClock) -> None:
    new_run(clocked_store, "run_old")
    new_run(clocked_store, "run_done")
    clocked_store.runs.start("run_done", "runner_a")
    clocked_store.runs.finish("run_done", RunStatus.COMPLETED, completed_result("run_done"))
    clock.advance(600)
    new_run(clocked_store, "run_new")
    idle = clocked_store.runs.list_open(RunStatus.PENDING, idle_since=clock.now - 300)
    assert [run.run_id for run in idle] == ["run_old"]
    assert clocked_store.runs.list_open(RunStatus.RUNNING, idle_since=clock.now) == []
    with pytest.raises(InvalidInput):
        clocked_store.runs.list_open(RunStatus.COMPLETED, idle_since=clock.now)
