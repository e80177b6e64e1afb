"""The SQL gate outside aggregate mode: one SELECT only, an injection corpus, the authorizer on its
own (as if the parser were bypassed), result caps, the query budget and role binding."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest

from hivemind.errors import Forbidden, Gone
from hivemind.models import Stage
from hivemind.policy import AggregatePolicy, parse_policy
from hivemind_runner.scoped import (
    ItemInfo,
    RoomItem,
    ScopedDatabase,
    ScopedLimits,
    SqlDenied,
    SqlInvalid,
    SqlRejected,
    build_scoped_database,
    full_read_database,
)
from hivemind_runner.scoped.sql import (
    Authorizer,
    GateRules,
    QueryBudget,
    execute,
    json_scalar,
    limit_connection,
    query_functions,
)

ROWS = [(f"person{index}", ["eng", "ops", "sales"][index % 3], 40_000 + 1_000 * index) for index in range(30)]


def people_item() -> RoomItem:
    data = ("name,department,salary\n" + "".join(f"{n},{d},{s}\n" for n, d, s in ROWS)).encode()
    return RoomItem.from_bytes(
        ItemInfo(id="item_people", name="people.csv", content_type="text/csv", size=1), data
    )


def open_policy(**overrides: Any) -> Any:
    """Row-level access to department and salary: the gate's rules without aggregation."""
    base: dict[str, Any] = {
        "tables": {"people": {"columns": ["department", "salary"]}},
        "aggregate": {"required": False, "functions": ["COUNT", "SUM", "AVG", "MIN", "MAX"]},
        "max_rows": 1000,
    }
    base.update(overrides)
    return parse_policy(base)


@pytest.fixture
def db() -> Iterator[ScopedDatabase]:
    with build_scoped_database([people_item()], open_policy()) as database:
        yield database


def rows(database: ScopedDatabase, sql: str) -> list[list[Any]]:
    return database.query(sql, role=Stage.QUERY).rows


def refused(database: ScopedDatabase, sql: str) -> SqlRejected:
    with pytest.raises(SqlRejected) as info:
        database.query(sql, role=Stage.QUERY)
    return info.value


def table_is_intact(database: ScopedDatabase) -> None:
    assert rows(database, "SELECT COUNT(*), SUM(salary) FROM people") == [[30, sum(s for _, _, s in ROWS)]]


