"""The backend-neutral pieces: SandboxSpec, outcomes, output capture, select_backend, AgentImageCache."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from hivemind.archive import pack_directory, validate_archive
from hivemind.errors import InvalidArchive
from hivemind_runner.images import AgentImageCache
from hivemind_runner.sandbox import (
    AGENT_BASE_IMAGE,
    Availability,
    Outcome,
    PreparedAgent,
    ProcessBackend,
    SandboxResult,
    SandboxSpec,
    SandboxUnavailable,
    SourceDigestMismatch,
    select_backend,
)
from hivemind_runner.sandbox.base import OutputCapture, classify
from hivemind_runner.sandbox.docker_backend import DockerBackend

DIGEST = "ab" * 32
AGENT = PreparedAgent(
    backend="docker", source_digest=DIGEST, image_digest="sha256:" + "cd" * 32, reference="x"
)


def spec(**fields: object) -> SandboxSpec:
    values: dict[str, object] = {
        "agent": AGENT,
        "role": "mediator",
        "bridge_socket": "/run/hivemind/s/bridge.sock",
        "session_token": "hms_token",
        "timeout_s": 30,
    }
    values.update(fields)
    return SandboxSpec.model_validate(values)


def test_environment_is_exactly_the_contract() -> None:
    assert spec().environment() == {
        "HIVEMIND_BRIDGE": "/run/hivemind/bridge.sock",
        "HIVEMIND_SESSION": "hms_token",
        "HIVEMIND_ROLE": "mediator",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    assert "hms_token" not in repr(spec())  # the session token never lands in logs


@pytest.mark.parametrize(
    "fields",
    [
        {"session_token": "has space"},
        {"session_token": ""},
        {"session_token": "x" * 513},
        {"session_token": "caf\u00e9"},
        {"bridge_socket": "relative/bridge.sock"},
        {"role": "admin"},
        {"memory_mb": 8},
        {"pids_limit": 2},
        {"timeout_s": 0},
        {"cpus": 0},
        {"unknown": 1},
    ],
)
def test_spec_refuses_bad_values(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        spec(**fields)


def test_prepared_agent_and_result_are_strict() -> None:
    with pytest.raises(ValidationError):
        PreparedAgent(backend="docker", source_digest=DIGEST, image_digest="sha256:short", reference="x")
    with pytest.raises(ValidationError):
        PreparedAgent(
            backend="docker", source_digest="sha256:" + DIGEST, image_digest=AGENT.image_digest, reference="x"
        )
    result = SandboxResult(
        outcome=Outcome.OK,
        exit_code=0,
        started_at=0.0,
        duration_ms=5,
        stdout=b"room data",
        stderr=b"",
        backend="docker",
        source_digest=DIGEST,
        image_digest=AGENT.image_digest,
    )
    assert result.ok
    assert "room data" not in repr(result)


def test_classify() -> None:
    assert classify(0, killed_for=None, oom=False) is Outcome.OK
    assert classify(1, killed_for=None, oom=False) is Outcome.FAILED
    assert classify(139, killed_for=None, oom=False) is Outcome.KILLED
    assert classify(137, killed_for=None, oom=True) is Outcome.OOM
    assert classify(0, killed_for=None, oom=True) is Outcome.OK  # a child was OOM-killed, the agent coped
    assert classify(137, killed_for=Outcome.TIMEOUT, oom=True) is Outcome.TIMEOUT


def test_output_capture_stops_at_the_cap() -> None:
    capture = OutputCapture(10)
    assert capture.add("stdout", b"12345")
    assert capture.add("stderr", b"abc")
    assert not capture.add("stdout", b"6789")
    assert (bytes(capture.stdout), bytes(capture.stderr), capture.truncated) == (b"1234567", b"abc", True)
    exact = OutputCapture(3)
    assert exact.add("stdout", b"abc")
    assert not exact.truncated


def test_select_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown sandbox backend"):
        select_backend("kubernetes")  # type: ignore[arg-type]
    monkeypatch.setattr(DockerBackend, "availability", lambda self: Availability(True, "ok"))
    assert isinstance(select_backend("auto"), DockerBackend)
    monkeypatch.setattr(DockerBackend, "availability", lambda self: Availability(False, "no engine here"))
    monkeypatch.setattr(ProcessBackend, "availability", lambda self: Availability(True, "ok"))
    assert isinstance(select_backend("auto"), ProcessBackend)
    with pytest.raises(
        SandboxUnavailable, match="the docker sandbox backend is not available: no engine here"
    ):
        select_backend("docker")
    monkeypatch.setattr(ProcessBackend, "availability", lambda self: Availability(False, "no bwrap"))
    with pytest.raises(SandboxUnavailable, match=r"docker: no engine here; process: no bwrap"):
        select_backend("auto")


class CountingBackend:
    """A backend double that records prepare() calls; run() is not needed here."""

    name = "docker"

    def __init__(self) -> None:
        self.prepared: list[tuple[Path, str]] = []
        self.seen_files: list[list[str]] = []

    def availability(self) -> Availability:
        return Availability(True, "test double")

    def available(self) -> bool:
        return True

    def prepare(self, source_dir: Path, source_digest: str) -> PreparedAgent:
        self.prepared.append((source_dir, source_digest))
        self.seen_files.append(sorted(path.name for path in source_dir.iterdir()))
        time.sleep(0.05)  # long enough for concurrent callers to pile up
        return AGENT.model_copy(update={"source_digest": source_digest})

    def run(self, spec: SandboxSpec, *, stop: threading.Event | None = None) -> SandboxResult:
        raise AssertionError("not used")


def test_image_cache_prepares_each_digest_once(tmp_path: Path) -> None:
    backend = CountingBackend()
    cache = AgentImageCache(backend)
    results: list[PreparedAgent] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(tmp_path, DIGEST))) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(backend.prepared) == 1
    assert {result.source_digest for result in results} == {DIGEST}
    assert cache.cached(DIGEST) == results[0]
    cache.forget(DIGEST)
    assert cache.cached(DIGEST) is None
    cache.get(tmp_path, DIGEST)
    assert len(backend.prepared) == 2


def test_image_cache_from_an_archive_checks_the_digest_and_cleans_up(tmp_path: Path) -> None:
    agent = tmp_path / "agent"
    agent.mkdir()
    (agent / "Dockerfile").write_text(f"FROM {AGENT_BASE_IMAGE}\n")
    (agent / "main.py").write_text("print(1)\n")
    archive = pack_directory(agent)
    digest = validate_archive(archive).digest
    work = tmp_path / "work"
    work.mkdir()
    backend = CountingBackend()
    cache = AgentImageCache(backend)

    with pytest.raises(SourceDigestMismatch, match=f"the room pins {DIGEST}"):
        cache.get_from_archive(archive, DIGEST, work_dir=work)
    with pytest.raises(InvalidArchive):
        cache.get_from_archive(b"not an archive", digest, work_dir=work)
    assert backend.prepared == []

    prepared = cache.get_from_archive(archive, digest, work_dir=work)
    assert prepared.source_digest == digest
    assert backend.seen_files == [["Dockerfile", "main.py"]]
    assert list(work.iterdir()) == []  # the extracted source is gone again
    assert cache.get_from_archive(archive, digest, work_dir=work) == prepared
    assert len(backend.prepared) == 1
