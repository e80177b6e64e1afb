"""The default agents as real images on the base image, in the runner's sandbox, through the runner's bridge.

Each agent directory is built with ``docker build --network none`` (the Dockerfiles only copy code),
then run the way the runner's Docker backend runs agents (docs/agents.md, "The sandbox"): no network,
read-only root, no capabilities, uid 10001, the bridge socket bind-mounted as the only door.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from agents_bridge import AGENTS_DIR, AgentSession, Room, room_file, running_bridge
from conftest import SAMPLE_DATA, people_rows

pytestmark = [pytest.mark.docker, pytest.mark.slow]

BASE_IMAGE = "hivemind/agent-base:local"
BUILD_BASE = AGENTS_DIR / "base" / "build-base-image.sh"
CONTAINER_SOCKET = "/run/hivemind/bridge.sock"
SANDBOX = [
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
PEOPLE_POLICY = {
    "tables": {"people": {"columns": ["department", "salary"]}},
    "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "SUM", "AVG"]},
    "max_rows": 50,
}


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False).returncode == 0


@pytest.fixture(scope="module")
def images() -> Iterator[dict[str, str]]:
    """Images of the three default agents, built on the base image; removed afterwards."""
    if not _docker_answers():
        pytest.skip("no Docker engine answers `docker info` (start one: agent-runner/deploy/dockerd.sh)")
    base = subprocess.run([str(BUILD_BASE)], capture_output=True, text=True, timeout=900, check=False)
    assert base.returncode == 0, base.stderr
    suffix = uuid.uuid4().hex[:10]
    built: dict[str, str] = {}
    try:
        for name in ("default-scope", "default-query", "default-mediator"):
            tag = f"hivemind/test-{name}:{suffix}"
            result = subprocess.run(
                ["docker", "build", "--network", "none", "--pull=false", "-t", tag, str(AGENTS_DIR / name)],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            built[name] = tag
        yield built
    finally:
        if built:
            subprocess.run(["docker", "image", "rm", "-f", *built.values()], capture_output=True, check=False)


def run_in_sandbox(image: str, session: AgentSession) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "docker", "run", "--rm", *SANDBOX,
            f"--mount=type=bind,source={session.socket_path},target={CONTAINER_SOCKET}",
            f"--env=HIVEMIND_BRIDGE={CONTAINER_SOCKET}",
            f"--env=HIVEMIND_SESSION={session.token}",
            f"--env=HIVEMIND_ROLE={session.role}",
            image,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip


def _people_room(people_rules: str) -> Room:
    return Room(data=[room_file(SAMPLE_DATA / "people.csv")], rules=people_rules)


def test_the_image_holds_code_only_on_the_base_image(images: dict[str, str]) -> None:
    listed = subprocess.run(
        ["docker", "run", "--rm", *SANDBOX, images["default-query"], "python3", "-c",
         "import os; print(sorted(os.listdir('/agent')))"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == str(
        sorted(path.name for path in (AGENTS_DIR / "default-query").glob("*.py"))
    )


def test_default_query_answers_inside_the_sandbox(images: dict[str, str], people_rules: str) -> None:
    with running_bridge(_people_room(people_rules)) as bridge:
        average = bridge.open_session("query", "average salary by department", policy=PEOPLE_POLICY)
        result = run_in_sandbox(images["default-query"], average)
        assert result.returncode == 0, result.stderr
        text = average.result["text"]
        assert "| Engineering |" in text and "| Support |" in text
        assert "Finance" not in text and "Legal" not in text

        listing = bridge.open_session("query", "list names and salaries", policy=PEOPLE_POLICY)
        result = run_in_sandbox(images["default-query"], listing)
        assert result.returncode == 0, result.stderr
        assert listing.sql == []
        assert not any(name in listing.result["text"] for name, _, _ in people_rows())


def test_the_default_pipeline_runs_in_containers(images: dict[str, str], people_rules: str) -> None:
    with running_bridge(_people_room(people_rules)) as bridge:
        prompt = "top 2 departments by average salary"
        scope = bridge.open_session("scope", prompt)
        assert run_in_sandbox(images["default-scope"], scope).returncode == 0
        policy: dict[str, Any] = scope.result["json"]
        assert policy["aggregate"]["min_group_size"] == 5

        query = bridge.open_session("query", prompt, policy=policy)
        assert run_in_sandbox(images["default-query"], query).returncode == 0

        stage = {"answer": query.result, "output_rules": policy["output"]}
        mediator = bridge.open_session("mediator", prompt, stage=stage)
        assert run_in_sandbox(images["default-mediator"], mediator).returncode == 0
    final = mediator.result["text"]
    assert final.startswith("Top 2 department by average salary")
    assert "| Engineering |" in final and "| Sales |" in final


def test_a_failing_stage_reports_through_the_socket(images: dict[str, str]) -> None:
    broken = Room(rules="```policy\nmax_rows: lots\n```\n")
    with running_bridge(broken) as bridge:
        scope = bridge.open_session("scope", "anything")
        result = run_in_sandbox(images["default-scope"], scope)
    assert result.returncode == 1
    assert scope.result["error"]["code"] == "agent_error"
    assert "max_rows: Input should be a valid integer" in scope.result["error"]["message"]
