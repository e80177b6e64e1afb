"""ScopePolicy: validation with path-naming errors, the restricted predicate grammar, hashing,
narrowing and what the query stage is shown."""

from __future__ import annotations

import copy
import json
import sqlite3
import subprocess
import sys
from typing import Any

import pytest

from hivemind.errors import InvalidPolicy
from hivemind.policy import (
    REDACTED,
    QueryView,
    ScopePolicy,
    check_against_schema,
    is_narrower,
    most_restrictive_policy,
    narrow,
    parse_policy,
    policy_hash,
    public_view,
    visible_schema,
    widenings,
)

FULL: dict[str, Any] = {
    "tables": {
        "patients": {
            "columns": ["age", "city", "diagnosis", "consent"],
            "where": "consent = 1 AND age >= 18",
        },
        "visits": {"columns": ["city", "cost"], "where": None},
    },
    "aggregate": {"required": True, "min_group_size": 10, "functions": ["COUNT", "AVG"]},
    "max_rows": 200,
    "items": {
        "allow": [{"id": "item_memo1"}, {"meta": {"kind": "memo"}}],
        "redact": [r"\b\d{3}-\d{2}-\d{4}\b"],
    },
    "output": {"deny": [r"(?i)patient name"], "redact": [r"[\w.+-]+@[\w-]+\.[a-z]{2,}"]},
}


def full(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(FULL)
    data.update(changes)
    return data


def with_table(name: str, columns: list[str], where: str | None) -> dict[str, Any]:
    return {"tables": {name: {"columns": columns, "where": where}}}


def rejected(data: Any) -> InvalidPolicy:
    with pytest.raises(InvalidPolicy) as info:
        parse_policy(data)
    return info.value


# --- parsing ------------------------------------------------------------------------------------


def test_full_policy_parses_from_dict_and_json_and_round_trips() -> None:
    from_dict = parse_policy(FULL)
    from_json = parse_policy(json.dumps(FULL))
    assert from_dict == from_json
    assert parse_policy(from_dict.model_dump(mode="json")) == from_dict
    assert from_dict.tables["patients"].columns == ("age", "city", "diagnosis", "consent")


def test_omitted_sections_take_the_most_restrictive_values() -> None:
    policy = parse_policy({})
    assert policy.tables == {}
    assert policy.items.allow == ()
    assert policy.aggregate.required is True
    assert policy.aggregate.min_group_size == 10
    assert [f.value for f in policy.aggregate.functions] == ["COUNT"]
    assert policy.max_rows == 100


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("age IN (SELECT age FROM visits)", "subqueries are not allowed"),
        ("EXISTS (SELECT 1)", "subqueries are not allowed"),
        ("age = 1 OR (SELECT 1) = 1", "subqueries are not allowed"),
        ("lower(city) = 'x'", "function calls are not allowed"),
        ("CAST(age AS TEXT) = '3'", "function calls are not allowed"),
        ("visits.city = 'x'", "visits.city is qualified"),
        ("Name = 'bob'", "column 'Name' is not a normalized name"),
        ("\"e-mail\" = 'x'", "column 'e-mail' is not a normalized name"),
        ('"' + "x" * 65 + '" = 1', "at most 64 characters"),
        ("age = 1; DROP TABLE patients", "semicolon"),
        ("age = 1 -- trailing", "comment"),
        ("age = /* hidden */ 1", "comment"),
        ("age = 1 city", "not one SQL predicate"),
        ("age = 'unterminated", "does not tokenize"),
        ("age", "is not a condition"),
        ("age + 1 > 2", "ADD"),
        ("age IS TRUE", "only IS NULL and IS NOT NULL"),
        ("age IN ()", "non-empty list of literals"),
        ("age IN (city)", "only literals are allowed here"),
        ("city LIKE 'a!%' ESCAPE '!'", "ESCAPE"),
        ("age = ?", "PLACEHOLDER"),
        ("age = x'00'", "HEXSTRING"),
        ("age = - - - - - 1", "prefix operators"),
        ("(" * 17 + "age = 1" + ")" * 17, "parentheses deeper than 16"),
        (" AND ".join(["age = 1"] * 80), "syntax nodes"),
        ("   ", "empty row filter"),
    ],
)
def test_row_filter_outside_the_grammar_is_refused_naming_its_path(where: str, message: str) -> None:
    error = rejected(with_table("patients", ["age", "city"], where))
    assert "tables.patients.where: " in error.message
    assert message in error.message
    assert error.details["errors"][0]["path"] == "tables.patients.where"


