"""The sandbox contract every backend implements (DESIGN §8 "Sandbox", §16.10; docs/sandbox.md).

A backend does two things:

1. ``prepare(source_dir, source_digest) -> PreparedAgent``: turn an agent's stored source (a directory
   from :func:`hivemind.archive.extract_archive`) into something runnable, after checking that the
   directory is exactly the source the room pins. Cached by source digest: a second call is instant.
2. ``run(spec) -> SandboxResult``: run one stage of one run, blocking, with no network, a read-only
   root, a size-capped ``/tmp``, no capabilities, uid 10001, memory, process and CPU limits and a
   wall-clock timeout. The bridge socket is the only door. ``run`` always cleans up (container
   removed, processes killed, cgroups removed), whatever happened.

What the agent does is reported in the :class:`SandboxResult` (an agent that crashes, loops or floods
its output is a result, not an exception). Exceptions mean the runner could not do its part:
:class:`SandboxUnavailable` (no engine, no base image), :class:`SourceDigestMismatch`,
:class:`DockerfileRefused` / :class:`AgentBuildError` (the agent's source cannot be prepared), and
:class:`SandboxError` (anything else that went wrong on the runner's side).

Prompts, data and outputs never travel in the environment or on the command line (§16.10): the
environment inside is exactly :meth:`SandboxSpec.environment` on top of the image's own ``ENV``, and
the command is the image's.
"""

from __future__ import annotations

import math
import os
import stat
import tempfile
import threading
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Protocol, runtime_checkable

from pydantic import Field, SecretStr, field_validator

from hivemind.archive import AgentManifest, pack_directory, read_archive_file, validate_archive
from hivemind.errors import HivemindError, IntegrityError, InvalidInput, ServiceUnavailable
from hivemind.models import Sha256Hex, Stage, StrictModel

AGENT_BASE_IMAGE = "hivemind/agent-base:local"
AGENT_UID = 10001
AGENT_GID = 10001
CONTAINER_BRIDGE_PATH = "/run/hivemind/bridge.sock"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The sandbox's own tmpfs (never the host's /tmp): the only writable place inside.
CONTAINER_TMP = "/tmp"  # noqa: S108
MAX_DOCKERFILE_BYTES = 256 * 1024

ImageDigest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]


# --- errors ---------------------------------------------------------------------------------------


class SandboxError(HivemindError):
    """The runner could not run or clean up a sandbox (engine error, cgroup failure, ...)."""

    code = "sandbox_error"
    status = 500


class SandboxUnavailable(ServiceUnavailable):
    """The chosen backend cannot work on this machine; the message says why and what to do."""

    code = "sandbox_unavailable"


class SourceDigestMismatch(IntegrityError):
    """The agent directory is not the source the room pins."""

    code = "source_digest_mismatch"


class DockerfileRefused(InvalidInput):
    """The agent's Dockerfile asks for something the backend does not allow (a registry pull, RUN on the
    process backend, ...). The message names the line."""

    code = "dockerfile_refused"


class AgentBuildError(InvalidInput):
    """The agent's image did not build.

    ``build_log`` is the tail of the build output. It is agent-controlled and may echo sealed source, so
    it is room data: keep it inside the TEE (never in the message, never sent to the control plane).
    """

    code = "agent_build_failed"

    def __init__(self, message: str, *, build_log: bytes = b""):
        super().__init__(message)
        self.build_log = build_log


# --- what a backend produces and consumes --------------------------------------------------------


class PreparedAgent(StrictModel):
    """A runnable agent, produced by one backend's ``prepare`` and accepted only by that backend.

    ``image_digest`` goes into the receipt next to ``source_digest``: the Docker image ID, or for the
    process backend a digest over the base rootfs, the SDK and the source (docs/sandbox.md).
    ``reference`` is the backend's own handle (an image ID, a prepared directory).
    """

    backend: str = Field(pattern=r"^[a-z]+$")
    source_digest: Sha256Hex
    image_digest: ImageDigest
    reference: str = Field(min_length=1, max_length=4096)


