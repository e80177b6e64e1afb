"""A typed client for every bridge route (docs/agents.md, "Bridge routes").

The bridge is the only door out of an agent container: a Unix socket at ``$HIVEMIND_BRIDGE``,
HTTP/1.1, ``Authorization: Bearer $HIVEMIND_SESSION``. The bridge decides what each role may do; this
client only shapes requests and checks answers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from ._wire import array, count, flag, frozen, obj, opt_string, string
from .errors import BridgeUnavailable, ProtocolError
from .models import (
    ROLES,
    AgentInput,
    ArtifactRef,
    ChatCompletion,
    Item,
    ItemInfo,
    PolicyCheck,
    Schema,
    SimulationResult,
    SqlResult,
)
from .transport import DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_TIMEOUT_S, Transport

ENV_BRIDGE = "HIVEMIND_BRIDGE"
ENV_SESSION = "HIVEMIND_SESSION"
ENV_ROLE = "HIVEMIND_ROLE"

LOG_LEVELS = ("debug", "info", "warning", "error")
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SESSION_TOKEN = re.compile(r"[\x21-\x7e]{1,512}")
# AF_UNIX paths are limited to 108 bytes including the terminating NUL on Linux.
_MAX_SOCKET_PATH_BYTES = 107


def _expect_accepted(response: Any, where: str) -> None:
    if flag(obj(response, where), "accepted", where) is not True:
        raise ProtocolError(f"{where}: the bridge did not accept the request")


class Llm:
    """``bridge.llm``: OpenAI-compatible chat completions through the bridge, within the run's budget."""

    def __init__(self, transport: Transport):
        self._transport = transport

    def chat(
        self, messages: Sequence[Mapping[str, Any]], *, model: str | None = None, **options: Any
    ) -> ChatCompletion:
        """One chat completion. ``model`` may be omitted (the bridge picks the room's default).

        ``options`` are further OpenAI request fields (``temperature``, ``max_tokens``, ``tools``...).
        Streaming is not offered: the bridge counts tokens per completed call.
        """
        if isinstance(messages, str | bytes) or not messages:
            raise ValueError("messages must be a non-empty list of message objects")
        if options.get("stream"):
            raise ValueError("streaming is not supported through the bridge; omit stream=True")
        body: dict[str, Any] = {**options, "messages": [dict(message) for message in messages]}
        if model is not None:
            body["model"] = model
        response = self._transport.call("POST", "/v1/llm/chat/completions", json_body=body)
        return ChatCompletion.from_wire(response)


