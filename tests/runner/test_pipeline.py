"""The pipeline end to end on a real sandbox backend: scope -> query -> mediator -> output gate.

Parametrized over the Docker and process backends (each skipped where it does not work). The room is
the people scenario: a CSV of people (name, department, salary); the rules allow averages and counts
of salary by department over groups of at least 5. The default agents of ``agents/default-*`` answer
the questions; small test agents in ``tests/runner/agents`` play the parts the tests need (a
pass-through mediator, a scope agent that widens, one that simulates, one that crashes...).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.llm_server import FakeLlmServer

from hivemind.archive import pack_directory, validate_archive
from hivemind.encoding import b64encode
from hivemind.keys import owner_box_key, owner_sign_key, public_bytes
from hivemind.manifest import AgentRef, EgressRule, OutputRule, QueryRule, RoomManifest, rules_digest
from hivemind.models import DEFAULT_BUDGET_LIMITS, Budgets, OutputVisibility, QueryMode, Stage, Visibility
from hivemind.policy import OutputPolicy, ScopePolicy, parse_policy, policy_hash
from hivemind.tokens import Secret, TokenKind
from hivemind.trust import RunnerTrust, RunnerTrustMode
from hivemind_runner.images import AgentImageCache
from hivemind_runner.llm import LlmConfig, LlmGateway, ProviderConfig
from hivemind_runner.pipeline import (
    Pipeline,
    PipelineConfig,
    PipelineInputs,
    PipelineResult,
    RoomItem,
    StageAgent,
)
from hivemind_runner.sandbox import SandboxBackend
from hivemind_runner.sandbox.docker_backend import LABEL_SANDBOX, DockerBackend

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TEST_AGENTS = Path(__file__).parent / "agents"
OWNER = Secret(TokenKind.TENANT, bytes(range(32)))
OPERATOR_KEY = "sk-operator-pipeline-secret-42"
SIZES = {"eng": 8, "ops": 6, "sales": 5, "legal": 3, "board": 1}
PROMPT_AVERAGE = "average salary by department"

POLICY_BLOCK = """tables:
  people:
    columns: [department, salary]
aggregate:
  required: true
  min_group_size: 5
  functions: [COUNT, SUM, AVG]
"""
ROOM_POLICY = parse_policy(
    {
        "tables": {"people": {"columns": ["department", "salary"]}},
        "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "SUM", "AVG"]},
    }
)


def rules(extra_block: str = "") -> str:
    intro = "# People\n\nAverages by department over at least 5 people. No names.\n\n"
    return f"{intro}```policy\n{POLICY_BLOCK}{extra_block}```\n"


def salary(department: str, index: int) -> int:
    # Distinctive values, so an individual salary in an output cannot be a coincidence.
    return 61_234 + 1_117 * index + 13 * len(department)


def people_csv() -> str:
    rows = ["name,department,salary"]
    rows += [
        f"Secretname{department.title()}{index},{department},{salary(department, index)}"
        for department, size in SIZES.items()
        for index in range(size)
    ]
    return "\n".join(rows) + "\n"


_DIGESTS: dict[Path, str] = {}


def agent_dir(name: str) -> Path:
    return REPO / "agents" / name if name.startswith("default-") else TEST_AGENTS / name


def digest(path: Path) -> str:
    if path not in _DIGESTS:
        _DIGESTS[path] = validate_archive(pack_directory(path)).digest
    return _DIGESTS[path]


def room(
    *,
    scope: str = "default-scope",
    query: str = "default-query",
    mediator: str | None = "default-mediator",
    rules_text: str | None = None,
    data_policy: ScopePolicy | None = None,
    providers: tuple[str, ...] = (),
    scope_visibility: Visibility = Visibility.INSPECTABLE,
) -> tuple[RoomManifest, dict[Stage, StageAgent]]:
    names = {Stage.SCOPE: scope, Stage.QUERY: query}
    if mediator is not None:
        names[Stage.MEDIATOR] = mediator
    agents = {
        stage: StageAgent(
            stage=stage,
            agent_id=f"ag_{stage.value}1",
            source_dir=agent_dir(name),
            source_digest=digest(agent_dir(name)),
            visibility=scope_visibility if stage is Stage.SCOPE else Visibility.INSPECTABLE,
        )
        for stage, name in names.items()
    }
    text = rules_text if rules_text is not None else rules()

    def ref(stage: Stage) -> AgentRef:
        return AgentRef(
            agent_id=agents[stage].agent_id,
            digest=agents[stage].source_digest,
            visibility=agents[stage].visibility,
        )

    manifest = RoomManifest(
        room_id="room_people1",
        tenant_id="tn_owner1",
        name="People",
        rules=text,
        rules_sha256=rules_digest(text),
        policy="",
        scope=ref(Stage.SCOPE),
        query=QueryRule(
            mode=QueryMode.FIXED,
            agent_id=agents[Stage.QUERY].agent_id,
            digest=agents[Stage.QUERY].source_digest,
            visibility=Visibility.INSPECTABLE,
        ),
        mediator=ref(Stage.MEDIATOR) if mediator is not None else None,
        output=OutputRule(visibility=OutputVisibility.QUERIER_ONLY),
        egress=EgressRule(llm_providers=list(providers), artifacts=False),
        budgets=DEFAULT_BUDGET_LIMITS,
        runner_trust=RunnerTrust(mode=RunnerTrustMode.PINNED, allowed_compose_hashes=["c0" * 32]),
        data_policy=data_policy,
        owner_sign_pub=b64encode(public_bytes(owner_sign_key(OWNER))),
        owner_box_pub=b64encode(public_bytes(owner_box_key(OWNER))),
        created_at=1_750_000_000,
        revision=1,
    )
    return manifest, agents


@pytest.fixture(params=[pytest.param("docker", marks=pytest.mark.docker), "process"])
def backend(request: pytest.FixtureRequest) -> SandboxBackend:
    # docker_sandbox / process_sandbox (tests/runner/conftest.py) skip when the backend cannot work here.
    return request.getfixturevalue(f"{request.param}_sandbox")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "items").mkdir()
    (tmp_path / "items" / "people.csv").write_text(people_csv())
    return tmp_path


class Runner:
    def __init__(self, backend: SandboxBackend, workspace: Path, socket_root: Path):
        self.backend = backend
        self.workspace = workspace
        self.config = PipelineConfig(socket_root=socket_root)
        self.stages: list[Stage] = []
        self.began: dict[Stage, float] = {}  # wall-clock time at which each stage began

    def __call__(
        self,
        manifest: RoomManifest,
        agents: dict[Stage, StageAgent],
        prompt: str,
        *,
        budgets: Budgets | None = None,
        gateway: LlmGateway | None = None,
    ) -> PipelineResult:
        gateway = gateway or LlmGateway(LlmConfig())
        pipeline = Pipeline(self.backend, AgentImageCache(self.backend), gateway, config=self.config)
        item = RoomItem(
            item_id="item_people",
            name="people.csv",
            content_type="text/csv",
            metadata={"table": "people"},
            path=self.workspace / "items" / "people.csv",
        )
        inputs = PipelineInputs(
            run_id="run_people1",
            manifest=manifest,
            prompt=prompt,
            budgets=budgets or Budgets(timeout_s=60, llm_calls=0, tokens=0, memory_mb=256),
            workspace=self.workspace,
            items=[item],
            agents=agents,
            payer_tenant_id="tn_payer1",
        )
        self.stages = []
        self.began = {}

        def on_stage(stage: Stage) -> None:
            self.stages.append(stage)
            self.began[stage] = time.time()

        return pipeline.run(inputs, on_stage)

    def unused(self) -> list[str]:
        """The pre-started sandboxes no stage used, by name."""
        return sorted(path.stem for path in (self.workspace / "diagnostics").glob("*-unused.json"))

    def diagnostics(self, name: str) -> dict[str, Any]:
        return json.loads((self.workspace / "diagnostics" / f"{name}.json").read_text())


@pytest.fixture
def socket_root() -> Iterator[Path]:
    # Traversable by uid 10001 (the process backend binds the socket as that user); pytest's tmp
    # directories are 0700.
    root = Path(tempfile.mkdtemp(prefix="hm-pipeline-", dir="/tmp"))
    root.chmod(0o711)
    yield root
    # Every stage's socket directory is gone once its stage ended.
    assert list(root.iterdir()) == []
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def run(backend: SandboxBackend, workspace: Path, socket_root: Path) -> Runner:
    return Runner(backend, workspace, socket_root)


def individual_salaries() -> list[str]:
    values = [salary(department, index) for department, size in SIZES.items() for index in range(size)]
    return [f"{value}" for value in values] + [f"{value:,}" for value in values]


# --- the people scenario with the default agents ----------------------------------------------------


def test_average_salary_by_department_reports_only_groups_of_five(run: Runner) -> None:
    manifest, agents = room()
    result = run(manifest, agents, PROMPT_AVERAGE)
    assert result.ok, result.error_code
    assert result.error_code is None
    assert result.output_content_type.startswith("text/plain")
    text = result.output.decode()  # type: ignore[union-attr]
    for department in ("eng", "ops", "sales"):
        assert department in text
    for small in ("legal", "board"):
        assert small not in text
    assert run.stages == [Stage.SCOPE, Stage.QUERY, Stage.MEDIATOR]
    assert [(agent.stage, agent.agent_id) for agent in result.agents] == [
        (Stage.SCOPE, "ag_scope1"),
        (Stage.QUERY, "ag_query1"),
        (Stage.MEDIATOR, "ag_mediator1"),
    ]
    assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", agent.image_digest or "") for agent in result.agents)
    assert [usage.stage for usage in result.usage] == [Stage.SCOPE, Stage.QUERY, Stage.MEDIATOR]
    assert result.usage[1].tool_calls.get("sql", 0) >= 1
    assert result.scope_policy_hash is not None and re.fullmatch(r"[0-9a-f]{64}", result.scope_policy_hash)
    assert result.llm_usage == []


def test_names_and_individual_salaries_never_leave(run: Runner) -> None:
    manifest, agents = room()
    result = run(manifest, agents, "list names and salaries")
    assert result.ok, result.error_code
    text = result.output.decode()  # type: ignore[union-attr]
    assert "Secretname" not in text
    assert not [value for value in individual_salaries() if value in text]


# --- the runner's gates --------------------------------------------------------------------------------


def test_output_deny_is_the_runners_last_gate(run: Runner) -> None:
    # The mediator passes everything; the runner still refuses an answer that names a department.
    denying = ROOM_POLICY.model_copy(update={"output": OutputPolicy(deny=(r"(?i)\bsales\b",))})
    manifest, agents = room(scope="fixed-scope", mediator="passthrough-mediator", data_policy=denying)
    result = run(manifest, agents, PROMPT_AVERAGE)
    assert (result.ok, result.error_code, result.output) == (False, "output_denied", None)
    assert result.artifacts == {}
    assert result.scope_policy_hash is not None


def test_output_redact_is_applied_by_the_runner(run: Runner) -> None:
    redacting = ROOM_POLICY.model_copy(update={"output": OutputPolicy(redact=("sales",))})
    manifest, agents = room(scope="fixed-scope", mediator="passthrough-mediator", data_policy=redacting)
    result = run(manifest, agents, PROMPT_AVERAGE)
    assert result.ok, result.error_code
    text = result.output.decode()  # type: ignore[union-attr]
    assert "[REDACTED]" in text and "sales" not in text and "eng" in text


def test_output_deny_holds_end_to_end_with_the_default_agents(run: Runner) -> None:
    # The default scope agent simulates the query under its policy and tightens it when the answer would
    # be denied; whatever the agents do, nothing that matches the deny pattern leaves.
    manifest, agents = room(rules_text=rules("output:\n  deny: ['(?i)\\bsales\\b']\n"))
    result = run(manifest, agents, PROMPT_AVERAGE)
    assert result.usage[0].tool_calls.get("simulate", 0) >= 1
    if result.ok:
        assert "sales" not in result.output.decode().lower()  # type: ignore[union-attr]
    else:
        assert (result.error_code, result.output) == ("output_denied", None)


def test_a_room_data_policy_is_used_and_may_be_narrowed(run: Runner) -> None:
    manifest, agents = room(data_policy=ROOM_POLICY)
    result = run(manifest, agents, PROMPT_AVERAGE)
    assert result.ok, result.error_code
    assert result.scope_policy_hash == policy_hash(ROOM_POLICY)


def test_a_scope_agent_that_widens_the_data_policy_fails_the_run_closed(run: Runner) -> None:
    manifest, agents = room(scope="widening-scope", data_policy=ROOM_POLICY)
    result = run(manifest, agents, "list names and salaries")
    assert (result.ok, result.error_code, result.output) == (False, "scope_policy_invalid", None)
    assert result.scope_policy_hash is None
    assert run.stages == [Stage.SCOPE]
    assert [usage.stage for usage in result.usage] == [Stage.SCOPE]


def test_simulate_runs_the_query_agent_with_real_scoped_sql(run: Runner) -> None:
    manifest, agents = room(scope="simulating-scope", mediator="passthrough-mediator")
    result = run(manifest, agents, PROMPT_AVERAGE)
    assert result.ok, result.error_code
    logs = {line["message"]: line["fields"] for line in run.diagnostics("scope")["logs"]}
    simulated = logs["simulated"]
    assert simulated["error"] is None
    assert "eng" in simulated["output"] and "legal" not in simulated["output"]
    assert logs["refused"] == {"code": "invalid_policy"}
    assert "main.py" in logs["query agent"]["files"]
    assert logs["query agent"]["digest"] == agents[Stage.QUERY].source_digest
    assert run.diagnostics("scope-simulation-1")["outcome"] in ("ok", "stopped")
    assert result.usage[0].tool_calls["simulate"] == 2
    # The simulated query stage's SQL counts as the scope stage's work, not the query stage's.
    assert result.usage[0].tool_calls.get("sql", 0) >= 1


def test_a_sealed_scope_agent_does_not_see_the_prompt(run: Runner) -> None:
    manifest, agents = room(scope="fixed-scope", scope_visibility=Visibility.SEALED)
    assert run(manifest, agents, PROMPT_AVERAGE).ok
    logged = next(line for line in run.diagnostics("scope")["logs"] if line["message"] == "input")
    assert logged["fields"] == {"prompt": None, "prompt_visible": False}
    manifest, agents = room(scope="fixed-scope")
    assert run(manifest, agents, PROMPT_AVERAGE).ok
    logged = next(line for line in run.diagnostics("scope")["logs"] if line["message"] == "input")
    assert logged["fields"] == {"prompt": PROMPT_AVERAGE, "prompt_visible": True}


# --- credentials and stage failures -------------------------------------------------------------------


def test_provider_keys_never_reach_the_container(run: Runner) -> None:
    manifest, agents = room(scope="fixed-scope", query="env-query", mediator=None, providers=("local",))
    with FakeLlmServer() as server:
        provider = ProviderConfig(
            name="local", base_url=server.base_url, api_key=OPERATOR_KEY, default_model="m1"
        )
        gateway = LlmGateway(LlmConfig(providers={"local": provider}))
        server.echo_authorization()
        result = run(
            manifest,
            agents,
            "secret prompt text",
            budgets=Budgets(timeout_s=60, llm_calls=2, tokens=5000, memory_mb=256),
            gateway=gateway,
        )
        assert server.requests[0].authorization == f"Bearer {OPERATOR_KEY}"
    assert result.ok, result.error_code
    assert OPERATOR_KEY.encode() not in result.output  # type: ignore[operator]
    seen = json.loads(result.output)  # type: ignore[arg-type]
    assert "[REDACTED]" in seen["llm"]
    assert seen["prompt"] == "secret prompt text"
    assert "secret prompt text" not in json.dumps([seen["env"], seen["argv"]])
    assert {"HIVEMIND_BRIDGE", "HIVEMIND_SESSION", "HIVEMIND_ROLE"} <= set(seen["env"])
    assert [agent.stage for agent in result.agents] == [Stage.SCOPE, Stage.QUERY]
    assert result.usage[1].llm_calls == 1
    assert [entry["provider"] for entry in result.llm_usage] == ["local"]


def test_a_crashing_stage_fails_the_run_with_its_code_and_keeps_the_text_inside(run: Runner) -> None:
    manifest, agents = room(scope="crashing-scope")
    result = run(manifest, agents, PROMPT_AVERAGE)
    assert (result.ok, result.error_code) == (False, "scope_failed")
    failure = run.diagnostics("scope")["failure"]
    assert failure["code"] == "agent_error"
    assert "SecretnameEng0" in failure["message"]
    assert "Secretname" not in json.dumps([result.error_code, [usage.model_dump() for usage in result.usage]])


def test_a_stage_that_never_answers_times_out(run: Runner) -> None:
    manifest, agents = room(scope="fixed-scope", query="sleeping-query", mediator=None)
    result = run(
        manifest, agents, PROMPT_AVERAGE, budgets=Budgets(timeout_s=5, llm_calls=0, tokens=0, memory_mb=256)
    )
    assert (result.ok, result.error_code) == (False, "query_timeout")
    assert run.diagnostics("query")["outcome"] == "timeout"


def test_on_stage_errors_stop_the_run(run: Runner) -> None:
    class Lost(Exception):
        pass

    def lose(stage: Stage) -> None:
        raise Lost(stage.value)

    manifest, agents = room(scope="fixed-scope", query="env-query", mediator=None)
    pipeline = Pipeline(run.backend, AgentImageCache(run.backend), LlmGateway(LlmConfig()), config=run.config)
    inputs = PipelineInputs(
        run_id="run_people2",
        manifest=manifest,
        prompt="q",
        budgets=Budgets(timeout_s=30, llm_calls=0, tokens=0, memory_mb=256),
        workspace=run.workspace,
        items=[],
        agents=agents,
        payer_tenant_id="tn_payer1",
    )
    with pytest.raises(Lost, match="scope"):
        pipeline.run(inputs, lose)


def test_agents_that_do_not_match_the_manifest_are_refused(run: Runner) -> None:
    manifest, agents = room()
    swapped = dict(agents)
    swapped[Stage.QUERY] = StageAgent(
        stage=Stage.QUERY,
        agent_id="ag_query1",
        source_dir=agent_dir("env-query"),
        source_digest=digest(agent_dir("env-query")),
        visibility=Visibility.INSPECTABLE,
    )
    result = run(manifest, swapped, PROMPT_AVERAGE)
    assert (result.ok, result.error_code, run.stages) == (False, "agent_mismatch", [])


# --- pre-started sandboxes ------------------------------------------------------------------------------


def _query_started(result: PipelineResult) -> float:
    assert result.ok, result.error_code
    return float(json.loads(result.output or b"")["started"])


@pytest.mark.parametrize("prestart", [True, False])
def test_each_stage_finds_its_agent_already_started(run: Runner, prestart: bool) -> None:
    run.config = run.config.model_copy(update={"prestart": prestart})
    manifest, agents = room(scope="slow-scope", query="timed-query", mediator=None)
    result = run(manifest, agents, PROMPT_AVERAGE)
    started, began = _query_started(result), run.began[Stage.QUERY]
    if prestart:
        # Started with the run: it waited through the scope stage's 1.5 s, and that wait is not its time.
        assert started < began - 1.0
        assert result.usage[1].duration_ms < 1000
    else:
        assert started > began
    assert run.unused() == []


def test_an_agent_that_gave_up_waiting_for_its_stage_is_started_again(run: Runner) -> None:
    manifest, agents = room(scope="slow-scope", query="impatient-query", mediator=None)
    result = run(manifest, agents, PROMPT_AVERAGE)
    assert _query_started(result) > run.began[Stage.QUERY]
    assert run.unused() == ["query-unused"]
    assert run.diagnostics("query-unused")["outcome"] == "failed"  # its first call timed out unanswered


def test_a_sandbox_that_waited_longer_than_allowed_is_replaced(run: Runner) -> None:
    run.config = run.config.model_copy(update={"prestart_max_wait_s": 1.0})
    manifest, agents = room(scope="slow-scope", query="timed-query", mediator=None)
    result = run(manifest, agents, PROMPT_AVERAGE)
    assert _query_started(result) > run.began[Stage.QUERY]
    assert run.unused() == ["query-unused"]
    assert run.diagnostics("query-unused")["outcome"] == "stopped"


def test_sandboxes_of_stages_that_never_run_are_stopped(run: Runner) -> None:
    manifest, agents = room(scope="crashing-scope")
    result = run(manifest, agents, PROMPT_AVERAGE)
    assert (result.ok, result.error_code) == (False, "scope_failed")
    assert run.unused() == ["mediator-unused", "query-unused"]
    for name in run.unused():
        unused = run.diagnostics(name)
        # Stopped while its first call waited: it never saw a session, an input or a byte of data.
        assert (unused["outcome"], unused["logs"]) == ("stopped", [])
    assert [usage.stage for usage in result.usage] == [Stage.SCOPE]
    if isinstance(run.backend, DockerBackend):
        assert run.backend._client().containers.list(all=True, filters={"label": LABEL_SANDBOX}) == []
