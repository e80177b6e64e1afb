"""A fake runner bridge for agent tests: every docs/agents.md route, over a Unix socket, on real SQLite.

It plays the runner's side of the contract closely enough that an agent's ``main.py`` runs against it
unchanged: sessions per stage with the role table enforced, the scope stage reading the full data,
the query stage reading an in-memory database built from the allowed projection only (DESIGN §16.6),
its SQL checked with sqlglot (a single SELECT, allowed aggregate functions, ``HAVING COUNT(*) >= k``
added), items filtered and redacted by the policy, ``simulate`` running the room's query agent as a
subprocess under a candidate policy, ``policy/check`` answering with the core's verdict, and a scripted
LLM.

Policies are parsed and judged with the core library (``hivemind.policy``), so a policy an agent posts
or asks about is checked by the same code the runner uses.
"""

from __future__ import annotations

import json
import os
import shutil
import socketserver
import sqlite3
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import sqlglot
from hivemind.errors import InvalidPolicy
from hivemind.policy import ScopePolicy, check_policy, parse_policy
from hivemind_agent import Bridge, Context
from sqlglot import exp

REPO = Path(__file__).resolve().parents[2]
SDK_DIR = REPO / "agents" / "sdk"
AGENTS_DIR = REPO / "agents"
SCOPE_ROW_CAP = 1000
MAX_SIMULATIONS = 5

LlmScript = Callable[[dict[str, Any]], dict[str, Any]]


class LlmFailure(Exception):
    """Raised by a scripted LLM to make the bridge answer 502 llm_provider_error."""


