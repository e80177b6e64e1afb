"""Loading room items into tables: formats, names, types, limits, and what is never read."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from hivemind.errors import InvalidPolicy
from hivemind.models import Stage
from hivemind.policy import parse_policy
from hivemind_runner.scoped import (
    DataLimitExceeded,
    DataLoadError,
    ItemInfo,
    ItemKind,
    RoomItem,
    ScopedDatabase,
    ScopedLimits,
    build_scoped_database,
    column_type,
    full_read_database,
    item_kind,
    normalize_name,
)

_counter = iter(range(1_000_000))


def item(name: str, data: bytes, content_type: str = "text/csv", **metadata: str) -> RoomItem:
    info = ItemInfo(
        id=f"item_{next(_counter)}", name=name, content_type=content_type, size=len(data), metadata=metadata
    )
    return RoomItem.from_bytes(info, data)


def unopenable(name: str, content_type: str = "text/csv", **metadata: str) -> RoomItem:
    def refuse() -> Any:
        raise AssertionError(f"{name} must not be opened")

    info = ItemInfo(
        id=f"item_{next(_counter)}", name=name, content_type=content_type, size=10, metadata=metadata
    )
    return RoomItem(info, refuse)


def scoped(
    items: list[RoomItem], tables: dict[str, Any], limits: ScopedLimits | None = None
) -> ScopedDatabase:
    policy = parse_policy({"tables": tables, "aggregate": {"required": False}, "max_rows": 1000})
    return build_scoped_database(items, policy, limits)


def select(database: ScopedDatabase, sql: str) -> list[list[Any]]:
    return database.query(sql, role=database.role).rows


def types(database: ScopedDatabase, role: Stage = Stage.QUERY) -> dict[str, dict[str, str]]:
    return {
        table.name: {column.name: column.type for column in table.columns}
        for table in database.schema(role=role).tables
    }


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Salary", "salary"),
        ("Annual Salary ($)", "annual_salary"),
        ("  e-mail__address  ", "e_mail_address"),
        ("Größe", "gro_e"),
        ("café", "cafe"),
        ("2024 sales", "t_2024_sales"),
        ("_id", "id"),
        ("sqlite_stat1", "t_sqlite_stat1"),
        ("x" * 80, "x" * 64),
        ("order", "order"),
        ("***", None),
        ("", None),
    ],
)
def test_normalize_name(raw: str, normalized: str | None) -> None:
    assert normalize_name(raw) == normalized


def test_table_names_come_from_metadata_or_the_file_stem() -> None:
    items = [
        item("Sales Report 2024.csv", b"Region,Amount\neu,1\n"),
        item("x.csv", b"a\n1\n", table="Staff List"),
    ]
    with full_read_database(items) as database:
        assert types(database, Stage.SCOPE) == {
            "sales_report_2024": {"region": "TEXT", "amount": "INTEGER"},
            "staff_list": {"a": "INTEGER"},
        }


def test_column_collisions_are_errors_naming_positions_not_values() -> None:
    with pytest.raises(DataLoadError) as info:
        scoped([item("p.csv", b"Name,name,NAME!\nsecretvalue,1,2\n")], {"p": {"columns": ["name"]}})
    assert info.value.reason == "column_collision"
    assert "columns 1 and 2" in info.value.message and "secretvalue" not in info.value.message
    jsonl = b'{"Name": "a"}\n{"name": "b"}\n'
    with pytest.raises(DataLoadError) as info:
        scoped([item("p.jsonl", jsonl, "application/x-ndjson")], {"p": {"columns": ["name"]}})
    assert info.value.reason == "column_collision"
    with pytest.raises(DataLoadError) as info:
        scoped([item("p.csv", b"a,***\n1,2\n")], {"p": {"columns": ["a"]}})
    assert info.value.reason == "bad_name"


def test_two_items_with_the_same_table_name_are_an_error() -> None:
    items = [item("people.csv", b"a\n1\n"), item("other.csv", b"a\n2\n", table="People")]
    with pytest.raises(DataLoadError) as info:
        full_read_database(items)
    assert info.value.reason == "table_collision"


# --- types -------------------------------------------------------------------------------------


def test_types_are_inferred_from_the_loaded_values() -> None:
    csv = (
        b"id,score,zip,mixed,empty,huge,special,flag\n"
        b"1,1.5,02134,5,,99999999999999999999,NaN,true\n"
        b"2,2,10001,five,,1,inf,false\n"
        b"-3,-0.25e1,00000,,,2,1e999,\n"
    )
    with full_read_database([item("t.csv", csv)]) as database:
        assert types(database, Stage.SCOPE)["t"] == {
            "id": "INTEGER",
            "score": "REAL",
            "zip": "TEXT",
            "mixed": "TEXT",
            "empty": "TEXT",
            "huge": "TEXT",
            "special": "TEXT",
            "flag": "TEXT",
        }
        assert select(database, "SELECT id, score, zip, mixed, empty, huge, special FROM t") == [
            [1, 1.5, "02134", "5", None, "99999999999999999999", "NaN"],
            [2, 2.0, "10001", "five", None, "1", "inf"],
            [-3, -2.5, "00000", None, None, "2", "1e999"],
        ]
        assert select(database, "SELECT typeof(id), typeof(score), typeof(mixed) FROM t LIMIT 1") == [
            ["integer", "real", "text"]
        ]


def test_column_type_rule() -> None:
    assert [column_type(bits) for bits in (0, 1, 2, 3, 4, 5, 7, 8, 9, 15)] == [
        "TEXT", "INTEGER", "REAL", "REAL", "TEXT", "TEXT", "TEXT", "BLOB", "BLOB", "BLOB",
    ]  # fmt: skip


def test_types_follow_the_visible_rows_only() -> None:
    # The only text value of "code" is in a filtered-out row: the visible column is INTEGER.
    csv = b"code,region\n1,eu\n2,eu\nunknown,us\n"
    with scoped([item("t.csv", csv)], {"t": {"columns": ["code"], "where": "region = 'eu'"}}) as database:
        assert types(database) == {"t": {"code": "INTEGER"}}
        assert select(database, "SELECT code FROM t") == [[1], [2]]


# --- formats -----------------------------------------------------------------------------------


def test_csv_dialect_quotes_bom_crlf_and_tsv() -> None:
    csv = '\ufeffName,Note\r\n"Smith, J","said ""hi""\nthen left"\r\n\r\nLee,\r\n'.encode()
    tsv = b"a\tb\n1\tx y\n"
    with full_read_database(
        [item("q.csv", csv), item("t.tsv", tsv, "text/tab-separated-values")]
    ) as database:
        assert select(database, "SELECT name, note FROM q") == [
            ["Smith, J", 'said "hi"\nthen left'],
            ["Lee", None],
        ]
        assert select(database, "SELECT a, b FROM t") == [[1, "x y"]]


@pytest.mark.parametrize(
    ("data", "reason", "where"),
    [
        (b"", "bad_csv", "empty file"),
        (b"a,b\n1,2\n3\n", "bad_csv", "line 3 has 1 fields"),
        (b'a,b\n1,"unterminated\n', "bad_csv", "line"),
        (b'a,b\n1,"x"y\n', "bad_csv", "line 2"),
        (b"a,b\n1,\xff\n", "bad_encoding", "line 2 is not valid UTF-8"),
    ],
)
def test_malformed_csv_is_refused_with_a_line_number(data: bytes, reason: str, where: str) -> None:
    with pytest.raises(DataLoadError) as info:
        full_read_database([item("bad.csv", data)])
    assert info.value.reason == reason
    assert where in info.value.message


def test_json_lines_load_the_union_of_keys_with_typed_values() -> None:
    lines = [
        {"Name": "a", "Age": 30, "Active": True, "Tags": ["x", "y"]},
        {"Name": "b", "Score": 1.5, "Nested": {"k": "v"}},
        {},
        {"Age": 2**70},
    ]
    data = ("\n".join(json.dumps(line) for line in lines) + "\n\n").encode()
    with full_read_database([item("p.jsonl", data, "application/x-ndjson")]) as database:
        assert types(database, Stage.SCOPE) == {
            "p": {
                "name": "TEXT",
                "age": "TEXT",
                "active": "INTEGER",
                "tags": "TEXT",
                "score": "REAL",
                "nested": "TEXT",
            }
        }
        assert select(database, "SELECT name, age, active, tags, score, nested FROM p") == [
            ["a", "30", 1, '["x","y"]', None, None],
            ["b", None, None, None, 1.5, '{"k":"v"}'],
            [None, None, None, None, None, None],
            [None, str(2**70), None, None, None, None],
        ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"a": 1}\n[1, 2]\n', "line 2 is not a JSON object"),
        (b'{"a": 1}\n{"a": \n', "line 2 is not valid JSON"),
        (b'{"a": NaN}\n', "line 1 is not valid JSON"),
        (b'{"a": 1e999}\n', "out of range"),
    ],
)
def test_malformed_json_lines_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(DataLoadError) as info:
        full_read_database([item("bad.jsonl", data, "application/x-ndjson")])
    assert info.value.reason == "bad_json" and message in info.value.message


def test_json_lines_scoped_projection_and_hidden_filter() -> None:
    data = b"".join(
        json.dumps(
            {
                "user": f"secretuser{i}",
                "dept": "ops" if i % 2 else "eng",
                "spend": i,
                "country": "fr" if i < 4 else "germanyonly",
            }
        ).encode()
        + b"\n"
        for i in range(8)
    )
    tables = {"orders": {"columns": ["dept", "spend"], "where": "country = 'fr'"}}
    with scoped([item("orders.ndjson", data, "application/octet-stream")], tables) as database:
        assert select(database, "SELECT dept, spend FROM orders") == [
            ["eng", 0],
            ["ops", 1],
            ["eng", 2],
            ["ops", 3],
        ]
        image = database.snapshot()
        assert b"secretuser" not in image and b"germanyonly" not in image and b"country" not in image


def make_sqlite(path: Path) -> bytes:
    connection = sqlite3.connect(path)
    connection.executescript(
        """
        CREATE TABLE Orders (id INTEGER PRIMARY KEY, product TEXT, qty INTEGER, secret TEXT, photo BLOB);
        INSERT INTO Orders VALUES (1, 'tea', 2, 'hiddenvalue1', x'00ff'),
            (2, 'cake', 1, 'hiddenvalue2', NULL), (3, 'tea', 5, 'hiddenvalue3', NULL);
        CREATE TABLE "Customer List" (name TEXT, city TEXT);
        INSERT INTO "Customer List" VALUES ('secretcustomer', 'Paris');
        CREATE VIEW tea_orders AS SELECT * FROM Orders WHERE product = 'tea';
        CREATE INDEX orders_product ON Orders (product);
        """
    )
    connection.commit()
    connection.close()
    return path.read_bytes()


def test_sqlite_items_become_prefixed_tables(tmp_path: Path) -> None:
    data = make_sqlite(tmp_path / "shop.sqlite")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    limits = ScopedLimits(workspace=workspace)
    shop = item("shop.sqlite", data, "application/vnd.sqlite3")
    with full_read_database([shop], limits) as database:
        assert types(database, Stage.SCOPE) == {
            "shop_customer_list": {"name": "TEXT", "city": "TEXT"},
            "shop_orders": {
                "id": "INTEGER",
                "product": "TEXT",
                "qty": "INTEGER",
                "secret": "TEXT",
                "photo": "BLOB",
            },
        }
        assert select(database, "SELECT photo FROM shop_orders WHERE id = 1") == [["AP8="]]
    assert list(workspace.iterdir()) == []  # the copy is deleted once read
    renamed = item("x.db", data, "application/octet-stream", table="Store")
    tables = {"store_orders": {"columns": ["product", "qty"], "where": "secret <> 'hiddenvalue2'"}}
    with scoped([renamed], tables, limits) as database:
        assert types(database) == {"store_orders": {"product": "TEXT", "qty": "INTEGER"}}
        assert select(database, "SELECT product, qty FROM store_orders") == [["tea", 2], ["tea", 5]]
        image = database.snapshot()
        assert b"hiddenvalue" not in image and b"secretcustomer" not in image and b"cake" not in image
    assert list(workspace.iterdir()) == []


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    bogus = item("fake.sqlite", b"not a database at all", "application/vnd.sqlite3")
    with pytest.raises(DataLoadError) as info:
        full_read_database([bogus], ScopedLimits(workspace=tmp_path))
    assert info.value.reason == "bad_sqlite"
    assert list(tmp_path.iterdir()) == []


def test_parquet_is_not_supported_and_says_so() -> None:
    parquet = item("events.parquet", b"PAR1....", "application/vnd.apache.parquet")
    with full_read_database([parquet]) as database:
        assert database.schema(role=Stage.SCOPE).tables == ()
    with pytest.raises(DataLoadError) as info:
        scoped([parquet], {"events": {"columns": ["x"]}})
    assert info.value.reason == "unsupported_format" and "pyarrow" in info.value.message


def test_item_kinds() -> None:
    def kind(name: str, content_type: str) -> ItemKind:
        return item_kind(ItemInfo(id="item_x", name=name, content_type=content_type, size=0))

    assert kind("a.txt", "text/csv; charset=utf-8") is ItemKind.CSV
    assert kind("a.csv", "text/plain") is ItemKind.CSV
    assert kind("a.jsonl", "application/json") is ItemKind.JSONL
    assert kind("a.json", "application/json") is ItemKind.DOCUMENT
    assert kind("a.db", "application/octet-stream") is ItemKind.SQLITE
    assert kind("a.csv", "text/markdown") is ItemKind.DOCUMENT
    assert kind("a.md", "text/markdown") is ItemKind.DOCUMENT


# --- what is read, and the policy against the data -----------------------------------------------


def test_tables_outside_the_policy_are_never_opened(tmp_path: Path) -> None:
    items = [
        item("people.csv", b"name,dept\nsecretname,eng\n"),
        unopenable("salaries.csv"),
        unopenable("events.jsonl", "application/x-ndjson"),
        unopenable("shop.sqlite", "application/vnd.sqlite3"),
    ]
    with scoped(items, {"people": {"columns": ["dept"]}}) as database:
        assert select(database, "SELECT dept FROM people") == [["eng"]]


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"nosuch": {"columns": ["a"]}}, "tables.nosuch: no such table"),
        ({"people": {"columns": ["dept", "salary"]}}, "tables.people.columns: no such column(s) salary"),
        (
            {"people": {"columns": ["dept"], "where": "regoin = 'eu'"}},
            "tables.people.where: no such column(s) regoin",
        ),
    ],
)
def test_a_policy_naming_missing_data_fails_closed(tables: dict[str, Any], message: str) -> None:
    csv = item("people.csv", b"name,dept,region\nx,eng,eu\n")
    jsonl = item("people.jsonl", b'{"name": "x", "dept": "eng", "region": "eu"}\n', "application/x-ndjson")
    for source in (csv, jsonl):
        with pytest.raises(InvalidPolicy) as info:
            scoped([source], tables)
        assert message in info.value.message


# --- limits ------------------------------------------------------------------------------------


def big_csv(rows: int) -> bytes:
    return b"id,label\n" + b"".join(b"%d,label number %d\n" % (index, index) for index in range(rows))


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        (ScopedLimits(max_item_bytes=1000), "item_bytes"),
        (ScopedLimits(max_total_bytes=30_000), "total_bytes"),
        (ScopedLimits(max_item_rows=999), "item_rows"),
        (ScopedLimits(max_database_bytes=64 * 1024, batch_rows=100), "database_bytes"),
        (ScopedLimits(max_line_bytes=1024), "line_too_long"),
    ],
)
def test_load_limits_fail_the_load_clearly(limits: ScopedLimits, reason: str) -> None:
    items = [item("a.csv", big_csv(1000) + b"9," + b"x" * 2000 + b"\n"), item("b.csv", big_csv(1000))]
    with pytest.raises(DataLimitExceeded) as info:
        full_read_database(items, limits)
    assert info.value.reason == reason and info.value.code == "data_too_large"


def test_too_many_columns_is_refused() -> None:
    header = ",".join(f"c{index}" for index in range(11)).encode()
    with pytest.raises(DataLoadError) as info:
        full_read_database([item("wide.csv", header + b"\n")], ScopedLimits(max_columns=10))
    assert info.value.reason == "too_many_columns"


def test_batches_smaller_than_the_data_give_the_same_table() -> None:
    data = big_csv(1234)
    with (
        full_read_database([item("t.csv", data)], ScopedLimits(batch_rows=7)) as small,
        full_read_database([item("t.csv", data)]) as large,
    ):
        query = "SELECT COUNT(*), SUM(id), MIN(label), MAX(label) FROM t"
        assert (
            select(small, query)
            == select(large, query)
            == [[1234, sum(range(1234)), "label number 0", "label number 999"]]
        )
        assert select(small, "SELECT id FROM t LIMIT 3") == [[0], [1], [2]]  # source order kept
