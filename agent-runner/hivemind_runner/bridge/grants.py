"""Per-stage grants and the admission chain every bridge tool call passes (DESIGN §10, docs/bridge.md).

The role table of docs/agents.md is the first policy of the chain (``stage_grants``), so a route closed
to a role is refused by the same machinery as everything else: ``403 not_allowed_for_role``. The fixed
head continues with the room's egress (artifacts, LLM providers) and per-stage call limits; operators
may append policies (``max_prompt_bytes:N`` bounds request bodies, ``daily_run_quota:N`` counts tool
calls per stage) with the same specs as the run chain. Any policy error denies (fail closed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from hivemind.admission import (
    ALLOW,
    AdmissionChain,
    Decision,
    Deny,
    DenyCode,
    InMemoryRunCounter,
    Policy,
    PolicyFactory,
    build_chain,
    standard_registry,
)
from hivemind.models import Stage


class Tool(StrEnum):
    """What a bridge call does; REST routes and MCP tools map onto these."""

    INPUT = "input"
    OUTPUT = "output"
    SCHEMA = "schema"
    SQL = "sql"
    ITEMS = "items"
    ITEM = "item"
    LLM = "llm"
    ARTIFACT = "artifact"
    SIMULATE = "simulate"
    POLICY_CHECK = "policy_check"
    LOG = "log"


_COMMON = frozenset({Tool.INPUT, Tool.OUTPUT, Tool.LLM, Tool.LOG})
_DATA = frozenset({Tool.SCHEMA, Tool.SQL, Tool.ITEMS, Tool.ITEM})

GRANTS: Mapping[Stage, frozenset[Tool]] = {
    # Full read, simulate and policy checks; never artifacts: the scope stage's only way out is its policy.
    Stage.SCOPE: _COMMON | _DATA | {Tool.SIMULATE, Tool.POLICY_CHECK},
    # Scoped tools and artifacts (when the room's egress allows them).
    Stage.QUERY: _COMMON | _DATA | {Tool.ARTIFACT},
    # No data at all: input, output, log (and the LLM when the room allows a provider).
    Stage.MEDIATOR: _COMMON,
}


@dataclass(frozen=True)
class ToolCall:
    """The admission context of one tool call. Holds sizes and counts, never the request's content."""

    run_id: str
    stage: Stage
    tool: Tool
    simulated: bool
    request_bytes: int
    artifacts_allowed: bool
    llm_allowed: bool
    tool_calls: int
    log_lines: int

    @property
    def prompt_bytes(self) -> int:
        """For ``max_prompt_bytes``: the size of the request body."""
        return self.request_bytes

    @property
    def caller_id(self) -> str:
        """For ``daily_run_quota``: one counter per stage of a run."""
        return f"{self.run_id}/{self.stage.value}{'/simulated' if self.simulated else ''}"


class StageGrants:
    """Refuse a tool the stage's role does not have (``not_allowed_for_role``)."""

    name = "stage_grants"

    def evaluate(self, ctx: ToolCall) -> Decision[ToolCall]:
        if ctx.tool not in GRANTS[ctx.stage]:
            return Deny("not_allowed_for_role", f"the {ctx.stage.value} stage may not use {ctx.tool.value}")
        return ALLOW


class EgressRules:
    """The room's egress: artifacts only when allowed; LLM calls only when a provider is allowed."""

    name = "room_egress"

    def evaluate(self, ctx: ToolCall) -> Decision[ToolCall]:
        if ctx.tool is Tool.ARTIFACT and not ctx.artifacts_allowed:
            return Deny("artifacts_disabled", "this room's egress does not allow artifacts")
        if ctx.tool is Tool.LLM and not ctx.llm_allowed:
            return Deny(DenyCode.PROVIDER_NOT_ALLOWED, "this room allows no LLM provider")
        return ALLOW


class CallLimits:
    """At most ``max_tool_calls`` calls and ``max_log_lines`` log lines per stage (``rate_limited``)."""

    name = "stage_call_limits"

    def __init__(self, max_tool_calls: int, max_log_lines: int):
        self.max_tool_calls = max_tool_calls
        self.max_log_lines = max_log_lines

    def evaluate(self, ctx: ToolCall) -> Decision[ToolCall]:
        if ctx.tool_calls >= self.max_tool_calls:
            return Deny(DenyCode.RATE_LIMITED, f"a stage may make at most {self.max_tool_calls} bridge calls")
        if ctx.tool is Tool.LOG and ctx.log_lines >= self.max_log_lines:
            return Deny(DenyCode.RATE_LIMITED, f"a stage may log at most {self.max_log_lines} lines")
        return ALLOW


def tool_call_chain(
    *,
    max_tool_calls: int,
    max_log_lines: int,
    extra_specs: str | Sequence[str] | None = None,
    extra_policies: Sequence[Policy[ToolCall]] = (),
    registry: Mapping[str, PolicyFactory] | None = None,
) -> AdmissionChain[ToolCall]:
    """The bridge's chain: the fixed head, then ``extra_policies``, then the operator's ``extra_specs``.

    A spec that cannot be resolved turns the chain into deny-all (``policy_chain_unavailable``).
    """
    head: list[Policy[ToolCall]] = [StageGrants(), EgressRules(), CallLimits(max_tool_calls, max_log_lines)]
    head.extend(extra_policies)
    return build_chain(head, extra_specs, registry or standard_registry(InMemoryRunCounter()))
