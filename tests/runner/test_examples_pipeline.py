"""Every example room of agents/examples through the real pipeline, with its own sample data and rules.

Each room is set up as its README's ``hmctl`` commands set it up (the same agents, rules file, item
metadata and content types as ``room add-data``), then asked the README's questions through
:class:`~hivemind_runner.pipeline.Pipeline` on a real sandbox backend: the runner's bridge, its SQL gate
and item redaction, and the default scope agent deciding the policy, inside a real sandbox (the median
agent's first histogram, ``GROUP BY`` on an expression, failed here as ``query_failed``).

Parametrized over the Docker and process backends, like test_pipeline.py.
"""

from __future__ import annotations

import csv
import json
import mimetypes
import re
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemind.archive import pack_directory, validate_archive
from hivemind.encoding import b64encode
from hivemind.keys import owner_box_key, owner_sign_key, public_bytes
from hivemind.manifest import AgentRef, EgressRule, OutputRule, QueryRule, RoomManifest, rules_digest
from hivemind.models import DEFAULT_BUDGET_LIMITS, Budgets, OutputVisibility, QueryMode, Stage, Visibility
from hivemind.tokens import Secret, TokenKind
from hivemind.trust import RunnerTrust, RunnerTrustMode
from hivemind_runner.images import AgentImageCache
from hivemind_runner.llm import LlmConfig, LlmGateway
from hivemind_runner.pipeline import (
    Pipeline,
    PipelineConfig,
    PipelineInputs,
    PipelineResult,
    RoomItem,
    StageAgent,
)
from hivemind_runner.sandbox import SandboxBackend
from hmctl.rooms import item_metadata

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
AGENTS = REPO / "agents"
EXAMPLES = AGENTS / "examples"
PEOPLE_CSV = EXAMPLES / "sample-data" / "people.csv"
MEMOS = EXAMPLES / "document-qa" / "memos"
OWNER = Secret(TokenKind.TENANT, bytes(range(32)))
SLOT = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}")
ALLOWED_MEMOS = {"q3-offsite.md", "hiring-plan.md", "office-move.md"}
# In the README's order (the runner lists items by their random ids; the answers do not depend on it).
MEMO_ITEMS = [
    ("q3-offsite.md", "kind=memo"),
    ("hiring-plan.md", "kind=memo"),
    ("office-move.md", "kind=memo"),
    ("salary-review.md", "kind=hr"),
]


# --- rooms as the READMEs' commands make them --------------------------------------------------------


def _digest(directory: Path) -> str:
    return validate_archive(pack_directory(directory)).digest


def agent(stage: Stage, directory: Path, visibility: Visibility = Visibility.INSPECTABLE) -> StageAgent:
    return StageAgent(
        stage=stage,
        agent_id="ag_" + re.sub(r"[^a-z0-9]", "", f"{stage.value}{directory.name}"),
        source_dir=directory,
        source_digest=_digest(directory),
        visibility=visibility,
    )