class BridgeRefusal(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class FakeItem:
    id: str
    name: str
    text: str
    metadata: dict[str, str] = field(default_factory=dict)
    content_type: str = "text/plain"


@dataclass
class Room:
    """The room behind the bridge: data, texts, items, and what the stages are allowed."""

    tables: dict[str, tuple[list[tuple[str, str]], list[tuple[Any, ...]]]]
    rules: str = ""
    policy_text: str = ""
    items: list[FakeItem] = field(default_factory=list)
    data_policy: dict[str, Any] | None = None
    llm_providers: list[str] = field(default_factory=list)
    llm: LlmScript | None = None
    llm_calls: int = 0
    query_agent_dir: Path = AGENTS_DIR / "default-query"
    query_agent_sealed: bool = False
    prompt_visible: bool = True


@dataclass
class Session:
    token: str
    role: str
    prompt: str | None
    policy: ScopePolicy | None = None
    stage: dict[str, Any] = field(default_factory=dict)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    sql: list[str] = field(default_factory=list)
    llm_requests: list[dict[str, Any]] = field(default_factory=list)
    scoped_db: sqlite3.Connection | None = None

    @property
    def result(self) -> dict[str, Any]:
        """The one output or failure the stage posted."""
        assert len(self.outputs) == 1, f"expected exactly one posted output, got {self.outputs}"
        return self.outputs[0]


def sqlite_db(
    tables: Mapping[str, tuple[list[tuple[str, str]], list[tuple[Any, ...]]]],
) -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", check_same_thread=False)
    for name, (columns, rows) in tables.items():
        declared = ", ".join(f'"{column}" {kind}' for column, kind in columns)
        db.execute(f'CREATE TABLE "{name}" ({declared})')
        marks = ", ".join("?" for _ in columns)
        db.executemany(f'INSERT INTO "{name}" VALUES ({marks})', rows)
    return db


def scoped_sql(query: str, policy: ScopePolicy) -> str:
    """The runner's query-stage SQL rules (docs/agents.md): what may run, with HAVING added."""
    try:
        statements = [statement for statement in sqlglot.parse(query, read="sqlite") if statement is not None]
    except sqlglot.errors.SqlglotError as exc:
        raise BridgeRefusal(400, "sql_invalid", f"the query does not parse: {exc}") from None
    if len(statements) != 1 or not isinstance(statements[0], exp.Select):
        raise BridgeRefusal(400, "sql_invalid", "only a single SELECT statement is allowed")
    tree = statements[0]
    if any(isinstance(node, exp.Select) and node is not tree for node in tree.walk()):
        raise BridgeRefusal(403, "sql_denied", "subqueries are not allowed")
    if not policy.aggregate.required:
        return tree.sql(dialect="sqlite")
    if tree.find(exp.Window) is not None:
        raise BridgeRefusal(403, "sql_denied", "window functions are not allowed")
    aggregates = list(tree.find_all(exp.AggFunc))
    if not aggregates:
        raise BridgeRefusal(403, "sql_denied", "this room requires aggregate queries")
    allowed = {function.value for function in policy.aggregate.functions}
    for aggregate in aggregates:
        if aggregate.key.upper() not in allowed:
            raise BridgeRefusal(403, "sql_denied", f"{aggregate.key.upper()} is not an allowed function")
    group = tree.args.get("group")
    keys: set[str] = set()
    for key in group.expressions if group else []:
        keys |= {key.sql(dialect="sqlite"), key.alias_or_name}
    for projection in tree.expressions:
        inner = projection.this if isinstance(projection, exp.Alias) else projection
        if inner.find(exp.AggFunc) is None and not (
            {projection.alias_or_name, inner.sql(dialect="sqlite")} & keys
        ):
            raise BridgeRefusal(
                403, "sql_denied", f"{projection.sql(dialect='sqlite')} is neither aggregated nor grouped"
            )
    return tree.having(f"COUNT(*) >= {policy.aggregate.min_group_size}", dialect="sqlite").sql(
        dialect="sqlite"
    )


class FakeBridge:
    """One socket, many sessions (one per stage). Use :func:`running_bridge` to get a started one."""

    def __init__(self, room: Room, socket_path: str):
        self.room = room
        self.socket_path = socket_path
        self.sessions: dict[str, Session] = {}
        self.simulations: list[tuple[dict[str, Any], str, Session]] = []
        self.policy_checks: list[dict[str, Any]] = []
        self.llm_calls_used = 0
        self._lock = threading.RLock()
        self._db = sqlite_db(room.tables)

    # --- sessions and agents ---------------------------------------------------------------------

    def open_session(
        self,
        role: str,
        prompt: str | None = None,
        *,
        policy: Mapping[str, Any] | ScopePolicy | None = None,
        stage: Mapping[str, Any] | None = None,
    ) -> Session:
        token = f"hms_{uuid.uuid4().hex}"
        session = Session(
            token=token,
            role=role,
            prompt=prompt,
            policy=None if policy is None else parse_policy(policy),
            stage=dict(stage or {}),
        )
        if role == "scope":
            session.stage = {
                "prompt_visible": self.room.prompt_visible,
                "data_policy": self.room.data_policy,
                "query_agent": self.query_agent_stage(),
                **session.stage,
            }
        self.sessions[token] = session
        return session

    def query_agent_stage(self) -> dict[str, Any]:
        directory = self.room.query_agent_dir
        files = None
        if not self.room.query_agent_sealed:
            files = {path.name: path.read_text() for path in sorted(directory.iterdir()) if path.is_file()}
        return {"agent_id": "agt_query", "digest": "0" * 64, "visibility": "sealed" if files is None else
                "inspectable", "files": files}  # fmt: skip

    def env(self, session: Session) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(SDK_DIR),
            "PYTHONDONTWRITEBYTECODE": "1",
            "HIVEMIND_BRIDGE": self.socket_path,
            "HIVEMIND_SESSION": session.token,
            "HIVEMIND_ROLE": session.role,
        }

    def context(self, session: Session) -> Context:
        """An SDK context for ``session``, to call an agent's functions in this process."""
        client = Bridge(self.socket_path, session.token, session.role, timeout=30)
        return Context(client, client.input())

    def run_agent(
        self, agent_dir: Path, session: Session, timeout: float = 60
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

    # --- inputs and schemas ----------------------------------------------------------------------

    def _columns(self, table: str) -> list[tuple[str, str]]:
        return list(self.room.tables[table][0])

    def full_schema(self) -> dict[str, Any]:
        return {
            "tables": [
                {
                    "name": name,
                    "columns": [{"name": c, "type": t} for c, t in columns],
                    "row_count": len(rows),
                }
                for name, (columns, rows) in self.room.tables.items()
            ],
            "aggregate": None,
            "max_rows": None,
        }

    def scoped_schema(self, policy: ScopePolicy) -> dict[str, Any]:
        tables = []
        for name, table_policy in policy.tables.items():
            types = dict(self._columns(name))
            tables.append(
                {
                    "name": name,
                    "columns": [{"name": column, "type": types[column]} for column in table_policy.columns],
                    "row_count": None,
                }
            )
        aggregate = policy.aggregate
        return {
            "tables": tables,
            "aggregate": {
                "required": aggregate.required,
                "min_group_size": aggregate.min_group_size,
                "functions": [function.value for function in aggregate.functions],
            },
            "max_rows": policy.max_rows,
        }

    def schema_for(self, session: Session) -> dict[str, Any] | None:
        if session.role == "scope":
            return self.full_schema()
        if session.role == "query":
            assert session.policy is not None, "a query session needs a policy"
            return self.scoped_schema(session.policy)
        return None

    def input_for(self, session: Session) -> dict[str, Any]:
        prompt = session.prompt
        if session.role == "scope" and not self.room.prompt_visible:
            prompt = None
        return {
            "role": session.role,
            "prompt": prompt,
            "rules": self.room.rules,
            "policy": self.room.policy_text,
            "schema": self.schema_for(session),
            "budgets": {
                "timeout_s": 60,
                "llm_calls": max(0, self.room.llm_calls - self.llm_calls_used),
                "tokens": 20000,
                "memory_mb": 256,
            },
            "llm_providers": list(self.room.llm_providers),
            "artifacts_allowed": False,
            "stage": session.stage,
        }

    # --- tools -----------------------------------------------------------------------------------

    def _scoped_db(self, session: Session) -> sqlite3.Connection:
        if session.scoped_db is None:
            policy = session.policy
            assert policy is not None
            db = sqlite3.connect(":memory:", check_same_thread=False)
            for name, table_policy in policy.tables.items():
                types = dict(self._columns(name))
                columns = ", ".join(f'"{column}"' for column in table_policy.columns)
                db.execute(
                    f'CREATE TABLE "{name}" ({", ".join(f"{c} {types[c]}" for c in table_policy.columns)})'
                )
                where = table_policy.where_sql()
                rows = self._db.execute(
                    f'SELECT {columns} FROM "{name}"' + (f" WHERE {where}" if where else "")
                ).fetchall()
                db.executemany(
                    f'INSERT INTO "{name}" VALUES ({", ".join("?" for _ in table_policy.columns)})', rows
                )
            session.scoped_db = db
        return session.scoped_db

    def sql(self, session: Session, query: str) -> dict[str, Any]:
        session.sql.append(query)
        if session.role == "scope":
            db, sql, cap = self._db, query, SCOPE_ROW_CAP
        else:
            assert session.policy is not None
            db, sql, cap = (
                self._scoped_db(session),
                scoped_sql(query, session.policy),
                session.policy.max_rows,
            )
        try:
            cursor = db.execute(sql)
            rows = cursor.fetchmany(cap + 1)
        except sqlite3.Error as exc:
            raise BridgeRefusal(400, "sql_invalid", f"SQLite: {exc}") from None
        columns = [description[0] for description in cursor.description or []]
        return {"columns": columns, "rows": [list(row) for row in rows[:cap]], "truncated": len(rows) > cap}

    def visible_items(self, session: Session) -> list[FakeItem]:
        if session.role == "scope":
            return list(self.room.items)
        assert session.policy is not None
        return [item for item in self.room.items if session.policy.items.allows(item.id, item.metadata)]

    def item(self, session: Session, item_id: str) -> dict[str, Any]:
        for item in self.visible_items(session):
            if item.id == item_id:
                text = item.text if session.role == "scope" else session.policy.items.redact_text(item.text)  # type: ignore[union-attr]
                return {"id": item.id, "name": item.name, "content_type": item.content_type,
                        "metadata": item.metadata, "text": text, "base64": None}  # fmt: skip
        raise BridgeRefusal(404, "not_found", f"no item {item_id}")

    def llm(self, session: Session, body: dict[str, Any]) -> dict[str, Any]:
        if not self.room.llm_providers or self.room.llm is None:
            raise BridgeRefusal(403, "provider_not_allowed", "the room allows no LLM provider")
        with self._lock:
            if self.llm_calls_used >= self.room.llm_calls:
                raise BridgeRefusal(429, "budget_exceeded", "no LLM calls left in this run")
            self.llm_calls_used += 1
        session.llm_requests.append(body)
        try:
            return self.room.llm(body)
        except LlmFailure as exc:
            raise BridgeRefusal(502, "llm_provider_error", str(exc)) from None

    def check_policy(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/policy/check``: the core's verdict, as the runner gives it."""
        room_policy = None if self.room.data_policy is None else parse_policy(self.room.data_policy)
        schema = {name: [column for column, _ in columns] for name, (columns, _) in self.room.tables.items()}
        try:
            verdict = check_policy(body["policy"], schema, bound=body.get("bound"), room_policy=room_policy)
        except InvalidPolicy as exc:
            raise BridgeRefusal(400, "invalid_policy", exc.message) from None
        return verdict.model_dump(mode="json")

    def simulate(self, body: dict[str, Any]) -> dict[str, Any]:
        verdict = self.check_policy({"policy": body["policy"]})
        if not verdict["valid"] or not verdict["narrower_than_room"]:
            reasons = [f"{e['path']}: {e['message']}" for e in verdict["errors"]] + [
                w["message"] for w in verdict["widenings"]
            ]
            raise BridgeRefusal(400, "invalid_policy", "; ".join(reasons))
        policy = parse_policy(verdict["policy"])
        if len(self.simulations) >= MAX_SIMULATIONS:
            raise BridgeRefusal(429, "budget_exceeded", "no simulations left in this run")
        session = self.open_session("query", str(body["prompt"]), policy=policy)
        self.simulations.append((body["policy"], body["prompt"], session))
        self.run_agent(self.room.query_agent_dir, session)
        posted = (
            session.outputs[0]
            if session.outputs
            else {"error": {"code": "agent_error", "message": "no output"}}
        )
        if "error" in posted:
            return {"output": None, "error": posted["error"]}
        return {"output": posted.get("text", posted.get("json")), "error": None}

    # --- routing ---------------------------------------------------------------------------------

    ROLE_ROUTES = {
        ("GET", "/v1/tools/schema"): {"scope", "query"},
        ("POST", "/v1/tools/sql"): {"scope", "query"},
        ("GET", "/v1/tools/items"): {"scope", "query"},
        ("POST", "/v1/simulate"): {"scope"},
        ("POST", "/v1/policy/check"): {"scope"},
    }

    def handle(self, method: str, path: str, authorization: str | None, raw: bytes) -> tuple[int, Any]:
        token = (authorization or "").removeprefix("Bearer ")
        session = self.sessions.get(token)
        if session is None:
            return 401, {"error": "unauthenticated", "message": "unknown session"}
        if session.outputs:
            return 409, {"error": "stage_finished", "message": "the stage already posted its output"}
        body: Any = json.loads(raw) if raw else None
        route = (method, "/v1/tools/items" if path.startswith("/v1/tools/items") else path)
        if route in self.ROLE_ROUTES and session.role not in self.ROLE_ROUTES[route]:
            return 403, {"error": "not_allowed_for_role", "message": f"{path} is closed to {session.role}"}
        try:
            return 200, self._route(session, method, path, body)
        except BridgeRefusal as refusal:
            return refusal.status, {"error": refusal.code, "message": refusal.message}

    def _route(self, session: Session, method: str, path: str, body: Any) -> Any:
        if (method, path) == ("GET", "/v1/input"):
            return self.input_for(session)
        if (method, path) == ("POST", "/v1/output"):
            if (
                not isinstance(body, dict)
                or len(body) != 1
                or next(iter(body)) not in ("text", "json", "error")
            ):
                raise BridgeRefusal(400, "invalid_request", "exactly one of text, json, error")
            session.outputs.append(body)
            return {"accepted": True}
        if (method, path) == ("GET", "/v1/tools/schema"):
            return self.schema_for(session)
        if (method, path) == ("POST", "/v1/tools/sql"):
            return self.sql(session, body["query"])
        if (method, path) == ("GET", "/v1/tools/items"):
            return {"items": [{"id": i.id, "name": i.name, "content_type": i.content_type,
                               "size": len(i.text.encode()), "metadata": i.metadata}
                              for i in self.visible_items(session)]}  # fmt: skip
        if method == "GET" and path.startswith("/v1/tools/items/"):
            return self.item(session, unquote(path.removeprefix("/v1/tools/items/")))
        if (method, path) == ("POST", "/v1/llm/chat/completions"):
            return self.llm(session, body)
        if (method, path) == ("POST", "/v1/simulate"):
            return self.simulate(body)
        if (method, path) == ("POST", "/v1/policy/check"):
            self.policy_checks.append(body)
            return self.check_policy(body)
        if (method, path) == ("POST", "/v1/log"):
            session.logs.append(body)
            return {"accepted": True}
        if method == "PUT" and path.startswith("/v1/artifacts/"):
            raise BridgeRefusal(403, "artifacts_disabled", "this room does not allow artifacts")
        raise BridgeRefusal(404, "not_found", f"no route {method} {path}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _serve(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, body = self.server.fake.handle(
            self.command, self.path, self.headers.get("Authorization"), raw
        )
        encoded = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(encoded)))
        self.end_headers()
        self.wfile.write(encoded)

    do_GET = do_POST = do_PUT = _serve


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    fake: FakeBridge


