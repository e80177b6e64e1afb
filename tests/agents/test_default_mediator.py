"""The default mediator: deny, redact, refuse row-level data in aggregate-only rooms, pass aggregates."""

from __future__ import annotations

import json
from typing import Any

import pytest
from agents_bridge import (
    AGENTS_DIR,
    LlmFailure,
    Room,
    completion,
    run_pipeline,
    running_bridge,
    scripted,
)
from mediator_gates import STRICTEST, Answer, OutputRules, RoomShape, apply_gates, room_shape
from mediator_llm import parse_verdict
from mediator_rows import delimited_tables, markdown_tables, row_level_reason

from hivemind_runner.scoped import RoomItem

MEDIATOR_DIR = AGENTS_DIR / "default-mediator"
AGGREGATE_ROOM = RoomShape(aggregate_only=True, min_group_size=5)
OPEN_ROOM = RoomShape(aggregate_only=False, min_group_size=1)
NO_RULES = OutputRules(deny=(), redact=())
EMAIL = r"[\w.+-]+@[\w-]+\.[a-z]{2,}"

AGGREGATE_ANSWER = """Average salary by department (only groups of at least 5 rows are reported):

| department | average salary | count |
|---|---|---|
| Engineering | 123,027.78 | 18 |
| Human Resources | 75,277.78 | 9 |
| Sales | 78,571.43 | 14 |"""


def rules(deny: tuple[str, ...] = (), redact: tuple[str, ...] = ()) -> OutputRules:
    return OutputRules.from_stage({"output_rules": {"deny": list(deny), "redact": list(redact)}})


def text(answer: str) -> Answer:
    return Answer(text=answer, data=None)


# --- deny and redact -----------------------------------------------------------------------------


def test_a_deny_pattern_refuses_without_echoing_the_pattern_or_the_match() -> None:
    result = apply_gates(text("The CEO earns 400,000."), rules(deny=("x", "(?i)ceo")), AGGREGATE_ROOM)
    assert result == {
        "refusal": "The answer was withheld: it matches deny rule 2 of 2 in the room's output rules."
    }
    assert "CEO" not in str(result) and "ceo" not in str(result)


def test_redact_patterns_replace_matches_in_text_and_in_json() -> None:
    redacting = rules(redact=(EMAIL,))
    assert apply_gates(text("Write to hr.team@acme.example today."), redacting, OPEN_ROOM) == (
        "Write to [REDACTED] today."
    )
    data = {"contact": "a@b.example", "items": [{"note": "c.d@e.example or x"}], "count": 3}
    released = apply_gates(Answer(text=None, data=data), redacting, OPEN_ROOM)
    assert released == {"contact": "[REDACTED]", "items": [{"note": "[REDACTED] or x"}], "count": 3}


def test_deny_is_checked_inside_json_strings_too() -> None:
    answer = Answer(text=None, data={"rows": [["Project Nightingale", 3]]})
    assert "refusal" in apply_gates(answer, rules(deny=("Project Nightingale",)), OPEN_ROOM)


def test_a_pattern_that_does_not_compile_fails_the_stage() -> None:
    with pytest.raises(Exception, match="unterminated character set"):
        rules(deny=("[",))


@pytest.mark.parametrize(
    "answer", [{"text": 3}, {"text": "a", "json": {}}, {}, None, {"json": [1, 2]}], ids=str
)
def test_a_malformed_answer_fails_the_stage(answer: Any) -> None:
    with pytest.raises(ValueError, match=r"stage\.answer must be"):
        Answer.from_stage({"answer": answer})


# --- row-level heuristics ------------------------------------------------------------------------


