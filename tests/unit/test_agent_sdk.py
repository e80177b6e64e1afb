"""The agent SDK against a fake bridge: a threaded HTTP server on a Unix socket, built here.

Each test scripts the fake's answers and checks both sides: what the SDK sent (method, path, headers,
JSON body) and what it made of the answer (values, or the specific exception).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import socket
import socketserver
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from hivemind_agent import (
    AgentInput,
    Bridge,
    BridgeError,
    BridgeUnavailable,
    BudgetExhausted,
    Context,
    Denied,
    InvalidRequest,
    NotAllowedForRole,
    NotFound,
    ProtocolError,
    run,
)

SESSION = "hms_test-session-token"


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=dict)  # JSON-encoded unless bytes
    declare_length: bool = True
    delay_s: float = 0.0


Route = Callable[[Recorded], Reply]


class FakeBridge:
    """Routes keyed by (method, path); unknown routes answer 404 like the real bridge."""

    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.routes: dict[tuple[str, str], Route] = {}
        self.requests: list[Recorded] = []

    def on(self, method: str, path: str, reply: Reply | Route) -> None:
        self.routes[(method, path)] = reply if callable(reply) else (lambda _request: reply)

    def answer(self, request: Recorded) -> Reply:
        self.requests.append(request)
        route = self.routes.get((request.method, request.path))
        if route is None:
            return Reply(404, {"error": "not_found", "message": f"no route {request.method} {request.path}"})
        return route(request)

    @property
    def last(self) -> Recorded:
        return self.requests[-1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        request = Recorded(self.command, self.path, dict(self.headers.items()), self.rfile.read(length))
        reply = self.server.fake.answer(request)
        time.sleep(reply.delay_s)
        raw = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        if reply.declare_length:
            self.send_header("Content-Length", str(len(raw)))
        else:
            # No length: the body ends when the connection closes (HTTP/1.1 section 6.3).
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = do_PUT = _serve


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    fake: FakeBridge

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The SDK hangs up on purpose (response over its size limit, timeout): not a server fault.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # Short path: AF_UNIX socket paths are limited to 108 bytes, pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="hm-sdk-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake(socket_dir: str) -> Iterator[FakeBridge]:
    socket_path = os.path.join(socket_dir, "bridge.sock")
    fake_bridge = FakeBridge(socket_path)
    server = _Server(socket_path, _Handler)
    server.fake = fake_bridge
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield fake_bridge
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def make_bridge(fake: FakeBridge, role: str = "query", **options: Any) -> Bridge:
    return Bridge(fake.socket_path, SESSION, role, **options)


INPUT_QUERY = {
    "role": "query",
    "prompt": "top 3 products by count",
    "rules": "aggregate only",
    "policy": "k >= 5",
    "schema": {
        "tables": [{"name": "orders", "columns": [{"name": "product", "type": "TEXT"}], "row_count": 40}],
        "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "SUM"]},
        "max_rows": 100,
    },
    "budgets": {"timeout_s": 60, "llm_calls": 3, "tokens": 5000, "memory_mb": 256},
    "llm_providers": ["openai"],
    "artifacts_allowed": True,
    "stage": {},
    "added_by_a_newer_bridge": 1,
}

INPUT_SCOPE_HIDDEN_PROMPT = {
    "role": "scope",
    "prompt": None,
    "rules": "rules",
    "policy": "policy",
    "schema": None,
    "budgets": {"timeout_s": 60, "llm_calls": 0, "tokens": 0, "memory_mb": 256},
    "llm_providers": [],
    "artifacts_allowed": False,
    "stage": {
        "prompt_visible": False,
        "data_policy": None,
        "query_agent": {"agent_id": "agt_q", "digest": "0" * 64, "visibility": "sealed", "files": None},
    },
}

COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "openai/gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
}

ACCEPTED = Reply(200, {"accepted": True})


# --- requests: what the SDK sends ----------------------------------------------------------------


def test_input_sends_bearer_session_and_parses_every_field(fake: FakeBridge) -> None:
    fake.on("GET", "/v1/input", Reply(200, INPUT_QUERY))
    agent_input = make_bridge(fake).input()

    assert fake.last.headers["Authorization"] == f"Bearer {SESSION}"
    assert fake.last.headers["Host"] == "localhost"
    assert agent_input.role == "query"
    assert agent_input.prompt == "top 3 products by count"
    assert (agent_input.rules, agent_input.policy) == ("aggregate only", "k >= 5")
    assert agent_input.budgets.llm_calls == 3
    assert agent_input.llm_available
    assert agent_input.artifacts_allowed
    assert agent_input.schema is not None
    orders = agent_input.schema.table("orders")
    assert orders.column_names == ("product",)
    assert orders.row_count == 40
    assert agent_input.schema.aggregate is not None
    assert agent_input.schema.aggregate.min_group_size == 5
    assert agent_input.schema.max_rows == 100


def test_input_for_scope_with_hidden_prompt_passes_stage_fields_through(fake: FakeBridge) -> None:
    fake.on("GET", "/v1/input", Reply(200, INPUT_SCOPE_HIDDEN_PROMPT))
    agent_input = make_bridge(fake, "scope").input()

    assert agent_input.prompt is None
    assert agent_input.schema is None
    assert not agent_input.llm_available
    assert agent_input.stage["query_agent"]["visibility"] == "sealed"
    with pytest.raises(TypeError):
        agent_input.stage["injected"] = 1  # type: ignore[index]


@pytest.mark.parametrize(
    ("field_name", "bad_value"),
    [
        ("role", "admin"),
        ("prompt", 5),
        ("rules", None),
        ("budgets", {"timeout_s": 1.5, "llm_calls": 0, "tokens": 0, "memory_mb": 64}),
        ("budgets", {"timeout_s": True, "llm_calls": 0, "tokens": 0, "memory_mb": 64}),
        ("llm_providers", "openai"),
        ("stage", []),
        ("schema", {"tables": [{"name": "t", "columns": [{"name": "c"}]}]}),
    ],
)
def test_input_with_a_broken_field_is_a_protocol_error(
    fake: FakeBridge, field_name: str, bad_value: Any
) -> None:
    fake.on("GET", "/v1/input", Reply(200, {**INPUT_QUERY, field_name: bad_value}))
    with pytest.raises(ProtocolError):
        make_bridge(fake).input()


def test_output_text_and_json(fake: FakeBridge) -> None:
    fake.on("POST", "/v1/output", ACCEPTED)
    bridge = make_bridge(fake)

    bridge.output("the answer")
    assert fake.last.json() == {"text": "the answer"}
    assert fake.last.headers["Content-Type"] == "application/json"
    bridge.output({"tables": {"orders": {"columns": ["product"]}}})
    assert fake.last.json() == {"json": {"tables": {"orders": {"columns": ["product"]}}}}


def test_output_of_another_type_is_refused_before_sending(fake: FakeBridge) -> None:
    with pytest.raises(TypeError):
        make_bridge(fake).output(["not", "an", "object"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Out of range float"):
        make_bridge(fake).output({"x": float("nan")})
    assert fake.requests == []


def test_output_not_accepted_is_a_protocol_error(fake: FakeBridge) -> None:
    fake.on("POST", "/v1/output", Reply(200, {"accepted": False}))
    with pytest.raises(ProtocolError, match="did not accept"):
        make_bridge(fake).output("x")


def test_schema(fake: FakeBridge) -> None:
    fake.on("GET", "/v1/tools/schema", Reply(200, INPUT_QUERY["schema"]))
    schema = make_bridge(fake).schema()
    assert schema.table_names == ("orders",)
    assert schema.aggregate is not None
    assert schema.aggregate.functions == ("COUNT", "SUM")
    with pytest.raises(KeyError, match="no table 'customers'"):
        schema.table("customers")


def test_sql_sends_the_query_and_returns_rows(fake: FakeBridge) -> None:
    fake.on(
        "POST",
        "/v1/tools/sql",
        Reply(200, {"columns": ["product", "n"], "rows": [["tea", 9], ["cake", None]], "truncated": True}),
    )
    result = make_bridge(fake).sql("SELECT product, COUNT(*) AS n FROM orders GROUP BY product")

    assert fake.last.json() == {"query": "SELECT product, COUNT(*) AS n FROM orders GROUP BY product"}
    assert result.columns == ("product", "n")
    assert result.rows == (("tea", 9), ("cake", None))
    assert result.truncated
    assert result.records() == [{"product": "tea", "n": 9}, {"product": "cake", "n": None}]


@pytest.mark.parametrize(
    "body",
    [
        {"columns": ["a", "b"], "rows": [["only one"]], "truncated": False},
        {"columns": ["a"], "rows": [[{"nested": 1}]], "truncated": False},
        {"columns": ["a"], "rows": [], "truncated": "no"},
    ],
)
def test_sql_answer_that_breaks_the_contract(fake: FakeBridge, body: Any) -> None:
    fake.on("POST", "/v1/tools/sql", Reply(200, body))
    with pytest.raises(ProtocolError):
        make_bridge(fake).sql("SELECT 1")


def test_sql_refuses_an_empty_query_without_calling(fake: FakeBridge) -> None:
    with pytest.raises(ValueError):
        make_bridge(fake).sql("  ")
    assert fake.requests == []


def test_items_and_text_item(fake: FakeBridge) -> None:
    info = {
        "id": "itm_1",
        "name": "notes.md",
        "content_type": "text/markdown",
        "size": 12,
        "metadata": {"k": "v"},
    }
    fake.on("GET", "/v1/tools/items", Reply(200, {"items": [info]}))
    fake.on(
        "GET",
        "/v1/tools/items/itm_1",
        Reply(200, {**info, "text": "[REDACTED] ok", "base64": None}),
    )
    bridge = make_bridge(fake)

    (listed,) = bridge.items()
    assert (listed.id, listed.name, listed.size, listed.metadata["k"]) == ("itm_1", "notes.md", 12, "v")
    item = bridge.item("itm_1")
    assert item.text == "[REDACTED] ok"
    assert item.data is None
    assert item.content_type == "text/markdown"


def test_binary_item_and_id_is_quoted_into_the_path(fake: FakeBridge) -> None:
    payload = bytes(range(256))
    fake.on(
        "GET",
        "/v1/tools/items/a%2F..%2Fb",
        Reply(
            200,
            {
                "id": "a/../b",
                "name": "blob",
                "content_type": "application/octet-stream",
                "metadata": {},
                "text": None,
                "base64": base64.b64encode(payload).decode(),
            },
        ),
    )
    item = make_bridge(fake).item("a/../b")
    assert fake.last.path == "/v1/tools/items/a%2F..%2Fb"
    assert item.data == payload
    assert item.text is None


@pytest.mark.parametrize(
    "body",
    [
        {"id": "itm_other", "name": "n", "content_type": "text/plain", "metadata": {}, "text": "x"},
        {
            "id": "itm_1",
            "name": "n",
            "content_type": "text/plain",
            "metadata": {},
            "text": "x",
            "base64": "eA==",
        },
        {"id": "itm_1", "name": "n", "content_type": "text/plain", "metadata": {}},
        {"id": "itm_1", "name": "n", "content_type": "text/plain", "metadata": {}, "base64": "not base64!"},
    ],
)
def test_item_answer_that_breaks_the_contract(fake: FakeBridge, body: Any) -> None:
    fake.on("GET", "/v1/tools/items/itm_1", Reply(200, body))
    with pytest.raises(ProtocolError):
        make_bridge(fake).item("itm_1")


def test_missing_item_is_not_found(fake: FakeBridge) -> None:
    fake.on(
        "GET", "/v1/tools/items/itm_gone", Reply(404, {"error": "not_found", "message": "no item itm_gone"})
    )
    with pytest.raises(NotFound, match="no item itm_gone") as caught:
        make_bridge(fake).item("itm_gone")
    assert caught.value.status == 404
    assert isinstance(caught.value, InvalidRequest)


def test_llm_chat_sends_an_openai_request(fake: FakeBridge) -> None:
    fake.on("POST", "/v1/llm/chat/completions", Reply(200, COMPLETION))
    bridge = make_bridge(fake)

    completion = bridge.llm.chat(
        [{"role": "user", "content": "hello"}], model="openai/gpt-4o-mini", temperature=0
    )
    assert fake.last.json() == {
        "messages": [{"role": "user", "content": "hello"}],
        "model": "openai/gpt-4o-mini",
        "temperature": 0,
    }
    assert completion.text == "hi"
    assert completion.finish_reason == "stop"
    assert completion.usage.total_tokens == 8
    assert completion.raw["object"] == "chat.completion"

    bridge.llm.chat([{"role": "user", "content": "hello"}])
    assert "model" not in fake.last.json()


def test_llm_chat_refuses_streaming_and_empty_messages(fake: FakeBridge) -> None:
    bridge = make_bridge(fake)
    with pytest.raises(ValueError, match="streaming"):
        bridge.llm.chat([{"role": "user", "content": "x"}], stream=True)
    with pytest.raises(ValueError):
        bridge.llm.chat([])
    assert fake.requests == []


def test_llm_budget_exhausted(fake: FakeBridge) -> None:
    fake.on(
        "POST",
        "/v1/llm/chat/completions",
        Reply(429, {"error": "budget_exceeded", "message": "llm_calls budget of 3 is used up"}),
    )
    with pytest.raises(BudgetExhausted, match="llm_calls budget of 3 is used up") as caught:
        make_bridge(fake).llm.chat([{"role": "user", "content": "x"}])
    assert caught.value.code == "budget_exceeded"
    assert isinstance(caught.value, Denied)


def test_artifact_puts_raw_bytes_and_checks_the_receipt(fake: FakeBridge) -> None:
    data = b"col\n1\n"
    digest = hashlib.sha256(data).hexdigest()
    fake.on("PUT", "/v1/artifacts/chart.csv", Reply(201, {"name": "chart.csv", "size": 6, "sha256": digest}))
    stored = make_bridge(fake).artifact("chart.csv", data, content_type="text/csv")

    assert fake.last.body == data
    assert fake.last.headers["Content-Type"] == "text/csv"
    assert (stored.name, stored.size, stored.sha256) == ("chart.csv", 6, digest)


def test_artifact_stored_differently_is_a_protocol_error(fake: FakeBridge) -> None:
    fake.on("PUT", "/v1/artifacts/a.bin", Reply(201, {"name": "a.bin", "size": 3, "sha256": "0" * 64}))
    with pytest.raises(ProtocolError, match="not what was sent"):
        make_bridge(fake).artifact("a.bin", b"abc")


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 129, "sp ace"])
def test_artifact_name_is_checked_before_sending(fake: FakeBridge, name: str) -> None:
    with pytest.raises(ValueError, match="artifact names"):
        make_bridge(fake).artifact(name, b"x")
    assert fake.requests == []


def test_artifact_data_must_be_bytes(fake: FakeBridge) -> None:
    with pytest.raises(TypeError, match="bytes"):
        make_bridge(fake).artifact("a.txt", "text")  # type: ignore[arg-type]


def test_simulate_success_and_failure(fake: FakeBridge) -> None:
    bridge = make_bridge(fake, "scope")
    policy = {"tables": {"orders": {"columns": ["product"]}}}

    fake.on("POST", "/v1/simulate", Reply(200, {"output": "tea: 9", "error": None}))
    result = bridge.simulate(policy, "top products")
    assert fake.last.json() == {"policy": policy, "prompt": "top products"}
    assert result.ok
    assert result.output == "tea: 9"

    fake.on(
        "POST",
        "/v1/simulate",
        Reply(
            200, {"output": None, "error": {"code": "sql_denied", "message": "column email is not in scope"}}
        ),
    )
    failed = bridge.simulate(policy, "emails")
    assert not failed.ok
    assert failed.output is None
    assert (failed.error_code, failed.error_message) == ("sql_denied", "column email is not in scope")


def test_simulate_answer_with_both_output_and_error_is_a_protocol_error(fake: FakeBridge) -> None:
    fake.on("POST", "/v1/simulate", Reply(200, {"output": "x", "error": {"code": "c", "message": "m"}}))
    with pytest.raises(ProtocolError):
        make_bridge(fake, "scope").simulate({}, "p")


@pytest.mark.parametrize(
    ("path", "call"),
    [
        ("/v1/simulate", lambda bridge: bridge.simulate({}, "p")),
        ("/v1/policy/check", lambda bridge: bridge.check_policy({})),
    ],
    ids=["simulate", "check_policy"],
)
def test_scope_tools_outside_scope_are_not_allowed_for_role(fake: FakeBridge, path: str, call: Any) -> None:
    fake.on(
        "POST", path, Reply(403, {"error": "not_allowed_for_role", "message": "open to the scope stage only"})
    )
    with pytest.raises(NotAllowedForRole, match="scope stage only") as caught:
        call(make_bridge(fake, "query"))
    assert isinstance(caught.value, Denied)
    assert (caught.value.code, caught.value.status) == ("not_allowed_for_role", 403)


PEOPLE = {"tables": {"people": {"columns": ["department"], "where": None}}, "max_rows": 10}
VERDICT = {
    "valid": True,
    "errors": [],
    "policy": PEOPLE,
    "widenings": [{"against": "data_policy", "message": "max_rows: 10 exceeds the bound's 5"}],
    "narrower_than_room": False,
    "within_room": {**PEOPLE, "max_rows": 5},
    "added_by_a_newer_bridge": True,
}


def test_check_policy_sends_policy_and_bound_and_reads_the_verdict(fake: FakeBridge) -> None:
    fake.on("POST", "/v1/policy/check", Reply(200, VERDICT))
    bridge = make_bridge(fake, "scope")
    check = bridge.check_policy({"tables": {"people": {"columns": ["department"]}}}, bound=PEOPLE)
    assert (fake.last.method, fake.last.path) == ("POST", "/v1/policy/check")
    assert fake.last.json() == {
        "policy": {"tables": {"people": {"columns": ["department"]}}},
        "bound": PEOPLE,
    }
    assert check.valid and check.errors == () and not check.narrower_than_room and not check.narrower
    assert check.policy == PEOPLE and check.within_room == {**PEOPLE, "max_rows": 5}
    assert [(w.against, w.message) for w in check.widenings] == [
        ("data_policy", "max_rows: 10 exceeds the bound's 5")
    ]
    # The policies are the caller's own dicts, ready to change and post.
    assert check.policy is not None and check.policy is not bridge.check_policy(PEOPLE).policy
    bridge.check_policy(PEOPLE)
    assert fake.last.json() == {"policy": PEOPLE, "bound": None}
    context = Context(bridge, AgentInput.from_wire(INPUT_SCOPE_HIDDEN_PROMPT))
    assert context.check_policy(PEOPLE, PEOPLE).within_room == {**PEOPLE, "max_rows": 5}
    assert fake.last.json() == {"policy": PEOPLE, "bound": PEOPLE}


def test_check_policy_reads_an_invalid_verdict(fake: FakeBridge) -> None:
    invalid = {
        "valid": False,
        "errors": [
            {"path": "tables.people.columns", "message": "no such column(s) email"},
            {"path": "max_rows", "message": "Input should be greater than or equal to 0"},
        ],
        "policy": None,
        "widenings": [],
        "narrower_than_room": False,
        "within_room": None,
    }
    fake.on("POST", "/v1/policy/check", Reply(200, invalid))
    check = make_bridge(fake, "scope").check_policy({"max_rows": -1})
    assert not check.valid and not check.narrower
    assert (check.policy, check.within_room) == (None, None)
    assert [str(problem) for problem in check.errors] == [
        "tables.people.columns: no such column(s) email",
        "max_rows: Input should be greater than or equal to 0",
    ]


@pytest.mark.parametrize(
    "body",
    [
        {**VERDICT, "policy": None},
        {**VERDICT, "within_room": None},
        {**VERDICT, "errors": [{"path": "x", "message": "y"}]},
        {**VERDICT, "valid": False},
        {**VERDICT, "valid": False, "policy": None, "within_room": None},
        {**VERDICT, "policy": ["not", "an", "object"]},
        {**VERDICT, "widenings": [{"against": "bound"}]},
        {**VERDICT, "narrower_than_room": None},
    ],
    ids=["valid-no-policy", "valid-no-within", "valid-with-errors", "invalid-with-policy",
         "invalid-no-errors", "policy-not-object", "widening-without-message", "no-room-flag"],
)  # fmt: skip
def test_check_policy_answer_that_breaks_the_contract(fake: FakeBridge, body: dict[str, Any]) -> None:
    fake.on("POST", "/v1/policy/check", Reply(200, body))
    with pytest.raises(ProtocolError, match="policy/check"):
        make_bridge(fake, "scope").check_policy(PEOPLE)


def test_check_policy_checks_its_arguments_before_sending(fake: FakeBridge) -> None:
    bridge = make_bridge(fake, "scope")
    with pytest.raises(TypeError, match="policy must be a mapping"):
        bridge.check_policy('{"tables": {}}')  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bound must be a mapping"):
        bridge.check_policy({}, bound=[])  # type: ignore[arg-type]
    assert fake.requests == []


def test_log_sends_level_message_and_fields(fake: FakeBridge) -> None:
    fake.on("POST", "/v1/log", ACCEPTED)
    make_bridge(fake).log("query done", level="warning", rows=3, table="orders")
    assert fake.last.json() == {
        "level": "warning",
        "message": "query done",
        "fields": {"rows": 3, "table": "orders"},
    }
    with pytest.raises(ValueError):
        make_bridge(fake).log("x", level="loud")


# --- error mapping --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (403, "sql_denied", Denied),
        (403, "provider_not_allowed", Denied),
        (401, "unauthenticated", Denied),
        (403, "not_allowed_for_role", NotAllowedForRole),
        (403, "budget_exceeded", BudgetExhausted),
        (429, "rate_limited", BudgetExhausted),
        (404, "not_found", NotFound),
        (400, "sql_invalid", InvalidRequest),
        (409, "stage_finished", InvalidRequest),
        (413, "payload_too_large", InvalidRequest),
        (500, "internal_error", BridgeError),
        (502, "llm_provider_error", BridgeError),
    ],
)
def test_bridge_errors_map_to_exceptions(fake: FakeBridge, status: int, code: str, expected: type) -> None:
    fake.on("POST", "/v1/tools/sql", Reply(status, {"error": code, "message": f"the bridge says {code}"}))
    with pytest.raises(BridgeError) as caught:
        make_bridge(fake).sql("SELECT 1")
    assert type(caught.value) is expected
    assert (caught.value.code, caught.value.status) == (code, status)
    assert caught.value.message == f"the bridge says {code}"


def test_error_without_a_json_body_keeps_the_status(fake: FakeBridge) -> None:
    fake.on("GET", "/v1/tools/schema", Reply(403, b"<html>forbidden</html>"))
    with pytest.raises(Denied, match="HTTP 403: <html>forbidden") as caught:
        make_bridge(fake).schema()
    assert caught.value.code == "http_403"


@pytest.mark.parametrize("declare_length", [True, False])
def test_oversized_response_is_refused(fake: FakeBridge, declare_length: bool) -> None:
    big = {"columns": ["a"], "rows": [["x" * 100]] * 100, "truncated": False}
    fake.on("POST", "/v1/tools/sql", Reply(200, big, declare_length=declare_length))
    with pytest.raises(ProtocolError, match="4096-byte limit"):
        make_bridge(fake, max_response_bytes=4096).sql("SELECT a FROM t")


def test_response_at_the_limit_is_accepted(fake: FakeBridge) -> None:
    body = {"columns": ["a"], "rows": [["x"]], "truncated": False}
    fake.on("POST", "/v1/tools/sql", Reply(200, body))
    exact = len(json.dumps(body).encode())
    assert make_bridge(fake, max_response_bytes=exact).sql("SELECT a FROM t").rows == (("x",),)


@pytest.mark.parametrize("raw", [b"not json", b'{"columns": NaN}', b"\xff\xfe"])
def test_success_body_that_is_not_json(fake: FakeBridge, raw: bytes) -> None:
    fake.on("POST", "/v1/tools/sql", Reply(200, raw))
    with pytest.raises(ProtocolError):
        make_bridge(fake).sql("SELECT 1")


def test_socket_missing(socket_dir: str) -> None:
    bridge = Bridge(os.path.join(socket_dir, "absent.sock"), SESSION, "query")
    with pytest.raises(BridgeUnavailable, match="does not exist") as caught:
        bridge.input()
    assert caught.value.code == "bridge_unavailable"


def test_socket_refusing(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "dead.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # bound, never listening: connect() is refused
    try:
        with pytest.raises(BridgeUnavailable, match="refuses connections"):
            Bridge(path, SESSION, "query").input()
    finally:
        listener.close()


def test_bridge_that_never_answers_times_out(fake: FakeBridge) -> None:
    fake.on("GET", "/v1/input", Reply(200, INPUT_QUERY, delay_s=1.0))
    with pytest.raises(BridgeUnavailable, match=r"did not answer in 0\.2s"):
        make_bridge(fake, timeout=0.2).input()


# --- environment ----------------------------------------------------------------------------------


def test_from_env_reads_the_three_variables(fake: FakeBridge) -> None:
    fake.on("GET", "/v1/input", Reply(200, INPUT_QUERY))
    env = {"HIVEMIND_BRIDGE": fake.socket_path, "HIVEMIND_SESSION": SESSION, "HIVEMIND_ROLE": "query"}
    bridge = Bridge.from_env(env)
    assert bridge.role == "query"
    assert bridge.input().role == "query"
    assert SESSION not in repr(bridge)
    assert SESSION not in repr(vars(bridge))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "HIVEMIND_BRIDGE, HIVEMIND_SESSION, HIVEMIND_ROLE not set"),
        (
            {"HIVEMIND_BRIDGE": "/x", "HIVEMIND_SESSION": SESSION, "HIVEMIND_ROLE": "root"},
            "role must be one of",
        ),
        ({"HIVEMIND_BRIDGE": "/x", "HIVEMIND_SESSION": "a b", "HIVEMIND_ROLE": "query"}, "session token"),
        (
            {"HIVEMIND_BRIDGE": "/" + "x" * 120, "HIVEMIND_SESSION": SESSION, "HIVEMIND_ROLE": "query"},
            "socket path",
        ),
    ],
)
def test_from_env_with_a_bad_environment(env: dict[str, str], message: str) -> None:
    with pytest.raises(BridgeUnavailable, match=message):
        Bridge.from_env(env)


# --- run(handler) ---------------------------------------------------------------------------------


def _outputs(fake: FakeBridge) -> list[Any]:
    return [request.json() for request in fake.requests if request.path == "/v1/output"]


def test_run_posts_the_handler_result(fake: FakeBridge) -> None:
    fake.on("GET", "/v1/input", Reply(200, INPUT_QUERY))
    fake.on("POST", "/v1/tools/sql", Reply(200, {"columns": ["n"], "rows": [[9]], "truncated": False}))
    fake.on("POST", "/v1/output", ACCEPTED)

    def handler(ctx: Context) -> str:
        assert isinstance(ctx.input, AgentInput)
        assert not hasattr(ctx, "output")  # only run() posts the output, once
        return f"{ctx.prompt}: {ctx.sql('SELECT COUNT(*) AS n FROM orders').rows[0][0]}"

    assert run(handler, bridge=make_bridge(fake), stderr=io.StringIO()) == 0
    assert _outputs(fake) == [{"text": "top 3 products by count: 9"}]


def test_run_reports_a_handler_exception(fake: FakeBridge) -> None:
    fake.on("GET", "/v1/input", Reply(200, INPUT_QUERY))
    fake.on("POST", "/v1/output", ACCEPTED)
    stderr = io.StringIO()

    def handler(ctx: Context) -> str:
        raise ValueError("cannot parse the prompt")

    assert run(handler, bridge=make_bridge(fake), stderr=stderr) == 1
    assert _outputs(fake) == [
        {"error": {"code": "agent_error", "message": "ValueError: cannot parse the prompt"}}
    ]
    assert "Traceback" in stderr.getvalue()


def test_run_reports_a_bridge_error_with_its_code(fake: FakeBridge) -> None:
    fake.on("GET", "/v1/input", Reply(200, INPUT_QUERY))
    fake.on("POST", "/v1/llm/chat/completions", Reply(429, {"error": "budget_exceeded", "message": "tokens"}))
    fake.on("POST", "/v1/output", ACCEPTED)

    def handler(ctx: Context) -> str:
        return ctx.llm.chat([{"role": "user", "content": "x"}]).text or ""

    assert run(handler, bridge=make_bridge(fake), stderr=io.StringIO()) == 1
    assert _outputs(fake) == [{"error": {"code": "budget_exceeded", "message": "tokens"}}]


def test_run_reports_a_result_of_the_wrong_type(fake: FakeBridge) -> None:
    fake.on("GET", "/v1/input", Reply(200, INPUT_QUERY))
    fake.on("POST", "/v1/output", ACCEPTED)
    assert run(lambda ctx: None, bridge=make_bridge(fake), stderr=io.StringIO()) == 1  # type: ignore[arg-type,return-value]
    (report,) = _outputs(fake)
    assert report["error"]["code"] == "agent_error"
    assert "must return a str or a mapping, not NoneType" in report["error"]["message"]


def test_run_reports_an_output_the_bridge_refuses(fake: FakeBridge) -> None:
    fake.on("GET", "/v1/input", Reply(200, INPUT_QUERY))

    def output_route(request: Recorded) -> Reply:
        if "error" in request.json():
            return ACCEPTED
        return Reply(413, {"error": "payload_too_large", "message": "output over 1 MiB"})

    fake.on("POST", "/v1/output", output_route)
    assert run(lambda ctx: "x" * 10, bridge=make_bridge(fake), stderr=io.StringIO()) == 1
    assert _outputs(fake)[-1]["error"]["code"] == "payload_too_large"


def test_run_bounds_the_failure_message(fake: FakeBridge) -> None:
    fake.on("GET", "/v1/input", Reply(200, INPUT_QUERY))
    fake.on("POST", "/v1/output", ACCEPTED)

    def handler(ctx: Context) -> str:
        raise RuntimeError("x" * 10_000)

    run(handler, bridge=make_bridge(fake), stderr=io.StringIO())
    (report,) = _outputs(fake)
    assert len(report["error"]["message"]) == 2000
    assert report["error"]["message"].endswith("...")


def test_run_without_a_bridge_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HIVEMIND_BRIDGE", "HIVEMIND_SESSION", "HIVEMIND_ROLE"):
        monkeypatch.delenv(name, raising=False)
    stderr = io.StringIO()
    assert run(lambda ctx: "never", stderr=stderr) == 2
    assert "not set" in stderr.getvalue()


def test_run_when_the_socket_disappears_exits_2(socket_dir: str) -> None:
    bridge = Bridge(os.path.join(socket_dir, "gone.sock"), SESSION, "query")
    stderr = io.StringIO()
    assert run(lambda ctx: "never", bridge=bridge, stderr=stderr) == 2
    assert "could not report the failure" in stderr.getvalue()
