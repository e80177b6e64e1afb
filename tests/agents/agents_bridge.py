"""A room behind the runner's real bridge, for agent tests: no rule of the runner is restated here.

Every stage session is a real :class:`~hivemind_runner.bridge.StageSession` served by a real
:class:`~hivemind_runner.bridge.BridgeServer` on its own Unix socket, wired the way the pipeline wires
it (hivemind_runner/pipeline.py):

- data: the room's items (the repository's own CSV and Markdown files, as ``hmctl room add-data``
  uploads them) go through the scoped-data engine: the scope stage gets :func:`full_read_database`,
  a query stage :func:`build_scoped_database` for its policy, so SQL meets the runner's gate and items
  its allow-list and redaction. Items are handed to the engine in a deterministic order unrelated to
  the order a test lists them in, so an agent that depends on item order is caught;
- ``policy/check``: :func:`room_policy_checker` over the full read's schema and the room's
  ``data_policy``; ``simulate``: the candidate resolved with :func:`resolve_policy`, then the room's
  query agent run as a process against a scoped database built for it;
- the LLM: the runner's :class:`RunLlm` meter (allow-list, call and token budgets) in front of a
  scripted provider (an ``httpx.MockTransport``): the only stub, since no model is called in tests.

Sessions only add recording (the SQL and LLM requests an agent sent) for tests to assert on.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from hivemind.archive import pack_directory, validate_archive
from hivemind.models import Budgets, Stage
from hivemind.policy import ScopePolicy, parse_policy
from hivemind_agent import Bridge, Context
from hivemind_agent.transport import UnixHTTPConnection
from hivemind_runner.bridge import (
    BridgeServer,
    SimulationLimit,
    StageServices,
    StageSession,
    room_policy_checker,
    tool_call_chain,
)
from hivemind_runner.llm import LlmConfig, LlmGateway, LlmProviderError, ProviderConfig, RunLlm
from hivemind_runner.scoped import (
    ItemInfo,
    RoomItem,
    ScopedDatabase,
    build_scoped_database,
    full_read_database,
    resolve_policy,
)

REPO = Path(__file__).resolve().parents[2]
SDK_DIR = REPO / "agents" / "sdk"
AGENTS_DIR = REPO / "agents"
MAX_SIMULATIONS = 5
TIMEOUT_S = 60
TOKEN_BUDGET = 20_000
MEMORY_MB = 256

LlmScript = Callable[[dict[str, Any]], dict[str, Any]]


class LlmFailure(Exception):
    """Raised by a scripted LLM: the provider answers HTTP 502, the bridge ``502 llm_provider_error``."""


# --- room data ------------------------------------------------------------------------------------


def room_file(
    path: Path, *, metadata: Mapping[str, str] | None = None, content_type: str | None = None
) -> RoomItem:
    """A repository file as a room item: its bytes, name, media type (from the suffix) and metadata."""
    data = path.read_bytes()
    info = ItemInfo(
        id="item_" + re.sub(r"[^a-z0-9]", "", path.stem.lower()),
        name=path.name,
        content_type=content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream",
        size=len(data),
        metadata=dict(metadata or {}),
    )
    return RoomItem.from_bytes(info, data)


def engine_order(items: Sequence[RoomItem]) -> list[RoomItem]:
    """``items`` in an order fixed by their ids and unrelated to how a test lists them (the runner
    lists items in no particular order)."""
    return sorted(items, key=lambda item: hashlib.sha256(item.info.id.encode()).digest())


@dataclass
class Room:
    """The room behind the bridge: its items, texts, egress, and its query agent."""

    data: Sequence[RoomItem] = ()
    rules: str = ""
    policy_text: str = ""
    data_policy: Mapping[str, Any] | None = None
    llm_providers: Sequence[str] = ()
    llm: LlmScript | None = None
    llm_calls: int = 0
    query_agent_dir: Path = AGENTS_DIR / "default-query"
    query_agent_sealed: bool = False
    prompt_visible: bool = True


# --- sessions -------------------------------------------------------------------------------------


class AgentSession(StageSession):
    """The runner's stage session, served on its own socket, remembering what the agent asked for."""

    def __init__(self, *, socket_path: Path, **session: Any):
        super().__init__(**session)
        self.socket_path = socket_path
        self.sql: list[Any] = []
        self.llm_requests: list[dict[str, Any]] = []

    @property
    def role(self) -> str:
        return self.stage.value

    @property
    def result(self) -> dict[str, Any]:
        """What the stage posted, in its wire shape: ``{"text"|"json"|"error": ...}``."""
        output = self.output
        assert output is not None, "the stage posted no output"
        if output.failed:
            return {"error": {"code": output.error_code, "message": output.error_message}}
        return output.answer()

    def run_sql(self, body: Mapping[str, Any], request_bytes: int) -> dict[str, Any]:
        self.sql.append(body.get("query"))
        return super().run_sql(body, request_bytes)

    def chat_completion(self, body: Mapping[str, Any], request_bytes: int) -> dict[str, Any]:
        # Recorded when the call reached the provider (answered or failed there), as the meter counts it.
        try:
            answer = super().chat_completion(body, request_bytes)
        except LlmProviderError:
            self.llm_requests.append(dict(body))
            raise
        self.llm_requests.append(dict(body))
        return answer


