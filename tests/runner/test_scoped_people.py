"""The people scenario: a CSV of people (name, department, salary, region) seen by a query agent
whose scope is aggregate-only over department and salary, groups of at least 5."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from hivemind.models import Stage
from hivemind.policy import AggregatePolicy, parse_policy
from hivemind_runner.scoped import (
    ItemInfo,
    RoomItem,
    ScopedDatabase,
    SqlDenied,
    SqlRejected,
    build_scoped_database,
)
from hivemind_runner.scoped.sql import GateRules, prepare

# department -> number of people; legal (3) and board (1) are below the minimum group size.
SIZES = {"eng": 8, "ops": 6, "sales": 5, "legal": 3, "board": 1}
K = 5


def people_rows() -> list[tuple[str, str, int, str]]:
    rows = []
    for department, size in SIZES.items():
        for index in range(size):
            salary = 50_000 + 1_000 * index + 10_000 * len(department)
            rows.append((f"Secretname{department.title()}{index}", department, salary, "eu"))
    # Rows only in the US: a department that exists nowhere else, and a very high salary.
    rows += [(f"Secretname{index}Us", "usonlydept", 999_999, "us") for index in range(6)]
    return rows


def csv_bytes(rows: list[tuple[str, str, Any, str]]) -> bytes:
    lines = ["Name,Department,Salary,Region"] + [",".join(map(str, row)) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def people_item() -> RoomItem:
    data = csv_bytes(people_rows())
    info = ItemInfo(id="item_people", name="people.csv", content_type="text/csv", size=len(data))
    return RoomItem.from_bytes(info, data)


def policy(**overrides: Any) -> Any:
    base: dict[str, Any] = {
        "tables": {"people": {"columns": ["department", "salary"]}},
        "aggregate": {"required": True, "min_group_size": K, "functions": ["COUNT", "AVG", "SUM"]},
        "max_rows": 100,
    }
    base.update(overrides)
    return parse_policy(base)


@pytest.fixture
def db() -> Iterator[ScopedDatabase]:
    database = build_scoped_database([people_item()], policy())
    yield database
    database.close()


def query(database: ScopedDatabase, sql: str) -> list[list[Any]]:
    return database.query(sql, role=Stage.QUERY).rows


def refused(database: ScopedDatabase, sql: str) -> SqlRejected:
    with pytest.raises(SqlRejected) as info:
        database.query(sql, role=Stage.QUERY)
    return info.value


def expected_average(department: str) -> float:
    salaries = [row[2] for row in people_rows() if row[1] == department]
    return sum(salaries) / len(salaries)


def test_average_by_department_returns_only_groups_of_at_least_k(db: ScopedDatabase) -> None:
    result = db.query(
        "SELECT department, AVG(salary) FROM people GROUP BY department ORDER BY department", role=Stage.QUERY
    )
    assert result.columns == ["department", "AVG(salary)"]
    assert result.rows == [
        [d, pytest.approx(expected_average(d))] for d in ("eng", "ops", "sales", "usonlydept")
    ]
    assert not result.truncated


def test_a_user_having_cannot_widen_the_minimum_group(db: ScopedDatabase) -> None:
    rows = query(
        db, "SELECT department, COUNT(*) FROM people GROUP BY department HAVING COUNT(*) >= 1 OR 1 = 1"
    )
    assert sorted(rows) == [["eng", 8], ["ops", 6], ["sales", 5], ["usonlydept", 6]]
    assert query(db, "SELECT department, COUNT(*) AS n FROM people GROUP BY department HAVING n < 5") == []


def test_names_are_not_in_the_database_and_rows_are_refused(db: ScopedDatabase) -> None:
    error = refused(db, "SELECT name, salary FROM people")
    assert (error.code, error.reason) == ("sql_denied", "aggregate_required")
    assert refused(db, "SELECT salary FROM people").reason == "aggregate_required"
    assert refused(db, "SELECT * FROM people").reason == "aggregate_required"
    # Even as a group key, a hidden column does not exist.
    assert refused(db, "SELECT name, COUNT(*) FROM people GROUP BY name").reason == "group_by_expression"


def test_max_is_refused_when_the_policy_does_not_allow_it(db: ScopedDatabase) -> None:
    error = refused(db, "SELECT department, MAX(salary) FROM people GROUP BY department")
    assert error.reason == "function_not_allowed"
    assert "MAX" in error.message
    assert refused(db, "SELECT MIN(salary) FROM people").reason == "function_not_allowed"
    allowed = build_scoped_database(
        [people_item()], policy(aggregate={"required": True, "min_group_size": K, "functions": ["MAX"]})
    )
    with allowed:
        assert allowed.query("SELECT MAX(salary) FROM people", role=Stage.QUERY).rows == [[999_999]]
        # COUNT is not in this policy: the gate refuses the agent's COUNT, yet adds its own HAVING COUNT.
        assert refused(allowed, "SELECT COUNT(*) FROM people").reason == "function_not_allowed"


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT COUNT(*) FROM (SELECT * FROM people)", "subquery_not_allowed"),
        (
            "SELECT department, COUNT(*) FROM people WHERE salary IN (SELECT salary FROM people) "
            "GROUP BY department",
            "subquery_not_allowed",
        ),
        (
            "SELECT department, (SELECT MAX(salary) FROM people) FROM people GROUP BY department",
            "subquery_not_allowed",
        ),
        ("SELECT COUNT(*) FROM people UNION SELECT salary FROM people", "set_operation_not_allowed"),
        ("SELECT AVG(salary) FROM people EXCEPT SELECT 0", "set_operation_not_allowed"),
        ("WITH p AS (SELECT * FROM people) SELECT COUNT(*) FROM p", "cte_not_allowed"),
        ("SELECT department, AVG(salary) OVER (PARTITION BY department) FROM people", "window_not_allowed"),
        (
            "SELECT department, AVG(salary) FILTER (WHERE salary > 90000) FROM people GROUP BY department",
            "filter_not_allowed",
        ),
        (
            "SELECT a.department, COUNT(*) FROM people a JOIN people b ON a.department = b.department "
            "GROUP BY a.department",
            "join_not_allowed",
        ),
        ("SELECT COUNT(*) FROM people, people AS other", "join_not_allowed"),
        ("SELECT department, SUM(DISTINCT salary) FROM people GROUP BY department", "distinct_not_allowed"),
        ("SELECT department, AVG(salary * 2) FROM people GROUP BY department", "aggregate_argument"),
        (
            "SELECT department, AVG(CASE WHEN salary > 0 THEN salary END) FROM people GROUP BY department",
            "aggregate_argument",
        ),
        ("SELECT department, SUM(*) FROM people GROUP BY department", "aggregate_argument"),
        (
            "SELECT department, AVG(salary) AS salary FROM people GROUP BY department HAVING salary > 1",
            "aggregate_required",
        ),
        (
            "SELECT department, AVG(salary) AS salary FROM people GROUP BY department ORDER BY salary + 0",
            "aggregate_required",
        ),
        ("SELECT department, COUNT(*) FROM people GROUP BY department ORDER BY salary", "aggregate_required"),
        (
            "SELECT department, COUNT(*) FROM people GROUP BY department HAVING salary > 1",
            "aggregate_required",
        ),
        ("SELECT department, salary + 0 FROM people GROUP BY department", "aggregate_required"),
        ("SELECT COUNT(*) FROM people GROUP BY salary / 1000", "group_by_expression"),
        ("SELECT COUNT(*) FROM people GROUP BY rowid", "group_by_expression"),
        ("SELECT department, COUNT(*) FROM people GROUP BY department LIMIT 1 + 1", "limit_not_literal"),
        ("SELECT department, GROUP_CONCAT(salary) FROM people GROUP BY department", "function_not_allowed"),
        ("SELECT department, TOTAL(salary) FROM people GROUP BY department", "function_not_allowed"),
        ("SELECT 1", "aggregate_required"),
    ],
)
def test_tricks_are_refused_in_aggregate_mode(db: ScopedDatabase, sql: str, reason: str) -> None:
    error = refused(db, sql)
    assert error.reason == reason, error.message
    assert isinstance(error, SqlDenied)
    assert error.to_dict()["details"] == {"reason": reason}


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT department, COUNT(DISTINCT salary) FROM people GROUP BY department",
        "SELECT department AS d, ROUND(AVG(salary), 2) AS mean FROM people GROUP BY d ORDER BY mean DESC",
        "SELECT department, COUNT(*) FROM people GROUP BY 1 ORDER BY 2 DESC LIMIT 2 OFFSET 1",
        "SELECT p.department, SUM(p.salary) / COUNT(*) FROM people AS p GROUP BY p.department",
        "SELECT UPPER(department), COUNT(*) * 100.0 / 5 FROM people WHERE salary > 60000 GROUP BY department",
        "SELECT DISTINCT department, 'label', COUNT(*) FROM people GROUP BY department",
        "SELECT department, SUM(salary) AS salary FROM people GROUP BY department ORDER BY salary DESC",
        "SELECT department AS salary, COUNT(*) AS n FROM people GROUP BY department HAVING n > 1",
        'SELECT `department`, count(*) FROM [people] GROUP BY "department"',
    ],
)
def test_honest_aggregate_queries_pass(db: ScopedDatabase, sql: str) -> None:
    rows = query(db, sql)
    assert rows
    assert all("legal" not in str(row) and "board" not in str(row) for row in rows)


def test_an_aggregate_without_group_by_needs_k_rows_in_the_whole_filtered_table(db: ScopedDatabase) -> None:
    assert query(db, "SELECT COUNT(*), AVG(salary) FROM people WHERE department = 'sales'")[0][0] == 5
    assert query(db, "SELECT COUNT(*), AVG(salary) FROM people WHERE department = 'legal'") == []
    assert query(db, "SELECT AVG(salary) FROM people WHERE salary < 0") == []


def test_a_group_with_few_non_null_values_does_not_reveal_them() -> None:
    rows: list[tuple[str, str, Any, str]] = [
        (f"n{index}", "ops", 70_000 if index == 0 else "", "eu") for index in range(6)
    ]
    data = csv_bytes(rows)
    item = RoomItem.from_bytes(
        ItemInfo(id="item_people", name="people.csv", content_type="text/csv", size=1), data
    )
    with build_scoped_database([item], policy()) as database:
        # Six rows, one salary: AVG would be that one person's salary.
        assert query(database, "SELECT department, AVG(salary) FROM people GROUP BY department") == []
        assert query(database, "SELECT department, COUNT(*) FROM people GROUP BY department") == [["ops", 6]]


def test_system_and_extension_access_is_refused(db: ScopedDatabase) -> None:
    assert refused(db, "ATTACH DATABASE '/tmp/x.db' AS x").reason == "not_a_select"
    assert refused(db, "PRAGMA table_info(people)").reason == "not_a_select"
    assert refused(db, "SELECT COUNT(*) FROM sqlite_master").reason == "system_table"
    assert refused(db, "SELECT COUNT(*) FROM sqlite_schema").reason == "system_table"
    assert refused(db, "SELECT COUNT(*) FROM sqlite_temp_master").reason == "system_table"
    assert refused(db, "SELECT load_extension('/tmp/evil.so')").reason == "function_not_allowed"
    error = refused(
        db, "SELECT department, COUNT(*) FROM people WHERE load_extension('x') GROUP BY department"
    )
    assert error.reason == "function_not_allowed"


def inspect(database: ScopedDatabase) -> sqlite3.Connection:
    image = database.snapshot()
    copy = sqlite3.connect(":memory:")
    copy.deserialize(image)
    return copy


def test_hidden_columns_and_other_tables_are_absent_from_the_database(db: ScopedDatabase) -> None:
    copy = inspect(db)
    assert copy.execute("SELECT type, name FROM sqlite_master").fetchall() == [("table", "people")]
    assert [(row[1], row[2]) for row in copy.execute("PRAGMA table_info(people)")] == [
        ("department", "TEXT"),
        ("salary", "INTEGER"),
    ]
    assert copy.execute("SELECT COUNT(*) FROM people").fetchone() == (len(people_rows()),)
    image = db.snapshot()
    assert b"Secretname" not in image  # not even in a free page
    assert b"Region" not in image and b"'eu'" not in image


def test_a_row_filter_on_a_hidden_column_keeps_only_matching_rows() -> None:
    scoped = policy(
        tables={"people": {"columns": ["department", "salary"], "where": "region = 'eu'"}},
        aggregate={"required": True, "min_group_size": 1, "functions": ["COUNT", "MAX"]},
    )
    with build_scoped_database([people_item()], scoped) as database:
        eu_rows = [row for row in people_rows() if row[3] == "eu"]
        assert query(database, "SELECT COUNT(*) FROM people") == [[len(eu_rows)]]
        assert query(database, "SELECT MAX(salary) FROM people") == [[max(row[2] for row in eu_rows)]]
        assert query(database, "SELECT COUNT(*) FROM people WHERE department = 'usonlydept'") == []
        schema = database.schema(role=Stage.QUERY)
        assert [column.name for column in schema.tables[0].columns] == ["department", "salary"]
        assert "region" not in schema.model_dump_json() and "eu" not in schema.model_dump_json()
        copy = inspect(database)
        assert [row[1] for row in copy.execute("PRAGMA table_info(people)")] == ["department", "salary"]
        assert copy.execute("SELECT COUNT(*) FROM people").fetchone() == (len(eu_rows),)
        image = database.snapshot()
        assert b"usonlydept" not in image and b"999999" not in image and b"Secretname" not in image


def test_a_row_filter_on_visible_columns_applies_before_any_query() -> None:
    scoped = policy(
        tables={
            "people": {
                "columns": ["department", "salary"],
                "where": "salary < 100000 AND department <> 'eng'",
            }
        },
        aggregate={"required": False},
    )
    with build_scoped_database([people_item()], scoped) as database:
        rows = query(database, "SELECT department, salary FROM people")
        assert rows and all(salary < 100_000 and department != "eng" for department, salary in rows)
        assert query(database, "SELECT COUNT(*) FROM people WHERE salary >= 100000") == [[0]]


def test_schema_shows_the_projection_and_rules_only(db: ScopedDatabase) -> None:
    schema = db.schema(role=Stage.QUERY)
    assert schema.model_dump(mode="json") == {
        "tables": [
            {
                "name": "people",
                "columns": [{"name": "department", "type": "TEXT"}, {"name": "salary", "type": "INTEGER"}],
                "row_count": None,
            }
        ],
        "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "AVG", "SUM"]},
        "max_rows": 100,
    }


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        # Each would fail only if some row (perhaps in a suppressed group) holds a given value.
        (
            "SELECT COUNT(*) FROM people WHERE abs(salary - 58000 - 9223372036854775807 - 1) > 0",
            "function_not_allowed",
        ),
        ("SELECT COUNT(*) FROM people WHERE json_extract(department, '$') IS NULL", "function_not_allowed"),
        (
            "SELECT COUNT(*) FROM people WHERE length(replace(department, 'l', department)) > 1",
            "function_not_allowed",
        ),
        ("SELECT COUNT(*) FROM people WHERE department || department <> ''", "where_expression"),
        ("SELECT COUNT(*) FROM people WHERE 'x' LIKE department", "where_expression"),
        ("SELECT COUNT(*) FROM people WHERE like(department, 'x')", "where_expression"),
        ("SELECT COUNT(*) FROM people WHERE 'x' GLOB department", "where_expression"),
    ],
)
def test_where_cannot_fail_on_chosen_values(db: ScopedDatabase, sql: str, reason: str) -> None:
    assert refused(db, sql).reason == reason


def test_the_agents_having_never_runs_on_a_suppressed_group() -> None:
    # Defence in depth: even an expression that could fail is evaluated only for groups that
    # already passed the minimum, because the gate puts the minimum first and SQLite stops at the
    # first false AND operand.
    rules = GateRules(
        tables={"people": ("department", "salary")},
        functions=frozenset(),
        aggregate=AggregatePolicy(required=True, min_group_size=K, functions=("COUNT",)),
        max_rows=100,
    )
    failing_on_small_groups = "json_extract(CASE WHEN COUNT(*) < 5 THEN 'oops' ELSE '1' END, '$') = 1"
    statement = prepare(
        f"SELECT department, COUNT(*) FROM people GROUP BY department HAVING {failing_on_small_groups}",
        rules,
        max_sql_chars=10_000,
    )
    assert "HAVING COUNT(*) >= 5 AND (" in statement
    plain = sqlite3.connect(":memory:")
    plain.execute("CREATE TABLE people (department TEXT, salary INTEGER)")
    plain.executemany("INSERT INTO people VALUES (?, ?)", [(row[1], row[2]) for row in people_rows()])
    assert sorted(plain.execute(statement).fetchall()) == [
        ("eng", 8),
        ("ops", 6),
        ("sales", 5),
        ("usonlydept", 6),
    ]
    with pytest.raises(sqlite3.OperationalError, match="malformed JSON"):
        plain.execute(statement.replace("HAVING COUNT(*) >= 5 AND", "HAVING")).fetchall()


def test_where_may_use_error_free_functions(db: ScopedDatabase) -> None:
    rows = query(
        db,
        "SELECT department, COUNT(*) FROM people WHERE lower(department) LIKE 'e%' ESCAPE '!' "
        "AND substr(department, 1, 1) = 'e' AND salary / 0 IS NULL AND round(salary, -3) > 0 "
        "GROUP BY department",
    )
    assert rows == [["eng", 8]]