def test_aggregate_answers_pass_unchanged() -> None:
    for answer in (
        AGGREGATE_ANSWER,
        "There are 60 people.\n\n| count |\n|---|\n| 60 |",
        "The average salary is 88,120.5 (over 60 rows).\n\n"
        "| average salary | count |\n|---|---|\n| 88,120.5 | 60 |",
        "There are 6 different department values.\n\n| distinct department |\n|---|\n| 6 |",
        "I could not match your question.\n\nI can answer questions like:\n- how many people are there?\n"
        "- count by department",
    ):
        assert apply_gates(text(answer), NO_RULES, AGGREGATE_ROOM) == answer


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (
            "| name | salary |\n|---|---|\n| Ada Okafor | 91,000 |",
            "has a 'name' column, which describes individuals",
        ),
        (
            "| department | salary |\n|---|---|\n| Sales | 63,500 |\n| Sales | 71,000 |",
            "without any count, total",
        ),
        (
            "| salary | count |\n|---|---|\n| 63500 | 1 |\n| 71000 | 1 |\n| 90000 | 6 |",
            "groups of fewer than 5",
        ),
        ("| contact | count |\n|---|---|\n| a@x.example | 7 |\n| b@y.example | 9 |", "lists email addresses"),
        (
            "name,department,salary\nAda Okafor,Sales,63500\nBen Xu,Legal,99000\n",
            "rows at line 1 has a 'name' column",
        ),
        (
            "department;salary\nSales;63500\nLegal;99000\nSupport;50500",
            "rows at line 1 lists rows without any count",
        ),
        ("Top earners:\n- Ada Okafor: 91,000\n- Ben Xu: 99,500\n", "lists 2 individual entries"),
        ("Ask jane.doe@acme.example for the numbers.", "contains an email address"),
    ],
)
def test_row_level_answers_are_refused_in_an_aggregate_room(answer: str, reason: str) -> None:
    result = apply_gates(text(answer), NO_RULES, AGGREGATE_ROOM)
    assert isinstance(result, dict)
    assert result["refusal"].startswith("The answer was withheld: this room releases aggregates only, and ")
    assert reason in result["refusal"]


def test_json_lists_of_people_are_refused() -> None:
    answer = Answer(text=None, data={"rows": [{"employee": "Ada Okafor", "salary": 91000}]})
    result = apply_gates(answer, NO_RULES, AGGREGATE_ROOM)
    assert "the list at the answer.rows has a 'employee' column" in result["refusal"]  # type: ignore[index]


def test_rooms_that_allow_rows_pass_row_tables() -> None:
    answer = "| department | salary |\n|---|---|\n| Sales | 63,500 |\n| Sales | 71,000 |"
    assert apply_gates(text(answer), NO_RULES, OPEN_ROOM) == answer


def test_aggregate_bullet_lists_and_thousands_separators_are_not_rows() -> None:
    answer = (
        "Averages:\n- Human Resources: 81,000 average\n- Customer Success: 64,500 average\n"
        "- Sales: 1,234,567 total"
    )
    assert row_level_reason(answer, None, 5) is None
    assert delimited_tables("a 1,234 b\nc 5,678 d\ne 9,012 f") == []


def test_markdown_table_parsing_keeps_escaped_pipes() -> None:
    (table,) = markdown_tables("intro\n\n| a | b\\|c |\n|:---|---:|\n| 1 | 2 |\n\nafter")
    assert table.headers == ("a", "b|c") and table.rows == (("1", "2"),)


# --- the room's shape from its rules ---------------------------------------------------------------


def test_room_shape_follows_the_policy_block(people_rules: str) -> None:
    assert room_shape(people_rules, "") == RoomShape(aggregate_only=True, min_group_size=5)
    assert room_shape("no block", "") == STRICTEST
    assert room_shape("```policy\n: : :\n```", "") == STRICTEST
    assert room_shape("```policy\naggregate:\n  required: false\n```", "").aggregate_only is False
    assert room_shape("```policy\nitems:\n  allow: [{meta: {kind: memo}}]\n```", "").aggregate_only is False


# --- LLM review ----------------------------------------------------------------------------------


