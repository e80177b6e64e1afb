"""The default scope agent: compiling rules into a ScopePolicy the runner accepts, and only narrowing.

Everything the agent emits is parsed again with the core library (``hivemind.policy``), the code the
runner uses, so these tests also pin the agent's stdlib re-statement of the policy model to the real
one.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import scope_agent
import yaml
from agents_fake_bridge import (
    AGENTS_DIR,
    LlmFailure,
    Room,
    completion,
    run_stage,
    running_bridge,
    scripted,
)
from hivemind.errors import InvalidPolicy
from hivemind.policy import (
    check_against_schema,
    check_pattern,
    is_narrower,
    most_restrictive_policy,
    narrow,
    parse_policy,
)
from rules_block import RulesError
from scope_policy import (
    PolicyError,
    keeps_filter,
    meet,
    most_restrictive,
    normalize,
    pattern_problem,
    predicate_problem,
    widenings,
)

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


# --- compiling -----------------------------------------------------------------------------------


def test_the_sample_rules_compile_to_the_people_policy(people_rules: str) -> None:
    policy, origin = scope_agent.compile_rules(people_rules, "", SCHEMA)
    assert policy == PEOPLE_POLICY
    assert origin.startswith("the policy block at rules line")
    assert parse_policy(policy) == parse_policy(PEOPLE_POLICY)


def test_without_a_block_the_policy_is_the_cores_most_restrictive_one() -> None:
    policy, origin = scope_agent.compile_rules("Only aggregates please.", "", SCHEMA)
    assert parse_policy(policy) == most_restrictive_policy(SCHEMA)
    assert policy == most_restrictive(SCHEMA)
    assert policy["aggregate"] == {"required": True, "min_group_size": 10, "functions": ["COUNT"]}
    assert policy["items"]["allow"] == []
    assert "no policy block" in origin


def test_yaml_conveniences_function_case_and_numeric_metadata() -> None:
    rules = block(
        "aggregate:\n  functions: [count, Avg]\nitems:\n  allow:\n    - meta: {year: 2024, kind: memo}"
    )
    policy, _ = scope_agent.compile_rules(rules, "", SCHEMA)
    assert policy["aggregate"]["functions"] == ["COUNT", "AVG"]
    assert policy["items"]["allow"] == [{"meta": {"year": "2024", "kind": "memo"}}]
    parse_policy(policy)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (
            "tables:\n  people:\n    columns: [department]\n    colums: [x]",
            r"tables\.people\.colums: unknown field",
        ),
        ("aggregate:\n  min_group_size: '5'", r"aggregate\.min_group_size: must be an integer"),
        ("aggregate:\n  min_group_size: 5.0", r"aggregate\.min_group_size: must be an integer"),
        ("aggregate:\n  required: yes please", r"aggregate\.required: must be true or false"),
        ("aggregate:\n  functions: [MEDIAN]", r"aggregate\.functions: unknown function\(s\) 'MEDIAN'"),
        ("max_rows: true", r"max_rows: must be an integer"),
        (
            "tables:\n  People:\n    columns: [a]",
            r"tables\.People \(name\): 'People' is not a normalized name",
        ),
        ("tables:\n  people:\n    columns: []", r"tables\.people\.columns: must be a non-empty list"),
        ("output:\n  deny: ['(a+)+']", r"output\.deny\[0\]: pattern '\(a\+\)\+' refused: nested quantifier"),
        ("output:\n  redact: ['[unclosed']", r"output\.redact\[0\]: pattern .* does not compile"),
        ("items:\n  allow: [{name: memo}]", r"items\.allow\[0\]: an item rule is"),
        ("tables:\n  people:\n    columns: [salary]\n    where: 'salary > 1; DROP'", r"semicolon"),
        (
            "tables:\n  people:\n    columns: [salary]\n    where: 'age > 18'",
            r"tables\.people\.where: no such column\(s\) age",
        ),
        (
            "tables:\n  people:\n    columns: [salary]\n    where: 'Name = 1'",
            r"'Name' is not a normalized name",
        ),
        ("tables:\n  nobody:\n    columns: [salary]", r"tables\.nobody: no such table in the room data"),
        ("tables:\n  people:\n    columns: [email]", r"tables\.people\.columns: no such column\(s\) email"),
        ("colour: blue", r"policy\.colour: unknown field"),
    ],
)
def test_a_malformed_block_is_a_rules_error_naming_the_path(yaml_text: str, message: str) -> None:
    with pytest.raises(
        RulesError, match=r"rules line 5: the policy block is not a valid ScopePolicy: .*" + message
    ):
        scope_agent.compile_rules(block(yaml_text), "", SCHEMA)


def test_every_problem_is_listed_not_just_the_first() -> None:
    with pytest.raises(RulesError) as caught:
        scope_agent.compile_rules(block("max_rows: -1\naggregate:\n  min_group_size: 0"), "", SCHEMA)
    assert "max_rows" in str(caught.value)
    assert "aggregate.min_group_size" in str(caught.value)


def test_two_blocks_fail_compilation() -> None:
    with pytest.raises(RulesError, match="2 policy blocks"):
        scope_agent.compile_rules(block("max_rows: 1") + block("max_rows: 2"), "", SCHEMA)


# --- the local model agrees with the core ---------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        "[\\w.+-]+@[\\w-]+\\.[a-z]{2,}",
        "(a+)+",
        "(\\w+\\s?)*",
        "(a|aa)*",
        "(a)\\1",
        "\\d{3}-\\d{2}",
        "(?i)secret",
        "[",
        "(?:\\d[ -]?){13,16}",
        "\\+\\d[\\d ()-]{7,}\\d",
    ],
)
def test_pattern_checks_agree_with_the_core(pattern: str) -> None:
    core_ok = True
    try:
        check_pattern(pattern)
    except ValueError:
        core_ok = False
    assert (pattern_problem(pattern) is None) == core_ok


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
def test_valid_filters_pass_both_checks(where: str) -> None:
    assert predicate_problem(where) is None
    parse_policy({"tables": {"people": {"columns": ["department", "salary"], "where": where}}})


@pytest.mark.parametrize(
    "where",
    ["salary > 1 -- x", "salary > 1 /* x */", "(salary > 1", "salary > 1)", "Name = 'x'", "salary = 'open"],
)
def test_invalid_filters_fail_both_checks(where: str) -> None:
    assert predicate_problem(where) is not None
    with pytest.raises(InvalidPolicy):
        parse_policy({"tables": {"people": {"columns": ["department", "salary"], "where": where}}})


BOUND = normalize(
    {
        "tables": {"people": {"columns": ["department", "salary", "consent"], "where": "consent = 1"}},
        "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "AVG"]},
        "max_rows": 50,
        "items": {"allow": [{"meta": {"kind": "memo"}}], "redact": ["secret"]},
        "output": {"deny": ["(?i)bonus"], "redact": []},
    }
)


def _changed(**changes: Any) -> dict[str, Any]:
    policy = json.loads(json.dumps(BOUND))
    for path, value in changes.items():
        target = policy
        keys = path.split("__")
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return normalize(policy)


@pytest.mark.parametrize(
    ("candidate", "narrower"),
    [
        (_changed(), True),
        (_changed(tables={"people": {"columns": ["salary", "consent"], "where": "consent = 1"}}), True),
        (
            _changed(
                tables={
                    "people": {"columns": ["salary", "consent"], "where": "(consent = 1) AND (salary > 5)"}
                }
            ),
            True,
        ),
        (_changed(tables={"people": {"columns": ["salary", "consent"], "where": None}}), False),
        (
            _changed(
                tables={
                    "people": {"columns": ["salary", "consent"], "where": "(consent = 1) OR (salary > 5)"}
                }
            ),
            False,
        ),
        (_changed(tables={"people": {"columns": ["name"], "where": None}}), False),
        (_changed(tables={"other": {"columns": ["x"]}}), False),
        (_changed(aggregate__required=False), False),
        (_changed(aggregate__min_group_size=4), False),
        (_changed(aggregate__min_group_size=50), True),
        (_changed(aggregate__functions=["COUNT", "SUM"]), False),
        (_changed(aggregate__functions=["COUNT"]), True),
        (_changed(max_rows=51), False),
        (_changed(items={"allow": [{"meta": {"kind": "memo", "year": "2024"}}], "redact": ["secret"]}), True),
        (_changed(items={"allow": [{"id": "item_abc"}], "redact": ["secret"]}), False),
        (_changed(items={"allow": [{"meta": {"kind": "memo"}}], "redact": []}), False),
        (_changed(output={"deny": [], "redact": []}), False),
        (_changed(output={"deny": ["(?i)bonus", "x"], "redact": ["y"]}), True),
    ],
)
def test_local_narrowing_is_sound_against_the_core(candidate: dict[str, Any], narrower: bool) -> None:
    assert (not widenings(candidate, BOUND)) == narrower
    if narrower:
        assert is_narrower(parse_policy(candidate), parse_policy(BOUND))


def test_keeps_filter_refuses_a_remainder_that_escapes_its_parentheses() -> None:
    assert keeps_filter("(consent = 1) AND (salary > 5)", "consent = 1")
    assert not keeps_filter("(consent = 1) AND (1) OR (1)", "consent = 1")
    assert not keeps_filter("(consent = 1) AND (x))", "consent = 1")
    assert keeps_filter("anything", None)
    assert not keeps_filter(None, "consent = 1")


def test_a_filter_may_use_a_hidden_column_that_exists() -> None:
    rules = block('tables:\n  people:\n    columns: [department]\n    where: "salary > 60000"')
    policy, _ = scope_agent.compile_rules(rules, "", SCHEMA)
    assert policy["tables"]["people"] == {"columns": ["department"], "where": "salary > 60000"}
    parsed = parse_policy(policy)
    check_against_schema(parsed, SCHEMA)
    assert parsed.tables["people"].where_columns() == {"salary"}


def test_meet_is_narrower_than_the_bound_and_keeps_the_bounds_filter() -> None:
    wants = normalize(
        {
            "tables": {"people": {"columns": ["department", "name"], "where": "department = 'Sales'"}},
            "aggregate": {"required": False, "min_group_size": 3, "functions": ["COUNT", "SUM", "AVG"]},
            "max_rows": 500,
            "items": {"allow": [{"meta": {"kind": "memo"}}, {"id": "item_other"}], "redact": ["mine"]},
            "output": {"deny": ["x"], "redact": ["y"]},
        }
    )
    met = meet(wants, BOUND)
    # The bound filters on consent; the column need not be visible for the filter to hold.
    assert met["tables"]["people"] == {
        "columns": ["department"],
        "where": "(consent = 1) AND (department = 'Sales')",
    }
    assert met["aggregate"] == {"required": True, "min_group_size": 5, "functions": ["COUNT", "AVG"]}
    assert met["max_rows"] == 50
    assert met["items"] == {"allow": [{"meta": {"kind": "memo"}}], "redact": ["secret", "mine"]}
    assert met["output"] == {"deny": ["(?i)bonus", "x"], "redact": ["y"]}
    assert not widenings(met, BOUND)
    assert narrow(parse_policy(BOUND), parse_policy(met)) == parse_policy(met)


def test_meet_without_a_bound_is_the_policy() -> None:
    assert meet(PEOPLE_POLICY, None) == PEOPLE_POLICY


def test_a_union_over_the_pattern_limit_is_refused() -> None:
    many = normalize({"output": {"deny": [f"a{i}" for i in range(40)]}})
    others = normalize({"output": {"deny": [f"b{i}" for i in range(40)]}})
    with pytest.raises(PolicyError, match="more than 64 patterns"):
        meet(many, others)


# --- least privilege from the query agent's files -------------------------------------------------


def test_least_privilege_drops_what_an_inspectable_agent_never_calls() -> None:
    policy = normalize({**PEOPLE_POLICY, "items": {"allow": [{"meta": {"kind": "memo"}}], "redact": []}})
    only_items = {"files": {"main.py": "for item in ctx.items():\n    ctx.item(item.id)"}}
    narrowed, notes = scope_agent.least_privilege(policy, only_items)
    assert narrowed["tables"] == {} and narrowed["items"]["allow"] == policy["items"]["allow"]
    assert notes == ["the query agent's source never calls the SQL tool: no tables"]
    only_sql = {"files": {"main.py": "ctx.sql('SELECT COUNT(*) FROM people')"}}
    narrowed, _ = scope_agent.least_privilege(policy, only_sql)
    assert narrowed["tables"] == policy["tables"] and narrowed["items"]["allow"] == []


def test_a_sealed_query_agent_keeps_the_whole_policy() -> None:
    assert scope_agent.least_privilege(PEOPLE_POLICY, {"files": None}) == (PEOPLE_POLICY, [])


# --- the stage against the fake bridge -------------------------------------------------------------


def _scope_result(
    room: Room, prompt: str | None = "average salary by department"
) -> tuple[dict[str, Any], Any]:
    with running_bridge(room) as bridge:
        session = bridge.open_session("scope", prompt)
        process = bridge.run_agent(SCOPE_DIR, session)
        return {"returncode": process.returncode, "stderr": process.stderr, **session.result}, bridge


def test_main_posts_the_compiled_policy(people_tables: dict[str, Any], people_rules: str) -> None:
    result, bridge = _scope_result(Room(tables=people_tables, rules=people_rules))
    assert result["returncode"] == 0, result["stderr"]
    assert parse_policy(result["json"]) == parse_policy(PEOPLE_POLICY)
    assert bridge.simulations == []  # no deny patterns: nothing to simulate against


def test_main_fails_closed_on_a_malformed_block(people_tables: dict[str, Any]) -> None:
    result, _ = _scope_result(Room(tables=people_tables, rules=block("aggregate:\n  min_group_size: many")))
    assert result["returncode"] == 1
    assert result["error"]["code"] == "agent_error"
    assert "RulesError: rules line 5" in result["error"]["message"]
    assert "aggregate.min_group_size: must be an integer" in result["error"]["message"]


def test_main_never_widens_the_rooms_data_policy(people_tables: dict[str, Any], people_rules: str) -> None:
    data_policy = {
        "tables": {"people": {"columns": ["salary"], "where": "salary > 50000"}},
        "aggregate": {"required": True, "min_group_size": 8, "functions": ["COUNT", "AVG", "MAX"]},
        "output": {"deny": ["(?i)ceo"]},
    }
    result, _ = _scope_result(Room(tables=people_tables, rules=people_rules, data_policy=data_policy))
    produced = parse_policy(result["json"])
    assert narrow(parse_policy(data_policy), produced) == produced
    assert result["json"]["tables"] == {"people": {"columns": ["salary"], "where": "salary > 50000"}}
    assert result["json"]["aggregate"] == {
        "required": True,
        "min_group_size": 8,
        "functions": ["COUNT", "AVG"],
    }


def test_without_a_block_a_data_policy_still_bounds_the_default(people_tables: dict[str, Any]) -> None:
    data_policy = {"tables": {"people": {"columns": ["department"]}}, "aggregate": {"min_group_size": 20}}
    result, _ = _scope_result(Room(tables=people_tables, rules="No block here.", data_policy=data_policy))
    assert result["json"]["tables"] == {"people": {"columns": ["department"], "where": None}}
    assert result["json"]["aggregate"]["min_group_size"] == 20
    assert is_narrower(parse_policy(result["json"]), parse_policy(data_policy))


# --- LLM mode ------------------------------------------------------------------------------------


def _llm_room(people_tables: dict[str, Any], people_rules: str, *replies: Any) -> Room:
    return Room(
        tables=people_tables,
        rules=people_rules,
        llm_providers=["openai"],
        llm_calls=3,
        llm=scripted(*replies),
    )


def test_llm_mode_keeps_a_narrower_proposal(people_tables: dict[str, Any], people_rules: str) -> None:
    proposal = {**PEOPLE_POLICY, "tables": {"people": {"columns": ["department"]}}, "max_rows": 10}
    room = _llm_room(
        people_tables, people_rules, completion("Here:\n```json\n" + json.dumps(proposal) + "\n```")
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
    people_tables: dict[str, Any], people_rules: str, reply: Any
) -> None:
    result, bridge = _scope_result(_llm_room(people_tables, people_rules, reply))
    assert result["returncode"] == 0, result["stderr"]
    assert parse_policy(result["json"]) == parse_policy(PEOPLE_POLICY)
    logs = [line["message"] for session in bridge.sessions.values() for line in session.logs]
    assert any(message.startswith("llm proposal") for message in logs)


# --- simulation ----------------------------------------------------------------------------------


def test_simulation_drops_the_column_behind_a_denied_answer(people_tables: dict[str, Any]) -> None:
    rules = block(
        "tables:\n  people:\n    columns: [department, salary]\naggregate:\n  min_group_size: 5\n"
        "  functions: [COUNT, AVG]\noutput:\n  deny: ['Engineering']"
    )
    result, bridge = _scope_result(Room(tables=people_tables, rules=rules))
    assert result["returncode"] == 0, result["stderr"]
    assert result["json"]["tables"] == {"people": {"columns": ["salary"], "where": None}}
    assert [prompt for _, prompt, _ in bridge.simulations] == ["average salary by department"] * 2
    first_answer = bridge.simulations[0][2].result["text"]
    assert "Engineering" in first_answer
    assert "Engineering" not in bridge.simulations[1][2].result["text"]


def test_simulation_keeps_a_policy_whose_answer_passes(people_tables: dict[str, Any]) -> None:
    rules = block(
        "tables:\n  people:\n    columns: [department, salary]\naggregate:\n  min_group_size: 5\n"
        "  functions: [COUNT, AVG]\noutput:\n  deny: ['(?i)ceo']"
    )
    result, bridge = _scope_result(Room(tables=people_tables, rules=rules))
    assert result["json"]["tables"]["people"]["columns"] == ["department", "salary"]
    assert len(bridge.simulations) == 1


def test_no_simulation_when_the_prompt_is_hidden(people_tables: dict[str, Any]) -> None:
    rules = block("tables:\n  people:\n    columns: [department]\noutput:\n  deny: ['Engineering']")
    result, bridge = _scope_result(Room(tables=people_tables, rules=rules, prompt_visible=False))
    assert result["json"]["tables"]["people"]["columns"] == ["department"]
    assert bridge.simulations == []


def test_the_stage_runs_in_process_with_the_sdk_runner(
    people_tables: dict[str, Any], people_rules: str
) -> None:
    with running_bridge(Room(tables=people_tables, rules=people_rules)) as bridge:
        posted = run_stage(bridge, SCOPE_DIR, bridge.open_session("scope", "how many people?"))
    assert posted["json"]["aggregate"]["min_group_size"] == 5


def test_the_examples_in_docs_rules_md_compile_and_the_core_accepts_them() -> None:
    text = (AGENTS_DIR.parent / "docs" / "rules.md").read_text()
    examples = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    assert len(examples) >= 5
    for example in examples:
        parse_policy(normalize(yaml.safe_load(example)))