@contextmanager
def running_bridge(room: Room) -> Iterator[FakeBridge]:
    """A started fake bridge on a fresh socket (in a short /tmp path: AF_UNIX paths are limited)."""
    directory = tempfile.mkdtemp(prefix="hm-agents-", dir="/tmp")
    path = os.path.join(directory, "bridge.sock")
    fake = FakeBridge(room, path)
    server = _Server(path, _Handler)
    server.fake = fake
    # The Docker test's container user (uid 10001) must be able to connect; the directory stays 0700.
    os.chmod(path, 0o666)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
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
        "model": "fake/scripted",
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
    sessions: dict[str, Session]


def run_stage(bridge: FakeBridge, agent_dir: Path, session: Session) -> dict[str, Any]:
    process = bridge.run_agent(agent_dir, session)
    assert process.returncode == 0, process.stderr
    return session.result


def run_pipeline(
    bridge: FakeBridge,
    prompt: str,
    *,
    scope_dir: Path = AGENTS_DIR / "default-scope",
    mediator_dir: Path = AGENTS_DIR / "default-mediator",
) -> PipelineRun:
    """scope -> query -> mediator, each stage's ``main.py`` as a process, wired as the runner wires them."""
    scope = bridge.open_session("scope", prompt)
    policy = run_stage(bridge, scope_dir, scope)["json"]
    query = bridge.open_session("query", prompt, policy=policy)
    raw = run_stage(bridge, bridge.room.query_agent_dir, query)
    output = parse_policy(policy).output
    mediator = bridge.open_session(
        "mediator",
        prompt,
        stage={"answer": raw, "output_rules": {"deny": list(output.deny), "redact": list(output.redact)}},
    )
    final = run_stage(bridge, mediator_dir, mediator)
    return PipelineRun(policy, raw, final, {"scope": scope, "query": query, "mediator": mediator})