def test_verdicts_parse_strictly() -> None:
    assert parse_verdict('Sure: {"decision": "refuse", "reason": "names a person"}').allow is False
    assert parse_verdict('{"decision": "allow"}').reason == "the reviewer gave no reason"
    with pytest.raises(ValueError, match="decision"):
        parse_verdict('{"decision": "maybe"}')


def _mediate(
    answer: dict[str, Any], output_rules: dict[str, list[str]], room: Room
) -> tuple[dict[str, Any], Any]:
    with running_bridge(room) as bridge:
        session = bridge.open_session("mediator", "q", stage={"answer": answer, "output_rules": output_rules})
        process = bridge.run_agent(MEDIATOR_DIR, session)
        return {"returncode": process.returncode, **session.result}, session


def _llm_room(people_rules: str, *replies: Any) -> Room:
    return Room(rules=people_rules, llm_providers=["openai"], llm_calls=2, llm=scripted(*replies))


def test_an_llm_refusal_stands_with_its_reason_redacted(people_rules: str) -> None:
    reply = completion('{"decision": "refuse", "reason": "it names ada@x.example, an individual"}')
    result, session = _mediate(
        {"text": AGGREGATE_ANSWER}, {"deny": [], "redact": [EMAIL]}, _llm_room(people_rules, reply)
    )
    assert result["json"]["refusal"] == (
        "The answer was withheld: the room's reviewer refused it (it names [REDACTED], an individual)."
    )
    assert json.loads(session.llm_requests[0]["messages"][1]["content"])["answer"] == AGGREGATE_ANSWER


def test_an_llm_reason_matching_a_deny_rule_is_replaced(people_rules: str) -> None:
    reply = completion('{"decision": "refuse", "reason": "mentions Project Nightingale"}')
    result, _ = _mediate(
        {"text": "x"}, {"deny": ["Nightingale"], "redact": []}, _llm_room(people_rules, reply)
    )
    assert result["json"] == {"refusal": "The answer was withheld: the room's reviewer refused it."}


def test_an_llm_approval_still_goes_through_the_gates(people_rules: str) -> None:
    reply = completion('{"decision": "allow", "reason": "fine"}')
    rows = "| name | salary |\n|---|---|\n| Ada Okafor | 91,000 |"
    result, _ = _mediate({"text": rows}, {"deny": [], "redact": []}, _llm_room(people_rules, reply))
    assert "this room releases aggregates only" in result["json"]["refusal"]


@pytest.mark.parametrize(
    "reply", [LlmFailure("down"), completion("looks fine to me")], ids=["error", "prose"]
)
def test_without_a_usable_review_the_gates_decide(people_rules: str, reply: Any) -> None:
    result, session = _mediate(
        {"text": AGGREGATE_ANSWER}, {"deny": [], "redact": []}, _llm_room(people_rules, reply)
    )
    assert result["text"] == AGGREGATE_ANSWER
    assert session.logs[0]["message"].startswith("llm review unavailable")


def test_main_fails_closed_on_a_malformed_answer(people_rules: str) -> None:
    result, _ = _mediate({"text": None}, {"deny": [], "redact": []}, Room(rules=people_rules))
    assert result["returncode"] == 1
    assert "stage.answer must be" in result["error"]["message"]


# --- the people scenario through all three stages ---------------------------------------------------


def test_the_people_pipeline_releases_aggregates_and_refuses_nothing_else(
    people_data: list[RoomItem], people_rules: str
) -> None:
    with running_bridge(Room(data=people_data, rules=people_rules)) as bridge:
        run = run_pipeline(bridge, "average salary by department")
        assert run.final == run.raw  # an aggregate answer passes unchanged
        assert "| Engineering |" in run.final["text"] and "Legal" not in run.final["text"]
        listing = run_pipeline(bridge, "list names and salaries")
        assert "Ada" not in listing.final["text"] and "I can answer questions like" in listing.final["text"]
