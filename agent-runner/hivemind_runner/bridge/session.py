"""One stage's session: its token, its grants, what it is wired to, and what it produced.

A :class:`StageSession` is the transport-independent half of the bridge. The HTTP routes and the MCP
tools both call its operations, so both pass the same checks in the same order:

1. the session is still open (else ``409 stage_finished``);
2. the admission chain (:mod:`hivemind_runner.bridge.grants`): role grants, room egress, call limits,
   operator policies;
3. the request's own validation (unknown fields are ``400 invalid_request``);
4. the operation, against the stage's :class:`StageServices` only.

Nothing here knows about the run's other stages: the pipeline hands a session exactly the database,
LLM meter, simulator, policy checker and artifact store its role may use (the query stage's database
is built from the allowed projection only, and the session never sees the ScopePolicy, DESIGN §16.5-6).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from hivemind.admission import AdmissionChain, raise_for_decision
from hivemind.envelope import MAX_PROMPT_CHARS
from hivemind.errors import NotFound, PayloadTooLarge, RateLimited
from hivemind.models import Stage, StrictModel
from hivemind.policy import ScopePolicy, check_policy
from hivemind_runner.bridge.errors import ArtifactExists, InvalidRequest, StageFinished
from hivemind_runner.bridge.grants import Tool, ToolCall
from hivemind_runner.llm import RunLlm
from hivemind_runner.scoped import ScopedDatabase

MiB = 1024 * 1024
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_FAILURE_MESSAGE_CHARS = 2000
MAX_LOG_MESSAGE_CHARS = 4096
MAX_LOG_FIELDS = 32
MAX_CONTENT_TYPE_CHARS = 255


class BridgeLimits(StrictModel):
    """Bounds of one stage's bridge. Defaults are docs/agents.md's."""

    max_json_bytes: int = Field(default=1 * MiB, ge=1024, description="JSON request body")
    max_artifact_bytes: int = Field(default=16 * MiB, ge=1, description="one artifact")
    max_artifacts: int = Field(default=64, ge=0, le=256, description="artifacts per run")
    max_artifact_total_bytes: int = Field(default=64 * MiB, ge=0, description="all artifacts of a run")
    max_log_lines: int = Field(default=1000, ge=0)
    max_tool_calls: int = Field(default=10_000, ge=1, description="bridge calls per stage")
    max_connections: int = Field(default=16, ge=1, le=256, description="concurrent connections per socket")
    read_timeout_s: float = Field(default=30.0, gt=0, le=600, description="idle time on a connection")
    max_drain_bytes: int = Field(
        default=64 * MiB,
        ge=0,
        description="an oversized body up to this size is read and discarded so the "
        "client sees the 413; larger ones just close the connection",
    )


# --- what a stage produced ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageOutput:
    """The stage's one result: an answer (``text`` or ``json``) or a failure report."""

    kind: Literal["text", "json", "error"]
    text: str | None = None
    data: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = field(default=None, repr=False)

    @property
    def failed(self) -> bool:
        return self.kind == "error"

    def answer(self) -> dict[str, Any]:
        """The answer in the shape it was posted: ``{"text": ...}`` or ``{"json": ...}``."""
        if self.kind == "text":
            return {"text": self.text}
        if self.kind == "json":
            return {"json": self.data}
        raise ValueError("a failure report is not an answer")


@dataclass(frozen=True)
class StoredArtifact:
    name: str
    path: Path
    content_type: str
    size: int
    sha256: str


class ArtifactStore:
    """Files a query stage writes next to the output; one write per name, bounded in count and size."""

    def __init__(self, directory: Path, limits: BridgeLimits):
        self.directory = directory
        self._limits = limits
        self._lock = threading.Lock()
        self._stored: dict[str, StoredArtifact] = {}
        self._total = 0

    @property
    def stored(self) -> dict[str, StoredArtifact]:
        with self._lock:
            return dict(self._stored)

    def put(self, name: str, data: bytes, content_type: str) -> StoredArtifact:
        if not ARTIFACT_NAME.fullmatch(name):
            raise InvalidRequest("artifact names match [A-Za-z0-9][A-Za-z0-9._-]{0,127}")
        if len(data) > self._limits.max_artifact_bytes:
            raise PayloadTooLarge(f"an artifact is at most {self._limits.max_artifact_bytes} bytes")
        with self._lock:
            if name in self._stored:
                raise ArtifactExists(f"artifact {name} was already written")
            if len(self._stored) >= self._limits.max_artifacts:
                raise PayloadTooLarge(f"a run writes at most {self._limits.max_artifacts} artifacts")
            if self._total + len(data) > self._limits.max_artifact_total_bytes:
                raise PayloadTooLarge(
                    f"a run's artifacts total at most {self._limits.max_artifact_total_bytes} bytes"
                )
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = self.directory / name
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            stored = StoredArtifact(
                name=name,
                path=path,
                content_type=content_type,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
            self._stored[name] = stored
            self._total += len(data)
            return stored


Simulator = Callable[[Mapping[str, Any], str], dict[str, Any]]
"""``(candidate policy, prompt) -> {"output": ..., "error": ...}``; raises ``InvalidPolicy`` or
``SimulationLimit``. Provided by the pipeline for the scope stage only."""

PolicyChecker = Callable[[Mapping[str, Any], Mapping[str, Any] | None], dict[str, Any]]
"""``(candidate policy, bound or None) -> the verdict`` (:class:`hivemind.policy.PolicyCheck` as JSON);
raises ``InvalidPolicy``. Provided by the pipeline for the scope stage only (:func:`room_policy_checker`)."""


def room_policy_checker(
    schema: Mapping[str, Sequence[str]], data_policy: ScopePolicy | None
) -> PolicyChecker:
    """``POST /v1/policy/check`` for a room: the core's verdict (:func:`hivemind.policy.check_policy`)
    against the full data's ``schema`` (table -> columns) and the room's ``data_policy``, the same
    checks the policy the scope stage posts goes through."""

    def check(candidate: Mapping[str, Any], bound: Mapping[str, Any] | None) -> dict[str, Any]:
        return check_policy(candidate, schema, bound=bound, room_policy=data_policy).model_dump(mode="json")

    return check


@dataclass(frozen=True)
class StageServices:
    """What one stage's tools are wired to. A missing service means the tool has nothing to act on."""

    input_document: Mapping[str, Any]
    database: ScopedDatabase | None = None
    llm: RunLlm | None = None
    simulator: Simulator | None = None
    policy_checker: PolicyChecker | None = None
    artifacts: ArtifactStore | None = None
    artifacts_allowed: bool = False
    llm_allowed: bool = False
    # The stage whose meter counts this session's LLM calls (a simulation bills the scope stage).
    bill_to: Stage | None = None


# --- request parsing ---------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"the request holds the non-JSON number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # 1e400 parses as infinity, which no JSON answer could carry back out.
        raise InvalidRequest("the request holds a number too large for a float")
    return value


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A JSON request body that must be one object, with finite numbers only."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not UTF-8") from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not JSON: {exc.msg} at {exc.pos}") from None
    if not isinstance(value, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return value


def _only_fields(body: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(f"{where}: unknown field(s) {', '.join(unknown)}")


def _string(body: Mapping[str, Any], key: str, where: str, *, max_chars: int) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{where}: {key} must be a non-empty string")
    if len(value) > max_chars:
        raise InvalidRequest(f"{where}: {key} is longer than {max_chars} characters")
    return value


def _policy_object(body: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = body.get(key)
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}: {key} must be a JSON object (a ScopePolicy)")
    return value


# --- the session ---------------------------------------------------------------------------------------

SESSION_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")


def new_session_token() -> str:
    """A fresh session token: 256 random bits, URL-safe base64 (what a sandbox gets in HIVEMIND_SESSION)."""
    return secrets.token_urlsafe(32)


class StageSession:
    """The bridge state of one stage of one run. Thread-safe; every operation admits itself first."""

    def __init__(
        self,
        *,
        run_id: str,
        stage: Stage,
        services: StageServices,
        chain: AdmissionChain[ToolCall],
        limits: BridgeLimits | None = None,
        simulated: bool = False,
        token: str | None = None,
    ):
        if token is not None and not SESSION_TOKEN.fullmatch(token):
            raise ValueError("a session token is 43 URL-safe base64 characters (new_session_token())")
        self.run_id = run_id
        self.stage = stage
        self.simulated = simulated
        self.services = services
        self.limits = limits or BridgeLimits()
        self._chain = chain
        self._token = token or new_session_token()
        self._lock = threading.Lock()
        self._output: StageOutput | None = None
        self._closed = False
        self._tool_calls = 0
        self._counts: dict[str, int] = {}
        self._logs: list[dict[str, Any]] = []
        # Set when the stage is over (output accepted, or closed by the runner).
        self.finished = threading.Event()

    def __repr__(self) -> str:
        return f"StageSession(run_id={self.run_id!r}, stage={self.stage.value!r}, simulated={self.simulated})"

    # --- identity ---

    @property
    def token(self) -> str:
        """The session token the sandbox gets in ``HIVEMIND_SESSION``."""
        return self._token

    def authenticates(self, presented: str | None) -> bool:
        if presented is None:
            return False
        return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), self._token.encode())

    # --- state the pipeline reads ---

    @property
    def output(self) -> StageOutput | None:
        with self._lock:
            return self._output

    @property
    def tool_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def logs(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._logs)

    @property
    def open(self) -> bool:
        with self._lock:
            return not self._closed and self._output is None

    def close(self) -> None:
        """End the session: every further call answers ``409 stage_finished``."""
        with self._lock:
            self._closed = True
        self.finished.set()

    def check_open(self) -> None:
        if not self.open:
            raise StageFinished("this stage has finished; the session accepts no more calls")

    # --- admission ---

    def admit(self, tool: Tool, request_bytes: int) -> None:
        """Open check, then the admission chain; counts the call when it is admitted."""
        self.check_open()
        with self._lock:
            context = ToolCall(
                run_id=self.run_id,
                stage=self.stage,
                tool=tool,
                simulated=self.simulated,
                request_bytes=request_bytes,
                artifacts_allowed=self.services.artifacts_allowed and self.services.artifacts is not None,
                llm_allowed=self.services.llm_allowed and self.services.llm is not None,
                tool_calls=self._tool_calls,
                log_lines=len(self._logs),
            )
        raise_for_decision(self._chain.evaluate(context))
        with self._lock:
            self._tool_calls += 1
            self._counts[tool.value] = self._counts.get(tool.value, 0) + 1

    # --- operations (each admits itself) ---

    def get_input(self) -> dict[str, Any]:
        self.admit(Tool.INPUT, 0)
        return dict(self.services.input_document)

    def post_output(self, body: Mapping[str, Any], request_bytes: int) -> dict[str, Any]:
        self.admit(Tool.OUTPUT, request_bytes)
        where = "POST /v1/output"
        if len(body) != 1 or next(iter(body)) not in ("text", "json", "error"):
            raise InvalidRequest(f"{where}: the body holds exactly one of text, json and error")
        key, value = next(iter(body.items()))
        if key == "text":
            if not isinstance(value, str):
                raise InvalidRequest(f"{where}: text must be a string")
            result = StageOutput(kind="text", text=value)
        elif key == "json":
            if not isinstance(value, dict):
                raise InvalidRequest(f"{where}: json must be a JSON object")
            result = StageOutput(kind="json", data=value)
        else:
            if not isinstance(value, dict):
                raise InvalidRequest(f"{where}: error must be an object with code and message")
            _only_fields(value, {"code", "message"}, where)
            code, message = value.get("code"), value.get("message")
            if not isinstance(code, str) or not ERROR_CODE.fullmatch(code):
                raise InvalidRequest(f"{where}: error.code must match {ERROR_CODE.pattern}")
            if not isinstance(message, str) or len(message) > MAX_FAILURE_MESSAGE_CHARS:
                raise InvalidRequest(f"{where}: error.message must be a string of at most 2000 characters")
            result = StageOutput(kind="error", error_code=code, error_message=message)
        with self._lock:
            if self._output is not None or self._closed:
                raise StageFinished("an output or failure was already accepted")
            self._output = result
        self.finished.set()
        return {"accepted": True}

    def _database(self) -> ScopedDatabase:
        if self.services.database is None:
            raise NotFound("this stage has no data")
        return self.services.database

    def get_schema(self) -> dict[str, Any]:
        self.admit(Tool.SCHEMA, 0)
        return self._database().schema(role=self.stage).model_dump(mode="json")

    def run_sql(self, body: Mapping[str, Any], request_bytes: int) -> dict[str, Any]:
        self.admit(Tool.SQL, request_bytes)
        _only_fields(body, {"query"}, "POST /v1/tools/sql")
        query = _string(body, "query", "POST /v1/tools/sql", max_chars=self.limits.max_json_bytes)
        return self._database().query(query, role=self.stage).model_dump(mode="json")

    def list_items(self) -> dict[str, Any]:
        self.admit(Tool.ITEMS, 0)
        infos = self._database().list_items(role=self.stage)
        return {"items": [info.model_dump(mode="json") for info in infos]}

    def read_item(self, item_id: str) -> dict[str, Any]:
        self.admit(Tool.ITEM, len(item_id))
        return self._database().read_item(item_id, role=self.stage).model_dump(mode="json")

    def chat_completion(self, body: Mapping[str, Any], request_bytes: int) -> dict[str, Any]:
        self.admit(Tool.LLM, request_bytes)
        if self.services.llm is None:
            raise NotFound("this stage has no LLM egress")
        return self.services.llm.complete(self.services.bill_to or self.stage, body)

    def put_artifact(self, name: str, data: bytes, content_type: str | None) -> dict[str, Any]:
        self.admit(Tool.ARTIFACT, len(data))
        if self.services.artifacts is None:
            raise NotFound("this stage has no artifact store")
        kind = (content_type or "application/octet-stream").strip()
        if len(kind) > MAX_CONTENT_TYPE_CHARS or not kind.isprintable():
            raise InvalidRequest("Content-Type is not a printable media type of at most 255 characters")
        stored = self.services.artifacts.put(name, data, kind)
        return {"name": stored.name, "size": stored.size, "sha256": stored.sha256}

    def simulate(self, body: Mapping[str, Any], request_bytes: int) -> dict[str, Any]:
        self.admit(Tool.SIMULATE, request_bytes)
        where = "POST /v1/simulate"
        _only_fields(body, {"policy", "prompt"}, where)
        policy = _policy_object(body, "policy", where)
        prompt = _string(body, "prompt", where, max_chars=MAX_PROMPT_CHARS)
        if self.services.simulator is None:
            raise NotFound("this stage cannot simulate")
        return self.services.simulator(policy, prompt)

    def check_policy(self, body: Mapping[str, Any], request_bytes: int) -> dict[str, Any]:
        self.admit(Tool.POLICY_CHECK, request_bytes)
        where = "POST /v1/policy/check"
        _only_fields(body, {"policy", "bound"}, where)
        policy = _policy_object(body, "policy", where)
        bound = None if body.get("bound") is None else _policy_object(body, "bound", where)
        if self.services.policy_checker is None:
            raise NotFound("this stage cannot check policies")
        return self.services.policy_checker(policy, bound)

    def log(self, body: Mapping[str, Any], request_bytes: int) -> dict[str, Any]:
        self.admit(Tool.LOG, request_bytes)
        where = "POST /v1/log"
        _only_fields(body, {"level", "message", "fields"}, where)
        level = body.get("level", "info")
        if level not in LOG_LEVELS:
            raise InvalidRequest(f"{where}: level is one of {', '.join(LOG_LEVELS)}")
        message = body.get("message")
        if not isinstance(message, str) or len(message) > MAX_LOG_MESSAGE_CHARS:
            raise InvalidRequest(
                f"{where}: message must be a string of at most {MAX_LOG_MESSAGE_CHARS} characters"
            )
        fields = body.get("fields", {})
        if not isinstance(fields, dict) or len(fields) > MAX_LOG_FIELDS:
            raise InvalidRequest(f"{where}: fields must be an object of at most {MAX_LOG_FIELDS} keys")
        with self._lock:
            if len(self._logs) >= self.limits.max_log_lines:
                raise RateLimited(f"a stage may log at most {self.limits.max_log_lines} lines")
            self._logs.append({"level": level, "message": message, "fields": fields})
        return {"accepted": True}