@pytest.mark.parametrize(
    "where",
    [
        "age >= 18",
        "age = 1 AND (city = 'x' OR city IS NULL)",
        "city IS NOT NULL",
        "NOT city LIKE 'a%'",
        "city NOT LIKE 'a%'",
        "age BETWEEN -5 AND 10.5",
        "age NOT IN (1, 2, NULL)",
        "city <> 'x' AND age != 3 AND age == 4",
        "TRUE",
        "age > city",
        '"age" = 1',
    ],
)
def test_grammar_accepts_the_documented_constructs(where: str) -> None:
    policy = parse_policy(with_table("patients", ["age", "city"], where))
    assert policy.tables["patients"].where == where


def test_row_filter_may_use_a_hidden_column_of_its_table() -> None:
    where = "region = 'eu' AND (age >= 18 OR \"name\" IS NULL)"
    table = parse_policy(with_table("patients", ["age"], where)).tables["patients"]
    assert table.columns == ("age",)
    assert table.where_columns() == {"region", "age", "name"}
    assert table.where_sql() == '"region" = \'eu\' AND ("age" >= 18 OR "name" IS NULL)'
    unfiltered = parse_policy(with_table("patients", ["age"], None)).tables["patients"]
    assert unfiltered.where_columns() == frozenset()


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("visits.region = 'eu'", "is qualified"),
        ("region IN (SELECT region FROM visits)", "subqueries are not allowed"),
        ("lower(region) = 'eu'", "function calls are not allowed"),
    ],
)
def test_row_filter_on_a_hidden_column_still_cannot_reach_other_tables(where: str, message: str) -> None:
    assert message in rejected(with_table("patients", ["age"], where)).message


def test_where_sql_is_regenerated_and_executes_in_sqlite() -> None:
    policy = parse_policy(with_table("t", ["order", "n"], "\"order\" = 'a' and n   between 1 and 2"))
    sql = policy.tables["t"].where_sql()
    assert sql == '"order" = \'a\' AND "n" BETWEEN 1 AND 2'
    db = sqlite3.connect(":memory:")
    db.execute('CREATE TABLE t ("order" TEXT, n INTEGER)')
    db.executemany("INSERT INTO t VALUES (?, ?)", [("a", 1), ("a", 5), ("b", 2)])
    assert db.execute(f"SELECT n FROM t WHERE {sql}").fetchall() == [(1,)]


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        (with_table("patients", ["*"], None), "tables.patients.columns[0]", "should match pattern"),
        (with_table("patients", [], None), "tables.patients.columns", "at least 1 item"),
        (with_table("patients", ["age", "age"], None), "tables.patients.columns", "duplicate column 'age'"),
        (with_table("Patients", ["age"], None), "tables.Patients (name)", "should match pattern"),
        (with_table("patients", ["Age"], None), "tables.patients.columns[0]", "should match pattern"),
        ({"max_rows": 5.0}, "max_rows", "valid integer"),
        ({"max_rows": "5"}, "max_rows", "valid integer"),
        ({"max_rows": True}, "max_rows", "valid integer"),
        ({"max_rows": -1}, "max_rows", "greater than or equal to 0"),
        ({"bogus": 1}, "bogus", "Extra inputs are not permitted"),
        ({"aggregate": {"required": "yes"}}, "aggregate.required", "valid boolean"),
        ({"aggregate": {"min_group_size": 0}}, "aggregate.min_group_size", "greater than or equal to 1"),
        ({"aggregate": {"functions": ["MEDIAN"]}}, "aggregate.functions[0]", "'COUNT'"),
        ({"aggregate": {"functions": ["COUNT", "COUNT"]}}, "aggregate.functions", "duplicate"),
        ({"output": {"deny": ["("]}}, "output.deny", "does not compile"),
        ({"output": {"deny": ["(a+)+b"]}}, "output.deny", "nested quantifier"),
        ({"output": {"redact": [r"(\w+\s?)*$"]}}, "output.redact", "nested quantifier"),
        ({"items": {"redact": ["(a|aa)*c"]}}, "items.redact", "alternation inside a repeated group"),
        ({"output": {"deny": [r"(a)\1"]}}, "output.deny", "backreference"),
        ({"output": {"deny": ["(a)?(?(1)b|c)"]}}, "output.deny", "conditional group"),
        ({"output": {"deny": ["(a?){30}a{30}"]}}, "output.deny", "nested quantifier"),
        ({"output": {"deny": ["x" * 257]}}, "output.deny[0]", "at most 256 characters"),
        ({"output": {"deny": ["a", "a"]}}, "output.deny", "duplicate pattern"),
        ({"items": {"allow": [{"id": "item_a", "meta": {"k": "v"}}]}}, "items.allow[0]", "an item rule is"),
        ({"items": {"allow": ["item_a"]}}, "items.allow[0]", "an item rule is"),
        ({"items": {"allow": [{"meta": {}}]}}, "items.allow[0].meta", "at least 1 item"),
        ({"items": {"allow": [{"id": "not an id"}]}}, "items.allow[0].id", "should match pattern"),
        ({"items": {"allow": [{"id": "item_a"}, {"id": "item_a"}]}}, "items.allow", "duplicate item rule"),
    ],
)
def test_invalid_fields_are_refused_naming_the_path(data: dict[str, Any], path: str, message: str) -> None:
    error = rejected(data)
    paths = [entry["path"] for entry in error.details["errors"]]
    assert path in paths, paths
    assert message in error.message
    assert error.code == "invalid_policy"
    assert error.status == 400


