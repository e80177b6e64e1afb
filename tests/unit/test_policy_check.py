"""Judging a candidate ScopePolicy (hivemind.policy): every schema problem at once, the intersection
with a bound, and the verdict the bridge's ``POST /v1/policy/check`` returns."""

from __future__ import annotations

from typing import Any

import pytest

from hivemind.errors import InvalidPolicy
from hivemind.policy import (
    MAX_PATTERNS,
    ScopePolicy,
    check_against_schema,
    check_policy,
    intersect,
    is_narrower,
    parse_policy,
    widenings,
)

SCHEMA = {"people": ["name", "department", "salary", "consent"], "visits": ["city", "cost"]}
BOUND = parse_policy(
    {
        "tables": {"people": {"columns": ["department", "salary", "consent"], "where": "consent = 1"}},
        "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "AVG"]},
        "max_rows": 50,
        "items": {"allow": [{"meta": {"kind": "memo"}}], "redact": ["secret"]},
        "output": {"deny": ["(?i)bonus"], "redact": []},
    }
)
WANTS = parse_policy(
    {
        "tables": {
            "people": {"columns": ["department", "name"], "where": "department = 'Sales'"},
            "visits": {"columns": ["city"]},
        },
        "aggregate": {"required": False, "min_group_size": 3, "functions": ["COUNT", "SUM", "AVG"]},
        "max_rows": 500,
        "items": {"allow": [{"meta": {"kind": "memo"}}, {"id": "item_other"}], "redact": ["mine"]},
        "output": {"deny": ["x"], "redact": ["y"]},
    }
)


def dumped(policy: ScopePolicy | None) -> dict[str, Any] | None:
    return None if policy is None else policy.model_dump(mode="json")


# --- check_against_schema ------------------------------------------------------------------------


def test_check_against_schema_names_every_problem() -> None:
    policy = parse_policy(
        {
            "tables": {
                "nobody": {"columns": ["a"]},
                "people": {"columns": ["email", "department"], "where": "age > 18 AND zip = '1'"},
            }
        }
    )
    with pytest.raises(InvalidPolicy) as caught:
        check_against_schema(policy, SCHEMA)
    assert caught.value.details["errors"] == [
        {"path": "tables.nobody", "message": "no such table in the room data"},
        {"path": "tables.people.columns", "message": "no such column(s) email"},
        {"path": "tables.people.where", "message": "no such column(s) age, zip"},
    ]
    assert caught.value.message == (
        "tables.nobody: no such table in the room data; tables.people.columns: no such column(s) email; "
        "tables.people.where: no such column(s) age, zip"
    )


# --- intersect -----------------------------------------------------------------------------------


def test_intersect_takes_the_stricter_of_every_rule() -> None:
    met = intersect(WANTS, BOUND)
    # The bound filters on consent; the column need not be visible for the filter to hold.
    assert dumped(met) == {
        "tables": {
            "people": {"columns": ["department"], "where": '("consent" = 1) AND ("department" = \'Sales\')'}
        },
        "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "AVG"]},
        "max_rows": 50,
        "items": {"allow": [{"meta": {"kind": "memo"}}], "redact": ["mine", "secret"]},
        "output": {"deny": ["x", "(?i)bonus"], "redact": ["y"]},
    }
    assert widenings(met, BOUND) == [] and widenings(met, WANTS) == []


def test_intersect_keeps_a_filter_that_already_keeps_the_bounds_and_adopts_the_bounds_otherwise() -> None:
    keeps = parse_policy(
        {"tables": {"people": {"columns": ["salary"], "where": "salary > 5 AND consent = 1"}}}
    )
    assert intersect(keeps, BOUND).tables["people"].where == "salary > 5 AND consent = 1"
    unfiltered = parse_policy({"tables": {"people": {"columns": ["salary"]}}, "aggregate": {"functions": []}})
    met = intersect(unfiltered, BOUND)
    assert met.tables["people"].where == "consent = 1"
    assert met.aggregate.functions == ()


def test_a_filter_with_an_or_stays_inside_its_parentheses() -> None:
    either = parse_policy({"tables": {"people": {"columns": ["salary"], "where": "salary > 1 OR 1 = 1"}}})
    met = intersect(either, BOUND)
    assert met.tables["people"].where == '("consent" = 1) AND ("salary" > 1 OR 1 = 1)'
    assert widenings(met, BOUND) == []
    # Text that would close the parenthesis around itself is not a filter in the first place.
    with pytest.raises(InvalidPolicy, match="not one SQL predicate"):
        parse_policy({"tables": {"people": {"columns": ["salary"], "where": "salary > 1) OR (1 = 1"}}})