def room(
    rules_file: Path,
    *,
    query: Path,
    mediator: Path,
    uploadable: bool = False,
    uploaded_visibility: Visibility = Visibility.INSPECTABLE,
    output: OutputVisibility = OutputVisibility.QUERIER_ONLY,
) -> tuple[RoomManifest, dict[Stage, StageAgent]]:
    """``room create agents/default-scope --rules-file RULES --mediator-agent MEDIATOR`` with either
    ``--query-agent QUERY`` or ``--uploadable-query`` (then QUERY is what the participant's ``room ask
    --query-agent`` uploads, with the visibility the room requires)."""
    agents = {
        Stage.SCOPE: agent(Stage.SCOPE, AGENTS / "default-scope"),
        Stage.QUERY: agent(Stage.QUERY, query, uploaded_visibility),
        Stage.MEDIATOR: agent(Stage.MEDIATOR, mediator),
    }
    text = rules_file.read_text()

    def ref(stage: Stage) -> AgentRef:
        chosen = agents[stage]
        return AgentRef(agent_id=chosen.agent_id, digest=chosen.source_digest, visibility=chosen.visibility)

    fixed = agents[Stage.QUERY]
    manifest = RoomManifest(
        room_id="room_example1",
        tenant_id="tn_owner1",
        name=rules_file.parent.name,
        rules=text,
        rules_sha256=rules_digest(text),
        policy="",
        scope=ref(Stage.SCOPE),
        query=QueryRule(mode=QueryMode.UPLOADABLE, visibility=uploaded_visibility)
        if uploadable
        else QueryRule(
            mode=QueryMode.FIXED,
            agent_id=fixed.agent_id,
            digest=fixed.source_digest,
            visibility=fixed.visibility,
        ),
        mediator=ref(Stage.MEDIATOR),
        output=OutputRule(visibility=output),
        egress=EgressRule(llm_providers=[], artifacts=False),
        budgets=DEFAULT_BUDGET_LIMITS,
        runner_trust=RunnerTrust(mode=RunnerTrustMode.PINNED, allowed_compose_hashes=["c0" * 32]),
        owner_sign_pub=b64encode(public_bytes(owner_sign_key(OWNER))),
        owner_box_pub=b64encode(public_bytes(owner_box_key(OWNER))),
        created_at=1_750_000_000,
        revision=1,
    )
    return manifest, agents


# --- running them --------------------------------------------------------------------------------------


@pytest.fixture(params=[pytest.param("docker", marks=pytest.mark.docker), "process"])
def backend(request: pytest.FixtureRequest) -> SandboxBackend:
    # docker_sandbox / process_sandbox (tests/runner/conftest.py) skip when the backend cannot work here.
    return request.getfixturevalue(f"{request.param}_sandbox")


_IMAGES: dict[str, AgentImageCache] = {}


@pytest.fixture
def socket_root() -> Iterator[Path]:
    # Traversable by uid 10001 (the process backend binds the socket as that user).
    root = Path(tempfile.mkdtemp(prefix="hm-examples-", dir="/tmp"))
    root.chmod(0o711)
    yield root
    assert list(root.iterdir()) == []  # every stage's socket directory is gone
    shutil.rmtree(root, ignore_errors=True)


class Runner:
    """Runs one example room; ``add_data`` is ``room add-data``, ``ask`` is one run of the pipeline."""

    def __init__(self, backend: SandboxBackend, workspace: Path, socket_root: Path):
        self.workspace = workspace
        self.items: list[RoomItem] = []
        images = _IMAGES.setdefault(backend.name, AgentImageCache(backend))
        config = PipelineConfig(socket_root=socket_root)
        self.pipeline = Pipeline(backend, images, LlmGateway(LlmConfig()), config=config)
        (workspace / "items").mkdir()

    def add_data(self, source: Path, *meta: str) -> None:
        """What ``room add-data ROOM --file SOURCE --meta ...`` stores: the CLI's metadata (``table``
        defaults to the file's stem), the file name (the control plane keeps it as metadata ``name``)
        and the content type the CLI guesses from the name."""
        copy = self.workspace / "items" / source.name
        shutil.copyfile(source, copy)
        self.items.append(
            RoomItem(
                item_id=f"item_{len(self.items) + 1}",
                name=source.name,
                content_type=mimetypes.guess_type(source.name)[0] or "application/octet-stream",
                metadata={**item_metadata(source, meta), "name": source.name},
                path=copy,
            )
        )

    def ask(self, manifest: RoomManifest, agents: dict[Stage, StageAgent], prompt: str) -> PipelineResult:
        shutil.rmtree(self.workspace / "diagnostics", ignore_errors=True)
        inputs = PipelineInputs(
            run_id="run_example1",
            manifest=manifest,
            prompt=prompt,
            budgets=Budgets(timeout_s=60, llm_calls=0, tokens=0, memory_mb=256),
            workspace=self.workspace,
            items=list(self.items),
            agents=agents,
            payer_tenant_id="tn_participant1",
        )
        return self.pipeline.run(inputs, lambda stage: None)

    def explain(self, result: PipelineResult) -> str:
        """The failed stage's own report (diagnostics stay in the workspace), for assertion messages."""
        stage = (result.error_code or "").split("_")[0]
        report = self.workspace / "diagnostics" / f"{stage}.json"
        if not report.is_file():
            return str(result.error_code)
        diagnostics = json.loads(report.read_text())
        return f"{result.error_code}: {diagnostics['failure']} {diagnostics['stderr'][-2000:]}"

    def text(self, result: PipelineResult) -> str:
        assert result.ok, self.explain(result)
        assert result.output is not None
        return result.output.decode()