@pytest.mark.parametrize("source", ["{not json", "[]", "null", b"\xff"])
def test_non_object_input_is_invalid_policy(source: str | bytes) -> None:
    rejected(source)


def test_safe_everyday_patterns_pass_and_apply() -> None:
    policy = parse_policy(FULL)
    assert policy.items.redact_text("ssn 123-45-6789 ok") == f"ssn {REDACTED} ok"
    assert policy.output.redact_text("mail bob@example.org now") == f"mail {REDACTED} now"
    assert policy.output.denied_by("the Patient Name is") == "(?i)patient name"
    assert policy.output.denied_by("an average of 42") is None


def test_item_rules_match_by_id_or_all_metadata_pairs() -> None:
    items = parse_policy(
        {"items": {"allow": [{"id": "item_a"}, {"meta": {"kind": "memo", "year": "2024"}}]}}
    ).items
    assert items.allows("item_a", {})
    assert items.allows("item_z", {"kind": "memo", "year": "2024", "other": "x"})
    assert not items.allows("item_z", {"kind": "memo"})
    assert not items.allows("item_z", {"kind": "memo", "year": 2024})
    assert not parse_policy({}).items.allows("item_a", {})


# --- hashing ------------------------------------------------------------------------------------


def test_policy_hash_is_stable_under_key_reordering() -> None:
    reordered = json.loads(json.dumps(FULL), object_pairs_hook=lambda pairs: dict(reversed(pairs)))
    assert list(reordered) != list(FULL)
    assert policy_hash(parse_policy(reordered)) == policy_hash(parse_policy(FULL))


def test_policy_hash_changes_with_any_content() -> None:
    base = policy_hash(parse_policy(FULL))
    assert policy_hash(parse_policy(full(max_rows=201))) != base
    changed = full()
    changed["tables"]["patients"]["where"] = "consent = 1 AND age >= 19"
    assert policy_hash(parse_policy(changed)) != base
    assert len(base) == 64


# --- narrowing ----------------------------------------------------------------------------------


def changed(mutate: Any) -> ScopePolicy:
    data = full()
    mutate(data)
    return parse_policy(data)


BOUND = parse_policy(FULL)

