"""The default query agent: intent grammar, fuzzy columns, allowed functions, answers, LLM mode."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Any

import pytest
from agents_bridge import (
    AGENTS_DIR,
    LlmFailure,
    Room,
    completion,
    run_stage,
    running_bridge,
    scripted,
    tool_call,
)
from conftest import people_rows
from query_answer import deterministic_answer, example_questions, format_value, help_reply, markdown_table
from query_intents import Intent, Unmatched, build_sql, name_key, parse_question, resolve_column

from hivemind_agent import Denied, Schema, SqlResult
from hivemind_runner.scoped import RoomItem

QUERY_DIR = AGENTS_DIR / "default-query"
PEOPLE_POLICY = {
    "tables": {"people": {"columns": ["department", "salary"]}},
    "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "SUM", "AVG"]},
    "max_rows": 50,
}


def schema(
    tables: dict[str, list[tuple[str, str]]] | None = None,
    *,
    functions: tuple[str, ...] = ("COUNT", "SUM", "AVG"),
    required: bool = True,
    k: int = 5,
) -> Schema:
    tables = tables or {"people": [("department", "TEXT"), ("salary", "INTEGER")]}
    return Schema.from_wire(
        {
            "tables": [
                {"name": name, "columns": [{"name": c, "type": t} for c, t in cols], "row_count": None}
                for name, cols in tables.items()
            ],
            "aggregate": {"required": required, "min_group_size": k, "functions": list(functions)},
            "max_rows": 100,
        }
    )


PEOPLE = schema()


# --- the grammar ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "sql"),
    [
        ("How many people are there?", 'SELECT COUNT(*) AS n FROM "people"'),
        ("how many records", 'SELECT COUNT(*) AS n FROM "people"'),
        ("how many rows are there in people", 'SELECT COUNT(*) AS n FROM "people"'),
        ("number of people", 'SELECT COUNT(*) AS n FROM "people"'),
        ("how many departments?", 'SELECT COUNT(DISTINCT "department") AS n FROM "people"'),
        ("how many different departments", 'SELECT COUNT(DISTINCT "department") AS n FROM "people"'),
        (
            "count by department",
            'SELECT "department", COUNT(*) AS n FROM "people" GROUP BY "department" ORDER BY "department"',
        ),
        (
            "Count of people by Department",
            'SELECT "department", COUNT(*) AS n FROM "people" GROUP BY "department" ORDER BY "department"',
        ),
        (
            "how many people per department?",
            'SELECT "department", COUNT(*) AS n FROM "people" GROUP BY "department" ORDER BY "department"',
        ),
        (
            "breakdown by department",
            'SELECT "department", COUNT(*) AS n FROM "people" GROUP BY "department" ORDER BY "department"',
        ),
        (
            "top 3 departments by count",
            'SELECT "department", COUNT(*) AS n FROM "people" GROUP BY "department" '
            'ORDER BY n DESC, "department" LIMIT 3',
        ),
        (
            "top three departments",
            'SELECT "department", COUNT(*) AS n FROM "people" GROUP BY "department" '
            'ORDER BY n DESC, "department" LIMIT 3',
        ),
        (
            "most common department",
            'SELECT "department", COUNT(*) AS n FROM "people" GROUP BY "department" '
            'ORDER BY n DESC, "department" LIMIT 1',
        ),
        (
            "which department has the most people?",
            'SELECT "department", COUNT(*) AS n FROM "people" '
            'GROUP BY "department" ORDER BY n DESC, "department" LIMIT 1',
        ),
        (
            "top 2 departments by average salary",
            'SELECT "department", AVG("salary") AS value, COUNT(*) AS n '
            'FROM "people" GROUP BY "department" ORDER BY value DESC, "department" LIMIT 2',
        ),
        (
            "which department has the lowest average salary",
            'SELECT "department", AVG("salary") AS value, '
            'COUNT(*) AS n FROM "people" GROUP BY "department" ORDER BY value ASC, "department" LIMIT 1',
        ),
        (
            "average salary by department",
            'SELECT "department", AVG("salary") AS value, COUNT(*) AS n '
            'FROM "people" GROUP BY "department" ORDER BY "department"',
        ),
        (
            "What is the mean of salaries per department?",
            'SELECT "department", AVG("salary") AS value, '
            'COUNT(*) AS n FROM "people" GROUP BY "department" ORDER BY "department"',
        ),
        (
            "total salary for each department",
            'SELECT "department", SUM("salary") AS value, COUNT(*) AS n '
            'FROM "people" GROUP BY "department" ORDER BY "department"',
        ),
        ("what's the average salary?", 'SELECT AVG("salary") AS value, COUNT(*) AS n FROM "people"'),
        ("sum of salary", 'SELECT SUM("salary") AS value, COUNT(*) AS n FROM "people"'),
        ("show department and salary", 'SELECT "department", "salary" FROM "people"'),
    ],
)
def test_every_form_builds_its_sql(question: str, sql: str) -> None:
    intent = parse_question(question, PEOPLE)
    assert isinstance(intent, Intent), intent
    assert build_sql(intent, with_count=True) == sql


def test_min_and_max_forms() -> None:
    wide = schema(functions=("COUNT", "MIN", "MAX"))
    lowest = parse_question("lowest salary by department", wide)
    highest = parse_question("maximum salary", wide)
    assert isinstance(lowest, Intent) and (lowest.function, lowest.group_by) == ("MIN", ("department",))
    assert isinstance(highest, Intent) and (highest.function, highest.group_by) == ("MAX", ())


def test_grouping_by_two_columns() -> None:
    wide = schema({"staff": [("department", "TEXT"), ("job_title", "TEXT"), ("salary", "REAL")]})
    intent = parse_question("average salary by department and job title", wide)
    assert isinstance(intent, Intent)
    assert intent.group_by == ("department", "job_title")


@pytest.mark.parametrize(
    ("phrase", "column"),
    [
        ("Departments", "department"),
        ("SALARY", "salary"),
        ("salaries", "salary"),
        ("job title", "job_title"),
        ("job-titles", "job_title"),
        ("jobtitle", "job_title"),
        ("deparment", "department"),
        ("hire dates", "hire_date"),
    ],
)
def test_fuzzy_column_matching(phrase: str, column: str) -> None:
    assert resolve_column(phrase, ("department", "salary", "job_title", "hire_date")) == column


def test_fuzzy_matching_refuses_ambiguity_and_strangers() -> None:
    assert resolve_column("cat", ("cat_a", "cat_b")) is None
    assert resolve_column("region", ("department", "salary")) is None
    assert name_key("Job Titles") == name_key("job_title")


def test_several_tables_pick_the_table_the_question_names_or_the_one_with_the_column() -> None:
    two = schema({"orders": [("product", "TEXT"), ("qty", "INTEGER")], "customers": [("city", "TEXT")]})
    orders = parse_question("how many orders", two)
    cities = parse_question("count by city", two)
    assert isinstance(orders, Intent) and orders.table == "orders" and orders.kind == "count"
    assert isinstance(cities, Intent) and cities.table == "customers"
    ambiguous = parse_question("how many rows are there", two)
    assert isinstance(ambiguous, Unmatched) and "orders, customers" in (ambiguous.reason or "")


@pytest.mark.parametrize(
    "question", ["what's the weather?", "salary by department", "", "tell me everything"]
)
def test_questions_outside_the_grammar_are_unmatched(question: str) -> None:
    assert isinstance(parse_question(question, PEOPLE), Unmatched)


def test_unknown_columns_are_named_in_the_reason() -> None:
    found = parse_question("list names and salaries", PEOPLE)
    assert isinstance(found, Unmatched)
    assert found.reason == "no column I may see matches 'names' (visible: people (department, salary))"


# --- replies -------------------------------------------------------------------------------------


def test_help_lists_questions_built_from_the_schema_that_all_parse() -> None:
    reply = help_reply(PEOPLE)
    assert "- how many people are there?" in reply
    assert "- average salary by department" in reply
    assert "What I can see: people (department, salary)" in reply
    for question in example_questions(PEOPLE):
        intent = parse_question(question, PEOPLE)
        assert isinstance(intent, Intent), question
        assert intent.function in ("COUNT", "SUM", "AVG")


def test_help_respects_the_allowed_functions() -> None:
    counts_only = schema(functions=("COUNT",))
    examples = example_questions(counts_only)
    assert examples == ["how many people are there?", "count by department", "top 3 department by count"]
    assert all(
        "average" not in line for line in help_reply(counts_only).splitlines() if line.startswith("- ")
    )


def test_a_forbidden_function_is_refused_before_any_sql() -> None:
    def no_sql(_query: str) -> SqlResult:
        raise AssertionError("no SQL should run")

    reply = deterministic_answer("average salary by department", schema(functions=("COUNT", "SUM")), no_sql)
    assert reply.startswith("This room does not allow average (AVG); it allows COUNT, SUM.")
    assert "- total salary by department" in reply


def test_listing_rows_is_refused_when_aggregation_is_required_and_allowed_otherwise() -> None:
    ran: list[str] = []

    def record(query: str) -> SqlResult:
        ran.append(query)
        return SqlResult(columns=("department",), rows=(("Sales",), ("Legal",)), truncated=False)

    refused = deterministic_answer("list departments", PEOPLE, record)
    assert "does not list individual rows" in refused and ran == []
    listed = deterministic_answer("list departments", schema(required=False), record)
    assert ran == ['SELECT "department" FROM "people"']
    assert "| Sales |" in listed and "- list department, salary" not in listed


def test_a_bridge_refusal_becomes_an_answer_about_what_is_allowed() -> None:
    def refuse(_query: str) -> SqlResult:
        raise Denied("COUNT(DISTINCT) is not allowed here", code="sql_denied", status=403)

    reply = deterministic_answer("how many departments", PEOPLE, refuse)
    assert reply.startswith("The room refused that query: COUNT(DISTINCT) is not allowed here")
    assert "I can answer questions like:" in reply


def test_answers_are_a_sentence_and_a_markdown_table() -> None:
    def result(_query: str) -> SqlResult:
        return SqlResult(
            ("department", "value", "n"), (("Sales", 78571.4286, 14), ("Eng|ops", 123000.0, 18)), True
        )

    reply = deterministic_answer("average salary by department", PEOPLE, result)
    assert (
        reply.splitlines()[0] == "Average salary by department (only groups of at least 5 rows are reported):"
    )
    assert "| department | average salary | count |\n|---|---|---|" in reply
    assert "| Sales | 78,571.43 | 14 |" in reply
    assert "| Eng\\|ops | 123,000 | 18 |" in reply
    assert reply.endswith("(The result was cut at 2 rows.)")


def test_an_empty_aggregate_says_small_groups_are_withheld() -> None:
    reply = deterministic_answer("how many people", PEOPLE, lambda _q: SqlResult(("n",), (), False))
    assert "no group has at least 5 rows" in reply


def test_number_and_table_formatting() -> None:
    assert [format_value(v) for v in (1234567, 2.5, 3.0, None, True)] == [
        "1,234,567",
        "2.50",
        "3",
        "n/a",
        "true",
    ]
    assert markdown_table(["a", "b"], [["1", "x|y"]]) == "| a | b |\n|---|---|\n| 1 | x\\|y |"


# --- end to end through the runner's bridge and SQL gate ------------------------------------------


def _ask(people_data: list[RoomItem], question: str, **room: Any) -> tuple[str, Any]:
    with running_bridge(Room(data=people_data, **room)) as bridge:
        session = bridge.open_session("query", question, policy=PEOPLE_POLICY)
        posted = run_stage(bridge, QUERY_DIR, session)
        return posted["text"], session


def test_average_salary_by_department_reports_only_groups_of_five_or_more(
    people_data: list[RoomItem],
) -> None:
    text, session = _ask(people_data, "average salary by department")
    by_department: dict[str, list[int]] = defaultdict(list)
    for _, department, salary in people_rows():
        by_department[department].append(salary)
    for department, salaries in by_department.items():
        if len(salaries) >= 5:
            assert f"| {department} | {format_value(statistics.fmean(salaries))} | {len(salaries)} |" in text
        else:
            assert department not in text
    assert {"Finance", "Legal"} == {d for d, s in by_department.items() if len(s) < 5}
    assert session.sql == [
        'SELECT "department", AVG("salary") AS value, COUNT(*) AS n FROM "people" GROUP BY "department" '
        'ORDER BY "department"'
    ]


def test_listing_names_and_salaries_reveals_no_name_and_no_salary(people_data: list[RoomItem]) -> None:
    for question in ("list names and salaries", "show department and salary", "list salary"):
        text, session = _ask(people_data, question)
        for name, _, salary in people_rows():
            assert name not in text
            assert str(salary) not in text and format_value(salary) not in text
        assert session.sql == []
        assert "I can answer questions like:" in text


def test_a_row_level_query_is_refused_by_the_bridge_not_answered(people_data: list[RoomItem]) -> None:
    with running_bridge(Room(data=people_data)) as bridge:
        session = bridge.open_session("query", "x", policy=PEOPLE_POLICY)
        row_level = {"query": "SELECT salary FROM people"}
        status, body = bridge.request(session, "POST", "/v1/tools/sql", row_level)
    assert (status, body["error"]) == (403, "sql_denied")


# --- LLM mode ------------------------------------------------------------------------------------


def _llm_ask(people_data: list[RoomItem], *replies: Any, calls: int = 6) -> tuple[str, Any]:
    return _ask(
        people_data,
        "average salary by department",
        llm_providers=["openai"],
        llm_calls=calls,
        llm=scripted(*replies),
    )


def test_llm_mode_runs_a_tool_loop_over_scoped_sql(people_data: list[RoomItem]) -> None:
    query = "SELECT department, AVG(salary) FROM people GROUP BY department"
    text, session = _llm_ask(
        people_data,
        completion(tool_calls=[tool_call("sql", {"query": query})]),
        completion("Engineering earns most on average."),
    )
    assert text == "Engineering earns most on average."
    assert session.sql == [query]
    second = session.llm_requests[1]["messages"]
    tool_message = second[-1]
    assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == "call_1"
    rows = json.loads(tool_message["content"])["rows"]
    assert {row[0] for row in rows} == {"Engineering", "Marketing", "Sales", "Support"}
    assert {tool["function"]["name"] for tool in session.llm_requests[0]["tools"]} == {
        "sql",
        "schema",
        "list_items",
        "read_item",
    }


def test_llm_mode_passes_refusals_back_to_the_model(people_data: list[RoomItem]) -> None:
    text, session = _llm_ask(
        people_data,
        completion(tool_calls=[tool_call("sql", {"query": "SELECT name FROM people"})]),
        completion("The room only allows aggregates."),
    )
    assert text == "The room only allows aggregates."
    refusal = json.loads(session.llm_requests[1]["messages"][-1]["content"])
    assert refusal["error"] in ("sql_denied", "sql_invalid")


@pytest.mark.parametrize(
    "replies",
    [
        (LlmFailure("provider down"),),
        (completion(None),),
        (completion(tool_calls=[tool_call("schema", {})]),) * 6,
    ],
    ids=["provider-error", "empty-answer", "never-answers"],
)
def test_llm_trouble_falls_back_to_the_grammar(people_data: list[RoomItem], replies: tuple[Any, ...]) -> None:
    text, session = _llm_ask(people_data, *replies)
    assert text.startswith("Average salary by department")
    assert any(line["message"].startswith("llm mode failed") for line in session.logs)


def test_llm_calls_stop_at_the_budget(people_data: list[RoomItem]) -> None:
    text, session = _llm_ask(people_data, *(completion(tool_calls=[tool_call("schema", {})]),) * 6, calls=2)
    assert len(session.llm_requests) == 2
    assert text.startswith("Average salary by department")