@pytest.fixture
def runner(backend: SandboxBackend, tmp_path: Path, socket_root: Path) -> Runner:
    return Runner(backend, tmp_path, socket_root)


def people() -> list[dict[str, str]]:
    with PEOPLE_CSV.open(newline="") as source:
        return list(csv.DictReader(source))


def row_level_values(text: str) -> list[str]:
    """Names and individual salaries of sample-data/people.csv found in ``text`` (a salary that is a
    multiple of 10,000 is also a band boundary, so it does not count)."""
    flat = text.replace(",", "")
    rows = people()
    names = [part for row in rows for part in row["name"].split() if re.search(rf"\b{part}\b", text)]
    return names + [row["salary"] for row in rows if int(row["salary"]) % 10_000 and row["salary"] in flat]


# --- the people room: the default agents on the sample data -------------------------------------------


def test_people_room_reports_departments_of_five_and_no_names(runner: Runner) -> None:
    manifest, agents = room(
        EXAMPLES / "sample-data" / "rules.md",
        query=AGENTS / "default-query",
        mediator=AGENTS / "default-mediator",
    )
    runner.add_data(PEOPLE_CSV)
    text = runner.text(runner.ask(manifest, agents, "average salary by department"))
    shown = {row["department"] for row in people() if row["department"] in text}
    assert shown == {"Engineering", "Marketing", "Sales", "Support"}  # Finance (4), Legal (3) withheld
    assert row_level_values(text) == []

    text = runner.text(runner.ask(manifest, agents, "list names and salaries"))
    assert row_level_values(text) == []
    assert "salary" in text.lower()  # it explains what it can answer instead


# --- median-query: a participant's own query agent in an aggregate-only room ---------------------------


@pytest.mark.parametrize("visibility", [Visibility.INSPECTABLE, Visibility.SEALED], ids=lambda v: v.value)
def test_median_query_answers_a_range_from_aggregates_only(runner: Runner, visibility: Visibility) -> None:
    manifest, agents = room(
        EXAMPLES / "sample-data" / "rules.md",
        query=EXAMPLES / "median-query",
        mediator=AGENTS / "default-mediator",
        uploadable=True,
        uploaded_visibility=visibility,
    )
    runner.add_data(PEOPLE_CSV)
    result = runner.ask(manifest, agents, "what is the median salary?")
    text = runner.text(result)

    rows = people()
    salaries = [int(row["salary"]) for row in rows]
    first = text.splitlines()[0]
    found = re.fullmatch(r"The median salary is between ([\d,]+) and ([\d,]+) \(from 60 rows, .*\)\.", first)
    assert found, text
    low, high = (int(bound.replace(",", "")) for bound in found.groups())
    assert low <= statistics.median(salaries) <= high
    # The README shows this very answer.
    assert first in (EXAMPLES / "median-query" / "README.md").read_text()
    # Only bands the room reports: every count reaches the rules' minimum group of 5.
    counts = [int(count) for count in re.findall(r"^\| [\d,]+-[\d,]+ \| (\d+) \|$", text, re.MULTILINE)]
    assert counts and min(counts) >= 5
    assert row_level_values(text) == []
    assert result.agents[1].agent_id == agents[Stage.QUERY].agent_id
    assert result.usage[1].tool_calls["sql"] >= 3


# --- masking-mediator: emails and IBANs masked in quoted memos ---------------------------------------