NARROWER_CASES = {
    "identical": lambda d: None,
    "drop a table": lambda d: d["tables"].pop("visits"),
    "drop a column": lambda d: d["tables"]["patients"]["columns"].remove("diagnosis"),
    "add a conjunct": lambda d: d["tables"]["patients"].update(
        where="consent = 1 AND age >= 18 AND city = 'x'"
    ),
    "reorder and regroup conjuncts": lambda d: d["tables"]["patients"].update(
        where="(age >= 18) AND (consent = 1)"
    ),
    "add a where where the bound has none": lambda d: d["tables"]["visits"].update(where="cost > 0"),
    "raise min group": lambda d: d["aggregate"].update(min_group_size=20),
    "drop a function": lambda d: d["aggregate"].update(functions=["COUNT"]),
    "lower max_rows": lambda d: d.update(max_rows=10),
    "drop an item rule": lambda d: d["items"]["allow"].pop(0),
    "more specific meta rule": lambda d: d["items"]["allow"].__setitem__(
        1, {"meta": {"kind": "memo", "y": "1"}}
    ),
    "add a redact pattern": lambda d: d["items"]["redact"].append("secret"),
    "add an output deny": lambda d: d["output"]["deny"].append("secret"),
    "add an output redact": lambda d: d["output"]["redact"].append("secret"),
}

WIDER_CASES = {
    "add a table": (lambda d: d["tables"].update(staff={"columns": ["name"]}), "tables.staff"),
    "add a column": (lambda d: d["tables"]["visits"]["columns"].append("doctor"), "tables.visits.columns"),
    "remove the where": (lambda d: d["tables"]["patients"].update(where=None), "tables.patients.where"),
    "drop a conjunct": (
        lambda d: d["tables"]["patients"].update(where="consent = 1"),
        "tables.patients.where",
    ),
    "replace with OR": (
        lambda d: d["tables"]["patients"].update(where="consent = 1 OR age >= 18"),
        "tables.patients.where",
    ),
    "semantically narrower but different": (
        lambda d: d["tables"]["patients"].update(where="consent = 1 AND age >= 30"),
        "tables.patients.where",
    ),
    "lower min group": (lambda d: d["aggregate"].update(min_group_size=5), "aggregate.min_group_size"),
    "drop aggregate requirement": (lambda d: d["aggregate"].update(required=False), "aggregate.required"),
    "add a function": (
        lambda d: d["aggregate"].update(functions=["COUNT", "AVG", "SUM"]),
        "aggregate.functions",
    ),
    "raise max_rows": (lambda d: d.update(max_rows=201), "max_rows"),
    "add an item id": (lambda d: d["items"]["allow"].append({"id": "item_other"}), "items.allow[2]"),
    "broader meta rule": (
        lambda d: d["items"]["allow"].__setitem__(1, {"meta": {"year": "2024"}}),
        "items.allow[1]",
    ),
    "remove an items redact": (lambda d: d["items"].update(redact=[]), "items.redact"),
    "remove an output deny": (lambda d: d["output"].update(deny=[]), "output.deny"),
    "remove an output redact": (lambda d: d["output"].update(redact=[]), "output.redact"),
}


@pytest.mark.parametrize("case", sorted(NARROWER_CASES))
def test_narrower_proposals_are_narrower(case: str) -> None:
    candidate = changed(NARROWER_CASES[case])
    assert widenings(candidate, BOUND) == []
    assert is_narrower(candidate, BOUND)
    assert narrow(BOUND, candidate) is candidate


@pytest.mark.parametrize("case", sorted(WIDER_CASES))
def test_wider_proposals_are_refused_with_the_reason(case: str) -> None:
    mutate, path = WIDER_CASES[case]
    candidate = changed(mutate)
    assert not is_narrower(candidate, BOUND)
    with pytest.raises(InvalidPolicy) as info:
        narrow(BOUND, candidate)
    assert any(reason.startswith(path) for reason in info.value.details["widenings"]), info.value.details
    assert "not narrower than the room's data_policy" in info.value.message


def test_bound_without_aggregate_requirement_accepts_one_that_requires_it() -> None:
    loose = changed(lambda d: d["aggregate"].update(required=False))
    assert is_narrower(BOUND, loose)
    assert not is_narrower(loose, BOUND)


