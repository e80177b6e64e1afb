"""MCP on the bridge socket: streamable HTTP, JSON responses, the same tools as the REST routes.

``POST /mcp`` takes one JSON-RPC 2.0 message. Requests are answered with ``application/json`` (the
transport lets a server answer with JSON instead of an event stream); notifications and client
responses get ``202 Accepted`` with no body; ``GET``/``DELETE /mcp`` are ``405`` (no server-initiated
stream, no MCP session: the bridge session is the session). Implemented: ``initialize``, ``ping``,
``tools/list``, ``tools/call``, ``notifications/initialized`` (and any other notification, ignored).

Every tool call runs the same :class:`~hivemind_runner.bridge.session.StageSession` operation as its
REST route, so the admission chain, the role grants and the request validation are identical. A
refused or failed call is a tool result with ``isError: true`` and ``structuredContent``
``{"error": code, "message": text}``; ``tools/list`` shows only the tools the stage may use.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hivemind.errors import HivemindError
from hivemind_runner.bridge.errors import InvalidRequest, wire_error
from hivemind_runner.bridge.grants import GRANTS, Tool
from hivemind_runner.bridge.session import StageSession

SUPPORTED_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
SERVER_INFO = {"name": "hivemind-bridge", "version": "1"}

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602

_Result = tuple[int, dict[str, Any] | None, dict[str, str]]
Operation = Callable[[StageSession, dict[str, Any], int], dict[str, Any]]

_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def _no_arguments(call: Callable[[StageSession], dict[str, Any]]) -> Operation:
    def operation(session: StageSession, arguments: dict[str, Any], size: int) -> dict[str, Any]:
        if arguments:
            raise InvalidRequest("this tool takes no arguments")
        return call(session)

    return operation


def _read_item(session: StageSession, arguments: dict[str, Any], size: int) -> dict[str, Any]:
    item_id = arguments.get("id")
    if set(arguments) != {"id"} or not isinstance(item_id, str) or not item_id:
        raise InvalidRequest("read_item takes one argument: id (a string)")
    return session.read_item(item_id)


def _write_artifact(session: StageSession, arguments: dict[str, Any], size: int) -> dict[str, Any]:
    unknown = set(arguments) - {"name", "content_base64", "content_type"}
    name, encoded = arguments.get("name"), arguments.get("content_base64")
    content_type = arguments.get("content_type")
    if unknown or not isinstance(name, str) or not isinstance(encoded, str):
        raise InvalidRequest("write_artifact takes name, content_base64 and optionally content_type")
    if content_type is not None and not isinstance(content_type, str):
        raise InvalidRequest("content_type must be a string")
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise InvalidRequest("content_base64 is not valid base64") from None
    return session.put_artifact(name, data, content_type)


@dataclass(frozen=True)
class McpTool:
    name: str
    tool: Tool
    description: str
    input_schema: dict[str, Any]
    operation: Operation

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "inputSchema": self.input_schema}


TOOLS: tuple[McpTool, ...] = (
    McpTool(
        "get_input",
        Tool.INPUT,
        "This stage's input: role, prompt, rules, policy text, schema, budgets and stage fields.",
        _NO_ARGUMENTS,
        _no_arguments(StageSession.get_input),
    ),
    McpTool(
        "submit_output",
        Tool.OUTPUT,
        "Post the stage's one result: {text}, {json} (the scope stage's ScopePolicy) or {error: {code, "
        "message}}. Exactly once; the session ends after it.",
        {
            "type": "object",
            "properties": {
                "text": {"type": "string"},
                "json": {"type": "object"},
                "error": {
                    "type": "object",
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                    "required": ["code", "message"],
                    "additionalProperties": False,
                },
            },
            "minProperties": 1,
            "maxProperties": 1,
            "additionalProperties": False,
        },
        lambda session, arguments, size: session.post_output(arguments, size),
    ),
    McpTool(
        "get_schema",
        Tool.SCHEMA,
        "The tables and columns this stage may query, and the aggregation rules that apply.",
        _NO_ARGUMENTS,
        _no_arguments(StageSession.get_schema),
    ),
    McpTool(
        "run_sql",
        Tool.SQL,
        "Run one SQLite SELECT against this stage's view of the room data.",
        {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "one SELECT statement"}},
            "required": ["query"],
            "additionalProperties": False,
        },
        lambda session, arguments, size: session.run_sql(arguments, size),
    ),
    McpTool(
        "list_items",
        Tool.ITEMS,
        "The document items this stage may read (metadata only).",
        _NO_ARGUMENTS,
        _no_arguments(StageSession.list_items),
    ),
    McpTool(
        "read_item",
        Tool.ITEM,
        "One item's content (text, or base64 for binary), after the room's redaction.",
        {
            "type": "object",
            "properties": {"id": {"type": "string"}},
            "required": ["id"],
            "additionalProperties": False,
        },
        _read_item,
    ),
    McpTool(
        "write_artifact",
        Tool.ARTIFACT,
        "Store a file next to the run's output (one write per name).",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
                "content_base64": {"type": "string"},
                "content_type": {"type": "string"},
            },
            "required": ["name", "content_base64"],
            "additionalProperties": False,
        },
        _write_artifact,
    ),
    McpTool(
        "simulate",
        Tool.SIMULATE,
        "Run the room's query agent on a prompt under a candidate ScopePolicy, with real scoped SQL.",
        {
            "type": "object",
            "properties": {"policy": {"type": "object"}, "prompt": {"type": "string"}},
            "required": ["policy", "prompt"],
            "additionalProperties": False,
        },
        lambda session, arguments, size: session.simulate(arguments, size),
    ),
    McpTool(
        "check_policy",
        Tool.POLICY_CHECK,
        "The runner's verdict on a candidate ScopePolicy: valid for the room's data, what it allows beyond "
        "bound (optional) and the room's data_policy, and what is left of it within the data_policy.",
        {
            "type": "object",
            "properties": {"policy": {"type": "object"}, "bound": {"type": ["object", "null"]}},
            "required": ["policy"],
            "additionalProperties": False,
        },
        lambda session, arguments, size: session.check_policy(arguments, size),
    ),
    McpTool(
        "log",
        Tool.LOG,
        "A structured log line for the run's diagnostics (kept inside the TEE).",
        {
            "type": "object",
            "properties": {
                "level": {"type": "string", "enum": ["debug", "info", "warning", "error"]},
                "message": {"type": "string"},
                "fields": {"type": "object"},
            },
            "required": ["message"],
            "additionalProperties": False,
        },
        lambda session, arguments, size: session.log(arguments, size),
    ),
)
_BY_NAME = {tool.name: tool for tool in TOOLS}


def _rpc_error(message_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": message_id, "error": {"code": code, "message": message}}


def _rpc_result(message_id: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": message_id, "result": result}


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


class McpEndpoint:
    """The MCP endpoint of one stage session."""

    def __init__(self, session: StageSession):
        self.session = session

    def visible_tools(self) -> list[McpTool]:
        services = self.session.services
        granted = GRANTS[self.session.stage]
        return [
            tool
            for tool in TOOLS
            if tool.tool in granted
            and (
                tool.tool is not Tool.ARTIFACT
                or (services.artifacts_allowed and services.artifacts is not None)
            )
        ]

    def handle(self, raw: bytes, *, protocol_version: str | None) -> _Result:
        if protocol_version is not None and protocol_version not in SUPPORTED_VERSIONS:
            error = _rpc_error(None, INVALID_REQUEST, f"unsupported MCP-Protocol-Version {protocol_version}")
            return 400, error, {}
        message, problem = self._message(raw)
        if message is None:
            return 400, problem, {}
        if "id" not in message or not isinstance(message.get("method"), str):
            # A notification, or a client's response to a server request: accepted, never answered.
            return 202, None, {}
        return 200, self._answer(message["id"], message["method"], message.get("params", {}), len(raw)), {}

    @staticmethod
    def _message(raw: bytes) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """``(message, None)``, or ``(None, JSON-RPC error)`` to answer with ``400``."""
        try:
            message = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None, _rpc_error(None, PARSE_ERROR, "the body is not JSON")
        if isinstance(message, list):
            return None, _rpc_error(None, INVALID_REQUEST, "JSON-RPC batches are not supported")
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            return None, _rpc_error(None, INVALID_REQUEST, "not a JSON-RPC 2.0 message")
        if "method" in message and "id" in message and not _valid_id(message["id"]):
            return None, _rpc_error(None, INVALID_REQUEST, "id must be a string or an integer")
        return message, None

    def _answer(self, message_id: Any, method: str, params: Any, size: int) -> dict[str, Any]:
        if not isinstance(params, dict):
            return _rpc_error(message_id, INVALID_PARAMS, "params must be an object")
        if method == "initialize":
            return _rpc_result(message_id, self._initialize(params))
        if method == "ping":
            return _rpc_result(message_id, {})
        if method == "tools/list":
            return _rpc_result(message_id, {"tools": [tool.describe() for tool in self.visible_tools()]})
        if method == "tools/call":
            return self._call(message_id, params, size)
        return _rpc_error(message_id, METHOD_NOT_FOUND, f"method {method} is not supported")

    def _initialize(self, params: Mapping[str, Any]) -> dict[str, Any]:
        requested = params.get("protocolVersion")
        version = requested if requested in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[0]
        return {
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": SERVER_INFO,
            "instructions": (
                f"Hivemind bridge for the {self.session.stage.value} stage. Call get_input first and "
                "submit_output exactly once."
            ),
        }

    def _call(self, message_id: Any, params: Mapping[str, Any], size: int) -> dict[str, Any]:
        name = params.get("name")
        tool = _BY_NAME.get(name) if isinstance(name, str) else None
        if tool is None:
            return _rpc_error(message_id, INVALID_PARAMS, f"unknown tool {name!r}")
        arguments = params.get("arguments", {})
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            return _rpc_error(message_id, INVALID_PARAMS, "arguments must be an object")
        try:
            result = tool.operation(self.session, arguments, size)
        except HivemindError as exc:
            _status, body = wire_error(exc)
            return _rpc_result(
                message_id,
                {
                    "content": [{"type": "text", "text": f"{body['error']}: {body['message']}"}],
                    "structuredContent": body,
                    "isError": True,
                },
            )
        text = json.dumps(result, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return _rpc_result(
            message_id,
            {"content": [{"type": "text", "text": text}], "structuredContent": result, "isError": False},
        )
