"""Agent tests: the default agents' modules are importable by name, and a people room is at hand.

Each agent directory is its own image build context, so its modules import their siblings by plain
name (``from query_intents import ...``). The directories go on ``sys.path`` here; module names are
unique across agents (what several agents share, such as the rules format, lives in the SDK).
Bytecode is not written into the agent directories: they are agent source, hashed and shipped as
they are.
"""

from __future__ import annotations

import csv
import importlib
import sys
from pathlib import Path

import pytest
from agents_bridge import room_file

from hivemind_runner.scoped import RoomItem

AGENTS = Path(__file__).resolve().parents[2] / "agents"
AGENT_DIRS = {
    "scope": AGENTS / "default-scope",
    "query": AGENTS / "default-query",
    "mediator": AGENTS / "default-mediator",
    "median": AGENTS / "examples" / "median-query",
    "masking": AGENTS / "examples" / "masking-mediator",
    "scheduler": AGENTS / "examples" / "negotiation" / "scheduler-query",
    "slot": AGENTS / "examples" / "negotiation" / "slot-mediator",
    "docs": AGENTS / "examples" / "document-qa" / "search-query",
}
AGENT_MODULES = (
    "scope_agent",
    "query_agent",
    "mediator_agent",
    "median_agent",
    "masking_agent",
    "scheduler_agent",
    "slot_agent",
    "search_agent",
)
SAMPLE_DATA = AGENTS / "examples" / "sample-data"


def _import_agent_modules() -> None:
    previous = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        for directory in AGENT_DIRS.values():
            if str(directory) not in sys.path:
                sys.path.insert(0, str(directory))
        # Every agent's entry module, which imports its siblings: all of them load now, without bytecode.
        for module in AGENT_MODULES:
            importlib.import_module(module)
    finally:
        sys.dont_write_bytecode = previous


_import_agent_modules()


def people_rows() -> list[tuple[str, str, int]]:
    with (SAMPLE_DATA / "people.csv").open(newline="") as handle:
        return [(row["name"], row["department"], int(row["salary"])) for row in csv.DictReader(handle)]


@pytest.fixture
def people_data() -> list[RoomItem]:
    """The people room's data: sample-data/people.csv as the runner loads it (table ``people``)."""
    return [room_file(SAMPLE_DATA / "people.csv")]


@pytest.fixture
def people_rules() -> str:
    return (SAMPLE_DATA / "rules.md").read_text()