# --- statements --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT 1; SELECT 2", "too_many_statements"),
        ("SELECT COUNT(*) FROM people; DROP TABLE people", "too_many_statements"),
        ("SELECT 1; ATTACH DATABASE '/tmp/x.db' AS x", "too_many_statements"),
        ("", "empty"),
        (";;", "empty"),
        ("-- only a comment", "empty"),
        ("INSERT INTO people VALUES ('x', 1)", "not_a_select"),
        ("UPDATE people SET salary = 0", "not_a_select"),
        ("DELETE FROM people", "not_a_select"),
        ("REPLACE INTO people VALUES ('x', 1)", "not_a_select"),
        ("CREATE TABLE t (a)", "not_a_select"),
        ("CREATE TEMP VIEW v AS SELECT 1", "not_a_select"),
        ("DROP TABLE people", "not_a_select"),
        ("ALTER TABLE people ADD COLUMN x", "not_a_select"),
        ("VACUUM", "not_a_select"),
        ("PRAGMA writable_schema = 1", "not_a_select"),
        ("PRAGMA query_only = 0", "not_a_select"),
        ("ATTACH DATABASE ':memory:' AS x", "not_a_select"),
        ("DETACH DATABASE main", "not_a_select"),
        ("BEGIN", "not_a_select"),
        ("SELECT ?", "parameters_not_supported"),
        ("SELECT :salary", "parameters_not_supported"),
        ("'; DROP TABLE people; --", "parse_error"),
        ("SELECT FROM WHERE", "parse_error"),
        ("SELECT 'unterminated", "parse_error"),
        ("SELECT " + "(" * 70 + "1" + ")" * 70, "too_deep"),
    ],
)
def test_only_one_select_statement_passes(db: ScopedDatabase, sql: str, reason: str) -> None:
    error = refused(db, sql)
    assert error.reason == reason, error.message
    assert isinstance(error, SqlInvalid) and (error.code, error.status) == ("sql_invalid", 400)
    table_is_intact(db)


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT * FROM sqlite_master", "system_table"),
        ('SELECT * FROM "sqlite_schema"', "system_table"),
        ("SELECT * FROM sqlite_temp_master", "system_table"),
        ("SELECT * FROM people UNION SELECT sql, 1 FROM sqlite_master", "system_table"),
        ("SELECT * FROM main.people", "unknown_table"),
        ("SELECT * FROM temp.sqlite_temp_master", "unknown_table"),
        ("SELECT * FROM staging.rows", "unknown_table"),
        ("SELECT * FROM employees", "unknown_table"),
        ("SELECT * FROM pragma_table_info('people')", "table_function_not_allowed"),
        ("SELECT * FROM json_each('[1, 2]')", "table_function_not_allowed"),
        ("SELECT load_extension('/tmp/evil.so')", "function_not_allowed"),
        ("SELECT randomblob(1000000000)", "function_not_allowed"),
        ("SELECT zeroblob(1000000000)", "function_not_allowed"),
        ("SELECT printf('%.*c', 1000000000, 'x')", "function_not_allowed"),
        ("SELECT group_concat(department) FROM people", "function_not_allowed"),
        ("SELECT * FROM people WHERE department = char(101, 110, 103)", "function_not_allowed"),
        ("SELECT name FROM people", "unknown_column"),
        ('SELECT "name" FROM people', "unknown_column"),
        ("SELECT rowid, salary FROM people", "unknown_column"),
        ("SELECT * FROM people INDEXED BY idx", "unsupported_clause"),
        (
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT n FROM r",
            "recursive_not_allowed",
        ),
    ],
)
def test_only_the_visible_tables_columns_and_functions_are_reachable(
    db: ScopedDatabase, sql: str, reason: str
) -> None:
    error = refused(db, sql)
    assert error.reason == reason, error.message
    assert isinstance(error, SqlDenied) and (error.code, error.status) == ("sql_denied", 403)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT COUNT(*) FROM people;", [[30]]),
        ("SELECT COUNT(*) FROM people -- ; DROP TABLE people", [[30]]),
        ("SELECT COUNT(*) FROM people /* ; DROP TABLE people */", [[30]]),
        ("SELECT COUNT(*) FROM people WHERE department = 'x'' OR 1=1 --'", [[0]]),
        ("SELECT COUNT(*) FROM people WHERE department = 'eng'' UNION SELECT 1 --'", [[0]]),
        ('SELECT COUNT(*) FROM people WHERE department = "eng"', None),  # not a column: refused below
        ("SELECT 'a; DROP TABLE people' AS text", [["a; DROP TABLE people"]]),
        ("SELECT COUNT(*) FROM [people] WHERE `department` = 'eng'", [[10]]),
        ("select count(*) from PEOPLE where DEPARTMENT = 'eng'", [[10]]),
    ],
)
def test_injection_corpus(db: ScopedDatabase, sql: str, expected: list[list[Any]] | None) -> None:
    if expected is None:
        # Double quotes are identifiers; SQLite's fallback to a string literal never applies here.
        assert refused(db, sql).reason == "unknown_column"
    else:
        assert rows(db, sql) == expected
    table_is_intact(db)


def test_row_level_queries_work_without_aggregation(db: ScopedDatabase) -> None:
    result = db.query(
        "WITH top AS (SELECT department, salary FROM people ORDER BY salary DESC LIMIT 2) "
        "SELECT department, salary, salary * 2 FROM top UNION ALL SELECT 'x', 0, 0",
        role=Stage.QUERY,
    )
    assert result.columns == ["department", "salary", "salary * 2"]
    assert result.rows == [["sales", 69_000, 138_000], ["ops", 68_000, 136_000], ["x", 0, 0]]


# --- the authorizer on its own -----------------------------------------------------------------


@pytest.fixture
def raw_connection() -> Iterator[tuple[sqlite3.Connection, Authorizer]]:
    connection = sqlite3.connect(":memory:", isolation_level=None)
    connection.execute("CREATE TABLE people (department TEXT, salary INTEGER)")
    connection.execute("CREATE TABLE secrets (name TEXT)")
    connection.execute("INSERT INTO people VALUES ('eng', 1), ('ops', 2)")
    rules = GateRules(
        tables={"people": ("department", "salary")},
        functions=query_functions(AggregatePolicy(required=False, functions=("AVG", "COUNT"))),
        aggregate=None,
        max_rows=10,
    )
    authorizer = Authorizer(rules)
    connection.set_authorizer(authorizer)
    limit_connection(connection, max_value_bytes=4096, max_sql_bytes=65536)
    yield connection, authorizer
    connection.close()


