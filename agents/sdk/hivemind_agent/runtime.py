"""``main(handler)``: the whole life of an agent stage, so an agent is a function from context to output.

The runner starts the container; ``main`` reads the stage input, calls ``handler(ctx)``, posts what it
returns as the stage output, and turns any exception into a failure report. The handler never posts
output itself, so a stage produces exactly one output or one failure.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, TextIO

from .client import Bridge, Llm
from .errors import BridgeError
from .models import AgentInput, ArtifactRef, Item, ItemInfo, PolicyCheck, Schema, SimulationResult, SqlResult

Output = str | Mapping[str, Any]
Handler = Callable[["Context"], Output]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NO_BRIDGE = 2
# Failure messages are agent-controlled text; a bounded size keeps them a message, not a channel.
MAX_FAILURE_MESSAGE_CHARS = 2000
AGENT_ERROR = "agent_error"


class Context:
    """What a handler gets: the stage input and the tools of its role (output is ``main``'s job)."""

    def __init__(self, bridge: Bridge, agent_input: AgentInput):
        self._bridge = bridge
        self.input = agent_input
        self.llm: Llm = bridge.llm

    @property
    def role(self) -> str:
        return self.input.role

    @property
    def prompt(self) -> str | None:
        return self.input.prompt

    def schema(self) -> Schema:
        return self._bridge.schema()

    def sql(self, query: str) -> SqlResult:
        return self._bridge.sql(query)

    def items(self) -> list[ItemInfo]:
        return self._bridge.items()

    def item(self, item_id: str) -> Item:
        return self._bridge.item(item_id)

    def artifact(
        self,
        name: str,
        data: bytes | bytearray | memoryview,
        *,
        content_type: str = "application/octet-stream",
    ) -> ArtifactRef:
        return self._bridge.artifact(name, data, content_type=content_type)

    def simulate(self, policy: Mapping[str, Any], prompt: str) -> SimulationResult:
        return self._bridge.simulate(policy, prompt)

    def check_policy(self, policy: Mapping[str, Any], bound: Mapping[str, Any] | None = None) -> PolicyCheck:
        return self._bridge.check_policy(policy, bound)

    def log(self, message: str, *, level: str = "info", **fields: Any) -> None:
        self._bridge.log(message, level=level, **fields)


def _failure(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, BridgeError):
        code, message = exc.code, exc.message
    else:
        code, message = AGENT_ERROR, f"{type(exc).__name__}: {exc}"
    if len(message) > MAX_FAILURE_MESSAGE_CHARS:
        message = message[: MAX_FAILURE_MESSAGE_CHARS - 3] + "..."
    return code, message


def run(handler: Handler, *, bridge: Bridge | None = None, stderr: TextIO | None = None) -> int:
    """Run one stage and return the process exit code (0 output posted, 1 failed, 2 no bridge).

    Tracebacks go to stderr, which the runner keeps with the stage's logs inside the TEE, as room data.
    """
    err = sys.stderr if stderr is None else stderr
    try:
        active = Bridge.from_env() if bridge is None else bridge
    except BridgeError as exc:
        print(f"hivemind_agent: {exc}", file=err)
        return EXIT_NO_BRIDGE

    try:
        agent_input = active.input()
        result = handler(Context(active, agent_input))
        if not isinstance(result, str | Mapping):
            raise TypeError(f"the handler must return a str or a mapping, not {type(result).__name__}")
    except Exception as exc:
        traceback.print_exc(file=err)
        return _report(active, exc, err)

    try:
        active.output(result)
    except Exception as exc:
        # An output the bridge refuses (too large, not JSON-encodable) is still a failure to report.
        traceback.print_exc(file=err)
        return _report(active, exc, err)
    return EXIT_OK


def _report(bridge: Bridge, exc: BaseException, err: TextIO) -> int:
    code, message = _failure(exc)
    try:
        bridge.report_failure(code, message)
    except BridgeError as report_exc:
        print(f"hivemind_agent: could not report the failure to the bridge: {report_exc}", file=err)
        return EXIT_NO_BRIDGE if report_exc.code == "bridge_unavailable" else EXIT_FAILED
    return EXIT_FAILED


def main(handler: Handler) -> NoReturn:
    """Run ``handler`` as this container's stage and exit with :func:`run`'s code."""
    sys.exit(run(handler))
