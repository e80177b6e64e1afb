"""MCP (streamable HTTP, JSON responses) on the bridge socket: the same tools and role rules as REST."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hivemind.models import Stage
from hivemind.policy import parse_policy
from hivemind_runner.bridge import (
    ArtifactStore,
    BridgeLimits,
    BridgeServer,
    StageServices,
    StageSession,
    room_policy_checker,
)
from hivemind_runner.bridge.grants import tool_call_chain
from hivemind_runner.scoped import ItemInfo, RoomItem, build_scoped_database, full_read_database

CSV = b"department,salary\n" + b"".join(f"d{i % 2},{1000 + i}\n".encode() for i in range(12))
POLICY = parse_policy(
    {
        "tables": {"people": {"columns": ["department", "salary"]}},
        "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "AVG"]},
    }
)
ACCEPT = "application/json, text/event-stream"


def items() -> list[RoomItem]:
    info = ItemInfo(id="item_people", name="people.csv", content_type="text/csv", size=len(CSV), metadata={})
    return [RoomItem.from_bytes(info, CSV)]


class McpClient:
    def __init__(self, path: Path, token: str):
        self.http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(path)),
            base_url="http://localhost",
            headers={"Authorization": f"Bearer {token}", "Accept": ACCEPT},
            timeout=10,
        )
        self.next_id = 0

    def post(self, message: Any, **headers: str) -> httpx.Response:
        return self.http.post("/mcp", json=message, headers=headers)

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            message["params"] = params
        response = self.post(message)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert body["id"] == self.next_id
        return body

    def tool(self, tool_name: str, /, **arguments: Any) -> dict[str, Any]:
        return self.call("tools/call", {"name": tool_name, "arguments": arguments})["result"]


def start(tmp_path: Path, stage: Stage, services: StageServices) -> tuple[BridgeServer, McpClient]:
    session = StageSession(
        run_id="run_mcp1",
        stage=stage,
        services=services,
        chain=tool_call_chain(max_tool_calls=100, max_log_lines=10),
    )
    server = BridgeServer(session, tmp_path / f"{stage.value}.sock").start()
    return server, McpClient(server.socket_path, session.token)


def document(stage: Stage) -> dict[str, Any]:
    return {"role": stage.value, "prompt": "q", "rules": "", "policy": "", "schema": None, "stage": {}}


@pytest.fixture
def scope(tmp_path: Path) -> Iterator[tuple[BridgeServer, McpClient]]:
    with full_read_database(items()) as database:
        services = StageServices(
            input_document=document(Stage.SCOPE),
            database=database,
            simulator=lambda policy, prompt: {"output": f"simulated: {prompt}", "error": None},
            policy_checker=room_policy_checker({"people": ["department", "salary"]}, POLICY),
        )
        server, client = start(tmp_path, Stage.SCOPE, services)
        try:
            yield server, client
        finally:
            server.close()


@pytest.fixture
def query(tmp_path: Path) -> Iterator[tuple[BridgeServer, McpClient]]:
    with build_scoped_database(items(), POLICY) as database:
        services = StageServices(
            input_document=document(Stage.QUERY),
            database=database,
            artifacts=ArtifactStore(tmp_path / "artifacts", BridgeLimits()),
            artifacts_allowed=True,
        )
        server, client = start(tmp_path, Stage.QUERY, services)
        try:
            yield server, client
        finally:
            server.close()


@pytest.fixture
def mediator(tmp_path: Path) -> Iterator[tuple[BridgeServer, McpClient]]:
    server, client = start(tmp_path, Stage.MEDIATOR, StageServices(input_document=document(Stage.MEDIATOR)))
    try:
        yield server, client
    finally:
        server.close()


def test_initialize_and_initialized_notification(scope: tuple[BridgeServer, McpClient]) -> None:
    _, client = scope
    result = client.call(
        "initialize",
        {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "0"}},
    )["result"]
    assert result["protocolVersion"] == "2025-06-18"
    assert result["capabilities"] == {"tools": {"listChanged": False}}
    assert result["serverInfo"]["name"] == "hivemind-bridge"
    notified = client.post(
        {"jsonrpc": "2.0", "method": "notifications/initialized"}, **{"MCP-Protocol-Version": "2025-06-18"}
    )
    assert (notified.status_code, notified.content) == (202, b"")
    unknown_version = client.call("initialize", {"protocolVersion": "1999-01-01"})["result"]
    assert unknown_version["protocolVersion"] == "2025-11-25"
    assert client.call("ping")["result"] == {}


def test_tools_list_shows_each_role_its_own_tools(
    scope: tuple[BridgeServer, McpClient],
    query: tuple[BridgeServer, McpClient],
    mediator: tuple[BridgeServer, McpClient],
) -> None:
    def names(client: McpClient) -> set[str]:
        tools = client.call("tools/list")["result"]["tools"]
        assert all(tool["inputSchema"]["type"] == "object" for tool in tools)
        return {tool["name"] for tool in tools}

    common = {"get_input", "submit_output", "log"}
    data = {"get_schema", "run_sql", "list_items", "read_item"}
    assert names(scope[1]) == common | data | {"simulate", "check_policy"}
    assert names(query[1]) == common | data | {"write_artifact"}
    assert names(mediator[1]) == common


def test_tools_call_runs_scoped_sql(query: tuple[BridgeServer, McpClient]) -> None:
    _, client = query
    result = client.tool("run_sql", query="SELECT department, COUNT(*) AS n FROM people GROUP BY department")
    assert result["isError"] is False
    assert sorted(result["structuredContent"]["rows"]) == [["d0", 6], ["d1", 6]]
    assert result["content"][0]["type"] == "text"
    schema = client.tool("get_schema")["structuredContent"]
    assert schema["aggregate"]["min_group_size"] == 5
    denied = client.tool("run_sql", query="SELECT salary FROM people")
    assert denied["isError"] is True
    assert denied["structuredContent"]["error"] == "sql_denied"


def test_role_rules_hold_over_mcp(
    query: tuple[BridgeServer, McpClient], mediator: tuple[BridgeServer, McpClient]
) -> None:
    simulated = query[1].tool("simulate", policy={}, prompt="q")
    assert (simulated["isError"], simulated["structuredContent"]["error"]) == (True, "not_allowed_for_role")
    checked = query[1].tool("check_policy", policy={})
    assert (checked["isError"], checked["structuredContent"]["error"]) == (True, "not_allowed_for_role")
    sql = mediator[1].tool("run_sql", query="SELECT 1")
    assert (sql["isError"], sql["structuredContent"]["error"]) == (True, "not_allowed_for_role")
    assert mediator[0].session.tool_counts == {}


def test_scope_simulates_over_mcp(scope: tuple[BridgeServer, McpClient]) -> None:
    result = scope[1].tool("simulate", policy={"tables": {}}, prompt="how many")
    assert result["structuredContent"] == {"output": "simulated: how many", "error": None}


def test_scope_checks_policies_over_mcp(scope: tuple[BridgeServer, McpClient]) -> None:
    _, client = scope
    wider = {"tables": {"people": {"columns": ["salary"]}}, "aggregate": {"min_group_size": 2}}
    result = client.tool("check_policy", policy=wider)
    verdict = result["structuredContent"]
    assert (result["isError"], verdict["valid"], verdict["narrower_than_room"]) == (False, True, False)
    assert verdict["widenings"] == [
        {"against": "data_policy", "message": "aggregate.min_group_size: 2 is below the bound's 5"}
    ]
    assert verdict["within_room"]["aggregate"]["min_group_size"] == 5
    bounded = client.tool("check_policy", policy=wider, bound={"tables": {}})["structuredContent"]
    assert [w["against"] for w in bounded["widenings"]] == ["bound", "bound", "data_policy"]
    invalid = client.tool("check_policy", policy={"tables": {"people": {"columns": ["email"]}}})
    assert invalid["structuredContent"]["errors"] == [
        {"path": "tables.people.columns", "message": "no such column(s) email"}
    ]
    refused = client.tool("check_policy", policy={}, bound={"max_rows": -1})
    assert (refused["isError"], refused["structuredContent"]["error"]) == (True, "invalid_policy")


def test_artifacts_and_output_over_mcp(query: tuple[BridgeServer, McpClient]) -> None:
    server, client = query
    stored = client.tool(
        "write_artifact", name="note.txt", content_base64=base64.b64encode(b"hello").decode()
    )
    assert stored["structuredContent"]["size"] == 5
    bad = client.tool("write_artifact", name="x.txt", content_base64="not base64!")
    assert bad["structuredContent"]["error"] == "invalid_request"
    assert client.tool("submit_output", text="done")["structuredContent"] == {"accepted": True}
    assert server.session.output is not None and server.session.output.text == "done"
    after = client.post({"jsonrpc": "2.0", "id": 99, "method": "tools/list"})
    assert (after.status_code, after.json()["error"]) == (409, "stage_finished")


def test_protocol_errors(scope: tuple[BridgeServer, McpClient]) -> None:
    _, client = scope
    assert client.call("resources/list")["error"]["code"] == -32601
    assert client.call("tools/call", {"name": "drop_tables"})["error"]["code"] == -32602
    assert client.call("tools/call", {"name": "get_schema", "arguments": ["x"]})["error"]["code"] == -32602
    batch = client.post([{"jsonrpc": "2.0", "id": 1, "method": "ping"}])
    assert (batch.status_code, batch.json()["error"]["code"]) == (400, -32600)
    garbage = client.http.post("/mcp", content=b"{not json")
    assert (garbage.status_code, garbage.json()["error"]["code"]) == (400, -32700)
    bad_version = client.post(
        {"jsonrpc": "2.0", "id": 1, "method": "ping"}, **{"MCP-Protocol-Version": "0.1"}
    )
    assert bad_version.status_code == 400
    assert client.http.get("/mcp").status_code == 405
    assert client.http.delete("/mcp").status_code == 405


def test_mcp_requires_the_session_token(scope: tuple[BridgeServer, McpClient]) -> None:
    server, _ = scope
    intruder = McpClient(server.socket_path, "not-the-token")
    response = intruder.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert (response.status_code, response.json()["error"]) == (401, "unauthenticated")
