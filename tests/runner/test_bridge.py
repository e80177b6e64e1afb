"""The bridge's REST routes, driven by the real agent SDK over a real Unix socket (docs/agents.md).

Each stage gets a session wired the way the pipeline wires it: the scope stage a full-read database,
the query stage a database built from the policy's projection only, the mediator nothing. The tests
check what an agent would notice: which routes answer for which role, what the data looks like, and
the error codes of refusals.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from hivemind.admission import Deny
from hivemind.errors import InvalidPolicy
from hivemind.models import Stage
from hivemind.policy import intersect, parse_policy
from hivemind_agent import Bridge
from hivemind_agent.errors import BudgetExhausted, Denied, InvalidRequest, NotAllowedForRole, NotFound
from hivemind_runner.bridge import (
    ArtifactStore,
    BridgeLimits,
    BridgeListener,
    BridgeServer,
    SimulationLimit,
    StageServices,
    StageSession,
    ToolCall,
    room_policy_checker,
    tool_call_chain,
    wire_error,
)
from hivemind_runner.scoped import (
    ItemInfo,
    RoomItem,
    ScopedDatabase,
    build_scoped_database,
    full_read_database,
)

SIZES = {"eng": 8, "ops": 6, "sales": 5, "legal": 3}
MEMO = "Q3 memo: Alice Example (SSN 123-45-6789) approved the budget."
POLICY = parse_policy(
    {
        "tables": {"people": {"columns": ["department", "salary"], "where": "region = 'eu'"}},
        "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "AVG"]},
        "items": {"allow": [{"meta": {"kind": "memo"}}], "redact": [r"\d{3}-\d{2}-\d{4}"]},
        "output": {"deny": ["(?i)secretname"], "redact": ["Alice"]},
    }
)


def people_csv() -> bytes:
    rows = ["Name,Department,Salary,Region"]
    for department, size in SIZES.items():
        rows += [f"Secretname{department}{i},{department},{50_000 + 1_000 * i},eu" for i in range(size)]
    rows += [f"Secretnameus{i},usdept,999999,us" for i in range(6)]
    return ("\n".join(rows) + "\n").encode()


def room_items() -> list[RoomItem]:
    data = people_csv()
    people = ItemInfo(
        id="item_people",
        name="people.csv",
        content_type="text/csv",
        size=len(data),
        metadata={"table": "people"},
    )
    memo = ItemInfo(
        id="item_memo",
        name="memo.md",
        content_type="text/markdown",
        size=len(MEMO),
        metadata={"kind": "memo"},
    )
    other = ItemInfo(
        id="item_other", name="other.md", content_type="text/markdown", size=5, metadata={"kind": "other"}
    )
    return [
        RoomItem.from_bytes(people, data),
        RoomItem.from_bytes(memo, MEMO.encode()),
        RoomItem.from_bytes(other, b"other"),
    ]


def input_document(stage: Stage, **stage_fields: Any) -> dict[str, Any]:
    return {
        "role": stage.value,
        "prompt": "average salary by department",
        "rules": "aggregates only",
        "policy": "",
        "schema": None,
        "budgets": {"timeout_s": 60, "llm_calls": 0, "tokens": 0, "memory_mb": 256},
        "llm_providers": [],
        "artifacts_allowed": False,
        "stage": stage_fields,
    }


class Harness:
    """Starts bridges on sockets under one directory and hands out SDK clients for them."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.servers: list[BridgeServer] = []

    def start(
        self, stage: Stage, services: StageServices, *, chain: Any = None, limits: BridgeLimits | None = None
    ) -> tuple[StageSession, Bridge, Path]:
        session = StageSession(
            run_id="run_test1",
            stage=stage,
            services=services,
            chain=chain or tool_call_chain(max_tool_calls=1000, max_log_lines=3),
            limits=limits,
        )
        path = self.directory / f"s{len(self.servers)}.sock"
        server = BridgeServer(session, path).start()
        self.servers.append(server)
        return session, Bridge(str(path), session.token, stage.value, timeout=30), path

    def close(self) -> None:
        for server in self.servers:
            server.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    active = Harness(tmp_path)
    try:
        yield active
    finally:
        active.close()


def full_schema(database: ScopedDatabase) -> dict[str, list[str]]:
    """Table -> columns of the full data, as the pipeline hands it to the policy checker."""
    return {
        table.name: [column.name for column in table.columns]
        for table in database.schema(role=Stage.SCOPE).tables
    }