def test_most_restrictive_policy_narrows_a_room_policy_once_output_patterns_are_kept() -> None:
    restrictive = most_restrictive_policy()
    assert [reason.split(":")[0] for reason in widenings(restrictive, BOUND)] == [
        "output.deny",
        "output.redact",
    ]
    with_output = parse_policy({"output": FULL["output"]})
    # No item is visible, so dropping the bound's item redaction widens nothing.
    assert is_narrower(with_output, BOUND)
    assert not is_narrower(BOUND, with_output)


def test_dropping_item_redaction_is_wider_while_items_are_visible() -> None:
    candidate = changed(lambda d: d["items"].update(redact=[]))
    assert widenings(candidate, BOUND) == [
        f"items.redact: drops the bound's pattern(s) {FULL['items']['redact'][0]!r}"
    ]


def test_most_restrictive_policy_over_a_schema_is_aggregate_count_only() -> None:
    policy = most_restrictive_policy({"sales": ["region", "amount"]})
    assert visible_schema(policy) == {"sales": ["region", "amount"]}
    assert policy.aggregate.required and policy.aggregate.min_group_size == 10
    assert [f.value for f in policy.aggregate.functions] == ["COUNT"]
    assert policy.items.allow == ()
    with pytest.raises(InvalidPolicy):
        most_restrictive_policy({"Sales Data": ["x"]})


def test_check_against_schema_refuses_missing_tables_and_columns() -> None:
    schema = {"patients": ["age", "city", "diagnosis", "consent", "name"], "visits": ["city", "cost"]}
    check_against_schema(BOUND, schema)
    with pytest.raises(InvalidPolicy, match=r"tables\.visits: no such table"):
        check_against_schema(BOUND, {"patients": schema["patients"]})
    with pytest.raises(InvalidPolicy, match=r"tables\.patients\.columns: no such column\(s\) consent"):
        check_against_schema(BOUND, {**schema, "patients": ["age", "city", "diagnosis"]})


def test_check_against_schema_refuses_a_row_filter_on_a_column_the_data_lacks() -> None:
    policy = parse_policy(with_table("patients", ["age"], "region = 'eu' AND age >= 18"))
    check_against_schema(policy, {"patients": ["age", "region", "name"]})
    with pytest.raises(InvalidPolicy, match=r"tables\.patients\.where: no such column\(s\) region"):
        check_against_schema(policy, {"patients": ["age", "name"]})


# --- what the query stage sees ------------------------------------------------------------------


def test_public_view_carries_no_row_filters_or_redaction_lists() -> None:
    view = public_view(BOUND)
    assert isinstance(view, QueryView)
    dumped = view.model_dump_json()
    for secret in ("consent = 1", "age >= 18", "patient name", r"\d{3}", "item_memo1", "memo"):
        assert secret not in dumped
    assert set(QueryView.model_fields) == {
        "tables",
        "aggregate_required",
        "min_group_size",
        "functions",
        "max_rows",
    }
    assert view.tables == {"patients": ("age", "city", "diagnosis", "consent"), "visits": ("city", "cost")}
    assert (view.aggregate_required, view.min_group_size, view.max_rows) == (True, 10, 200)
    assert [f.value for f in view.functions] == ["COUNT", "AVG"]


def test_visible_schema_lists_tables_and_columns_only() -> None:
    assert visible_schema(BOUND) == {
        "patients": ["age", "city", "diagnosis", "consent"],
        "visits": ["city", "cost"],
    }
    assert visible_schema(parse_policy({})) == {}


def test_the_sql_parser_is_loaded_only_for_the_first_row_filter() -> None:
    # hivemind.policy is imported by every Lambda handler and by hmctl; sqlglot costs about 100 ms of
    # import, so it must load only when a policy with a row filter is checked.
    code = """
import sys
from hivemind.policy import parse_policy
parse_policy({"tables": {"t": {"columns": ["a"]}}})
assert "sqlglot" not in sys.modules, "sqlglot imported without a row filter"
policy = parse_policy({"tables": {"t": {"columns": ["a"], "where": "b >= 18 AND (c = 'x')"}}})
assert "sqlglot" in sys.modules
print(policy.tables["t"].where_sql())
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '"b" >= 18 AND ("c" = \'x\')'
