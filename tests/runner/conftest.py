"""Fixtures for the sandbox tests: both backends, a probe agent, and a tiny fake bridge.

- ``sandbox_backend``: parametrized over ``docker`` (marked ``docker``) and ``process``; a backend that does
  not work on this machine is skipped with its own reason.
- ``probe_agent``: the prepared probe agent (tests/runner/probe_agent), one build per backend
  per session. Its ``main.py`` uses the real SDK: without a probe it answers from the bridge; with a
  probe (Python source sent in the stage input, never in env or argv) it ``exec``s it and posts
  ``result``.
- ``run_sandbox(bridge, **limits)``: runs the probe agent on the current backend against ``bridge``.
- ``bridge_factory``: starts fake bridges (HTTP over a Unix socket, the routes the probe uses) in
  per-stage directories made by ``create_bridge_socket_dir``, the way the runner makes them.
"""

from __future__ import annotations

import json
import os
import shutil
import socketserver
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from hivemind.archive import pack_directory, validate_archive
from hivemind_runner.sandbox import (
    PreparedAgent,
    ProcessBackend,
    SandboxBackend,
    SandboxResult,
    SandboxSpec,
    create_bridge_socket_dir,
)
from hivemind_runner.sandbox.docker_backend import DockerBackend

PROBE_DIR = Path(__file__).parent / "probe_agent"


class FakeBridge(socketserver.ThreadingUnixStreamServer):
    """Serves ``GET /v1/input``, ``POST /v1/tools/sql`` and ``POST /v1/output`` for one session."""

    daemon_threads = True

    def __init__(self, path: Path, *, session: str, prompt: str, probe: str | None):
        super().__init__(str(path), _BridgeHandler)
        self.path = path
        self.session = session
        self.prompt = prompt
        self.probe = probe
        self.outputs: list[Any] = []
        self.unauthorized = 0

    @property
    def output(self) -> Any:
        assert len(self.outputs) == 1, self.outputs
        return self.outputs[0]


class _BridgeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeBridge

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _reply(self, status: int, body: Any) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Authorization") != f"Bearer {self.server.session}":
            self.server.unauthorized += 1
            self._reply(401, {"error": "unauthenticated", "message": "bad session"})
        elif (self.command, self.path) == ("GET", "/v1/input"):
            stage = {} if self.server.probe is None else {"probe": self.server.probe}
            self._reply(
                200,
                {
                    "role": "query",
                    "prompt": self.server.prompt,
                    "rules": "",
                    "policy": "",
                    "schema": None,
                    "budgets": {"timeout_s": 30, "llm_calls": 0, "tokens": 0, "memory_mb": 128},
                    "llm_providers": [],
                    "artifacts_allowed": False,
                    "stage": stage,
                },
            )
        elif (self.command, self.path) == ("POST", "/v1/tools/sql"):
            self._reply(200, {"columns": ["n"], "rows": [[42]], "truncated": False})
        elif (self.command, self.path) == ("POST", "/v1/output"):
            self.server.outputs.append(json.loads(body))
            self._reply(200, {"accepted": True})
        else:
            self._reply(404, {"error": "not_found", "message": self.path})

    do_GET = do_POST = _serve


@pytest.fixture(scope="session")
def docker_sandbox() -> DockerBackend:
    backend = DockerBackend()
    availability = backend.availability()
    if not availability.available:
        pytest.skip(f"Docker backend unavailable: {availability.reason}")
    return backend


@pytest.fixture(scope="session")
def process_sandbox() -> ProcessBackend:
    backend = ProcessBackend()
    availability = backend.availability()
    if not availability.available:
        pytest.skip(f"process backend unavailable: {availability.reason}")
    return backend


@pytest.fixture(params=[pytest.param("docker", marks=pytest.mark.docker), "process"])
def sandbox_backend(request: pytest.FixtureRequest) -> SandboxBackend:
    return request.getfixturevalue(f"{request.param}_sandbox")


@pytest.fixture(scope="session")
def probe_digest() -> str:
    return validate_archive(pack_directory(PROBE_DIR)).digest


_PREPARED: dict[str, PreparedAgent] = {}


@pytest.fixture
def probe_agent(sandbox_backend: SandboxBackend, probe_digest: str) -> PreparedAgent:
    if sandbox_backend.name not in _PREPARED:
        _PREPARED[sandbox_backend.name] = sandbox_backend.prepare(PROBE_DIR, probe_digest)
    return _PREPARED[sandbox_backend.name]


@pytest.fixture(scope="session")
def bridges_parent() -> Iterator[Path]:
    # Traversable (not listable) by uid 10001, like /run/hivemind on a runner; pytest's own tmp
    # directories are 0700 and would keep bubblewrap out.
    parent = Path(tempfile.mkdtemp(prefix="hm-bridges-", dir="/tmp"))
    parent.chmod(0o711)
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


BridgeFactory = Callable[..., FakeBridge]


@pytest.fixture
def bridge_factory(bridges_parent: Path) -> Iterator[BridgeFactory]:
    started: list[tuple[FakeBridge, threading.Thread]] = []

    def start(*, probe: str | None = None, prompt: str = "how many orders?") -> FakeBridge:
        directory = create_bridge_socket_dir(bridges_parent)
        server = FakeBridge(
            directory / "bridge.sock", session=f"hms_{uuid.uuid4().hex}", prompt=prompt, probe=probe
        )
        os.chmod(server.path, 0o666)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        shutil.rmtree(server.path.parent, ignore_errors=True)


RunSandbox = Callable[..., SandboxResult]


@pytest.fixture
def run_sandbox(sandbox_backend: SandboxBackend, probe_agent: PreparedAgent) -> RunSandbox:
    """``run_sandbox(bridge, timeout_s=..., stop=..., **limits)``: the probe agent on ``bridge``."""

    def run(
        bridge: FakeBridge, *, timeout_s: float = 20, stop: threading.Event | None = None, **limits: Any
    ) -> SandboxResult:
        spec = SandboxSpec(
            agent=probe_agent,
            role="query",
            bridge_socket=bridge.path,
            session_token=bridge.session,
            timeout_s=timeout_s,
            **limits,
        )
        return sandbox_backend.run(spec, stop=stop)

    return run
