"""Logs that cannot carry room data, and usage summaries for settlement and `run stats`."""

from __future__ import annotations

import io
import json

import pytest

from hivemind.errors import ReplayError, SealError
from hivemind.models import Stage, StageUsage
from hivemind_runner.lifecycle import error_code_of
from hivemind_runner.telemetry import (
    REDACTED,
    RunTimer,
    StructuredLogger,
    aggregate_llm_usage,
    configure_logging,
    safe_fields,
    usage_summary,
)


def test_free_text_is_redacted_before_it_is_logged() -> None:
    fields = safe_fields(
        {
            "run_id": "run_abc",
            "error_code": "seal_tag_mismatch",
            "count": 3,
            "prompt": "what is alice's salary?",
            "sql": "SELECT * FROM people",
            "tool_calls": {"sql": 2, "free text key": 1},
            "stages": ["scope", "query with spaces"],
            "Bad Name": "x",
        }
    )
    assert (
        fields["run_id"] == "run_abc" and fields["error_code"] == "seal_tag_mismatch" and fields["count"] == 3
    )
    assert fields["prompt"] == REDACTED and fields["sql"] == REDACTED
    assert fields["tool_calls"] == {"sql": 2, REDACTED: 1}
    assert fields["stages"] == ["scope", REDACTED]
    assert "Bad Name" not in fields


def test_events_are_json_lines_with_bound_fields() -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream)
    logger = StructuredLogger().bind(run_id="run_abc", room_id="room_x")
    logger.event("run_finished", status="completed", secret="row: alice,100")
    logger.event("debug_only", level=10)
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["event"] == "run_finished" and line["run_id"] == "run_abc" and line["room_id"] == "room_x"
    assert line["secret"] == REDACTED
    with pytest.raises(ValueError):
        logger.event("Not an event name")


def test_error_codes_never_carry_messages() -> None:
    assert error_code_of(ReplayError("nonce abc seen")) == "replay_detected"
    assert error_code_of(SealError("x", code="seal_tag_mismatch")) == "seal_tag_mismatch"
    assert error_code_of(RuntimeError("alice,salary=1")) == "internal_error"
    assert error_code_of(OSError(28, "No space left on device")) == "workspace_full"


def test_llm_usage_is_summed_per_provider_and_model() -> None:
    lines = aggregate_llm_usage(
        [
            {"provider": "tinfoil", "model": "b", "prompt_tokens": 1, "completion_tokens": 1},
            {"provider": "openrouter", "model": "a", "prompt_tokens": 2, "completion_tokens": 3},
            {"provider": "tinfoil", "model": "b", "prompt_tokens": 4, "completion_tokens": 5},
        ]
    )
    assert [(line.provider, line.model, line.prompt_tokens, line.completion_tokens) for line in lines] == [
        ("openrouter", "a", 2, 3),
        ("tinfoil", "b", 5, 6),
    ]
    with pytest.raises(ValueError):
        aggregate_llm_usage([{"provider": "x", "model": "m", "prompt_tokens": -1, "completion_tokens": 0}])


def test_usage_summary_and_timer() -> None:
    summary = usage_summary(
        [
            StageUsage(stage=Stage.SCOPE, duration_ms=1200, tool_calls={"sql": 2, "items": 1}, llm_calls=1),
            StageUsage(stage=Stage.QUERY, duration_ms=800, tool_calls={"sql": 3}, prompt_tokens=7),
        ]
    )
    assert summary == {
        "stage_ms": {"scope": 1200, "query": 800},
        "tool_calls": {"sql": 5, "items": 1},
        "llm_calls": 1,
        "prompt_tokens": 7,
        "completion_tokens": 0,
    }
    ticks = iter([10.0, 12.2])
    assert RunTimer(clock=lambda: next(ticks)).seconds() == 3
