"""The bridge's HTTP/1.1 server on one stage's Unix socket (docs/agents.md, docs/bridge.md).

One :class:`BridgeServer` per stage (and per simulation): its own socket, its own session token, its
own threads. Every request is authenticated first (constant-time token comparison), then routed;
bodies are bounded before they are read (1 MiB of JSON, 16 MiB per artifact), and an oversized body is
read and discarded up to a bound so the client sees its ``413`` instead of a broken pipe. Each
connection carries one request (``Connection: close``) and idles at most ``read_timeout_s``; at most
``max_connections`` are served at once, so an agent cannot tie up the runner's threads.

The server never logs request content: agents' requests carry room data.
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from hivemind.errors import NotFound, PayloadTooLarge, Unauthenticated
from hivemind_runner.bridge.errors import InvalidRequest, MethodNotAllowed, wire_error
from hivemind_runner.bridge.mcp import McpEndpoint
from hivemind_runner.bridge.session import BridgeLimits, StageSession, new_session_token, parse_json_object

logger = logging.getLogger(__name__)

# AF_UNIX paths are at most 108 bytes including the terminating NUL on Linux.
MAX_SOCKET_PATH_BYTES = 107
MAX_RESPONSE_BYTES = 16 * 1024 * 1024 - 64 * 1024
_DRAIN_CHUNK = 256 * 1024
_TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: 74\r\n"
    b"Connection: close\r\n\r\n"
    b'{"error":"rate_limited","message":"too many concurrent bridge connections"}'
)

Route = Callable[["_Handler", str], tuple[int, dict[str, Any] | None, dict[str, str]]]


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # Connections made before the session is served wait here (the agent's first call blocks meanwhile).
    request_queue_size = 16
    bridge: BridgeServer  # set when serving starts; no handler runs before

    def __init__(self, path: str, max_connections: int):
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(path, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(_TOO_MANY_CONNECTIONS)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; its locals may hold request content.
        logger.error("bridge connection handler failed")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hivemind-bridge"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        self.timeout = self.server.bridge.session.limits.read_timeout_s
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        """Request lines are not logged: paths carry item ids and artifact names."""

    # The stdlib calls this for requests it cannot parse (bad request line, headers too long...).
    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        status = 405 if code == 501 else code
        error = {405: "method_not_allowed", 413: "payload_too_large"}.get(status, "invalid_request")
        self.close_connection = True
        self._send(status, {"error": error, "message": message or "the request could not be parsed"}, {})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    # --- plumbing ---

    def _send(self, status: int, body: dict[str, Any] | None, headers: dict[str, str]) -> None:
        payload = b""
        if body is not None:
            try:
                payload = json.dumps(
                    body, ensure_ascii=False, allow_nan=False, separators=(",", ":")
                ).encode()
            except (TypeError, ValueError):
                status, payload = 500, b'{"error":"internal_error","message":"the answer is not JSON"}'
            if len(payload) > MAX_RESPONSE_BYTES:
                status = 500
                payload = b'{"error":"internal_error","message":"the answer is larger than the bridge sends"}'
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        if payload:
            self.wfile.write(payload)
        self.close_connection = True

    def _declared_length(self) -> int:
        if self.headers.get("Transfer-Encoding") is not None:
            raise InvalidRequest("chunked bodies are not accepted: send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return 0
        if not raw.isdigit():
            raise InvalidRequest("Content-Length is not a number")
        return int(raw)

    def _discard(self, length: int) -> None:
        """Read and drop ``length`` bytes (bounded), so the client can read our answer."""
        self._consumed = True
        limit = self.server.bridge.session.limits.max_drain_bytes
        if length > limit:
            self.close_connection = True
            return
        left = length
        while left > 0:
            chunk = self.rfile.read(min(_DRAIN_CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)

    def read_body(self, cap: int) -> bytes:
        length = self._declared_length()
        self._consumed = True
        if length > cap:
            self._discard(length)
            raise PayloadTooLarge(f"the request body is {length} bytes; the limit is {cap}")
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            raise InvalidRequest("the request body ended early")
        return body

    def read_json(self) -> tuple[dict[str, Any], int]:
        raw = self.read_body(self.server.bridge.session.limits.max_json_bytes)
        return parse_json_object(raw), len(raw)

    def _authenticate(self) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or not self.server.bridge.session.authenticates(token):
            raise Unauthenticated(
                "a valid session token is required (Authorization: Bearer $HIVEMIND_SESSION)"
            )

    def _dispatch(self, method: str) -> None:
        self._consumed = False
        try:
            try:
                self._authenticate()
                path = urlsplit(self.path).path
                route = _resolve(method, path)
                session = self.server.bridge.session
                session.check_open()
                status, body, headers = route(self, path)
            except BaseException:
                # Whatever went wrong, consume what the client sends so it can read the answer.
                if not self._consumed:
                    try:
                        self._discard(self._declared_length())
                    except InvalidRequest:
                        self.close_connection = True
                raise
        except Exception as exc:
            status, body = wire_error(exc)
            headers = {}
        try:
            self._send(status, body, headers)
        except OSError:
            self.close_connection = True


# --- routes ---------------------------------------------------------------------------------------------

_Result = tuple[int, dict[str, Any] | None, dict[str, str]]


def _ok(body: dict[str, Any], status: int = 200) -> _Result:
    return status, body, {}


def _input(handler: _Handler, path: str) -> _Result:
    handler.read_body(0)
    return _ok(handler.server.bridge.session.get_input())


def _output(handler: _Handler, path: str) -> _Result:
    body, size = handler.read_json()
    return _ok(handler.server.bridge.session.post_output(body, size))


def _schema(handler: _Handler, path: str) -> _Result:
    handler.read_body(0)
    return _ok(handler.server.bridge.session.get_schema())


def _sql(handler: _Handler, path: str) -> _Result:
    body, size = handler.read_json()
    return _ok(handler.server.bridge.session.run_sql(body, size))


def _items(handler: _Handler, path: str) -> _Result:
    handler.read_body(0)
    return _ok(handler.server.bridge.session.list_items())


def _item(handler: _Handler, path: str) -> _Result:
    handler.read_body(0)
    raw = path.removeprefix(_ITEM_PREFIX)
    item_id = unquote(raw, errors="strict") if raw else ""
    if not item_id or "/" in raw:
        raise InvalidRequest("GET /v1/tools/items/{id}: one percent-encoded item id")
    return _ok(handler.server.bridge.session.read_item(item_id))


def _llm(handler: _Handler, path: str) -> _Result:
    body, size = handler.read_json()
    return _ok(handler.server.bridge.session.chat_completion(body, size))


def _artifact(handler: _Handler, path: str) -> _Result:
    session = handler.server.bridge.session
    name = path.removeprefix(_ARTIFACT_PREFIX)
    data = handler.read_body(session.limits.max_artifact_bytes)
    return _ok(session.put_artifact(name, data, handler.headers.get("Content-Type")), status=201)


def _simulate(handler: _Handler, path: str) -> _Result:
    body, size = handler.read_json()
    return _ok(handler.server.bridge.session.simulate(body, size))


def _policy_check(handler: _Handler, path: str) -> _Result:
    body, size = handler.read_json()
    return _ok(handler.server.bridge.session.check_policy(body, size))


def _log(handler: _Handler, path: str) -> _Result:
    body, size = handler.read_json()
    return _ok(handler.server.bridge.session.log(body, size))


def _mcp(handler: _Handler, path: str) -> _Result:
    raw = handler.read_body(handler.server.bridge.session.limits.max_json_bytes)
    version = handler.headers.get("MCP-Protocol-Version")
    return handler.server.bridge.mcp.handle(raw, protocol_version=version)


def _mcp_other(handler: _Handler, path: str) -> _Result:
    # No server-initiated stream and no session to delete: the spec lets a server answer 405.
    raise MethodNotAllowed("/mcp answers POST only")


_ITEM_PREFIX = "/v1/tools/items/"
_ARTIFACT_PREFIX = "/v1/artifacts/"
_ROUTES: dict[str, dict[str, Route]] = {
    "/v1/input": {"GET": _input},
    "/v1/output": {"POST": _output},
    "/v1/tools/schema": {"GET": _schema},
    "/v1/tools/sql": {"POST": _sql},
    "/v1/tools/items": {"GET": _items},
    "/v1/llm/chat/completions": {"POST": _llm},
    "/v1/simulate": {"POST": _simulate},
    "/v1/policy/check": {"POST": _policy_check},
    "/v1/log": {"POST": _log},
    "/mcp": {"POST": _mcp, "GET": _mcp_other, "DELETE": _mcp_other},
}
_PREFIX_ROUTES: dict[str, dict[str, Route]] = {
    _ITEM_PREFIX: {"GET": _item},
    _ARTIFACT_PREFIX: {"PUT": _artifact},
}


def _resolve(method: str, path: str) -> Route:
    methods = _ROUTES.get(path)
    if methods is None:
        methods = next(
            (
                routes
                for prefix, routes in _PREFIX_ROUTES.items()
                if path.startswith(prefix) and path != prefix
            ),
            None,
        )
    if methods is None:
        raise NotFound(f"no route {path}")
    route = methods.get(method)
    if route is None:
        raise MethodNotAllowed(f"{path} answers {', '.join(sorted(methods))}")
    return route


# --- the server -------------------------------------------------------------------------------------------


def _check_socket_path(socket_path: Path) -> None:
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH_BYTES:
        raise ValueError(f"the socket path is longer than {MAX_SOCKET_PATH_BYTES} bytes: {socket_path}")


def _bind(socket_path: Path, max_connections: int) -> _Server:
    """Bind and listen on ``socket_path`` (which must not exist); any uid may connect."""
    server = _Server(os.fspath(socket_path), max_connections)
    try:
        # Any uid may connect: the socket's 0700 directory is the gate (docs/agents.md).
        os.chmod(socket_path, 0o666)  # noqa: S103
    except OSError:
        server.server_close()
        raise
    return server


class BridgeServer:
    """Serves one :class:`StageSession` on a Unix socket until :meth:`close`.

    ``socket_path`` must not exist and its directory should be reachable only by the runner and the
    agent's uid (docs/agents.md, "The sandbox"); the socket itself is made connectable by any uid
    (mode 0666) because the directory is the gate. A socket bound before its session existed is served
    with :meth:`BridgeListener.serve`.
    """

    def __init__(self, session: StageSession, socket_path: Path):
        _check_socket_path(socket_path)
        self.session = session
        self.socket_path = socket_path
        self.mcp = McpEndpoint(session)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> BridgeServer:
        return self._serve(_bind(self.socket_path, self.session.limits.max_connections))

    def _serve(self, server: _Server) -> BridgeServer:
        server.bridge = self
        self._server = server
        # A short poll interval: shutdown waits for it, and the last stage's shutdown is on the ask's path.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, name="hivemind-bridge", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """End the session, stop serving and remove the socket. Safe to call twice."""
        self.session.close()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> BridgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class BridgeListener:
    """A stage's bridge socket, bound and listening before the stage's session exists.

    A sandbox can start against it at once (docs/bridge.md, "Pre-started sandboxes"): the kernel
    accepts the agent's connections into the socket's backlog and nothing reads them, so the agent's
    first call waits until :meth:`serve` attaches the session. The session token the sandbox is given
    is chosen here; the session must be made with it (``StageSession(token=listener.token)``).
    """

    def __init__(self, socket_path: Path, limits: BridgeLimits):
        _check_socket_path(socket_path)
        self.socket_path = socket_path
        self.token = new_session_token()
        self._lock = threading.Lock()
        self._server: _Server | None = _bind(socket_path, limits.max_connections)

    def serve(self, session: StageSession) -> BridgeServer:
        """Serve ``session`` on this socket; the returned server closes it. Once only, and never after
        :meth:`close`."""
        if not session.authenticates(self.token):
            raise ValueError("the session was not made with this listener's token")
        with self._lock:
            if self._server is None:
                raise RuntimeError("this bridge socket was already served or closed")
            if session.limits.max_connections != self._server.max_connections:
                raise ValueError("the session's connection limit differs from the listener's")
            server, self._server = self._server, None
        return BridgeServer(session, self.socket_path)._serve(server)

    def close(self) -> None:
        """Close the socket if it was never served (connections waiting in it are dropped). Safe to
        call twice, and after :meth:`serve` (the server owns the socket then)."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        server.server_close()
        self.socket_path.unlink(missing_ok=True)