def _scripted_provider(room: Room) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        if room.llm is None:
            return httpx.Response(503)
        try:
            return httpx.Response(200, json=room.llm(json.loads(request.content)))
        except LlmFailure:
            return httpx.Response(502)

    return httpx.MockTransport(answer)


def _scripted_gateway(room: Room) -> LlmGateway:
    """The runner's LLM gateway with each of the room's providers answered by its script."""
    providers = {
        name: ProviderConfig(
            name=name, base_url="https://llm.test/v1", api_key=SecretStr("sk-test"), default_model="scripted"
        )
        for name in room.llm_providers
    }
    return LlmGateway(LlmConfig(providers=providers), client=httpx.Client(transport=_scripted_provider(room)))


class RoomBridge:
    """The bridges of one room's stages. Use :func:`running_bridge` to get one that is torn down."""

    def __init__(self, room: Room, directory: Path):
        self.room = room
        self.directory = directory
        self.items = engine_order(room.data)
        self.data_policy = None if room.data_policy is None else parse_policy(room.data_policy)
        self.sessions: dict[str, AgentSession] = {}
        self.simulations: list[tuple[dict[str, Any], str, AgentSession]] = []
        self.policy_checks: list[dict[str, Any]] = []
        self._gateway = _scripted_gateway(room)
        budgets = Budgets(
            timeout_s=TIMEOUT_S, llm_calls=room.llm_calls, tokens=TOKEN_BUDGET, memory_mb=MEMORY_MB
        )
        self.meter: RunLlm = self._gateway.open_run(
            run_id="run_agents", allowed_providers=room.llm_providers, budgets=budgets, payer_tenant_id=None
        )
        self._chain = tool_call_chain(max_tool_calls=10_000, max_log_lines=1000)
        self._full_read = full_read_database(self.items)
        self._databases: list[ScopedDatabase] = [self._full_read]
        self._servers: list[BridgeServer] = []
        self._lock = threading.Lock()
        full_schema = self._full_read.schema(role=Stage.SCOPE)
        self._check_policy = room_policy_checker(
            {table.name: [column.name for column in table.columns] for table in full_schema.tables},
            self.data_policy,
        )

    # --- sessions ---

    def open_session(
        self,
        role: str,
        prompt: str | None = None,
        *,
        policy: Mapping[str, Any] | ScopePolicy | None = None,
        stage: Mapping[str, Any] | None = None,
    ) -> AgentSession:
        """A started stage session: ``scope`` reads everything, ``query`` the projection of ``policy``,
        ``mediator`` no data (``stage`` carries its answer and output rules)."""
        stage_role = Stage(role)
        if stage_role is Stage.QUERY:
            assert policy is not None, "a query session needs a policy"
            database = build_scoped_database(self.items, parse_policy(policy))
            with self._lock:
                self._databases.append(database)
            return self._start(stage_role, prompt, database, dict(stage or {}))
        assert policy is None, "only a query session has a policy"
        if stage_role is Stage.SCOPE:
            scope_stage = {
                "prompt_visible": self.room.prompt_visible,
                "data_policy": None if self.data_policy is None else self.data_policy.model_dump(mode="json"),
                "query_agent": self._query_agent_view(),
                **(stage or {}),
            }
            return self._start(
                stage_role, prompt if self.room.prompt_visible else None, self._full_read, scope_stage
            )
        return self._start(stage_role, prompt, None, dict(stage or {}))

    def _start(
        self,
        role: Stage,
        prompt: str | None,
        database: ScopedDatabase | None,
        stage: dict[str, Any],
        *,
        simulated: bool = False,
    ) -> AgentSession:
        schema = None if database is None else database.schema(role=role).model_dump(mode="json")
        services = StageServices(
            input_document={
                "role": role.value,
                "prompt": prompt,
                "rules": self.room.rules,
                "policy": self.room.policy_text,
                "schema": schema,
                "budgets": {
                    "timeout_s": TIMEOUT_S,
                    "llm_calls": self.meter.remaining_calls(),
                    "tokens": self.meter.remaining_tokens(),
                    "memory_mb": MEMORY_MB,
                },
                "llm_providers": list(self.room.llm_providers),
                "artifacts_allowed": False,
                "stage": stage,
            },
            database=database,
            llm=self.meter,
            llm_allowed=bool(self.room.llm_providers),
            simulator=self._simulate if role is Stage.SCOPE else None,
            policy_checker=self._record_policy_check if role is Stage.SCOPE else None,
            bill_to=Stage.SCOPE if simulated else None,
        )
        socket_dir = Path(tempfile.mkdtemp(prefix=f"{role.value}-", dir=self.directory))
        session = AgentSession(
            socket_path=socket_dir / "bridge.sock",
            run_id="run_agents",
            stage=role,
            services=services,
            chain=self._chain,
            simulated=simulated,
        )
        server = BridgeServer(session, session.socket_path).start()
        with self._lock:
            self._servers.append(server)
            self.sessions[session.token] = session
        return session

    def _query_agent_view(self) -> dict[str, Any]:
        directory = self.room.query_agent_dir
        manifest = validate_archive(pack_directory(directory))
        files = None
        if not self.room.query_agent_sealed:
            files = {entry.path: (directory / entry.path).read_text() for entry in manifest.files}
        return {
            "agent_id": "agt_query",
            "digest": manifest.digest,
            "visibility": "sealed" if files is None else "inspectable",
            "files": files,
        }

    # --- the scope stage's services ---

    def _record_policy_check(
        self, candidate: Mapping[str, Any], bound: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        self.policy_checks.append({"policy": candidate, "bound": bound})
        return self._check_policy(candidate, bound)

    def _simulate(self, candidate: Mapping[str, Any], prompt: str) -> dict[str, Any]:
        policy = resolve_policy(candidate, self.data_policy)
        with self._lock:
            if len(self.simulations) >= MAX_SIMULATIONS:
                raise SimulationLimit(f"a run may simulate at most {MAX_SIMULATIONS} times")
        with build_scoped_database(self.items, policy) as database:
            session = self._start(Stage.QUERY, prompt, database, {}, simulated=True)
            with self._lock:
                self.simulations.append((dict(candidate), prompt, session))
            self.run_agent(self.room.query_agent_dir, session)
        output = session.output
        if output is None:
            failure = {"code": "failed", "message": "the query agent exited without an output"}
            return {"output": None, "error": failure}
        if output.failed:
            failure = {"code": output.error_code, "message": output.error_message or ""}
            return {"output": None, "error": failure}
        return {"output": output.text if output.kind == "text" else output.data, "error": None}

    # --- agents ---

    def env(self, session: AgentSession) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(SDK_DIR),
            "PYTHONDONTWRITEBYTECODE": "1",
            "HIVEMIND_BRIDGE": str(session.socket_path),
            "HIVEMIND_SESSION": session.token,
            "HIVEMIND_ROLE": session.role,
        }

    def context(self, session: AgentSession) -> Context:
        """An SDK context for ``session``, to call an agent's functions in this process."""
        client = Bridge(str(session.socket_path), session.token, session.role, timeout=30)
        return Context(client, client.input())

    def run_agent(
        self, agent_dir: Path, session: AgentSession, timeout: float = TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run an agent's ``main.py`` as the runner would (a process with only the bridge variables)."""
        return subprocess.run(
            [sys.executable, "-B", str(agent_dir / "main.py")],
            env=self.env(session),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def request(
        self, session: AgentSession, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """One raw HTTP request on the session's socket: the status and the JSON answer."""
        connection = UnixHTTPConnection(str(session.socket_path), timeout=30)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Authorization": f"Bearer {session.token}"}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def close(self) -> None:
        with self._lock:
            servers, self._servers = self._servers, []
            databases, self._databases = self._databases, []
        for server in servers:
            server.close()
        for database in databases:
            database.close()
        self._gateway.close()


@contextmanager
def running_bridge(room: Room) -> Iterator[RoomBridge]:
    """A room's bridge, its sockets in a fresh short /tmp directory (AF_UNIX paths are limited)."""
    directory = Path(tempfile.mkdtemp(prefix="hm-agents-", dir="/tmp"))
    bridge = RoomBridge(room, directory)
    try:
        yield bridge
    finally:
        bridge.close()
        shutil.rmtree(directory, ignore_errors=True)


# --- scripted LLMs -------------------------------------------------------------------------------


def completion(content: str | None = None, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An OpenAI chat.completion body with one choice."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:8]}",
        "object": "chat.completion",
        "model": "scripted",
        "choices": [
            {"index": 0, "message": message, "finish_reason": "tool_calls" if tool_calls else "stop"}
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def tool_call(name: str, arguments: Mapping[str, Any], call_id: str = "call_1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def scripted(*replies: dict[str, Any] | Exception) -> LlmScript:
    """An LLM that answers with ``replies`` in order (an exception is raised instead of answered)."""
    queue = list(replies)

    def answer(_request: dict[str, Any]) -> dict[str, Any]:
        if not queue:
            raise LlmFailure("the script has no more replies")
        reply = queue.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    return answer


# --- the whole pipeline --------------------------------------------------------------------------


@dataclass
class PipelineRun:
    policy: dict[str, Any]
    raw: dict[str, Any]
    final: dict[str, Any]
    sessions: dict[str, AgentSession] = field(default_factory=dict)


def run_stage(bridge: RoomBridge, agent_dir: Path, session: AgentSession) -> dict[str, Any]:
    process = bridge.run_agent(agent_dir, session)
    assert process.returncode == 0, process.stderr
    return session.result


def run_pipeline(
    bridge: RoomBridge,
    prompt: str,
    *,
    scope_dir: Path = AGENTS_DIR / "default-scope",
    mediator_dir: Path = AGENTS_DIR / "default-mediator",
) -> PipelineRun:
    """scope -> query -> mediator, each stage's ``main.py`` as a process, wired as the runner wires them."""
    scope = bridge.open_session("scope", prompt)
    posted = run_stage(bridge, scope_dir, scope)["json"]
    policy = resolve_policy(posted, bridge.data_policy)
    query = bridge.open_session("query", prompt, policy=policy)
    raw = run_stage(bridge, bridge.room.query_agent_dir, query)
    mediator = bridge.open_session(
        "mediator",
        prompt,
        stage={
            "answer": raw,
            "output_rules": {"deny": list(policy.output.deny), "redact": list(policy.output.redact)},
        },
    )
    final = run_stage(bridge, mediator_dir, mediator)
    return PipelineRun(posted, raw, final, {"scope": scope, "query": query, "mediator": mediator})
