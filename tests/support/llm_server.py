"""A small OpenAI-compatible chat-completions server on loopback, for tests of the runner's LLM egress.

Deterministic: a reply is taken from a queue (:meth:`FakeLlmServer.reply`, :meth:`tool_call`,
:meth:`fail`), or, when the queue is empty, is ``"echo: <last user message>"``. Usage counts are words:
``prompt_tokens`` is the number of whitespace-separated words in all message contents, and
``completion_tokens`` the number of words in the reply (overridable per reply). Every request is
recorded with its headers, so tests can check which credential was sent.

    with FakeLlmServer() as server:
        server.reply("tea: 41")
        ... LlmConfig(providers={"local": ProviderConfig(name="local", base_url=server.base_url, ...)})
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class _Reply:
    status: int = 200
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    usage: dict[str, int] | None = None
    omit_usage: bool = False
    raw: bytes | None = None
    echo_authorization: bool = False


def _words(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


@dataclass
class FakeLlmServer:
    """Start with ``with FakeLlmServer() as server`` or :meth:`start` / :meth:`stop`."""

    requests: list[RecordedRequest] = field(default_factory=list)
    _queue: deque[_Reply] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # --- scripting ---

    def reply(self, content: str, *, usage: dict[str, int] | None = None, omit_usage: bool = False) -> None:
        with self._lock:
            self._queue.append(_Reply(content=content, usage=usage, omit_usage=omit_usage))

    def tool_call(self, name: str, arguments: dict[str, Any], *, call_id: str = "call_1") -> None:
        call = {
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)},
        }
        with self._lock:
            self._queue.append(_Reply(tool_calls=[call]))

    def fail(self, status: int = 500, body: bytes = b'{"error": {"message": "upstream failed"}}') -> None:
        with self._lock:
            self._queue.append(_Reply(status=status, raw=body))

    def raw(self, body: bytes) -> None:
        """Answer 200 with exactly these bytes (for malformed-answer tests)."""
        with self._lock:
            self._queue.append(_Reply(raw=body))

    def echo_authorization(self) -> None:
        """A misbehaving provider: reflect the request's Authorization header in the reply."""
        with self._lock:
            self._queue.append(_Reply(echo_authorization=True))

    # --- lifecycle ---

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the server is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeLlmServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                headers = {name.lower(): value for name, value in self.headers.items()}
                with fake._lock:
                    fake.requests.append(RecordedRequest(self.path, headers, body))
                    reply = fake._queue.popleft() if fake._queue else _Reply()
                status, payload = fake._answer(self.path, headers, body, reply)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeLlmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- answers ---

    def _answer(
        self, path: str, headers: dict[str, str], body: dict[str, Any], reply: _Reply
    ) -> tuple[int, bytes]:
        if path != "/v1/chat/completions":
            return 404, b'{"error": {"message": "no such route"}}'
        if reply.raw is not None:
            return reply.status, reply.raw
        messages = body.get("messages", [])
        if reply.echo_authorization:
            content: str | None = f"your header was {headers.get('authorization')}"
        elif reply.content is not None or reply.tool_calls is not None:
            content = reply.content
        else:
            last_user = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
            content = f"echo: {last_user}"
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reply.tool_calls is not None:
            message["tool_calls"] = reply.tool_calls
        prompt_tokens = sum(_words(m.get("content")) for m in messages)
        completion_tokens = _words(content)
        completion: dict[str, Any] = {
            "id": f"chatcmpl-fake-{len(self.requests)}",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "unknown"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                }
            ],
        }
        if not reply.omit_usage:
            completion["usage"] = reply.usage or {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
        return 200, json.dumps(completion).encode()
