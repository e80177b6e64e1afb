"""The Docker sandbox backend (production): one hardened, network-less container per stage.

Images are built from the verified agent source with the legacy builder, ``network_mode=none`` and
``pull=False``, after :func:`check_docker_dockerfile` made sure nothing in the Dockerfile can reach a
registry. They are tagged ``hivemind/agent:<source digest>`` and labelled with the source digest and
the IDs of the parent images they were built on, so a second ``prepare`` of the same source on the same
base is one ``inspect`` call, and a rebuilt base image invalidates the cache by itself.

Every container runs with the flags listed in docs/sandbox.md (no network, read-only root, capped
noexec tmpfs, no capabilities, no-new-privileges, uid 10001, pids/memory/CPU limits, init, no IPC
namespace, logging driver ``none`` so agent output never lands on the engine's disk). Output is read
through ``attach`` before the container starts, capped, and the container is removed in every case.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests
import urllib3
from docker.models.containers import Container
from docker.types import LogConfig, Mount, Ulimit

from hivemind_runner.sandbox.base import (
    AGENT_BASE_IMAGE,
    AGENT_GID,
    AGENT_UID,
    CONTAINER_BRIDGE_PATH,
    CONTAINER_TMP,
    AgentBuildError,
    Availability,
    Outcome,
    OutputCapture,
    PreparedAgent,
    SandboxError,
    SandboxResult,
    SandboxSpec,
    SandboxUnavailable,
    check_bridge_socket,
    classify,
    verify_source,
)
from hivemind_runner.sandbox.dockerfile import check_docker_dockerfile, parse_dockerfile

LABEL_SANDBOX = "org.hivemind.sandbox"
LABEL_SOURCE_DIGEST = "org.hivemind.agent.source_digest"
LABEL_PARENT_IDS = "org.hivemind.agent.parent_ids"
LABEL_ROLE = "org.hivemind.role"

_MIB = 1024 * 1024
_POLL_S = 0.05
_KILL_WAIT_S = 30
_BUILD_LOG_TAIL_BYTES = 64 * 1024
_TRANSPORT_ERRORS = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
)


class DockerBackend:
    """Agent containers on a local Docker engine. Thread-safe: stages may run concurrently."""

    name = "docker"

    def __init__(
        self,
        *,
        client: docker.DockerClient | None = None,
        allowed_parents: tuple[str, ...] = (AGENT_BASE_IMAGE,),
        repository: str = "hivemind/agent",
        build_timeout_s: float = 600,
        build_memory_mb: int = 2048,
        api_timeout_s: float = 60,
    ):
        if not allowed_parents:
            raise ValueError("allowed_parents must name at least one image")
        self.allowed_parents = tuple(allowed_parents)
        self.repository = repository
        self.build_timeout_s = build_timeout_s
        self.build_memory_mb = build_memory_mb
        self._api_timeout_s = api_timeout_s
        self._client_instance = client
        self._lock = threading.Lock()
        self._digest_locks: dict[str, threading.Lock] = {}

    # --- availability ---------------------------------------------------------------------------

    def _client(self) -> docker.DockerClient:
        with self._lock:
            if self._client_instance is None:
                try:
                    self._client_instance = docker.from_env(timeout=int(self._api_timeout_s))
                except _TRANSPORT_ERRORS as exc:
                    raise SandboxUnavailable(
                        f"no Docker engine answers ({exc}); start one with agent-runner/deploy/dockerd.sh"
                    ) from None
            return self._client_instance

    def availability(self) -> Availability:
        try:
            self._client().ping()
        except SandboxUnavailable as exc:
            return Availability(False, exc.message)
        except _TRANSPORT_ERRORS as exc:
            return Availability(False, f"the Docker engine does not answer: {exc}")
        return Availability(True, "the Docker engine answers")

    def available(self) -> bool:
        return self.availability().available

    # --- prepare --------------------------------------------------------------------------------

    def prepare(self, source_dir: Path, source_digest: str) -> PreparedAgent:
        verified = verify_source(source_dir, source_digest)
        parents = check_docker_dockerfile(parse_dockerfile(verified.dockerfile), self.allowed_parents)
        parent_ids = {parent: self._parent_id(parent) for parent in sorted(parents)}
        labels = {
            LABEL_SOURCE_DIGEST: source_digest,
            LABEL_PARENT_IDS: json.dumps(parent_ids, sort_keys=True, separators=(",", ":")),
        }
        tag = f"{self.repository}:{source_digest}"
        with self._digest_lock(source_digest):
            image_id = self._cached_image(tag, labels)
            if image_id is None:
                self._build(verified.packed, tag, labels)
                image_id = self._cached_image(tag, labels)
            if image_id is None:
                raise SandboxError(f"the engine built {tag} but it does not carry the expected labels")
        return PreparedAgent(
            backend=self.name, source_digest=source_digest, image_digest=image_id, reference=image_id
        )

    def _digest_lock(self, digest: str) -> threading.Lock:
        with self._lock:
            return self._digest_locks.setdefault(digest, threading.Lock())

    def _parent_id(self, image: str) -> str:
        try:
            return str(self._client().images.get(image).id)
        except docker.errors.ImageNotFound:
            raise SandboxUnavailable(
                f"the parent image {image} is missing and is never pulled; "
                "build it with agents/base/build-base-image.sh"
            ) from None
        except _TRANSPORT_ERRORS as exc:
            raise SandboxError(f"cannot inspect {image}: {exc}") from None

    def _cached_image(self, tag: str, labels: dict[str, str]) -> str | None:
        try:
            image = self._client().images.get(tag)
        except docker.errors.ImageNotFound:
            return None
        except _TRANSPORT_ERRORS as exc:
            raise SandboxError(f"cannot inspect {tag}: {exc}") from None
        have = image.labels or {}
        if any(have.get(key) != value for key, value in labels.items()):
            return None
        return str(image.id)

    def _build(self, context: bytes, tag: str, labels: dict[str, str]) -> None:
        deadline = time.monotonic() + self.build_timeout_s
        log: collections.deque[bytes] = collections.deque()
        log_size = 0
        memory = self.build_memory_mb * _MIB
        try:
            chunks: Iterator[dict[str, Any]] = self._client().api.build(
                fileobj=BytesIO(context),
                custom_context=True,
                encoding="gzip",
                tag=tag,
                labels=labels,
                network_mode="none",
                pull=False,
                rm=True,
                forcerm=True,
                decode=True,
                timeout=int(self.build_timeout_s) + 1,
                container_limits={"memory": memory, "memswap": memory},
                use_config_proxy=False,
            )
            for chunk in chunks:
                text = str(chunk.get("stream") or chunk.get("error") or "").encode("utf-8", "replace")
                log.append(text)
                log_size += len(text)
                while log_size > _BUILD_LOG_TAIL_BYTES and len(log) > 1:
                    log_size -= len(log.popleft())
                if "error" in chunk:
                    raise AgentBuildError(
                        "the agent image failed to build (the build log is kept with the run's diagnostics)",
                        build_log=b"".join(log),
                    )
                if time.monotonic() > deadline:
                    # Dropping the streaming response closes the connection, which cancels the build.
                    chunks.close()  # type: ignore[attr-defined]
                    raise AgentBuildError(
                        f"the agent image did not build within {self.build_timeout_s:g} s",
                        build_log=b"".join(log),
                    )
        except AgentBuildError:
            raise
        except _TRANSPORT_ERRORS as exc:
            if time.monotonic() > deadline:
                raise AgentBuildError(
                    f"the agent image did not build within {self.build_timeout_s:g} s",
                    build_log=b"".join(log),
                ) from None
            raise SandboxError(f"the Docker engine failed during the build: {exc}") from None

    # --- run ------------------------------------------------------------------------------------

    def _container_options(self, spec: SandboxSpec) -> dict[str, Any]:
        memory = spec.memory_mb * _MIB
        return {
            "environment": spec.environment(),
            "network_mode": "none",
            "read_only": True,
            "tmpfs": {CONTAINER_TMP: f"rw,nosuid,nodev,noexec,size={spec.tmpfs_mb}m,mode=1777"},
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            "user": f"{AGENT_UID}:{AGENT_GID}",
            "pids_limit": spec.pids_limit,
            "mem_limit": memory,
            "memswap_limit": memory,
            "nano_cpus": int(spec.cpus * 1_000_000_000),
            "init": True,
            "ipc_mode": "none",
            "cgroupns": "private",
            "hostname": "agent",
            "oom_score_adj": 500,
            "ulimits": [Ulimit(name="core", soft=0, hard=0), Ulimit(name="nofile", soft=1024, hard=1024)],
            "log_config": LogConfig(type=LogConfig.types.NONE),
            "mounts": [
                Mount(
                    target=CONTAINER_BRIDGE_PATH, source=str(spec.bridge_socket), type="bind", read_only=False
                )
            ],
            "labels": {
                LABEL_SANDBOX: "agent",
                LABEL_SOURCE_DIGEST: spec.agent.source_digest,
                LABEL_ROLE: spec.role.value,
            },
            "stdin_open": False,
            "tty": False,
        }

    def run(self, spec: SandboxSpec, *, stop: threading.Event | None = None) -> SandboxResult:
        if spec.agent.backend != self.name:
            raise SandboxError(f"this agent was prepared by the {spec.agent.backend} backend, not docker")
        check_bridge_socket(spec.bridge_socket)
        client = self._client()
        try:
            container = client.containers.create(image=spec.agent.reference, **self._container_options(spec))
        except docker.errors.ImageNotFound:
            raise SandboxError(f"the image {spec.agent.reference} is gone; prepare the agent again") from None
        except _TRANSPORT_ERRORS as exc:
            raise SandboxError(f"cannot create the agent container: {exc}") from None
        try:
            return self._supervise(client, container, spec, stop)
        except _TRANSPORT_ERRORS as exc:
            raise SandboxError(f"the Docker engine failed during the run: {exc}") from None
        finally:
            self._remove(container)

    def _supervise(
        self,
        client: docker.DockerClient,
        container: Container,
        spec: SandboxSpec,
        stop: threading.Event | None,
    ) -> SandboxResult:
        capture = OutputCapture(spec.max_output_bytes)
        finished = threading.Event()
        # Attached before start, so not a byte is missed; with logging driver "none" this stream is the
        # only copy of the output anywhere.
        stream = client.api.attach(container.id, stdout=True, stderr=True, stream=True, demux=True)
        pump = threading.Thread(
            target=_pump,
            args=(stream, capture, finished),
            name=f"sandbox-output-{container.short_id}",
            daemon=True,
        )
        pump.start()
        container.start()
        started = time.monotonic()
        killed_for = _watch(finished, capture, started + spec.timeout_s, stop)
        if killed_for is not None:
            try:
                container.kill()
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: it exited on its own meanwhile
                    raise
        status = container.wait(timeout=_KILL_WAIT_S)
        ended = time.monotonic()
        pump.join(timeout=5)
        container.reload()
        state = container.attrs.get("State", {})
        exit_code = int(status.get("StatusCode", state.get("ExitCode", -1)))
        return SandboxResult(
            outcome=classify(exit_code, killed_for=killed_for, oom=bool(state.get("OOMKilled"))),
            exit_code=exit_code,
            started_at=started,
            duration_ms=int((ended - started) * 1000),
            stdout=bytes(capture.stdout),
            stderr=bytes(capture.stderr),
            backend=self.name,
            source_digest=spec.agent.source_digest,
            image_digest=spec.agent.image_digest,
        )

    @staticmethod
    def _remove(container: Container) -> None:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            return
        except _TRANSPORT_ERRORS as exc:
            raise SandboxError(f"cannot remove the agent container {container.short_id}: {exc}") from None


def _pump(
    stream: Iterator[tuple[bytes | None, bytes | None]], capture: OutputCapture, done: threading.Event
) -> None:
    """Read the attached output until the container exits or the cap is reached (then stop reading)."""
    try:
        for out, err in stream:
            if (out and not capture.add("stdout", out)) or (err and not capture.add("stderr", err)):
                break
    except (*_TRANSPORT_ERRORS, OSError, ValueError):
        pass  # the connection closes when the container is killed or removed
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        done.set()


def _watch(
    finished: threading.Event, capture: OutputCapture, deadline: float, stop: threading.Event | None
) -> Outcome | None:
    """Wait for the output stream to end; return why the runner must kill the container, if it must."""
    while not finished.wait(_POLL_S):
        if capture.truncated:
            return Outcome.OUTPUT_TRUNCATED
        if stop is not None and stop.is_set():
            return Outcome.STOPPED
        if time.monotonic() >= deadline:
            return Outcome.TIMEOUT
    return Outcome.OUTPUT_TRUNCATED if capture.truncated else None
