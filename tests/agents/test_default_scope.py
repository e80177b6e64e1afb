"""The default scope agent: compiling rules into a ScopePolicy the runner accepts, and only narrowing.

The agent judges no policy itself: every verdict (valid, narrower, within the room's ``data_policy``)
comes from the bridge's ``POST /v1/policy/check``, which the runner's bridge answers with the core library
(``hivemind.policy``), the code the runner uses. Everything the agent emits is parsed again with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import scope_agent
from agents_bridge import (
    AGENTS_DIR,
    LlmFailure,
    Room,
    completion,
    run_stage,
    running_bridge,
    scripted,
)

from hivemind.policy import check_against_schema, is_narrower, most_restrictive_policy, narrow, parse_policy
from hivemind_agent import Context, InvalidRequest
from hivemind_agent.rules import RulesError, load_policy_block
from hivemind_runner.scoped import RoomItem

SCOPE_DIR = AGENTS_DIR / "default-scope"
SCHEMA = {"people": ["name", "department", "salary"]}
PEOPLE_POLICY = {
    "tables": {"people": {"columns": ["department", "salary"], "where": None}},
    "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "SUM", "AVG"]},
    "max_rows": 50,
    "items": {"allow": [], "redact": []},
    "output": {"deny": [], "redact": ["[\\w.+-]+@[\\w-]+\\.[a-z]{2,}"]},
}


def block(yaml_text: str) -> str:
    return f"# Rules\n\nProse for humans.\n\n```policy\n{yaml_text}\n```\n"


@contextmanager
def scope_context(room: Room, prompt: str | None = "average salary by department") -> Iterator[Context]:
    """A scope stage's SDK context on the runner's bridge, to call the agent's steps in this process."""
    with running_bridge(room) as bridge:
        yield bridge.context(bridge.open_session("scope", prompt))


def compiled(people_data: list[RoomItem], rules: str, **room: Any) -> tuple[dict[str, Any], str]:
    with scope_context(Room(data=people_data, rules=rules, **room)) as ctx:
        return scope_agent.compile_rules(ctx)


# --- compiling -----------------------------------------------------------------------------------


def test_the_sample_rules_compile_to_the_people_policy(
    people_data: list[RoomItem], people_rules: str
) -> None:
    policy, origin = compiled(people_data, people_rules)
    assert policy == PEOPLE_POLICY
    assert origin.startswith("the policy block at rules line")
    assert parse_policy(policy) == parse_policy(PEOPLE_POLICY)


def test_without_a_block_the_policy_is_the_cores_most_restrictive_one(people_data: list[RoomItem]) -> None:
    policy, origin = compiled(people_data, "Only aggregates please.")
    assert parse_policy(policy) == most_restrictive_policy(SCHEMA)
    assert policy["tables"] == {"people": {"columns": ["name", "department", "salary"], "where": None}}
    assert policy["aggregate"] == {"required": True, "min_group_size": 10, "functions": ["COUNT"]}
    assert policy["items"]["allow"] == []
    assert "no policy block" in origin


def test_compiling_asks_the_bridge(people_data: list[RoomItem], people_rules: str) -> None:
    with running_bridge(Room(data=people_data, rules=people_rules)) as bridge:
        scope_agent.compile_rules(bridge.context(bridge.open_session("scope", "q")))
    assert bridge.policy_checks == [{"policy": load_policy_block(people_rules)[1], "bound": None}]  # type: ignore[index]


def test_yaml_conveniences_function_case_and_numeric_metadata(people_data: list[RoomItem]) -> None:
    rules = block(
        "aggregate:\n  functions: [count, Avg]\nitems:\n  allow:\n    - meta: {year: 2024, kind: memo}"
    )
    policy, _ = compiled(people_data, rules)
    assert policy["aggregate"]["functions"] == ["COUNT", "AVG"]
    assert policy["items"]["allow"] == [{"meta": {"year": "2024", "kind": "memo"}}]


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (
            "tables:\n  people:\n    columns: [department]\n    colums: [x]",
            r"tables\.people\.colums: Extra inputs are not permitted",
        ),
        ("aggregate:\n  min_group_size: '5'", r"aggregate\.min_group_size: Input should be a valid integer"),
        ("aggregate:\n  min_group_size: 5.0", r"aggregate\.min_group_size: Input should be a valid integer"),
        ("aggregate:\n  required: yes please", r"aggregate\.required: Input should be a valid boolean"),
        ("aggregate:\n  functions: [MEDIAN]", r"aggregate\.functions\[0\]: Input should be 'COUNT'"),
        ("max_rows: true", r"max_rows: Input should be a valid integer"),
        ("tables:\n  People:\n    columns: [a]", r"tables\.People \(name\): String should match pattern"),
        (
            "tables:\n  people:\n    columns: []",
            r"tables\.people\.columns: Tuple should have at least 1 item",
        ),
        ("output:\n  deny: ['(a+)+']", r"output\.deny: pattern '\(a\+\)\+' refused: nested quantifier"),
        ("output:\n  redact: ['[unclosed']", r"output\.redact: pattern .* does not compile"),
        ("items:\n  allow: [{name: memo}]", r"items\.allow\[0\]: an item rule is"),
        ("tables:\n  people:\n    columns: [salary]\n    where: 'salary > 1; DROP'", r"semicolon"),
        (
            "tables:\n  people:\n    columns: [salary]\n    where: 'age > 18'",
            r"tables\.people\.where: no such column\(s\) age",
        ),
        (
            "tables:\n  people:\n    columns: [salary]\n    where: 'Name = 1'",
            r"column 'Name' is not a normalized name",
        ),
        (
            "tables:\n  people:\n    columns: [salary]\n    where: \"lower(name) = 'x'\"",
            r"tables\.people\.where: function calls are not allowed",
        ),
        ("tables:\n  nobody:\n    columns: [salary]", r"tables\.nobody: no such table in the room data"),
        ("tables:\n  people:\n    columns: [email]", r"tables\.people\.columns: no such column\(s\) email"),
        ("colour: blue", r"colour: Extra inputs are not permitted"),
    ],
)
def test_a_malformed_block_is_a_rules_error_naming_the_path(
    people_data: list[RoomItem], yaml_text: str, message: str
) -> None:
    with pytest.raises(
        RulesError, match=r"rules line 5: the policy block is not a valid ScopePolicy: .*" + message
    ):
        compiled(people_data, block(yaml_text))


def test_every_problem_is_listed_not_just_the_first(people_data: list[RoomItem]) -> None:
    with pytest.raises(RulesError) as caught:
        compiled(people_data, block("max_rows: -1\naggregate:\n  min_group_size: 0"))
    assert "max_rows" in str(caught.value)
    assert "aggregate.min_group_size" in str(caught.value)
    with pytest.raises(RulesError) as caught:
        compiled(people_data, block("tables:\n  nobody: {columns: [a]}\n  people: {columns: [email]}"))
    assert "tables.nobody" in str(caught.value) and "tables.people.columns" in str(caught.value)


def test_two_blocks_fail_compilation(people_data: list[RoomItem]) -> None:
    with pytest.raises(RulesError, match="2 policy blocks"):
        compiled(people_data, block("max_rows: 1") + block("max_rows: 2"))


@pytest.mark.parametrize(
    "where",
    [
        "salary > 1000",
        "department IN ('Sales', 'Support') AND salary >= 1",
        '"salary" BETWEEN 1 AND 2',
        "department LIKE 'S%'",
        "salary IS NOT NULL",
        "NOT (salary < -5)",
        "salary > 1e3",
        "salary = 0x10",
    ],
)
def test_valid_filters_compile_verbatim(people_data: list[RoomItem], where: str) -> None:
    rules = block(f"tables:\n  people:\n    columns: [department, salary]\n    where: {json.dumps(where)}")
    policy, _ = compiled(people_data, rules)
    assert policy["tables"]["people"]["where"] == where


@pytest.mark.parametrize(
    "where",
    ["salary > 1 -- x", "salary > 1 /* x */", "(salary > 1", "salary > 1)", "Name = 'x'", "salary = 'open"],
)
def test_invalid_filters_fail_compilation(people_data: list[RoomItem], where: str) -> None:
    rules = block(f"tables:\n  people:\n    columns: [department, salary]\n    where: {json.dumps(where)}")
    with pytest.raises(RulesError, match=r"tables\.people\.where: "):
        compiled(people_data, rules)


def test_a_filter_may_use_a_hidden_column_that_exists(people_data: list[RoomItem]) -> None:
    rules = block('tables:\n  people:\n    columns: [department]\n    where: "salary > 60000"')
    policy, _ = compiled(people_data, rules)
    assert policy["tables"]["people"] == {"columns": ["department"], "where": "salary > 60000"}
    parsed = parse_policy(policy)
    check_against_schema(parsed, SCHEMA)
    assert parsed.tables["people"].where_columns() == {"salary"}


def test_compiling_bounds_the_block_by_the_rooms_data_policy(people_data: list[RoomItem]) -> None:
    data_policy = {
        "tables": {"people": {"columns": ["department", "salary"], "where": "salary > 1000"}},
        "aggregate": {"required": True, "min_group_size": 8, "functions": ["COUNT", "AVG"]},
        "output": {"deny": ["(?i)bonus"]},
    }
    rules = block(
        "tables:\n  people:\n    columns: [department, name]\n    where: \"department = 'Sales'\"\n"
        "aggregate:\n  required: false\n  min_group_size: 3\n  functions: [COUNT, SUM, AVG]\nmax_rows: 500"
    )
    policy, _ = compiled(people_data, rules, data_policy=data_policy)
    # The bound filters on salary; the column need not be visible for the filter to hold.
    assert policy["tables"]["people"] == {
        "columns": ["department"],
        "where": '("salary" > 1000) AND ("department" = \'Sales\')',
    }
    assert policy["aggregate"] == {"required": True, "min_group_size": 8, "functions": ["COUNT", "AVG"]}
    assert policy["max_rows"] == 100
    assert policy["output"]["deny"] == ["(?i)bonus"]
    assert narrow(parse_policy(data_policy), parse_policy(policy)) == parse_policy(policy)


def test_a_block_that_cannot_be_bounded_fails_closed(people_data: list[RoomItem]) -> None:
    deny = ", ".join(f"'a{i}'" for i in range(40))
    data_policy = {"output": {"deny": [f"b{i}" for i in range(40)]}}
    with pytest.raises(InvalidRequest, match="cannot be intersected") as caught:
        compiled(people_data, block(f"output:\n  deny: [{deny}]"), data_policy=data_policy)
    assert (caught.value.code, caught.value.status) == ("invalid_policy", 400)


# --- least privilege from the query agent's files -------------------------------------------------


def test_least_privilege_drops_what_an_inspectable_agent_never_calls() -> None:
    policy = {**PEOPLE_POLICY, "items": {"allow": [{"meta": {"kind": "memo"}}], "redact": []}}
    only_items = {"files": {"main.py": "for item in ctx.items():\n    ctx.item(item.id)"}}
    narrowed, notes = scope_agent.least_privilege(policy, only_items)
    assert narrowed["tables"] == {} and narrowed["items"]["allow"] == policy["items"]["allow"]
    assert notes == ["the query agent's source never calls the SQL tool: no tables"]
    only_sql = {"files": {"main.py": "ctx.sql('SELECT COUNT(*) FROM people')"}}
    narrowed, _ = scope_agent.least_privilege(policy, only_sql)
    assert narrowed["tables"] == policy["tables"] and narrowed["items"]["allow"] == []


def test_a_sealed_query_agent_keeps_the_whole_policy() -> None:
    assert scope_agent.least_privilege(PEOPLE_POLICY, {"files": None}) == (PEOPLE_POLICY, [])


# --- the stage through the runner's bridge ---------------------------------------------------------


def _scope_result(
    room: Room, prompt: str | None = "average salary by department"
) -> tuple[dict[str, Any], Any]:
    with running_bridge(room) as bridge:
        session = bridge.open_session("scope", prompt)
        process = bridge.run_agent(SCOPE_DIR, session)
        return {"returncode": process.returncode, "stderr": process.stderr, **session.result}, bridge


def test_main_posts_the_compiled_policy(people_data: list[RoomItem], people_rules: str) -> None:
    result, bridge = _scope_result(Room(data=people_data, rules=people_rules))
    assert result["returncode"] == 0, result["stderr"]
    assert parse_policy(result["json"]) == parse_policy(PEOPLE_POLICY)
    assert bridge.simulations == []  # no deny patterns: nothing to simulate against


def test_main_fails_closed_on_a_malformed_block(people_data: list[RoomItem]) -> None:
    result, _ = _scope_result(Room(data=people_data, rules=block("aggregate:\n  min_group_size: many")))
    assert result["returncode"] == 1
    assert result["error"]["code"] == "agent_error"
    assert "RulesError: rules line 5" in result["error"]["message"]
    assert "aggregate.min_group_size: Input should be a valid integer" in result["error"]["message"]


def test_main_never_widens_the_rooms_data_policy(people_data: list[RoomItem], people_rules: str) -> None:
    data_policy = {
        "tables": {"people": {"columns": ["salary"], "where": "salary > 50000"}},
        "aggregate": {"required": True, "min_group_size": 8, "functions": ["COUNT", "AVG", "MAX"]},
        "output": {"deny": ["(?i)ceo"]},
    }
    result, _ = _scope_result(Room(data=people_data, rules=people_rules, data_policy=data_policy))
    produced = parse_policy(result["json"])
    assert narrow(parse_policy(data_policy), produced) == produced
    assert result["json"]["tables"] == {"people": {"columns": ["salary"], "where": "salary > 50000"}}
    assert result["json"]["aggregate"] == {
        "required": True,
        "min_group_size": 8,
        "functions": ["COUNT", "AVG"],
    }


def test_without_a_block_a_data_policy_still_bounds_the_default(people_data: list[RoomItem]) -> None:
    data_policy = {"tables": {"people": {"columns": ["department"]}}, "aggregate": {"min_group_size": 20}}
    result, _ = _scope_result(Room(data=people_data, rules="No block here.", data_policy=data_policy))
    assert result["json"]["tables"] == {"people": {"columns": ["department"], "where": None}}
    assert result["json"]["aggregate"]["min_group_size"] == 20
    assert is_narrower(parse_policy(result["json"]), parse_policy(data_policy))


# --- LLM mode ------------------------------------------------------------------------------------


def _llm_room(people_data: list[RoomItem], people_rules: str, *replies: Any) -> Room:
    return Room(
        data=people_data,
        rules=people_rules,
        llm_providers=["openai"],
        llm_calls=3,
        llm=scripted(*replies),
    )


def test_llm_mode_keeps_a_narrower_proposal(people_data: list[RoomItem], people_rules: str) -> None:
    proposal = {**PEOPLE_POLICY, "tables": {"people": {"columns": ["department"]}}, "max_rows": 10}
    room = _llm_room(
        people_data, people_rules, completion("Here:\n```json\n" + json.dumps(proposal) + "\n```")
    )
    result, bridge = _scope_result(room)
    assert result["json"]["tables"] == {"people": {"columns": ["department"], "where": None}}
    assert result["json"]["max_rows"] == 10
    request = bridge.sessions[next(iter(bridge.sessions))].llm_requests[0]
    assert json.loads(request["messages"][1]["content"])["current_policy"] == PEOPLE_POLICY


@pytest.mark.parametrize(
    "reply",
    [
        completion(json.dumps({**PEOPLE_POLICY, "tables": {"people": {"columns": ["name", "department"]}}})),
        completion(json.dumps({**PEOPLE_POLICY, "aggregate": {"required": False}})),
        completion(
            json.dumps(
                {**PEOPLE_POLICY, "tables": {"people": {"columns": ["salary"], "where": "salary > 1"}}}
            )
        ),
        completion(json.dumps({**PEOPLE_POLICY, "output": {"deny": ["(a+)+"]}})),
        completion("I think the policy is fine."),
        completion(None),
        LlmFailure("provider down"),
    ],
    ids=[
        "wider-columns",
        "drops-aggregation",
        "changes-filter",
        "bad-regex",
        "prose",
        "empty",
        "provider-error",
    ],
)
def test_llm_mode_falls_back_to_the_compiled_policy(
    people_data: list[RoomItem], people_rules: str, reply: Any
) -> None:
    result, bridge = _scope_result(_llm_room(people_data, people_rules, reply))
    assert result["returncode"] == 0, result["stderr"]
    assert parse_policy(result["json"]) == parse_policy(PEOPLE_POLICY)
    logs = [line["message"] for session in bridge.sessions.values() for line in session.logs]
    assert any(message.startswith("llm proposal") for message in logs)


# --- simulation ----------------------------------------------------------------------------------


def test_simulation_drops_the_column_behind_a_denied_answer(people_data: list[RoomItem]) -> None:
    rules = block(
        "tables:\n  people:\n    columns: [department, salary]\naggregate:\n  min_group_size: 5\n"
        "  functions: [COUNT, AVG]\noutput:\n  deny: ['Engineering']"
    )
    result, bridge = _scope_result(Room(data=people_data, rules=rules))
    assert result["returncode"] == 0, result["stderr"]
    assert result["json"]["tables"] == {"people": {"columns": ["salary"], "where": None}}
    assert [prompt for _, prompt, _ in bridge.simulations] == ["average salary by department"] * 2
    first_answer = bridge.simulations[0][2].result["text"]
    assert "Engineering" in first_answer
    assert "Engineering" not in bridge.simulations[1][2].result["text"]


def test_simulation_keeps_a_policy_whose_answer_passes(people_data: list[RoomItem]) -> None:
    rules = block(
        "tables:\n  people:\n    columns: [department, salary]\naggregate:\n  min_group_size: 5\n"
        "  functions: [COUNT, AVG]\noutput:\n  deny: ['(?i)ceo']"
    )
    result, bridge = _scope_result(Room(data=people_data, rules=rules))
    assert result["json"]["tables"]["people"]["columns"] == ["department", "salary"]
    assert len(bridge.simulations) == 1


def test_no_simulation_when_the_prompt_is_hidden(people_data: list[RoomItem]) -> None:
    rules = block("tables:\n  people:\n    columns: [department]\noutput:\n  deny: ['Engineering']")
    result, bridge = _scope_result(Room(data=people_data, rules=rules, prompt_visible=False))
    assert result["json"]["tables"]["people"]["columns"] == ["department"]
    assert bridge.simulations == []


def test_the_stage_runs_in_process_with_the_sdk_runner(
    people_data: list[RoomItem], people_rules: str
) -> None:
    with running_bridge(Room(data=people_data, rules=people_rules)) as bridge:
        posted = run_stage(bridge, SCOPE_DIR, bridge.open_session("scope", "how many people?"))
    assert posted["json"]["aggregate"]["min_group_size"] == 5


def test_the_examples_in_docs_rules_md_compile_and_the_core_accepts_them() -> None:
    text = (AGENTS_DIR.parent / "docs" / "rules.md").read_text()
    examples = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    assert len(examples) >= 5
    for example in examples:
        loaded = load_policy_block(f"```policy\n{example}```")
        assert loaded is not None
        parse_policy(loaded[1])
