"""The example agents in agents/examples, each in the room its README describes, via the runner's bridge."""

from __future__ import annotations

import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from agents_bridge import AGENTS_DIR, Room, room_file, run_pipeline, run_stage, running_bridge
from conftest import AGENT_DIRS, people_rows
from masking_agent import mask, release
from median_agent import Histogram, describe_range, median_band_range, nice_width
from scheduler_agent import proposed_slots
from search_agent import keywords, sentences
from slot_agent import release as release_slot

from hivemind_runner.scoped import RoomItem

EXAMPLES = AGENTS_DIR / "examples"
PEOPLE_POLICY = {
    "tables": {"people": {"columns": ["department", "salary"]}},
    "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "SUM", "AVG"]},
    "max_rows": 50,
}


# --- (a) the participant's median agent ------------------------------------------------------------


def test_nice_widths_are_round() -> None:
    assert [nice_width(mean) for mean in (90_000, 1_000, 7, 0.5)] == [10_000, 100, 1, 1]


def test_the_median_band_range_accounts_for_withheld_rows() -> None:
    exact = Histogram(total=10, bands=((0, 5), (10, 5)), width=10)
    assert median_band_range(exact) == (0, 10)
    assert median_band_range(Histogram(total=9, bands=((0, 9),), width=10)) == (0, 0)
    uncertain = Histogram(total=20, bands=((0, 6), (10, 6)), width=10)  # 8 rows in unreported bands
    assert median_band_range(uncertain) == (0, 10)
    assert describe_range(None, 10, 10) == "at most 20"
    assert describe_range(0, None, 10) == "at least 0"


def test_the_median_agent_estimates_from_an_aggregate_histogram(people_data: list[RoomItem]) -> None:
    with running_bridge(Room(data=people_data)) as bridge:
        session = bridge.open_session("query", "what is the median salary?", policy=PEOPLE_POLICY)
        text = run_stage(bridge, AGENT_DIRS["median"], session)["text"]
    salaries = [salary for _, _, salary in people_rows()]
    bands = Counter((salary // 10_000) * 10_000 for salary in salaries)
    for start, rows in bands.items():
        line = f"| {start:,}-{start + 10_000:,} | {rows} |"
        assert (line in text) == (rows >= 5), line
    withheld = sum(rows for rows in bands.values() if rows < 5)
    assert f"{withheld} rows fall in bands too small" in text
    numbers = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", text.splitlines()[0].split("(")[0])]
    assert numbers and min(numbers) <= statistics.median(salaries) <= max(numbers)
    # The runner's gate refuses GROUP BY on an expression (group_by_expression).
    assert session.sql and not [sql for sql in session.sql if "GROUP BY" in sql]


# --- (b) the masking mediator -----------------------------------------------------------------------


def test_masking_keeps_the_domain_and_the_last_four() -> None:
    masked = mask("Pay DE89 3704 0044 0532 0130 00 or GB29NWBK60161331926819; ask jane.doe@acme.example.")
    assert masked == "Pay DE** **** 3000 or GB** **** 6819; ask j***@acme.example."
    assert mask("Order ABCD1234 in 2024 costs 1,500 EUR.") == "Order ABCD1234 in 2024 costs 1,500 EUR."


def test_masking_then_the_rooms_output_rules() -> None:
    rules = {"deny": ["(?i)nightingale"], "redact": [r"\b\d{3}-\d{4}\b"]}
    assert release({"text": "call 555-0142 or a@b.example"}, rules) == "call [REDACTED] or a***@b.example"
    assert release({"json": {"to": ["x.y@z.example"]}}, rules) == {"to": ["x***@z.example"]}
    assert release({"text": "Project Nightingale"}, rules) == {
        "refusal": "The answer was withheld: it matches deny rule 1 of the room."
    }


# --- (c) the two-party negotiation ------------------------------------------------------------------


NEGOTIATION = EXAMPLES / "negotiation"


def _slots_room() -> Room:
    return Room(
        data=[room_file(NEGOTIATION / "availability.csv")],
        rules=(NEGOTIATION / "rules.md").read_text(),
        query_agent_dir=AGENT_DIRS["scheduler"],
    )


def _negotiate(prompt: str) -> Any:
    with running_bridge(_slots_room()) as bridge:
        return run_pipeline(bridge, prompt, mediator_dir=AGENT_DIRS["slot"])


def test_the_first_common_slot_and_nothing_else_leaves() -> None:
    run = _negotiate("I'm free 2025-03-05 10:00, 2025-03-04T14:00 and 2025-03-03 12:00.")
    assert run.final == {"text": "Agreed slot: 2025-03-04 14:00"}
    assert run.policy["max_rows"] == 1
    (sql,) = run.sessions["query"].sql
    assert "IN ('2025-03-03 12:00', '2025-03-04 14:00', '2025-03-05 10:00')" in sql


@pytest.mark.parametrize(
    ("prompt", "final"),
    [
        ("Free 2025-03-03 12:00 or 2025-03-08 09:00", "No common slot."),
        ("Whenever suits Alice", "Send your free slots as YYYY-MM-DD HH:MM, separated by commas."),
        (", ".join(f"2025-03-0{day} {hour:02d}:00" for day in (3, 4) for hour in range(9, 15)),
         "Propose fewer slots per request (at most ten)."),
    ],
)  # fmt: skip
def test_the_negotiation_says_little_when_there_is_no_agreement(prompt: str, final: str) -> None:
    assert _negotiate(prompt).final == {"text": final}


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"text": "Agreed slot: 2025-03-07 13:00"}, "not one the requester proposed"),
        (
            {"text": "Agreed slot: 2025-03-04 14:00\nAlso free: 2025-03-05 10:00"},
            "not exactly one agreed slot",
        ),
        ({"text": "Alice is free 2025-03-04 14:00"}, "not exactly one agreed slot"),
        ({"json": {"slot": "2025-03-04 14:00"}}, "must answer in text"),
    ],
)
def test_the_slot_mediator_refuses_anything_but_one_proposed_slot(
    answer: dict[str, Any], reason: str
) -> None:
    result = release_slot(answer, "2025-03-04 14:00, 2025-03-05 10:00")
    assert isinstance(result, dict) and reason in result["refusal"]