class Bridge:
    """The bridge client. Build it with :meth:`from_env` inside an agent container.

    Raises, for every call: :class:`~hivemind_agent.errors.BridgeUnavailable` (no socket),
    :class:`~hivemind_agent.errors.Denied` and subclasses (refused), :class:`InvalidRequest`
    (bad request), :class:`ProtocolError` (bad or oversized answer).
    """

    def __init__(
        self,
        socket_path: str,
        session: str,
        role: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ):
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if not _SESSION_TOKEN.fullmatch(session):
            raise ValueError("the session token must be 1-512 printable ASCII characters without spaces")
        if len(os.fsencode(socket_path)) > _MAX_SOCKET_PATH_BYTES:
            raise ValueError(f"the socket path is longer than {_MAX_SOCKET_PATH_BYTES} bytes: {socket_path}")
        if timeout <= 0 or max_response_bytes <= 0:
            raise ValueError("timeout and max_response_bytes must be positive")
        self.role = role
        self._transport = Transport(
            socket_path, session, timeout=timeout, max_response_bytes=max_response_bytes
        )
        self.llm = Llm(self._transport)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **options: Any) -> Bridge:
        """The bridge this container was started with, from ``HIVEMIND_BRIDGE/SESSION/ROLE``."""
        env = os.environ if environ is None else environ
        missing = [name for name in (ENV_BRIDGE, ENV_SESSION, ENV_ROLE) if not env.get(name)]
        if missing:
            raise BridgeUnavailable(
                f"{', '.join(missing)} not set: agents run under the Hivemind runner, which sets "
                f"{ENV_BRIDGE}, {ENV_SESSION} and {ENV_ROLE}"
            )
        try:
            return cls(env[ENV_BRIDGE], env[ENV_SESSION], env[ENV_ROLE], **options)
        except ValueError as exc:
            raise BridgeUnavailable(f"the bridge environment is invalid: {exc}") from None

    def __repr__(self) -> str:
        return f"Bridge(role={self.role!r}, socket_path={self._transport.socket_path!r})"

    # --- stage input and output -------------------------------------------------------------------

    def input(self) -> AgentInput:
        """This stage's input: role, prompt (if visible), rules, policy, schema, budgets, stage fields."""
        return AgentInput.from_wire(self._transport.call("GET", "/v1/input"))

    def output(self, answer: str | Mapping[str, Any]) -> None:
        """Post the stage's result, once: text, or a JSON object (the scope stage posts its ScopePolicy)."""
        if isinstance(answer, str):
            body: dict[str, Any] = {"text": answer}
        elif isinstance(answer, Mapping):
            body = {"json": dict(answer)}
        else:
            raise TypeError(f"output must be a str or a mapping, not {type(answer).__name__}")
        _expect_accepted(self._transport.call("POST", "/v1/output", json_body=body), "POST /v1/output")

    def report_failure(self, code: str, message: str) -> None:
        """Post that this stage failed, instead of an output. ``main`` does this for uncaught errors."""
        body = {"error": {"code": code, "message": message}}
        _expect_accepted(self._transport.call("POST", "/v1/output", json_body=body), "POST /v1/output")

    # --- data tools -------------------------------------------------------------------------------

    def schema(self) -> Schema:
        """The tables and columns this role may query, and the aggregation rule if one applies."""
        return Schema.from_wire(self._transport.call("GET", "/v1/tools/schema"), "GET /v1/tools/schema")

    def sql(self, query: str) -> SqlResult:
        """Run one SQL SELECT against the role's view of the room data."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query must be a non-empty SQL string")
        return SqlResult.from_wire(self._transport.call("POST", "/v1/tools/sql", json_body={"query": query}))

    def items(self) -> list[ItemInfo]:
        """The room items this role may read (metadata only)."""
        where = "GET /v1/tools/items"
        body = obj(self._transport.call("GET", "/v1/tools/items"), where)
        return [ItemInfo.from_wire(raw, where) for raw in array(body, "items", where)]

    def item(self, item_id: str) -> Item:
        """One item's content, after the room's allow-list and redaction."""
        if not isinstance(item_id, str) or not item_id:
            raise ValueError("item_id must be a non-empty string")
        where = "GET /v1/tools/items/{id}"
        body = obj(self._transport.call("GET", f"/v1/tools/items/{quote(item_id, safe='')}"), where)
        if string(body, "id", where) != item_id:
            raise ProtocolError(f"{where}: asked for item {item_id!r}, the bridge answered {body['id']!r}")
        text = opt_string(body, "text", where)
        encoded = opt_string(body, "base64", where)
        if (text is None) == (encoded is None):
            raise ProtocolError(f"{where}: exactly one of 'text' and 'base64' must be set")
        data = None
        if encoded is not None:
            try:
                data = base64.b64decode(encoded, validate=True)
            except binascii.Error as exc:
                raise ProtocolError(f"{where}: 'base64' is not valid base64 ({exc})") from None
        return Item(
            id=item_id,
            name=string(body, "name", where),
            content_type=string(body, "content_type", where),
            metadata=frozen(obj(body.get("metadata", {}), f"{where} metadata")),
            text=text,
            data=data,
        )

    # --- side outputs -----------------------------------------------------------------------------

    def artifact(
        self,
        name: str,
        data: bytes | bytearray | memoryview,
        *,
        content_type: str = "application/octet-stream",
    ) -> ArtifactRef:
        """Store a file next to the run's output (only where the room allows artifacts)."""
        if not isinstance(name, str) or not ARTIFACT_NAME.fullmatch(name):
            raise ValueError(
                "artifact names are 1-128 characters of letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("artifact data must be bytes (encode text explicitly)")
        payload = bytes(data)
        where = "PUT /v1/artifacts/{name}"
        body = obj(
            self._transport.call("PUT", f"/v1/artifacts/{name}", raw_body=payload, content_type=content_type),
            where,
        )
        stored = ArtifactRef(
            name=string(body, "name", where),
            size=count(body, "size", where),
            sha256=string(body, "sha256", where),
        )
        expected = ArtifactRef(name=name, size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
        if stored != expected:
            raise ProtocolError(f"{where}: the bridge stored {stored}, not what was sent ({expected})")
        return stored

    def simulate(self, policy: Mapping[str, Any], prompt: str) -> SimulationResult:
        """Scope stage only: run the room's query agent on ``prompt`` under a candidate ScopePolicy."""
        if not isinstance(policy, Mapping):
            raise TypeError("policy must be a mapping (a ScopePolicy as JSON)")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        body = {"policy": dict(policy), "prompt": prompt}
        return SimulationResult.from_wire(self._transport.call("POST", "/v1/simulate", json_body=body))

    def check_policy(self, policy: Mapping[str, Any], bound: Mapping[str, Any] | None = None) -> PolicyCheck:
        """Scope stage only: the runner's verdict on a candidate ScopePolicy for this room's data.

        Judged with the code the runner applies to the policy the stage posts: does it parse, does
        the data have its tables and columns, what does it allow beyond ``bound`` (when given) and the
        room's ``data_policy``, and what is left of it within the room's ``data_policy``.
        """
        if not isinstance(policy, Mapping):
            raise TypeError("policy must be a mapping (a ScopePolicy as JSON)")
        if bound is not None and not isinstance(bound, Mapping):
            raise TypeError("bound must be a mapping (a ScopePolicy as JSON) or None")
        body = {"policy": dict(policy), "bound": None if bound is None else dict(bound)}
        return PolicyCheck.from_wire(self._transport.call("POST", "/v1/policy/check", json_body=body))

    def log(self, message: str, *, level: str = "info", **fields: Any) -> None:
        """A structured log line for the run's operator log (never part of the output)."""
        if level not in LOG_LEVELS:
            raise ValueError(f"level must be one of {', '.join(LOG_LEVELS)}")
        body = {"level": level, "message": str(message), "fields": fields}
        _expect_accepted(self._transport.call("POST", "/v1/log", json_body=body), "POST /v1/log")
