"""Document items through the items tools, and scope simulation with real scoped SQL."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from hivemind.errors import Forbidden, Gone, InvalidPolicy, NotFound, PayloadTooLarge
from hivemind.models import Stage
from hivemind.policy import parse_policy
from hivemind_runner.scoped import (
    ItemInfo,
    RoomItem,
    ScopedDatabase,
    ScopedLimits,
    SqlRejected,
    build_scoped_database,
    full_read_database,
    resolve_policy,
    simulate,
)

MEMO = "Q3 memo: Alice Smith (SSN 123-45-6789) approved the budget. Call 555-0100."
PDF = b"%PDF-1.7 \x00\x01\x02 binary"


def info(item_id: str, name: str, content_type: str, size: int, **metadata: str) -> ItemInfo:
    return ItemInfo(id=item_id, name=name, content_type=content_type, size=size, metadata=metadata)


def room_items() -> list[RoomItem]:
    documents = {
        "item_memo": ("memo.md", "text/markdown", MEMO.encode(), {"kind": "memo"}),
        "item_notes": ("notes.txt", "text/plain; charset=utf-8", b"private notes", {"kind": "private"}),
        "item_report": ("report.pdf", "application/pdf", PDF, {"kind": "report"}),
        "item_config": ("config.json", "application/json", b'{"ssn": "123-45-6789"}', {"kind": "memo"}),
        "item_people": ("people.csv", "text/csv", b"name,dept\nsecretname,eng\n", {"kind": "memo"}),
    }
    return [
        RoomItem.from_bytes(info(item_id, name, kind, len(data), **meta), data)
        for item_id, (name, kind, data, meta) in documents.items()
    ]


def scoped(items_policy: dict[str, Any], limits: ScopedLimits | None = None) -> ScopedDatabase:
    policy = parse_policy({"tables": {"people": {"columns": ["dept"]}}, "items": items_policy})
    return build_scoped_database(room_items(), policy, limits)


SSN = r"\b\d{3}-\d{2}-\d{4}\b"


def test_the_query_stage_sees_allowed_documents_only_and_never_tabular_items() -> None:
    allow = [{"meta": {"kind": "memo"}}, {"id": "item_report"}, {"id": "item_people"}]
    with scoped({"allow": allow}) as database:
        listed = [item.id for item in database.list_items(role=Stage.QUERY)]
        assert listed == ["item_memo", "item_report", "item_config"]
        for hidden in ("item_notes", "item_people", "item_nosuch"):
            with pytest.raises(NotFound) as info_:
                database.read_item(hidden, role=Stage.QUERY)
            assert info_.value.message == "no such item"  # hidden and unknown look the same


def test_document_text_is_redacted_for_the_query_stage() -> None:
    with scoped({"allow": [{"meta": {"kind": "memo"}}], "redact": [SSN, r"555-\d{4}"]}) as database:
        memo = database.read_item("item_memo", role=Stage.QUERY)
        assert memo.text == "Q3 memo: Alice Smith (SSN [REDACTED]) approved the budget. Call [REDACTED]."
        assert memo.base64 is None
        assert memo.metadata == {"kind": "memo"} and memo.content_type == "text/markdown"
        assert database.read_item("item_config", role=Stage.QUERY).text == '{"ssn": "[REDACTED]"}'


def test_binary_documents_pass_only_when_nothing_needs_redacting() -> None:
    with scoped({"allow": [{"id": "item_report"}]}) as database:
        report = database.read_item("item_report", role=Stage.QUERY)
        assert report.text is None and base64.b64decode(report.base64 or "") == PDF
    with (
        scoped({"allow": [{"id": "item_report"}], "redact": [SSN]}) as database,
        pytest.raises(Forbidden) as info_,
    ):
        database.read_item("item_report", role=Stage.QUERY)
    assert info_.value.code == "item_not_redactable"


def test_documents_over_the_size_cap_are_refused() -> None:
    with scoped({"allow": [{"id": "item_memo"}]}, ScopedLimits(max_document_bytes=16)) as database:
        with pytest.raises(PayloadTooLarge) as info_:
            database.read_item("item_memo", role=Stage.QUERY)
        assert info_.value.code == "item_too_large"


def test_a_lying_size_does_not_get_past_the_cap() -> None:
    data = b"x" * 100
    liar = RoomItem.from_bytes(info("item_memo", "memo.txt", "text/plain", 1), data)
    policy = parse_policy({"items": {"allow": [{"id": "item_memo"}]}})
    with build_scoped_database([liar], policy, ScopedLimits(max_document_bytes=50)) as database:
        with pytest.raises(PayloadTooLarge):
            database.read_item("item_memo", role=Stage.QUERY)


def test_the_scope_stage_reads_every_item_raw() -> None:
    with full_read_database(room_items()) as database:
        assert len(database.list_items(role=Stage.SCOPE)) == 5
        assert database.read_item("item_memo", role=Stage.SCOPE).text == MEMO
        assert database.read_item("item_people", role=Stage.SCOPE).text == "name,dept\nsecretname,eng\n"
        assert base64.b64decode(database.read_item("item_report", role=Stage.SCOPE).base64 or "") == PDF


# --- simulation --------------------------------------------------------------------------------


PEOPLE = b"name,dept,salary\n" + b"".join(
    b"p%d,%s,%d\n" % (i, b"eng" if i < 6 else b"ops", 1000 * i) for i in range(9)
)
ROOM_POLICY = parse_policy(
    {
        "tables": {"people": {"columns": ["dept", "salary"]}},
        "aggregate": {"required": True, "min_group_size": 3, "functions": ["COUNT", "AVG"]},
    }
)


def people() -> list[RoomItem]:
    return [RoomItem.from_bytes(info("item_people", "people.csv", "text/csv", len(PEOPLE)), PEOPLE)]


def test_simulation_runs_the_query_agent_against_the_candidate_scope() -> None:
    candidate = {
        "tables": {"people": {"columns": ["dept"]}},
        "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT"]},
    }
    seen: list[ScopedDatabase] = []

    def query_agent(database: ScopedDatabase) -> Any:
        seen.append(database)
        with pytest.raises(SqlRejected) as info_:
            database.query("SELECT dept, AVG(salary) FROM people GROUP BY dept", role=Stage.QUERY)
        return info_.value.reason, database.query(
            "SELECT dept, COUNT(*) FROM people GROUP BY dept", role=Stage.QUERY
        ).rows

    reason, rows = simulate(candidate, query_agent, items=people(), room_policy=ROOM_POLICY)
    assert reason == "function_not_allowed"
    assert rows == [["eng", 6]]  # ops has 3 people: below the candidate's 5
    with pytest.raises(Gone):
        seen[0].query("SELECT 1", role=Stage.QUERY)  # closed after the agent returned


def test_a_candidate_that_widens_the_room_policy_is_refused_before_data_is_read() -> None:
    def never(_: ScopedDatabase) -> None:
        raise AssertionError("the agent must not run")

    def unreadable() -> Any:
        raise AssertionError("no item may be opened")

    items = [RoomItem(info("item_people", "people.csv", "text/csv", 1), unreadable)]
    wider = {"tables": {"people": {"columns": ["name", "dept"]}}}
    with pytest.raises(InvalidPolicy) as info_:
        simulate(wider, never, items=items, room_policy=ROOM_POLICY)
    assert "tables.people.columns: name not allowed by the bound" in info_.value.message
    with pytest.raises(InvalidPolicy):
        simulate('{"tables": ', never, items=items, room_policy=None)
    assert resolve_policy(ROOM_POLICY, ROOM_POLICY) == ROOM_POLICY