class SandboxSpec(StrictModel):
    """One stage's sandbox. Limits default to docs/agents.md's values; the pipeline sets them per run."""

    agent: PreparedAgent
    role: Stage
    bridge_socket: Path = Field(description="host path of this stage's bridge socket")
    # SecretStr: the token is a credential for the stage and must not show up in reprs or logs.
    session_token: SecretStr
    memory_mb: int = Field(default=256, ge=32, le=65_536)
    cpus: float = Field(default=1.0, gt=0, le=64)
    pids_limit: int = Field(default=128, ge=8, le=4096)
    tmpfs_mb: int = Field(default=64, ge=1, le=4096)
    timeout_s: float = Field(gt=0, le=3600)
    max_output_bytes: int = Field(default=1024 * 1024, ge=0, le=64 * 1024 * 1024)

    @field_validator("session_token")
    @classmethod
    def _printable_token(cls, token: SecretStr) -> SecretStr:
        value = token.get_secret_value()
        if not 1 <= len(value) <= 512 or not all(0x21 <= ord(char) <= 0x7E for char in value):
            raise ValueError("a session token is 1-512 printable ASCII characters without spaces")
        return token

    @field_validator("bridge_socket")
    @classmethod
    def _absolute_socket(cls, path: Path) -> Path:
        if not path.is_absolute():
            raise ValueError("the bridge socket path must be absolute")
        return path

    def environment(self) -> dict[str, str]:
        """Exactly what the runner puts in the agent's environment; nothing of the run's content."""
        return {
            "HIVEMIND_BRIDGE": CONTAINER_BRIDGE_PATH,
            "HIVEMIND_SESSION": self.session_token.get_secret_value(),
            "HIVEMIND_ROLE": self.role.value,
            "PATH": CONTAINER_PATH,
            "HOME": CONTAINER_TMP,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    @property
    def cpu_seconds_limit(self) -> int:
        """CPU time a backend may grant per process: the whole wall-clock budget at full quota, plus one."""
        return math.ceil(self.timeout_s * self.cpus) + 1


class Outcome(StrEnum):
    """How a sandboxed stage ended. Only ``ok`` is a success."""

    OK = "ok"  # exit status 0
    FAILED = "failed"  # non-zero exit status (an exception, sys.exit(n), a failed fork...)
    KILLED = "killed"  # ended by a signal nobody in the runner sent (exit status above 128)
    TIMEOUT = "timeout"  # still running at timeout_s: killed
    OOM = "oom"  # the memory limit killed a process, and the agent did not exit 0
    OUTPUT_TRUNCATED = "output_truncated"  # wrote more than max_output_bytes to stdout/stderr: killed
    STOPPED = "stopped"  # the runner asked run() to stop (e.g. the bridge accepted the output)


class SandboxResult(StrictModel):
    """What happened in one sandbox.

    ``stdout`` and ``stderr`` hold at most ``max_output_bytes`` together: everything the agent wrote,
    or its first bytes when the outcome is ``output_truncated``. They are agent-controlled and may
    contain room data: the runner keeps them inside the TEE with the stage's logs and never sends them
    to the control plane or puts them in a receipt. They are left out of ``repr``.
    """

    outcome: Outcome
    exit_code: int | None = Field(description="as the container's init reports it; 128+n for signal n")
    started_at: float = Field(description="the runner's time.monotonic() when the sandbox started")
    duration_ms: int = Field(ge=0, description="from started_at to the sandbox's end")
    stdout: bytes = Field(repr=False)
    stderr: bytes = Field(repr=False)
    backend: str
    source_digest: Sha256Hex
    image_digest: ImageDigest

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str


@runtime_checkable
class SandboxBackend(Protocol):
    """What the pipeline needs from a sandbox backend. See the module docstring."""

    name: str

    def availability(self) -> Availability:
        """Whether the backend works on this machine, and if not, why (for the operator)."""
        ...

    def available(self) -> bool: ...

    def prepare(self, source_dir: Path, source_digest: str) -> PreparedAgent:
        """Build (or find in the cache) the runnable form of the agent in ``source_dir``.

        Raises SourceDigestMismatch when the directory is not that source, DockerfileRefused or
        AgentBuildError when the source cannot be prepared, SandboxUnavailable when the backend cannot.
        """
        ...

    def run(self, spec: SandboxSpec, *, stop: threading.Event | None = None) -> SandboxResult:
        """Run one stage to its end, then clean up. Setting ``stop`` kills it (outcome ``stopped``)."""
        ...


# --- helpers shared by the backends --------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedSource:
    """An agent directory packed deterministically and checked against the pinned digest."""

    packed: bytes
    manifest: AgentManifest
    dockerfile: str


def verify_source(source_dir: Path, source_digest: str) -> VerifiedSource:
    """Pack ``source_dir`` and check it against ``source_digest``; return the packed bytes to build from.

    Backends build from the returned bytes, never from the directory again, so the source cannot
    change between the check and the build.
    """
    packed = pack_directory(source_dir)
    manifest = validate_archive(packed)
    if manifest.digest != source_digest:
        raise SourceDigestMismatch(
            f"the agent source in {source_dir} has digest {manifest.digest}, the room pins {source_digest}"
        )
    raw = read_archive_file(packed, "Dockerfile")
    if len(raw) > MAX_DOCKERFILE_BYTES:
        raise DockerfileRefused(f"the Dockerfile is larger than {MAX_DOCKERFILE_BYTES} bytes")
    try:
        dockerfile = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise DockerfileRefused("the Dockerfile is not UTF-8 text") from None
    return VerifiedSource(packed=packed, manifest=manifest, dockerfile=dockerfile)


def check_bridge_socket(path: Path) -> None:
    """The bridge socket must exist and be a socket before a sandbox starts (no silent empty mount)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise SandboxError(f"the bridge socket {path} is not there: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise SandboxError(f"{path} is not a Unix socket")


def reachable_by_agent(path: Path) -> bool:
    """Whether uid 10001 can traverse every directory down to ``path`` (what bubblewrap needs, as it
    runs as that uid when the runner is root)."""
    if os.geteuid() != 0:
        return True  # bubblewrap runs as the runner's own user, who reached the path already
    current = Path("/")
    for part in path.resolve().parts[1:-1]:
        current = current / part
        try:
            info = current.stat()
        except OSError:
            return False
        if info.st_uid == AGENT_UID:
            if not info.st_mode & stat.S_IXUSR:
                return False
        elif not info.st_mode & stat.S_IXOTH:
            return False
    return True


def create_bridge_socket_dir(parent: Path) -> Path:
    """A fresh per-stage directory for a bridge socket that both backends can hand to the agent.

    Mode 0700; when the runner is root it belongs to uid 10001, so bubblewrap (running as that uid)
    can bind the socket while no other host user can reach it. ``parent`` must be traversable by
    uid 10001. Create the socket as ``<dir>/bridge.sock`` and make it mode 0666 (the directory is the
    gate).
    """
    if not reachable_by_agent(parent / "x"):
        raise SandboxError(
            f"{parent} is not traversable by uid {AGENT_UID}; use a directory like /run/hivemind"
        )
    directory = Path(tempfile.mkdtemp(prefix="bridge-", dir=parent))
    if os.geteuid() == 0:
        os.chown(directory, AGENT_UID, AGENT_GID)
    return directory


class OutputCapture:
    """stdout and stderr of one sandbox, at most ``cap`` bytes together; thread-safe."""

    def __init__(self, cap: int):
        self._cap = cap
        self._lock = threading.Lock()
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.truncated = False

    def add(self, stream: str, chunk: bytes) -> bool:
        """Keep ``chunk``; False once the cap is passed (the caller stops reading and kills the agent)."""
        with self._lock:
            buffer = self.stdout if stream == "stdout" else self.stderr
            room = self._cap - len(self.stdout) - len(self.stderr)
            if len(chunk) > room:
                buffer += chunk[:room]
                self.truncated = True
                return False
            buffer += chunk
            return True


def classify(exit_code: int | None, *, killed_for: Outcome | None, oom: bool) -> Outcome:
    """The outcome of a finished sandbox. A kill the runner decided on names its own reason."""
    if killed_for is not None:
        return killed_for
    if oom and exit_code != 0:
        return Outcome.OOM
    if exit_code == 0:
        return Outcome.OK
    if exit_code is not None and exit_code > 128:
        return Outcome.KILLED
    return Outcome.FAILED
