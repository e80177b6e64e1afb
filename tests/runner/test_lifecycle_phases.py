"""Where a run's time went: the contiguous ``phase_ms`` of the ``run_finished`` log line."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.rooms import (
    Tenant,
    agent_ref,
    build_manifest,
    create_room,
    seal_item,
    submit_run,
    upload_agent,
    write_agent_dir,
)
from support.runner_harness import TEST_COMPOSE_HASH, FakePipeline, make_runner

from hivemind.models import Stage
from hivemind.store import Store
from hivemind_runner.pipeline import PipelineInputs, PipelineResult
from hivemind_runner.telemetry import PhaseClock, configure_logging

pytestmark = pytest.mark.moto_server

LIFECYCLE_PHASES = ["start", "verify", "envelope", "inputs"]
AFTER_PIPELINE = ["seal", "wipe", "receipt", "finish", "settle"]


def test_laps_are_contiguous_and_parts_split_a_phase() -> None:
    ticks = iter([0.0, 0.010, 0.250, 0.300, 0.3004])
    clock = PhaseClock(clock=lambda: next(ticks))
    assert clock.lap("start") == 10
    # 240 ms, of which the callee accounts for 200 (and claims more than it had, which is capped).
    clock.lap("pipeline", {"scope": 150, "query": 50})
    clock.lap("seal")
    clock.lap("seal")
    assert clock.phases() == {"start": 10, "scope": 150, "query": 50, "pipeline": 40, "seal": 50}
    assert list(clock.phases()) == ["start", "scope", "query", "pipeline", "seal"]
    with pytest.raises(ValueError, match="lowercase identifier"):
        clock.lap("Scope Stage")
    with pytest.raises(ValueError, match="lowercase identifier"):
        clock.lap("pipeline", {"row data": 1})


@dataclass
class TimedPipeline(FakePipeline):
    """Reports the phases a real pipeline reports, and takes a little time in each."""

    def run(self, inputs: PipelineInputs, on_stage: Callable[[Stage], None]) -> PipelineResult:
        time.sleep(0.03)
        result = super().run(inputs, on_stage)
        result.phases = {"images": 5, "scope": 10, "query": 10, "mediator": 5}
        return result


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("INFO", stream)
    yield stream
    configure_logging("INFO")


def finished_event(stream: io.StringIO) -> dict[str, Any]:
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    (finished,) = [event for event in events if event["event"] == "run_finished"]
    return finished


def run_once(store: Store, tmp_path: Path, pipeline: FakePipeline) -> float:
    owner = Tenant.create(store, "owner")
    agents = {
        name: upload_agent(store, owner, write_agent_dir(tmp_path / "agents" / name, body=f"# {name}\n"))
        for name in ("scope", "query", "mediator")
    }
    manifest = build_manifest(
        owner,
        room_id="room_phases" + tmp_path.name[-8:].lower().replace("_", "x"),
        scope=agent_ref(agents["scope"]),
        query=agent_ref(agents["query"]),
        mediator=agent_ref(agents["mediator"]),
        compose_hashes=[TEST_COMPOSE_HASH],
    )
    room = create_room(store, owner, manifest)
    seal_item(store, room, b"region,amount\nnorth,10\n", item_id="item_sales", metadata={"name": "s.csv"})
    runner = make_runner(store, tmp_path / "runner", pipeline)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    started = time.perf_counter()
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    return (time.perf_counter() - started) * 1000


def test_a_completed_run_logs_its_timeline_in_order(
    store: Store, tmp_path: Path, log_lines: io.StringIO
) -> None:
    elapsed_ms = run_once(store, tmp_path, TimedPipeline(store=store))
    finished = finished_event(log_lines)
    phases = finished["phase_ms"]
    pipeline_phases = ["images", "scope", "query", "mediator", "pipeline"]
    assert list(phases) == LIFECYCLE_PHASES + pipeline_phases + AFTER_PIPELINE
    assert all(isinstance(value, int) and value >= 0 for value in phases.values())
    # The pipeline's own phases are inside the lifecycle's lap; the remainder (its sleep) stays "pipeline".
    assert phases["scope"] == 10 and phases["pipeline"] >= 25
    assert sum(phases.values()) <= elapsed_ms + 5


def test_a_failed_run_logs_the_phases_it_reached(
    store: Store, tmp_path: Path, log_lines: io.StringIO
) -> None:
    run_once(store, tmp_path, FakePipeline(store=store, error_code="scope_failed"))
    finished = finished_event(log_lines)
    assert finished["status"] == "failed"
    phases = finished["phase_ms"]
    assert list(phases) == [*LIFECYCLE_PHASES, "pipeline", "failed_step", "receipt", "finish", "settle"]
