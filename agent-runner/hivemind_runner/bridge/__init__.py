"""The bridge: the only door between an agent container and the runner (DESIGN §8, docs/agents.md).

- :class:`StageSession`: one stage's token, grants, wiring and result; every operation passes the
  admission chain of :mod:`hivemind_runner.bridge.grants`;
- :class:`BridgeServer`: HTTP/1.1 on the stage's Unix socket, with the REST routes of docs/agents.md
  and MCP (streamable HTTP, ``POST /mcp``) exposing the same tools;
- :class:`BridgeListener`: a stage's socket bound before its session exists, so its sandbox can start
  early (its first call waits until the session is served).

docs/bridge.md describes the internals.
"""

from hivemind_runner.bridge.errors import (
    ArtifactExists,
    InvalidRequest,
    MethodNotAllowed,
    SimulationLimit,
    StageFinished,
    wire_error,
)
from hivemind_runner.bridge.grants import GRANTS, Tool, ToolCall, tool_call_chain
from hivemind_runner.bridge.mcp import McpEndpoint
from hivemind_runner.bridge.server import BridgeListener, BridgeServer
from hivemind_runner.bridge.session import (
    ArtifactStore,
    BridgeLimits,
    PolicyChecker,
    Simulator,
    StageOutput,
    StageServices,
    StageSession,
    StoredArtifact,
    room_policy_checker,
)

__all__ = [
    "GRANTS",
    "ArtifactExists",
    "ArtifactStore",
    "BridgeLimits",
    "BridgeListener",
    "BridgeServer",
    "InvalidRequest",
    "McpEndpoint",
    "MethodNotAllowed",
    "PolicyChecker",
    "SimulationLimit",
    "Simulator",
    "StageFinished",
    "StageOutput",
    "StageServices",
    "StageSession",
    "StoredArtifact",
    "Tool",
    "ToolCall",
    "room_policy_checker",
    "tool_call_chain",
    "wire_error",
]
