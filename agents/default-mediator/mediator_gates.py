"""The default mediator's deterministic gates: deny, row-level refusal, redaction (docs/default-agents.md).

Order: deny patterns on the raw answer (refuse), then row-level heuristics in aggregate-only rooms
(refuse), then redaction (replace with ``[REDACTED]``), then deny patterns again on what would leave.
The runner applies ``output.deny`` and ``output.redact`` once more after the mediator.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mediator_rows import row_level_reason, strings_in

from hivemind_agent.rules import RulesError, load_policy_block

REDACTED = "[REDACTED]"
DEFAULT_MIN_GROUP_SIZE = 10


@dataclass(frozen=True, slots=True)
class RoomShape:
    """What the mediator needs of the room's rules: does it release aggregates only, over what groups."""

    aggregate_only: bool
    min_group_size: int


STRICTEST = RoomShape(aggregate_only=True, min_group_size=DEFAULT_MIN_GROUP_SIZE)


def room_shape(rules: str, policy_text: str) -> RoomShape:
    """Read the rules' policy block the way the default scope agent compiles it.

    No block: the scope agent's default (aggregate-only, groups of 10). A block that lists no tables
    shows no tabular data, so the row heuristics have nothing to guard. A block that does not parse
    makes the run fail at the scope stage; here it means the strictest reading.
    """
    try:
        loaded = load_policy_block(rules, policy_text)
    except RulesError:
        return STRICTEST
    if loaded is None:
        return STRICTEST
    data = loaded[1]
    aggregate = data.get("aggregate")
    aggregate = aggregate if isinstance(aggregate, Mapping) else {}
    size = aggregate.get("min_group_size", DEFAULT_MIN_GROUP_SIZE)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        size = DEFAULT_MIN_GROUP_SIZE
    tables = data.get("tables")
    # An omitted or empty tables section shows no table; a malformed one fails the scope stage.
    has_tables = bool(tables) if tables is None or isinstance(tables, Mapping) else True
    return RoomShape(
        aggregate_only=has_tables and aggregate.get("required") is not False, min_group_size=size
    )


@dataclass(frozen=True, slots=True)
class OutputRules:
    """``output.deny`` and ``output.redact`` of the run's ScopePolicy, compiled."""

    deny: tuple[re.Pattern[str], ...]
    redact: tuple[re.Pattern[str], ...]

    @classmethod
    def from_stage(cls, stage: Mapping[str, Any]) -> OutputRules:
        """From the mediator's stage input. A pattern that does not compile fails the stage (closed)."""
        rules = stage.get("output_rules") or {}
        if not isinstance(rules, Mapping):
            raise ValueError("stage.output_rules must be an object with deny and redact lists")

        def patterns(key: str) -> tuple[re.Pattern[str], ...]:
            values = rules.get(key) or []
            if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
                raise ValueError(f"stage.output_rules.{key} must be a list of regular expressions")
            return tuple(re.compile(value) for value in values)

        return cls(deny=patterns("deny"), redact=patterns("redact"))


@dataclass(frozen=True, slots=True)
class Answer:
    """The query stage's output: text, or a JSON object (exactly one is set)."""

    text: str | None
    data: Mapping[str, Any] | None

    @classmethod
    def from_stage(cls, stage: Mapping[str, Any]) -> Answer:
        answer = stage.get("answer")
        if isinstance(answer, Mapping) and set(answer) == {"text"} and isinstance(answer["text"], str):
            return cls(text=answer["text"], data=None)
        if isinstance(answer, Mapping) and set(answer) == {"json"} and isinstance(answer["json"], Mapping):
            return cls(text=None, data=answer["json"])
        raise ValueError('stage.answer must be {"text": string} or {"json": object}')

    def readable(self) -> str:
        """The answer as one text: itself, or its JSON followed by every string in it."""
        if self.text is not None:
            return self.text
        return "\n".join([json.dumps(self.data, ensure_ascii=False, default=str), *strings_in(self.data)])

    def output(self) -> str | dict[str, Any]:
        return self.text if self.text is not None else dict(self.data or {})


def _denied_by(text: str, deny: Sequence[re.Pattern[str]]) -> int | None:
    return next((index for index, pattern in enumerate(deny) if pattern.search(text)), None)


def _redact_value(value: Any, redact: Sequence[re.Pattern[str]]) -> Any:
    if isinstance(value, str):
        for pattern in redact:
            value = pattern.sub(REDACTED, value)
        return value
    if isinstance(value, Mapping):
        return {key: _redact_value(inner, redact) for key, inner in value.items()}
    if isinstance(value, list):
        return [_redact_value(inner, redact) for inner in value]
    return value


def redact(answer: Answer, rules: OutputRules) -> Answer:
    if answer.text is not None:
        return Answer(text=_redact_value(answer.text, rules.redact), data=None)
    return Answer(text=None, data=_redact_value(dict(answer.data or {}), rules.redact))


def refusal(reason: str) -> dict[str, str]:
    """The mediator's refusal output (docs/agents.md): the runner shows ``reason`` to the requester."""
    return {"refusal": f"The answer was withheld: {reason}."}


def deny_reason(text: str, rules: OutputRules) -> str | None:
    index = _denied_by(text, rules.deny)
    if index is None:
        return None
    # The rule's number, not the pattern or the matched text: either could carry what is withheld.
    return f"it matches deny rule {index + 1} of {len(rules.deny)} in the room's output rules"


def apply_gates(answer: Answer, rules: OutputRules, shape: RoomShape) -> str | dict[str, Any]:
    """The final answer, or a refusal object, after every deterministic gate."""
    reason = deny_reason(answer.readable(), rules)
    if reason is not None:
        return refusal(reason)
    if shape.aggregate_only:
        row_level = row_level_reason(answer.readable(), answer.data, shape.min_group_size)
        if row_level is not None:
            return refusal(f"this room releases aggregates only, and {row_level}")
    released = redact(answer, rules)
    reason = deny_reason(released.readable(), rules)
    if reason is not None:
        return refusal(reason)
    return released.output()