@pytest.fixture
def scope(harness: Harness) -> Iterator[tuple[StageSession, Bridge, Path]]:
    with full_read_database(room_items()) as database:
        simulated: list[tuple[Mapping[str, Any], str]] = []

        def simulator(policy: Mapping[str, Any], prompt: str) -> dict[str, Any]:
            parsed = parse_policy(dict(policy))
            simulated.append((policy, prompt))
            if len(simulated) > 2:
                raise SimulationLimit("a run may simulate at most 2 times")
            return {"output": f"simulated {sorted(parsed.tables)} for {prompt}", "error": None}

        services = StageServices(
            input_document=input_document(Stage.SCOPE, prompt_visible=True),
            database=database,
            simulator=simulator,
            policy_checker=room_policy_checker(full_schema(database), None),
        )
        yield harness.start(Stage.SCOPE, services)


@pytest.fixture
def query(harness: Harness, tmp_path: Path) -> Iterator[tuple[StageSession, Bridge, Path]]:
    with build_scoped_database(room_items(), POLICY) as database:
        services = StageServices(
            input_document=input_document(Stage.QUERY),
            database=database,
            artifacts=ArtifactStore(tmp_path / "artifacts", BridgeLimits(max_artifact_bytes=1024)),
            artifacts_allowed=True,
        )
        yield harness.start(Stage.QUERY, services)


@pytest.fixture
def mediator(harness: Harness) -> tuple[StageSession, Bridge, Path]:
    services = StageServices(input_document=input_document(Stage.MEDIATOR, answer={"text": "42"}))
    return harness.start(Stage.MEDIATOR, services)


def raw_request(
    path: Path, method: str, target: str, *, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("localhost", timeout=10)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    connection.sock = sock
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


# --- input, output, session ------------------------------------------------------------------------


def test_input_is_the_stage_document(scope: tuple[StageSession, Bridge, Path]) -> None:
    _, bridge, _ = scope
    agent_input = bridge.input()
    assert agent_input.role == "scope"
    assert agent_input.prompt == "average salary by department"
    assert agent_input.stage["prompt_visible"] is True


def test_output_is_accepted_once_and_then_every_call_is_stage_finished(
    mediator: tuple[StageSession, Bridge, Path],
) -> None:
    session, bridge, _ = mediator
    bridge.output("final answer")
    assert session.output is not None and session.output.text == "final answer"
    assert session.finished.is_set()
    with pytest.raises(InvalidRequest) as second:
        bridge.output("another")
    assert (second.value.code, second.value.status) == ("stage_finished", 409)
    with pytest.raises(InvalidRequest, match="stage_finished"):
        bridge.input()


def test_failure_report_is_recorded_without_becoming_an_output(
    mediator: tuple[StageSession, Bridge, Path],
) -> None:
    session, bridge, _ = mediator
    bridge.report_failure("agent_error", "ValueError: bad prompt")
    assert session.output is not None and session.output.failed
    assert (session.output.error_code, session.output.error_message) == (
        "agent_error",
        "ValueError: bad prompt",
    )


@pytest.mark.parametrize(
    "body",
    [
        {"text": "a", "json": {}},
        {},
        {"text": 5},
        {"json": ["not", "an", "object"]},
        {"error": {"code": "Not A Code", "message": "x"}},
        {"error": {"code": "agent_error", "message": "x" * 2001}},
        {"answer": "a"},
    ],
)
def test_malformed_outputs_are_invalid_requests(
    mediator: tuple[StageSession, Bridge, Path], body: dict[str, Any]
) -> None:
    session, _, path = mediator
    status, answer = raw_request(
        path,
        "POST",
        "/v1/output",
        body=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {session.token}", "Content-Type": "application/json"},
    )
    assert (status, answer["error"]) == (400, "invalid_request")
    assert session.output is None


def test_a_wrong_or_missing_token_is_unauthenticated(scope: tuple[StageSession, Bridge, Path]) -> None:
    session, _, path = scope
    impostor = Bridge(str(path), session.token[:-1] + ("A" if session.token[-1] != "A" else "B"), "scope")
    with pytest.raises(Denied) as refused:
        impostor.sql("SELECT name FROM people")
    assert (refused.value.code, refused.value.status) == ("unauthenticated", 401)
    status, body = raw_request(path, "GET", "/v1/input")
    assert (status, body["error"]) == (401, "unauthenticated")
    status, body = raw_request(path, "GET", "/v1/input", headers={"Authorization": f"Basic {session.token}"})
    assert status == 401
    assert session.tool_counts == {}


def test_unknown_routes_and_methods(scope: tuple[StageSession, Bridge, Path]) -> None:
    session, _, path = scope
    auth = {"Authorization": f"Bearer {session.token}"}
    assert raw_request(path, "GET", "/v1/nothing", headers=auth)[1]["error"] == "not_found"
    assert raw_request(path, "POST", "/v1/input", body=b"{}", headers=auth) == (
        405,
        {"error": "method_not_allowed", "message": "/v1/input answers GET"},
    )


def test_an_oversized_json_body_is_refused_with_413(scope: tuple[StageSession, Bridge, Path]) -> None:
    session, bridge, _ = scope
    with pytest.raises(InvalidRequest) as refused:
        bridge.sql("SELECT 1 -- " + "x" * (1024 * 1024 + 10))
    assert (refused.value.code, refused.value.status) == ("payload_too_large", 413)
    assert "sql" not in session.tool_counts
    # The connection was drained: the bridge still answers normally.
    assert bridge.sql("SELECT COUNT(*) AS n FROM people").rows == ((28,),)


def test_unknown_request_fields_are_refused(scope: tuple[StageSession, Bridge, Path]) -> None:
    session, _, path = scope
    status, body = raw_request(
        path,
        "POST",
        "/v1/tools/sql",
        body=json.dumps({"query": "SELECT 1", "role": "scope"}).encode(),
        headers={"Authorization": f"Bearer {session.token}"},
    )
    assert (status, body["error"]) == (400, "invalid_request")
    for raw in (b'{"query": NaN}', b'{"query": "SELECT 1", "x": 1e400}', b'["SELECT 1"]', b"\xff"):
        status, body = raw_request(
            path, "POST", "/v1/tools/sql", body=raw, headers={"Authorization": f"Bearer {session.token}"}
        )
        assert (status, body["error"]) == (400, "invalid_request")
    # Bodies that do not parse never reach the admission chain; the first request was admitted.
    assert session.tool_counts == {"sql": 1}


# --- per-stage grants ------------------------------------------------------------------------------


def test_scope_reads_everything(scope: tuple[StageSession, Bridge, Path]) -> None:
    _, bridge, _ = scope
    schema = bridge.schema()
    assert schema.table("people").column_names == ("name", "department", "salary", "region")
    assert (schema.aggregate, schema.max_rows) == (None, None)
    names = bridge.sql("SELECT name FROM people WHERE department = 'legal' ORDER BY name")
    assert [row[0] for row in names.rows] == ["Secretnamelegal0", "Secretnamelegal1", "Secretnamelegal2"]
    assert {item.id for item in bridge.items()} == {"item_people", "item_memo", "item_other"}
    assert bridge.item("item_memo").text == MEMO


def test_scope_may_simulate_but_never_write_artifacts(scope: tuple[StageSession, Bridge, Path]) -> None:
    _, bridge, _ = scope
    result = bridge.simulate({"tables": {"people": {"columns": ["department"]}}}, "how many people")
    assert result.ok and result.output == "simulated ['people'] for how many people"
    with pytest.raises(NotAllowedForRole):
        bridge.artifact("policy.json", b"{}")


def test_simulate_refuses_invalid_policies_and_counts_its_budget(
    scope: tuple[StageSession, Bridge, Path],
) -> None:
    _, bridge, _ = scope
    with pytest.raises(InvalidRequest) as invalid:
        bridge.simulate({"tables": {"people": {"columns": ["salary"], "where": "lower(name) = 'x'"}}}, "q")
    assert (invalid.value.code, invalid.value.status) == ("invalid_policy", 400)
    bridge.simulate({}, "one")
    bridge.simulate({}, "two")
    with pytest.raises(BudgetExhausted) as exhausted:
        bridge.simulate({}, "three")
    assert (exhausted.value.code, exhausted.value.status) == ("budget_exceeded", 429)


def test_scope_checks_policies_with_the_runners_verdict(scope: tuple[StageSession, Bridge, Path]) -> None:
    session, bridge, _ = scope
    check = bridge.check_policy({"tables": {"people": {"columns": ["department"], "where": "region = 'eu'"}}})
    assert check.valid and check.narrower and check.narrower_than_room
    # Every section written out, omitted ones at their strictest; no data_policy: within_room is itself.
    assert check.policy == {
        "tables": {"people": {"columns": ["department"], "where": "region = 'eu'"}},
        "aggregate": {"required": True, "min_group_size": 10, "functions": ["COUNT"]},
        "max_rows": 100,
        "items": {"allow": [], "redact": []},
        "output": {"deny": [], "redact": []},
    }
    assert check.within_room == check.policy

    wider = bridge.check_policy({"tables": {"people": {"columns": ["department", "salary"]}}}, check.policy)
    assert wider.valid and wider.narrower_than_room and not wider.narrower
    assert [(w.against, w.message) for w in wider.widenings] == [
        ("bound", "tables.people.columns: salary not allowed by the bound"),
        ("bound", "tables.people.where: does not keep the bound's condition(s) \"region\" = 'eu'"),
    ]

    invalid = bridge.check_policy(
        {"tables": {"people": {"columns": ["email"]}, "nobody": {"columns": ["a"]}}, "max_rows": 10}
    )
    assert not invalid.valid and (invalid.policy, invalid.within_room) == (None, None)
    assert [str(problem) for problem in invalid.errors] == [
        "tables.people.columns: no such column(s) email",
        "tables.nobody: no such table in the room data",
    ]
    grammar = bridge.check_policy(
        {"tables": {"people": {"columns": ["salary"], "where": "lower(name) = 'x'"}}}
    )
    assert [problem.path for problem in grammar.errors] == ["tables.people.where"]
    assert session.tool_counts == {"policy_check": 4}


def test_policy_check_measures_against_the_rooms_data_policy(harness: Harness) -> None:
    room = parse_policy(
        {
            "tables": {"people": {"columns": ["department", "salary"], "where": "region = 'eu'"}},
            "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "AVG"]},
            "output": {"deny": ["(?i)secretname"]},
        }
    )
    with full_read_database(room_items()) as database:
        services = StageServices(
            input_document=input_document(Stage.SCOPE),
            database=database,
            policy_checker=room_policy_checker(full_schema(database), room),
        )
        _, bridge, _ = harness.start(Stage.SCOPE, services)
        wants = {"tables": {"people": {"columns": ["name", "salary"]}}, "aggregate": {"functions": ["AVG"]}}
        wider = bridge.check_policy(wants)
        assert wider.valid and not wider.narrower_than_room
        assert {w.against for w in wider.widenings} == {"data_policy"}
        assert wider.within_room == intersect(parse_policy(wants), room).model_dump(mode="json")
        assert wider.within_room is not None
        assert wider.within_room["tables"] == {"people": {"columns": ["salary"], "where": "region = 'eu'"}}
        assert wider.within_room["output"]["deny"] == ["(?i)secretname"]

        within = bridge.check_policy(wider.within_room)
        assert within.narrower_than_room and within.widenings == ()
        assert within.within_room == within.policy == wider.within_room


def test_policy_check_refuses_malformed_requests(scope: tuple[StageSession, Bridge, Path]) -> None:
    session, bridge, path = scope
    with pytest.raises(InvalidRequest) as bad_bound:
        bridge.check_policy({}, bound={"max_rows": -1})
    assert (bad_bound.value.code, bad_bound.value.status) == ("invalid_policy", 400)
    assert "the bound is not a valid policy" in bad_bound.value.message
    auth = {"Authorization": f"Bearer {session.token}"}
    for body in ({"policy": "{}"}, {"policy": {}, "bound": []}, {"policy": {}, "prompt": "x"}, {}):
        status, answer = raw_request(
            path, "POST", "/v1/policy/check", body=json.dumps(body).encode(), headers=auth
        )
        assert (status, answer["error"]) == (400, "invalid_request")
    assert raw_request(path, "GET", "/v1/policy/check", headers=auth)[0] == 405


def test_operator_policies_also_bound_policy_checks(harness: Harness) -> None:
    with full_read_database(room_items()) as database:
        chain = tool_call_chain(max_tool_calls=1000, max_log_lines=10, extra_specs="max_prompt_bytes:64")
        services = StageServices(
            input_document=input_document(Stage.SCOPE),
            database=database,
            policy_checker=room_policy_checker(full_schema(database), None),
        )
        session, bridge, _ = harness.start(Stage.SCOPE, services, chain=chain)
        assert bridge.check_policy({}).valid
        with pytest.raises(Denied) as refused:
            bridge.check_policy({"tables": {"people": {"columns": ["department", "salary", "region"]}}})
        assert (refused.value.code, refused.value.status) == ("prompt_too_large", 403)
        assert session.tool_counts == {"policy_check": 1}


def test_query_sees_only_the_allowed_projection(query: tuple[StageSession, Bridge, Path]) -> None:
    _, bridge, _ = query
    schema = bridge.schema()
    assert schema.table_names == ("people",)
    assert schema.table("people").column_names == ("department", "salary")
    assert schema.aggregate is not None and schema.aggregate.min_group_size == 5
    averages = bridge.sql("SELECT department, AVG(salary) AS average FROM people GROUP BY department")
    # legal (3 people) is below the minimum group; the US rows are filtered out before loading.
    assert sorted(row[0] for row in averages.rows) == ["eng", "ops", "sales"]
    with pytest.raises(Denied) as denied:
        bridge.sql("SELECT department, salary FROM people")
    assert denied.value.code == "sql_denied"
    with pytest.raises(Denied, match="sql_denied"):
        bridge.sql("SELECT name, COUNT(*) FROM people GROUP BY name")


def test_query_never_receives_filters_redaction_lists_or_hidden_columns(
    query: tuple[StageSession, Bridge, Path],
) -> None:
    session, _, path = query
    auth = {"Authorization": f"Bearer {session.token}"}
    seen = json.dumps(
        [raw_request(path, "GET", target, headers=auth)[1] for target in ("/v1/input", "/v1/tools/schema")]
    )
    for secret in ("region", "where", "redact", "deny", "Secretname", "usdept", r"\\d{3}"):
        assert secret not in seen


def test_query_items_pass_the_allow_list_and_redaction(query: tuple[StageSession, Bridge, Path]) -> None:
    _, bridge, _ = query
    assert [item.id for item in bridge.items()] == ["item_memo"]
    assert bridge.item("item_memo").text == "Q3 memo: Alice Example (SSN [REDACTED]) approved the budget."
    for hidden in ("item_other", "item_people", "item_nothing"):
        with pytest.raises(NotFound):
            bridge.item(hidden)


@pytest.mark.parametrize(
    "call",
    [lambda bridge: bridge.simulate({}, "q"), lambda bridge: bridge.check_policy({})],
    ids=["simulate", "check_policy"],
)
def test_query_cannot_simulate_or_check_policies(query: tuple[StageSession, Bridge, Path], call: Any) -> None:
    session, bridge, _ = query
    with pytest.raises(NotAllowedForRole) as refused:
        call(bridge)
    assert (refused.value.code, refused.value.status) == ("not_allowed_for_role", 403)
    assert session.tool_counts == {}


def test_query_artifacts_are_stored_once_per_name(
    query: tuple[StageSession, Bridge, Path], tmp_path: Path
) -> None:
    session, bridge, path = query
    reference = bridge.artifact("chart.svg", b"<svg/>", content_type="image/svg+xml")
    assert (reference.name, reference.size) == ("chart.svg", 6)
    stored = session.services.artifacts.stored["chart.svg"]  # type: ignore[union-attr]
    assert (stored.content_type, stored.path.read_bytes()) == ("image/svg+xml", b"<svg/>")
    assert stored.path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(InvalidRequest) as again:
        bridge.artifact("chart.svg", b"<svg></svg>")
    assert again.value.code == "artifact_exists"
    with pytest.raises(InvalidRequest) as large:
        bridge.artifact("big.bin", b"x" * 1025)
    assert (large.value.code, large.value.status) == ("payload_too_large", 413)
    status, body = raw_request(
        path,
        "PUT",
        "/v1/artifacts/..%2Fescape",
        body=b"x",
        headers={"Authorization": f"Bearer {session.token}"},
    )
    assert (status, body["error"]) == (400, "invalid_request")
    assert sorted(path.name for path in (tmp_path / "artifacts").iterdir()) == ["chart.svg"]


def test_artifacts_are_refused_when_the_room_disallows_them(harness: Harness) -> None:
    with build_scoped_database(room_items(), POLICY) as database:
        services = StageServices(input_document=input_document(Stage.QUERY), database=database)
        _, bridge, _ = harness.start(Stage.QUERY, services)
        with pytest.raises(Denied) as refused:
            bridge.artifact("chart.png", b"png")
        assert (refused.value.code, refused.value.status) == ("artifacts_disabled", 403)


@pytest.mark.parametrize(
    "call",
    [
        lambda bridge: bridge.schema(),
        lambda bridge: bridge.sql("SELECT 1"),
        lambda bridge: bridge.items(),
        lambda bridge: bridge.item("item_memo"),
        lambda bridge: bridge.simulate({}, "q"),
        lambda bridge: bridge.check_policy({}),
        lambda bridge: bridge.artifact("a.txt", b"a"),
    ],
    ids=["schema", "sql", "items", "item", "simulate", "check_policy", "artifact"],
)
def test_mediator_has_no_data_tools(mediator: tuple[StageSession, Bridge, Path], call: Any) -> None:
    session, bridge, _ = mediator
    with pytest.raises(NotAllowedForRole):
        call(bridge)
    assert session.tool_counts == {}
    assert bridge.input().stage["answer"] == {"text": "42"}


def test_llm_is_refused_when_the_room_allows_no_provider(mediator: tuple[StageSession, Bridge, Path]) -> None:
    _, bridge, _ = mediator
    with pytest.raises(Denied) as refused:
        bridge.llm.chat([{"role": "user", "content": "hi"}])
    assert (refused.value.code, refused.value.status) == ("provider_not_allowed", 403)


# --- logs and the admission chain -------------------------------------------------------------------


def test_logs_are_kept_and_limited(scope: tuple[StageSession, Bridge, Path]) -> None:
    session, bridge, _ = scope
    with pytest.raises(InvalidRequest):
        bridge.log("x" * 4097)
    for index in range(3):
        bridge.log("step", index=index)
    with pytest.raises(BudgetExhausted) as limited:
        bridge.log("one too many")
    assert (limited.value.code, limited.value.status) == ("rate_limited", 429)
    assert [line["fields"]["index"] for line in session.logs] == [0, 1, 2]


def test_operator_policies_deny_tool_calls(harness: Harness) -> None:
    with full_read_database(room_items()) as database:
        chain = tool_call_chain(max_tool_calls=1000, max_log_lines=10, extra_specs="max_prompt_bytes:64")
        services = StageServices(input_document=input_document(Stage.SCOPE), database=database)
        session, bridge, _ = harness.start(Stage.SCOPE, services, chain=chain)
        assert bridge.sql("SELECT 1 AS one").rows == ((1,),)
        with pytest.raises(Denied) as refused:
            bridge.sql("SELECT department, COUNT(*) AS n FROM people GROUP BY department ORDER BY n DESC")
        assert (refused.value.code, refused.value.status) == ("prompt_too_large", 403)
        assert session.tool_counts == {"sql": 1}


def test_a_failing_policy_denies_and_a_broken_chain_denies_everything(harness: Harness) -> None:
    class Exploding:
        name = "exploding"

        def evaluate(self, ctx: ToolCall) -> Deny:
            raise RuntimeError("room data in an exception")

    with full_read_database(room_items()) as database:
        services = StageServices(input_document=input_document(Stage.SCOPE), database=database)
        failing = tool_call_chain(max_tool_calls=10, max_log_lines=10, extra_policies=[Exploding()])
        _, bridge, _ = harness.start(Stage.SCOPE, services, chain=failing)
        with pytest.raises(Denied) as refused:
            bridge.schema()
        assert refused.value.code == "policy_error"
        assert "room data" not in refused.value.message
        broken = tool_call_chain(max_tool_calls=10, max_log_lines=10, extra_specs="no_such_policy")
        _, bridge, _ = harness.start(Stage.SCOPE, services, chain=broken)
        with pytest.raises(Denied, match="policy_chain_unavailable"):
            bridge.input()


def test_tool_call_limit(harness: Harness) -> None:
    services = StageServices(input_document=input_document(Stage.MEDIATOR))
    chain = tool_call_chain(max_tool_calls=2, max_log_lines=10)
    _, bridge, _ = harness.start(Stage.MEDIATOR, services, chain=chain)
    bridge.input()
    bridge.input()
    with pytest.raises(BudgetExhausted, match="rate_limited"):
        bridge.input()


def test_simulator_errors_map_to_contract_codes() -> None:
    # The pipeline's simulator raises these; the bridge maps them to 400 and 429.
    assert wire_error(InvalidPolicy("bad"))[0] == 400
    assert wire_error(InvalidPolicy("bad"))[1]["error"] == "invalid_policy"
    assert wire_error(SimulationLimit("spent")) == (429, {"error": "budget_exceeded", "message": "spent"})
    assert wire_error(RuntimeError("secret row")) == (
        500,
        {"error": "internal_error", "message": "the bridge failed to handle the request"},
    )


# --- a socket bound before its session exists (pre-started sandboxes) -----------------------------------


def _mediator_services() -> StageServices:
    return StageServices(input_document=input_document(Stage.MEDIATOR, answer="42"))


def _session_for(listener: BridgeListener, services: StageServices) -> StageSession:
    return StageSession(
        run_id="run_test1",
        stage=Stage.MEDIATOR,
        services=services,
        chain=tool_call_chain(max_tool_calls=1000, max_log_lines=3),
        token=listener.token,
    )


def test_a_call_made_before_the_session_exists_is_answered_once_it_is_served(tmp_path: Path) -> None:
    listener = BridgeListener(tmp_path / "early.sock", BridgeLimits())
    answers: list[Any] = []
    agent = threading.Thread(
        target=lambda: answers.append(Bridge(str(listener.socket_path), listener.token, "mediator").input())
    )
    agent.start()
    agent.join(0.5)
    assert agent.is_alive() and answers == []  # the agent's first call waits: nothing serves it yet
    server = listener.serve(_session_for(listener, _mediator_services()))
    try:
        agent.join(10)
        assert [answer.stage["answer"] for answer in answers] == ["42"]
    finally:
        server.close()
    assert not listener.socket_path.exists()


def test_a_listener_serves_one_session_made_with_its_token(tmp_path: Path) -> None:
    listener = BridgeListener(tmp_path / "once.sock", BridgeLimits())
    stranger = StageSession(
        run_id="run_test1",
        stage=Stage.MEDIATOR,
        services=_mediator_services(),
        chain=tool_call_chain(max_tool_calls=1000, max_log_lines=3),
    )
    with pytest.raises(ValueError, match="this listener's token"):
        listener.serve(stranger)
    narrower = StageSession(
        run_id="run_test1",
        stage=Stage.MEDIATOR,
        services=_mediator_services(),
        chain=tool_call_chain(max_tool_calls=1000, max_log_lines=3),
        limits=BridgeLimits(max_connections=1),
        token=listener.token,
    )
    with pytest.raises(ValueError, match="connection limit"):
        listener.serve(narrower)
    server = listener.serve(_session_for(listener, _mediator_services()))
    try:
        with pytest.raises(RuntimeError, match="already served or closed"):
            listener.serve(_session_for(listener, _mediator_services()))
    finally:
        server.close()


def test_closing_an_unserved_listener_drops_waiting_calls_and_removes_the_socket(tmp_path: Path) -> None:
    listener = BridgeListener(tmp_path / "dropped.sock", BridgeLimits())
    errors: list[Exception] = []

    def call() -> None:
        try:
            Bridge(str(listener.socket_path), listener.token, "mediator", timeout=30).input()
        except Exception as exc:
            errors.append(exc)

    agent = threading.Thread(target=call)
    agent.start()
    agent.join(0.3)
    listener.close()
    agent.join(10)
    assert not agent.is_alive()
    assert [type(error).__name__ for error in errors] == ["BridgeUnavailable"]
    assert not listener.socket_path.exists()
    listener.close()  # twice is fine
    with pytest.raises(RuntimeError, match="already served or closed"):
        listener.serve(_session_for(listener, _mediator_services()))


@pytest.mark.parametrize("token", ["", "short", "x" * 42 + " ", "é" * 43])
def test_a_session_token_must_look_like_one_the_runner_makes(token: str) -> None:
    with pytest.raises(ValueError, match="session token"):
        StageSession(
            run_id="run_test1",
            stage=Stage.MEDIATOR,
            services=_mediator_services(),
            chain=tool_call_chain(max_tool_calls=1000, max_log_lines=3),
            token=token,
        )