def test_masking_mediator_masks_emails_and_ibans(runner: Runner) -> None:
    manifest, agents = room(
        EXAMPLES / "document-qa" / "rules.md",
        query=EXAMPLES / "document-qa" / "search-query",
        mediator=EXAMPLES / "masking-mediator",
    )
    runner.add_data(MEMOS / "q3-offsite.md", "kind=memo")
    text = runner.text(runner.ask(manifest, agents, "Where is travel reimbursed, and who answers questions?"))
    assert "IBAN PT** **** 0154" in text and "a***@northwind.example" in text
    assert "ana.silva" not in text and "PT50" not in text and "0002 0123" not in text
    assert "[REDACTED]" in text and "+351" not in text  # the phone number: the rules' items.redact


# --- negotiation: one agreed slot leaves, nothing else of either calendar -----------------------------


def test_negotiation_returns_exactly_one_agreed_slot(runner: Runner) -> None:
    manifest, agents = room(
        EXAMPLES / "negotiation" / "rules.md",
        query=EXAMPLES / "negotiation" / "scheduler-query",
        mediator=EXAMPLES / "negotiation" / "slot-mediator",
        output=OutputVisibility.OWNER_AND_QUERIER,
    )
    runner.add_data(EXAMPLES / "negotiation" / "availability.csv")
    # Bob's 2025-03-04 14:00 and 2025-03-05 10:00 are both free for Alice; only the first leaves.
    text = runner.text(
        runner.ask(manifest, agents, "I'm free 2025-03-03 12:00, 2025-03-04 14:00 and 2025-03-05 10:00")
    )
    assert text == "Agreed slot: 2025-03-04 14:00"
    assert "Answer: `Agreed slot: 2025-03-04 14:00`" in (EXAMPLES / "negotiation" / "README.md").read_text()

    text = runner.text(runner.ask(manifest, agents, "I'm free 2025-03-03 12:00 and 2025-03-06 10:00"))
    assert text == "No common slot."
    assert SLOT.search(text) is None


# --- document-qa: allowed memos only, redacted, the codename withheld ---------------------------------


@pytest.fixture
def memo_room(runner: Runner) -> tuple[RoomManifest, dict[Stage, StageAgent]]:
    for name, meta in MEMO_ITEMS:
        runner.add_data(MEMOS / name, meta)
    return room(
        EXAMPLES / "document-qa" / "rules.md",
        query=EXAMPLES / "document-qa" / "search-query",
        mediator=AGENTS / "default-mediator",
    )


def quoted_sources(text: str) -> list[str]:
    return re.findall(r'^> ".*" \(([^)]+)\)$', text, re.MULTILINE)


def test_document_qa_quotes_allowed_memos_with_phone_numbers_redacted(
    runner: Runner, memo_room: tuple[RoomManifest, dict[Stage, StageAgent]]
) -> None:
    text = runner.text(runner.ask(*memo_room, "Who answers questions about the offsite budget?"))
    assert text.startswith("From 3 documents I may read")  # the HR memo is not among them
    sources = quoted_sources(text)
    assert sources and set(sources) <= ALLOWED_MEMOS and "q3-offsite.md" in sources
    assert "Questions go to ana.silva@northwind.example or [REDACTED]." in text
    assert "555 0199" not in text and "555 0142" not in text

    text = runner.text(runner.ask(*memo_room, "What is the salary of Ana Silva?"))
    assert set(quoted_sources(text)) <= ALLOWED_MEMOS
    assert "92,000" not in text and "Jonas" not in text and "salary-review" not in text


def test_document_qa_withholds_the_codename_project(
    runner: Runner, memo_room: tuple[RoomManifest, dict[Stage, StageAgent]]
) -> None:
    result = runner.ask(*memo_room, "Which engineers does the hiring plan need?")
    # The default mediator refuses (deny rule of the room); the runner's own gate would stop it anyway.
    text = runner.text(result)
    assert json.loads(text)["refusal"].startswith("The answer was withheld")
    assert "nightingale" not in text.lower()