def test_proposed_slots_are_normalized_and_sorted() -> None:
    assert proposed_slots("2025-03-05T10:00, 2025-03-04 09:30, 2025-03-05 10:00") == [
        "2025-03-04 09:30",
        "2025-03-05 10:00",
    ]


# --- (d) document Q&A with redaction -----------------------------------------------------------------


DOCUMENTS = EXAMPLES / "document-qa"


def _memo_room() -> Room:
    memos = DOCUMENTS / "memos"
    items = [
        room_file(path, metadata={"kind": kind}, content_type="text/markdown")
        for path, kind in (
            (memos / "q3-offsite.md", "memo"),
            (memos / "hiring-plan.md", "memo"),
            (memos / "office-move.md", "memo"),
            (memos / "salary-review.md", "hr"),
        )
    ]
    return Room(data=items, rules=(DOCUMENTS / "rules.md").read_text(), query_agent_dir=AGENT_DIRS["docs"])


def _ask_documents(prompt: str, mediator: Path) -> Any:
    with running_bridge(_memo_room()) as bridge:
        return run_pipeline(bridge, prompt, mediator_dir=mediator)


def test_quotes_come_from_allowed_memos_with_phone_numbers_redacted() -> None:
    run = _ask_documents("Who answers questions about the offsite budget?", AGENT_DIRS["mediator"])
    text = run.final["text"]
    assert (
        '"The team offsite in Lisbon is approved for 12-14 September, with a budget of 40,000 EUR."' in text
    )
    assert "(q3-offsite.md)" in text
    assert "Questions go to ana.silva@northwind.example or [REDACTED]." in text
    assert "555 0199" not in text
    assert run.policy["items"]["allow"] == [{"meta": {"kind": "memo"}}]
    assert run.policy["tables"] == {}


def test_hr_documents_are_never_searched() -> None:
    run = _ask_documents("What is the salary of Ana Silva?", AGENT_DIRS["mediator"])
    assert "92,000" not in run.final["text"] and "salary-review" not in run.final["text"]


def test_the_codename_is_denied_by_the_output_rules() -> None:
    run = _ask_documents("Which engineers does the hiring plan need?", AGENT_DIRS["mediator"])
    assert "Nightingale" in run.raw["text"]
    assert run.final == {
        "json": {
            "refusal": "The answer was withheld: it matches deny rule 1 of 1 in the room's output rules."
        }
    }


def test_the_masking_mediator_masks_emails_and_ibans_in_quotes() -> None:
    run = _ask_documents("Where is travel reimbursed, and who answers questions?", AGENT_DIRS["masking"])
    text = run.final["text"]
    assert "IBAN PT** **** 0154" in text
    assert "a***@northwind.example" in text
    assert "ana.silva" not in text


def test_keywords_and_sentences() -> None:
    assert keywords("What is the budget of the Lisbon offsites?") == ["budget", "lisbon", "offsite"]
    assert sentences("# Title\n\nOne. Two!\n- Three") == ["Title", "One.", "Two!", "Three"]


# --- every example and default agent is a plain code-only image ---------------------------------------


AGENT_IMAGE_DIRS = sorted(path.parent for path in AGENTS_DIR.rglob("Dockerfile") if "base" not in path.parts)


@pytest.mark.parametrize("directory", AGENT_IMAGE_DIRS, ids=lambda path: str(path.relative_to(AGENTS_DIR)))
def test_agent_dockerfiles_only_copy_code(directory: Path) -> None:
    instructions = [
        line.split()[0].upper()
        for line in (directory / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert instructions == ["FROM", "COPY", "CMD"]
    dockerfile = (directory / "Dockerfile").read_text()
    assert "FROM hivemind/agent-base:local" in dockerfile
    assert 'CMD ["python3", "/agent/main.py"]' in dockerfile
    assert (directory / "main.py").is_file()


def test_readme_commands_name_paths_that_exist() -> None:
    readmes = [*EXAMPLES.rglob("README.md")]
    readmes += [
        AGENTS_DIR / name / "README.md" for name in ("default-scope", "default-query", "default-mediator")
    ]
    repo = AGENTS_DIR.parent
    checked = 0
    for readme in readmes:
        commands = readme.read_text().replace("\\\n", " ").splitlines()
        for command in (line.strip() for line in commands if line.strip().startswith("hmctl ")):
            assert command.startswith("hmctl --profile "), f"{readme}: {command}"
            for path in re.findall(r"(?<![\w/])(agents/[\w./-]+)", command):
                assert (repo / path).exists(), f"{readme}: {path}"
                checked += 1
    assert checked >= 20