def test_tables_or_columns_the_bound_lacks_are_dropped() -> None:
    met = intersect(
        parse_policy({"tables": {"people": {"columns": ["name"]}, "visits": {"columns": ["city"]}}}), BOUND
    )
    assert met.tables == {}


def test_a_policy_already_narrower_than_the_bound_is_returned_unchanged() -> None:
    narrower = intersect(WANTS, BOUND)
    assert intersect(narrower, BOUND) is narrower
    # Item redaction is irrelevant without visible items: not added when nothing needs narrowing.
    no_items = parse_policy({"max_rows": 50, "output": {"deny": ["(?i)bonus"]}})
    assert intersect(no_items, BOUND) is no_items


def test_an_intersection_over_a_limit_is_refused() -> None:
    many = parse_policy({"output": {"deny": [f"a{i}" for i in range(40)]}})
    others = parse_policy({"output": {"deny": [f"b{i}" for i in range(40)]}})
    assert 80 > MAX_PATTERNS
    with pytest.raises(InvalidPolicy, match=r"cannot be intersected with its bound: .*output\.deny: "):
        intersect(many, others)


# --- check_policy ----------------------------------------------------------------------------------


def test_a_valid_candidate_without_bounds() -> None:
    verdict = check_policy({"tables": {"people": {"columns": ["department"]}}}, SCHEMA)
    assert verdict.valid and verdict.errors == () and verdict.widenings == ()
    assert verdict.narrower_than_room
    assert verdict.policy == parse_policy({"tables": {"people": {"columns": ["department"]}}})
    assert verdict.within_room == verdict.policy


def test_an_invalid_candidate_lists_every_problem_and_carries_no_policy() -> None:
    unparsable = check_policy({"max_rows": -1, "colour": "blue"}, SCHEMA, room_policy=BOUND)
    assert not unparsable.valid and not unparsable.narrower_than_room
    assert (unparsable.policy, unparsable.within_room, unparsable.widenings) == (None, None, ())
    assert [problem.path for problem in unparsable.errors] == ["max_rows", "colour"]
    missing = check_policy({"tables": {"people": {"columns": ["email"]}, "nope": {"columns": ["a"]}}}, SCHEMA)
    assert [(p.path, p.message) for p in missing.errors] == [
        ("tables.people.columns", "no such column(s) email"),
        ("tables.nope", "no such table in the room data"),
    ]
    not_json = check_policy("[1, 2]", SCHEMA)
    assert [(p.path, p.message) for p in not_json.errors] == [("$", "policy must be a JSON object")]


def test_widenings_are_reported_against_the_bound_and_always_against_the_room() -> None:
    bound = {"tables": {"people": {"columns": ["department", "name"]}}, "aggregate": {"min_group_size": 3}}
    verdict = check_policy(WANTS, SCHEMA, bound=bound, room_policy=BOUND)
    assert verdict.valid and not verdict.narrower_than_room
    against_bound = [w.message for w in verdict.widenings if w.against == "bound"]
    against_room = [w.message for w in verdict.widenings if w.against == "data_policy"]
    assert against_bound == widenings(WANTS, parse_policy(bound))
    assert against_room == widenings(WANTS, BOUND)
    assert verdict.within_room == intersect(WANTS, BOUND)
    # Without a room bound only the caller's bound counts, and the room accepts anything valid.
    alone = check_policy(WANTS, SCHEMA, bound=bound)
    assert alone.narrower_than_room and {w.against for w in alone.widenings} == {"bound"}
    assert alone.within_room == WANTS


def test_what_the_room_accepts_is_what_narrow_accepts() -> None:
    inside = check_policy(intersect(WANTS, BOUND), SCHEMA, room_policy=BOUND)
    assert inside.narrower_than_room and inside.widenings == () and inside.within_room == inside.policy
    assert inside.policy is not None and is_narrower(inside.policy, BOUND)


def test_a_bound_that_does_not_parse_is_an_error_not_a_verdict() -> None:
    with pytest.raises(InvalidPolicy, match=r"the bound is not a valid policy: .*max_rows"):
        check_policy({}, SCHEMA, bound={"max_rows": -1})


def test_the_verdict_round_trips_as_json() -> None:
    verdict = check_policy(WANTS, SCHEMA, room_policy=BOUND)
    wire = verdict.model_dump(mode="json")
    assert set(wire) == {"valid", "errors", "policy", "widenings", "narrower_than_room", "within_room"}
    assert wire["widenings"][0] == {"against": "data_policy", "message": widenings(WANTS, BOUND)[0]}
    assert type(verdict).model_validate(wire) == verdict
