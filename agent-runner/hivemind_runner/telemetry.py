"""What the runner says about its work: structured logs that hold no room data, and per-run usage.

Logs leave the TEE (the CVM's console, a log shipper), so they are built to be unable to carry room
data: an event is a fixed name plus fields whose values are integers, booleans, ``None``, short
identifier-like strings (ids, codes, stage names) or flat maps of those. Anything else, a prompt or an
SQL error message for instance, is replaced by ``"[redacted]"`` before it is formatted. Exception
messages are never logged, only error codes.

Per-run usage (seconds per stage, tool calls by name, LLM calls and tokens) comes from the pipeline as
``StageUsage`` and is stored with the run (the run row's ``usage``, which ``hmctl run stats`` reads),
signed into the receipt and summed into the settlement message.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

from hivemind.models import StageUsage
from hivemind.store.prices import LlmUsage

REDACTED = "[redacted]"
# Ids, codes, stage and tool names, hashes, versions: nothing that could hold a sentence of room data.
_SAFE_TEXT = re.compile(r"^[A-Za-z0-9_.:@+/-]{0,128}$")
_EVENT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_MAX_MAP_ENTRIES = 64


def _safe_scalar(value: Any) -> Any:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return round(value, 3) if math.isfinite(value) else None
    if isinstance(value, str) and _SAFE_TEXT.fullmatch(value):
        return value
    return REDACTED


def safe_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` with every value that could carry free text replaced by ``[redacted]``."""
    safe: dict[str, Any] = {}
    for name, value in fields.items():
        if not _EVENT_NAME.fullmatch(name):
            continue
        if isinstance(value, Mapping):
            safe[name] = {
                str(_safe_scalar(key)): _safe_scalar(item)
                for key, item in list(value.items())[:_MAX_MAP_ENTRIES]
            }
        elif isinstance(value, list | tuple):
            safe[name] = [_safe_scalar(item) for item in value[:_MAX_MAP_ENTRIES]]
        else:
            safe[name] = _safe_scalar(value)
    return safe


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        body.update(getattr(record, "hivemind_fields", {}))
        return json.dumps(body, separators=(",", ":"), sort_keys=False)


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """One JSON line per event on ``stream`` (stderr by default) for the ``hivemind_runner`` loggers."""
    root = logging.getLogger("hivemind_runner")
    root.handlers.clear()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


class StructuredLogger:
    """Events with safe fields, optionally bound to a run (``run_id``, ``room_id``, ...)."""

    def __init__(self, name: str = "hivemind_runner", bound: Mapping[str, Any] | None = None) -> None:
        self._logger = logging.getLogger(name)
        self._bound = safe_fields(bound or {})

    def bind(self, **fields: Any) -> StructuredLogger:
        child = StructuredLogger(self._logger.name)
        child._bound = {**self._bound, **safe_fields(fields)}
        return child

    def event(self, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
        if not _EVENT_NAME.fullmatch(event):
            raise ValueError("an event name is a lowercase identifier")
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"hivemind_fields": {**self._bound, **safe_fields(fields)}})

    def warning(self, event: str, **fields: Any) -> None:
        self.event(event, level=logging.WARNING, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.event(event, level=logging.ERROR, **fields)


# --- usage -----------------------------------------------------------------------------------------


def aggregate_llm_usage(calls: Iterable[Mapping[str, Any] | LlmUsage]) -> list[LlmUsage]:
    """One line per (provider, model), summed, sorted: the ``llm`` list of a settlement message."""
    totals: dict[tuple[str, str], list[int]] = {}
    for call in calls:
        usage = call if isinstance(call, LlmUsage) else LlmUsage.model_validate(dict(call))
        entry = totals.setdefault((usage.provider, usage.model), [0, 0])
        entry[0] += usage.prompt_tokens
        entry[1] += usage.completion_tokens
    return [
        LlmUsage(provider=provider, model=model, prompt_tokens=prompt, completion_tokens=completion)
        for (provider, model), (prompt, completion) in sorted(totals.items())
    ]


def usage_summary(usage: Iterable[StageUsage]) -> dict[str, Any]:
    """Log fields for a finished run: milliseconds per stage, tool calls by name, LLM calls, tokens."""
    stage_ms: dict[str, int] = {}
    tool_calls: dict[str, int] = {}
    llm_calls = prompt_tokens = completion_tokens = 0
    for stage in usage:
        stage_ms[stage.stage.value] = stage.duration_ms
        for tool, count in stage.tool_calls.items():
            tool_calls[tool] = tool_calls.get(tool, 0) + count
        llm_calls += stage.llm_calls
        prompt_tokens += stage.prompt_tokens
        completion_tokens += stage.completion_tokens
    return {
        "stage_ms": stage_ms,
        "tool_calls": tool_calls,
        "llm_calls": llm_calls,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }


class PhaseClock:
    """Where one run's time went: contiguous named phases in milliseconds, for the ``run_finished`` log.

    Each :meth:`lap` closes the phase that began at the previous lap (or at construction), so the
    phases add up to the whole and their running sum is a timeline from the first instant. Only names
    and integers: nothing here can carry room data. Not thread-safe: one run's own thread laps it.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._last = clock()
        self._phases: dict[str, int] = {}

    def lap(self, name: str, parts: Mapping[str, int] | None = None) -> int:
        """End the current phase as ``name`` (summed if ``name`` was lapped before); its milliseconds.

        ``parts`` splits the phase: a callee's own contiguous phases (the pipeline's stages) are
        recorded in their order, and whatever of the phase they do not cover is recorded as ``name``.
        """
        for part in (name, *(parts or {})):
            if not _EVENT_NAME.fullmatch(part):
                raise ValueError("a phase name is a lowercase identifier")
        now = self._clock()
        elapsed = max(0, round((now - self._last) * 1000))
        self._last = now
        remainder = elapsed
        for part, milliseconds in (parts or {}).items():
            covered = min(max(0, int(milliseconds)), remainder)
            self._phases[part] = self._phases.get(part, 0) + covered
            remainder -= covered
        self._phases[name] = self._phases.get(name, 0) + remainder
        return elapsed

    def phases(self) -> dict[str, int]:
        """The phases so far, in the order they first ended."""
        return dict(self._phases)


class RunTimer:
    """Wall-clock seconds one run held the runner (what the runner fee is charged on)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()

    def seconds(self) -> int:
        """Elapsed seconds, rounded up: a started second is a used second."""
        return max(0, math.ceil(self._clock() - self._started))
