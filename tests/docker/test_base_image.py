"""Smoke test of the agent base image under the runner's sandbox flags (docs/agents.md).

Builds the image with agents/base/build-base-image.sh (a no-op when it is up to date), then runs
containers the way the runner does: no network, read-only root, capped tmpfs, no capabilities,
no-new-privileges, uid 10001, pids and memory limits, the bridge socket bind-mounted as the only door.
"""

from __future__ import annotations

import json
import os
import shutil
import socketserver
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "agents" / "base" / "build-base-image.sh"
IMAGE = "hivemind/agent-base:local"
SESSION = "hms_docker-smoke-session"
CONTAINER_SOCKET = "/run/hivemind/bridge.sock"

HARDENING = [
    "--network=none",
    "--read-only",
    "--tmpfs=/tmp:rw,nosuid,nodev,noexec,size=16m",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
    "--user=10001:10001",
    "--pids-limit=64",
    "--memory=256m",
    "--memory-swap=256m",
]


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False).returncode == 0


@pytest.fixture(scope="module")
def base_image() -> str:
    if not _docker_answers():
        pytest.skip("no Docker engine answers `docker info` (start one: agent-runner/deploy/dockerd.sh)")
    built = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=900, check=False)
    assert built.returncode == 0, built.stderr
    image_id = built.stdout.strip().splitlines()[-1]
    assert image_id.startswith("sha256:")
    return image_id


def run_hardened(image: str, *command: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "run", "--rm", *HARDENING, *extra, image, *command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_build_is_idempotent_and_labels_the_sdk(base_image: str) -> None:
    again = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == base_image
    assert "up to date" in again.stderr

    inspected = json.loads(
        subprocess.run(
            ["docker", "image", "inspect", base_image], capture_output=True, text=True, check=True
        ).stdout
    )[0]
    labels = inspected["Config"]["Labels"]
    assert len(labels["org.hivemind.sdk.sha256"]) == 64
    assert labels["org.hivemind.base.parent"] == "hivemind/debian-rootfs:bookworm"
    assert inspected["Config"]["User"] == "10001:10001"
    assert inspected["Config"]["WorkingDir"] == "/agent"


def test_python_and_the_sdk_import_in_the_sandbox(base_image: str) -> None:
    result = run_hardened(
        base_image,
        "python3",
        "-c",
        "import sys, json, http.client, yaml, hivemind_agent\n"
        "print(sys.version_info[:2], hivemind_agent.__version__)",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 11) 0.1.0"


def test_sandbox_is_unprivileged_read_only_with_a_capped_tmp(base_image: str) -> None:
    probe = (
        "import os\n"
        "print(os.getuid(), os.getgid())\n"
        "try:\n"
        "    open('/agent/x', 'w')\n"
        "    print('root writable')\n"
        "except OSError as exc:\n"
        "    print('root', exc.errno)\n"
        "open('/tmp/ok', 'w').write('fine')\n"
        "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n"
        "print(open('/proc/self/status').read().split('NoNewPrivs:')[1].split()[0])\n"
    )
    result = run_hardened(base_image, "python3", "-c", probe)
    assert result.returncode == 0, result.stderr
    uid_gid, root, capabilities, no_new_privs = result.stdout.split("\n")[:4]
    assert uid_gid == "10001 10001"
    assert root == "root 30"  # EROFS
    assert int(capabilities, 16) == 0
    assert no_new_privs == "1"


def test_no_network_interface_but_loopback(base_image: str) -> None:
    probe = (
        "import os\n"
        "print(sorted(os.listdir('/sys/class/net')))\n"
        "print(sorted(line.split(':')[0].strip() for line in open('/proc/net/dev').readlines()[2:]))\n"
    )
    result = run_hardened(base_image, "python3", "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["['lo']", "['lo']"]


# --- the bridge socket as the only door -----------------------------------------------------------


class _Bridge(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str):
        super().__init__(path, _BridgeHandler)
        self.outputs: list[Any] = []
        self.authorizations: list[str | None] = []


class _BridgeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Bridge

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
        self.server.authorizations.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != f"Bearer {SESSION}":
            self._reply(401, {"error": "unauthenticated", "message": "bad session"})
        elif (self.command, self.path) == ("GET", "/v1/input"):
            self._reply(
                200,
                {
                    "role": "query",
                    "prompt": "how many orders?",
                    "rules": "",
                    "policy": "",
                    "schema": None,
                    "budgets": {"timeout_s": 30, "llm_calls": 0, "tokens": 0, "memory_mb": 256},
                    "llm_providers": [],
                    "artifacts_allowed": False,
                    "stage": {},
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


@pytest.fixture
def host_bridge() -> Iterator[tuple[_Bridge, str]]:
    directory = tempfile.mkdtemp(prefix="hm-bridge-", dir="/tmp")
    path = os.path.join(directory, "bridge.sock")
    server = _Bridge(path)
    # The container user (uid 10001) must be able to connect; the 0700 directory keeps other host
    # users away, and the container sees only the socket file, not the directory.
    os.chmod(path, 0o666)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, path
    server.shutdown()
    server.server_close()
    shutil.rmtree(directory, ignore_errors=True)


AGENT = """
from hivemind_agent import main

def answer(ctx):
    count = ctx.sql("SELECT COUNT(*) AS n FROM orders").rows[0][0]
    return {"prompt": ctx.prompt, "orders": count}

main(answer)
"""


def test_agent_round_trip_through_a_bind_mounted_socket(
    base_image: str, host_bridge: tuple[_Bridge, str]
) -> None:
    server, path = host_bridge
    result = run_hardened(
        base_image,
        "python3",
        "-c",
        AGENT,
        extra=(
            f"--mount=type=bind,source={path},target={CONTAINER_SOCKET}",
            f"--env=HIVEMIND_BRIDGE={CONTAINER_SOCKET}",
            f"--env=HIVEMIND_SESSION={SESSION}",
            "--env=HIVEMIND_ROLE=query",
        ),
    )
    assert result.returncode == 0, result.stderr
    assert server.outputs == [{"json": {"prompt": "how many orders?", "orders": 42}}]
    assert set(server.authorizations) == {f"Bearer {SESSION}"}


def test_agent_without_the_socket_exits_2(base_image: str) -> None:
    result = run_hardened(
        base_image,
        "python3",
        "-c",
        AGENT,
        extra=(
            f"--env=HIVEMIND_BRIDGE={CONTAINER_SOCKET}",
            f"--env=HIVEMIND_SESSION={SESSION}",
            "--env=HIVEMIND_ROLE=query",
        ),
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr
