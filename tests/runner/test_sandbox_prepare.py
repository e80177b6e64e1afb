"""prepare(): source digests, caching, Dockerfile rules, and the same agent behaving the same on both
backends."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hivemind.archive import pack_directory, validate_archive
from hivemind_runner.sandbox import (
    AGENT_BASE_IMAGE,
    AgentBuildError,
    DockerfileRefused,
    Outcome,
    PreparedAgent,
    ProcessBackend,
    SandboxBackend,
    SandboxSpec,
    SourceDigestMismatch,
)
from hivemind_runner.sandbox.docker_backend import DockerBackend
from hivemind_runner.sandbox.dockerfile import BASE_CMD, BASE_ENV, BASE_WORKDIR
from hivemind_runner.sandbox.process_backend import sdk_sha256

PROBE_DIR = Path(__file__).parent / "probe_agent"

BridgeFactory = Callable[..., Any]

pytestmark = pytest.mark.slow


def write_agent(root: Path, dockerfile: str, files: dict[str, str]) -> tuple[Path, str]:
    root.mkdir(parents=True)
    (root / "Dockerfile").write_text(dockerfile)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root, validate_archive(pack_directory(root)).digest


def test_prepare_is_cached_by_source_digest(
    sandbox_backend: SandboxBackend, probe_agent: PreparedAgent
) -> None:
    started = time.monotonic()
    again = sandbox_backend.prepare(PROBE_DIR, probe_agent.source_digest)
    assert time.monotonic() - started < 1.0
    assert again == probe_agent
    assert again.source_digest == validate_archive(pack_directory(PROBE_DIR)).digest


def test_prepare_refuses_a_directory_that_is_not_the_pinned_source(
    sandbox_backend: SandboxBackend, tmp_path: Path, probe_digest: str
) -> None:
    agent, digest = write_agent(
        tmp_path / "agent",
        f"FROM {AGENT_BASE_IMAGE}\nCOPY main.py /agent/main.py\n",
        {"main.py": "print(1)\n"},
    )
    with pytest.raises(SourceDigestMismatch, match=f"the room pins {probe_digest}"):
        sandbox_backend.prepare(agent, probe_digest)
    (agent / "main.py").write_text("print(2)\n")  # changed after the digest was taken
    with pytest.raises(SourceDigestMismatch):
        sandbox_backend.prepare(agent, digest)


@pytest.mark.parametrize(
    ("dockerfile", "expected"),
    [
        ("FROM python:3.11-slim\nCOPY main.py /agent/main.py\n", "not allowed|only runs agents built FROM"),
        (f"FROM {AGENT_BASE_IMAGE}\nADD https://example.com/main.py /agent/\n", "ADD of a URL"),
    ],
)
def test_prepare_refuses_registry_and_network_access(
    sandbox_backend: SandboxBackend, tmp_path: Path, dockerfile: str, expected: str
) -> None:
    agent, digest = write_agent(tmp_path / "agent", dockerfile, {"main.py": "print(1)\n"})
    with pytest.raises(DockerfileRefused, match=expected):
        sandbox_backend.prepare(agent, digest)


def test_process_backend_refuses_run(process_sandbox: ProcessBackend, tmp_path: Path) -> None:
    agent, digest = write_agent(
        tmp_path / "agent", f"FROM {AGENT_BASE_IMAGE}\nRUN pip install requests\n", {"main.py": "print(1)\n"}
    )
    with pytest.raises(
        DockerfileRefused, match="line 2 \\(RUN\\): the process backend cannot RUN; use the Docker"
    ):
        process_sandbox.prepare(agent, digest)


@pytest.mark.docker
def test_docker_build_runs_without_network(docker_sandbox: DockerBackend, tmp_path: Path) -> None:
    secret_marker = "sealed-source-marker"
    agent, digest = write_agent(
        tmp_path / "agent",
        f"FROM {AGENT_BASE_IMAGE}\n"
        f"RUN python3 -c \"import socket; print('{secret_marker}'); "
        "socket.create_connection(('1.1.1.1', 53), 3)\"\n",
        {},
    )
    with pytest.raises(AgentBuildError) as caught:
        docker_sandbox.prepare(agent, digest)
    assert b"Network is unreachable" in caught.value.build_log
    # The build log may echo sealed source: it is kept on the exception, not in the message.
    assert secret_marker not in caught.value.message
    assert secret_marker not in json.dumps(caught.value.to_dict())


PARITY_DOCKERFILE = f"""\
FROM {AGENT_BASE_IMAGE}
LABEL purpose=parity
COPY *.py /agent/
COPY lib /agent/lib/
WORKDIR /agent/lib
ENV GREETING="hello world"
ENTRYPOINT ["python3"]
CMD ["/agent/main.py", "--flag"]
"""

PARITY_MAIN = """\
import os, sys
print(sys.argv[1:], os.getcwd(), os.environ["GREETING"], os.getuid(), open("data.txt").read().strip())
print(sorted(os.listdir("/agent")), os.environ["PYTHONUNBUFFERED"], os.environ["HOME"])
"""


def test_the_same_agent_behaves_the_same_on_both_backends(
    sandbox_backend: SandboxBackend, tmp_path: Path, bridge_factory: BridgeFactory
) -> None:
    agent, digest = write_agent(
        tmp_path / "agent",
        PARITY_DOCKERFILE,
        {"main.py": PARITY_MAIN, "helper.py": "", "lib/data.txt": "from lib\n"},
    )
    prepared = sandbox_backend.prepare(agent, digest)
    bridge = bridge_factory()
    result = sandbox_backend.run(
        SandboxSpec(
            agent=prepared,
            role="scope",
            bridge_socket=bridge.path,
            session_token=bridge.session,
            timeout_s=20,
        )
    )
    assert result.outcome is Outcome.OK, result.stderr
    assert result.stdout.decode().splitlines() == [
        "['--flag'] /agent/lib hello world 10001 from lib",
        "['helper.py', 'lib', 'main.py'] 1 /tmp",
    ]


@pytest.mark.docker
def test_process_backend_reproduces_the_base_image(docker_sandbox: DockerBackend) -> None:
    inspected = json.loads(
        subprocess.run(
            ["docker", "image", "inspect", AGENT_BASE_IMAGE], capture_output=True, text=True, check=True
        ).stdout
    )[0]
    config = inspected["Config"]
    image_env = dict(item.split("=", 1) for item in config["Env"])
    assert {key: image_env[key] for key in BASE_ENV} == BASE_ENV
    assert tuple(config["Cmd"]) == BASE_CMD
    assert config["WorkingDir"] == BASE_WORKDIR
    sdk_dir = ProcessBackend().sdk_dir
    assert sdk_dir is not None
    assert config["Labels"]["org.hivemind.sdk.sha256"] == sdk_sha256(sdk_dir)