BUDGET = QueryBudget(timeout_ms=2_000, max_steps=10_000_000, max_result_bytes=1 << 20)


@pytest.mark.parametrize(
    ("statement", "reason"),
    [
        ("SELECT name FROM secrets", "unknown_table"),
        ("SELECT * FROM sqlite_master", "system_table"),
        ("SELECT rowid FROM people", "unknown_column"),
        ("PRAGMA table_info(people)", "not_a_select"),
        ("ATTACH DATABASE ':memory:' AS x", "not_a_select"),
        ("SELECT load_extension('x')", "function_not_allowed"),
        ("SELECT MAX(salary) FROM people", "function_not_allowed"),
        ("SELECT group_concat(department) FROM people", "function_not_allowed"),
        ("INSERT INTO people VALUES ('x', 3)", "not_authorized"),
        ("DELETE FROM people", "not_authorized"),
        ("CREATE TABLE t (a)", "not_authorized"),
        ("DROP TABLE people", "not_authorized"),
        ("BEGIN", "not_authorized"),
        ("SELECT * FROM pragma_table_info('people')", "not_authorized"),
        (
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r LIMIT 3) SELECT n FROM r",
            "recursive_not_allowed",
        ),
    ],
)
def test_the_authorizer_denies_what_the_parser_would_have_refused(
    raw_connection: tuple[sqlite3.Connection, Authorizer], statement: str, reason: str
) -> None:
    connection, authorizer = raw_connection
    with pytest.raises(SqlRejected) as info:
        execute(connection, authorizer, statement, max_rows=10, budget=BUDGET)
    assert info.value.reason == reason
    assert info.value.code == ("sql_invalid" if reason == "not_a_select" else "sql_denied")
    connection.set_authorizer(None)
    assert connection.execute("SELECT COUNT(*) FROM people").fetchone() == (2,)
    assert connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone() == (2,)


def test_the_authorizer_allows_reads_of_visible_columns(
    raw_connection: tuple[sqlite3.Connection, Authorizer],
) -> None:
    connection, authorizer = raw_connection
    result = execute(
        connection,
        authorizer,
        "SELECT department, AVG(salary), COUNT(*), lower(department) FROM people GROUP BY department",
        max_rows=10,
        budget=BUDGET,
    )
    assert result.rows == [["eng", 1.0, 1, "eng"], ["ops", 2.0, 1, "ops"]]


def test_values_cannot_grow_past_the_length_limit(
    raw_connection: tuple[sqlite3.Connection, Authorizer],
) -> None:
    connection, authorizer = raw_connection
    sixteen = "'" + "a" * 16 + "'"
    # 16 ** 3 = 4096 characters from a 4-character string: over the 4096-byte length limit with "bcd".
    statement = f"SELECT replace(replace(replace('abcd', 'a', {sixteen}), 'a', {sixteen}), 'a', {sixteen})"
    with pytest.raises(SqlDenied) as info:
        execute(connection, authorizer, statement, max_rows=10, budget=BUDGET)
    assert info.value.reason == "result_too_large"


# --- caps and budgets --------------------------------------------------------------------------


def test_max_rows_truncates_and_says_so() -> None:
    with build_scoped_database([people_item()], open_policy(max_rows=3)) as database:
        result = database.query("SELECT salary FROM people ORDER BY salary", role=Stage.QUERY)
        assert result.rows == [[40_000], [41_000], [42_000]] and result.truncated
        exact = database.query("SELECT salary FROM people ORDER BY salary LIMIT 3", role=Stage.QUERY)
        assert len(exact.rows) == 3 and not exact.truncated
    with build_scoped_database([people_item()], open_policy(max_rows=0)) as database:
        empty = database.query("SELECT salary FROM people", role=Stage.QUERY)
        assert empty.rows == [] and empty.truncated
    limits = ScopedLimits(max_result_rows=2)  # the runner's cap wins over a larger policy max_rows
    with build_scoped_database([people_item()], open_policy(), limits) as database:
        assert len(database.query("SELECT salary FROM people", role=Stage.QUERY).rows) == 2


def test_the_result_byte_cap_truncates_and_refuses_a_single_huge_row() -> None:
    limits = ScopedLimits(max_result_bytes=1024)
    with build_scoped_database([people_item()], open_policy(), limits) as database:
        result = database.query("SELECT a.department, a.salary FROM people a, people b", role=Stage.QUERY)
        assert result.truncated and 0 < len(result.rows) < 900
        assert len(result.model_dump_json()) <= 1024 + 64
        sixteen = "'eeeeeeeeeeeeeeee'"
        huge_row = (
            f"WITH s AS (SELECT replace(replace(department, 'e', {sixteen}), 'e', {sixteen}) AS v "
            "FROM people WHERE department = 'eng') SELECT v, v, v, v, v FROM s"
        )
        assert refused(database, huge_row).reason == "result_too_large"


def test_a_query_past_its_step_budget_is_aborted() -> None:
    limits = ScopedLimits(query_max_steps=50_000)
    with build_scoped_database([people_item()], open_policy(), limits) as database:
        error = refused(database, "SELECT COUNT(*) FROM people a, people b, people c, people d")
        assert (error.reason, error.code) == ("query_too_expensive", "sql_denied")
        table_is_intact(database)  # the connection still works afterwards


def test_a_query_past_its_time_budget_is_aborted() -> None:
    limits = ScopedLimits(query_timeout_ms=1)
    with build_scoped_database([people_item()], open_policy(), limits) as database:
        error = refused(database, "SELECT COUNT(*) FROM people a, people b, people c, people d, people e")
        assert error.reason == "query_too_expensive"


def test_too_long_queries_are_refused_before_parsing() -> None:
    limits = ScopedLimits(max_sql_chars=100)
    with build_scoped_database([people_item()], open_policy(), limits) as database:
        assert refused(database, "SELECT " + " + ".join(["1"] * 60)).reason == "too_long"


def test_json_scalars() -> None:
    assert json_scalar(b"\x00\xff") == "AP8="
    assert json_scalar(float("inf")) == "Infinity"
    assert json_scalar(float("-inf")) == "-Infinity"
    assert [json_scalar(value) for value in (1, 1.5, "x", None)] == [1, 1.5, "x", None]


# --- roles and lifetime ------------------------------------------------------------------------


def wrong_role_calls(database: ScopedDatabase, role: Any) -> list[Callable[[], object]]:
    return [
        partial(database.query, "SELECT 1", role=role),
        partial(database.schema, role=role),
        partial(database.list_items, role=role),
        partial(database.read_item, "item_people", role=role),
    ]


def test_a_database_serves_only_its_role() -> None:
    with (
        build_scoped_database([people_item()], open_policy()) as query_db,
        full_read_database([people_item()]) as scope_db,
    ):
        cases = [
            (query_db, Stage.SCOPE),
            (query_db, Stage.MEDIATOR),
            (query_db, "query"),
            (scope_db, Stage.QUERY),
        ]
        for database, wrong in cases:
            for call in wrong_role_calls(database, wrong):
                with pytest.raises(Forbidden) as info:
                    call()
                assert info.value.code == "not_allowed_for_role"
        assert query_db.query("SELECT COUNT(*) FROM people", role=Stage.QUERY).rows == [[30]]


def test_full_read_sees_everything_with_the_same_gate_minus_aggregation() -> None:
    with full_read_database([people_item()]) as database:
        schema = database.schema(role=Stage.SCOPE)
        assert schema.aggregate is None and schema.max_rows is None
        assert [(c.name, c.type) for c in schema.tables[0].columns] == [
            ("name", "TEXT"),
            ("department", "TEXT"),
            ("salary", "INTEGER"),
        ]
        assert schema.tables[0].row_count == 30
        result = database.query(
            "SELECT name, group_concat(department), MAX(salary) FROM people WHERE salary > 68000",
            role=Stage.SCOPE,
        )
        assert result.rows == [["person29", "sales", 69_000]]
        with pytest.raises(SqlRejected) as info:
            database.query("DELETE FROM people", role=Stage.SCOPE)
        assert info.value.reason == "not_a_select"
        with pytest.raises(SqlRejected) as info:
            database.query("SELECT * FROM sqlite_master", role=Stage.SCOPE)
        assert info.value.reason == "system_table"


def test_a_closed_database_answers_nothing() -> None:
    database = build_scoped_database([people_item()], open_policy())
    database.close()
    database.close()
    with pytest.raises(Gone):
        database.query("SELECT 1", role=Stage.QUERY)
    with pytest.raises(Gone):
        database.snapshot()


def test_refused_statements_are_not_written_to_logs(
    db: ScopedDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("DEBUG"):
        refused(db, "VACUUM INTO '/tmp/secret-value-42'")
        refused(db, "REPLACE INTO people VALUES ('secret-value-42', 1)")
    assert "secret-value-42" not in caplog.text
