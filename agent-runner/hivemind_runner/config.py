"""The runner's configuration, read once from ``HIVEMIND_*`` variables (docs/runner.md, "Configuration").

| variable | field | default |
|---|---|---|
| ``HIVEMIND_TEE`` | ``tee`` (``tdx`` or ``simulated``) | ``tdx`` |
| ``HIVEMIND_RUNNER_ID`` | ``runner_id`` | ``runner_`` + dstack instance id, else a hash of the host name |
| ``HIVEMIND_RUNNER_SEED_FILE`` | ``seed_file`` (simulated only) | ``~/.local/state/hivemind/runner-seed`` |
| ``HIVEMIND_RUNNER_COMPOSE_HASH`` | ``compose_hash`` (simulated only) | hash of ``deploy/app-compose.json`` |
| ``HIVEMIND_RUNNER_RELEASE_FILE`` | ``release_file``: operator release statement (JSON) | none |
| ``HIVEMIND_DSTACK_ENDPOINT`` | ``dstack_endpoint`` | the SDK's default socket |
| ``HIVEMIND_RUNNER_BACKEND`` | ``backend`` (``auto``, ``docker``, ``process``) | ``auto`` |
| ``HIVEMIND_RUNNER_CONCURRENCY`` | ``concurrency`` | 2 |
| ``HIVEMIND_RUNNER_WAIT_S`` | ``wait_time_s`` (SQS long poll) | 20 |
| ``HIVEMIND_RUNNER_VISIBILITY_S`` | ``visibility_timeout_s`` | 900 (the runs queue's) |
| ``HIVEMIND_RUNNER_VISIBILITY_HEARTBEAT_S`` | ``visibility_heartbeat_s`` | 60 |
| ``HIVEMIND_RUNNER_MAX_ATTEMPTS`` | ``max_attempts`` | 3 (the runs queue's ``maxReceiveCount``) |
| ``HIVEMIND_RUNNER_HEARTBEAT_S`` | ``attestation_heartbeat_s`` | 30 |
| ``HIVEMIND_RUNNER_SHUTDOWN_GRACE_S`` | ``shutdown_grace_s`` | 600 |
| ``HIVEMIND_RUNNER_WORKSPACE_DIR`` | ``workspace_dir`` | ``/dev/shm/hivemind-runner`` |
| ``HIVEMIND_RUNNER_WORKSPACE_MB`` | ``workspace_mb`` (tmpfs size cap per run) | 2048 |
| ``HIVEMIND_RUNNER_PRESTART`` | ``prestart``: start every stage's sandbox when a run starts | ``true`` |
| ``HIVEMIND_LOG_LEVEL`` | ``log_level`` | ``INFO`` |

Storage coordinates (``HIVEMIND_PREFIX``, ``HIVEMIND_ENDPOINT_URL``, ...) are :class:`StoreConfig`'s; LLM
providers are ``HIVEMIND_LLM_*`` (:class:`hivemind_runner.llm.LlmConfig`). A malformed value stops the
runner at start-up; it never falls back to a default silently.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hivemind.errors import InvalidInput
from hivemind.models import Identifier, Sha256Hex, TeeKind
from hivemind.store import StoreConfig
from hivemind.store.schema import RUNS_MAX_RECEIVE_COUNT, RUNS_VISIBILITY_TIMEOUT_S
from hivemind_runner.workspace import DEFAULT_BASE


class BackendChoice(StrEnum):
    AUTO = "auto"  # Docker when an engine answers, else the process backend
    DOCKER = "docker"
    PROCESS = "process"


ENV_VARIABLES: dict[str, str] = {
    "tee": "HIVEMIND_TEE",
    "runner_id": "HIVEMIND_RUNNER_ID",
    "seed_file": "HIVEMIND_RUNNER_SEED_FILE",
    "compose_hash": "HIVEMIND_RUNNER_COMPOSE_HASH",
    "release_file": "HIVEMIND_RUNNER_RELEASE_FILE",
    "dstack_endpoint": "HIVEMIND_DSTACK_ENDPOINT",
    "backend": "HIVEMIND_RUNNER_BACKEND",
    "concurrency": "HIVEMIND_RUNNER_CONCURRENCY",
    "wait_time_s": "HIVEMIND_RUNNER_WAIT_S",
    "visibility_timeout_s": "HIVEMIND_RUNNER_VISIBILITY_S",
    "visibility_heartbeat_s": "HIVEMIND_RUNNER_VISIBILITY_HEARTBEAT_S",
    "max_attempts": "HIVEMIND_RUNNER_MAX_ATTEMPTS",
    "attestation_heartbeat_s": "HIVEMIND_RUNNER_HEARTBEAT_S",
    "shutdown_grace_s": "HIVEMIND_RUNNER_SHUTDOWN_GRACE_S",
    "workspace_dir": "HIVEMIND_RUNNER_WORKSPACE_DIR",
    "workspace_mb": "HIVEMIND_RUNNER_WORKSPACE_MB",
    "prestart": "HIVEMIND_RUNNER_PRESTART",
    "log_level": "HIVEMIND_LOG_LEVEL",
}


def default_seed_file() -> Path:
    return Path.home() / ".local" / "state" / "hivemind" / "runner-seed"


def host_runner_id() -> str:
    """A stable id for this host when the TEE names no instance: ``runner_`` + 16 hex of its name."""
    return "runner_" + hashlib.sha256(socket.gethostname().encode()).hexdigest()[:16]


class RunnerSettings(BaseModel):
    """Immutable runner configuration; build it once per process with :meth:`from_env`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: StoreConfig = Field(default_factory=StoreConfig)
    tee: TeeKind = TeeKind.TDX
    runner_id: Identifier | None = None
    seed_file: Path = Field(default_factory=default_seed_file)
    compose_hash: Sha256Hex | None = None
    release_file: Path | None = None
    dstack_endpoint: str | None = None
    backend: BackendChoice = BackendChoice.AUTO
    concurrency: int = Field(default=2, ge=1, le=64)
    wait_time_s: int = Field(default=20, ge=0, le=20)
    visibility_timeout_s: int = Field(default=RUNS_VISIBILITY_TIMEOUT_S, ge=2, le=43_200)
    visibility_heartbeat_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=RUNS_MAX_RECEIVE_COUNT, ge=1, le=100)
    attestation_heartbeat_s: float = Field(default=30.0, gt=0, le=3600)
    shutdown_grace_s: float = Field(default=600.0, ge=0, le=86_400)
    workspace_dir: Path = DEFAULT_BASE
    workspace_mb: int = Field(default=2048, ge=16, le=1_048_576)
    prestart: bool = True
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")

    @model_validator(mode="after")
    def _consistent(self) -> RunnerSettings:
        if self.visibility_heartbeat_s >= self.visibility_timeout_s:
            raise ValueError("visibility_heartbeat_s must be shorter than visibility_timeout_s")
        if self.tee is TeeKind.TDX and self.compose_hash is not None:
            # On TDX the compose hash is what dstack measured; an override would be a lie in receipts.
            raise ValueError("HIVEMIND_RUNNER_COMPOSE_HASH applies to the simulated TEE only")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RunnerSettings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {"store": StoreConfig.from_env(env)}
        for name, variable in ENV_VARIABLES.items():
            raw = env.get(variable)
            if raw is not None and raw.strip():
                values[name] = raw.strip()
        try:
            return cls(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0]) if error["loc"] else ""
            where = ENV_VARIABLES.get(name, "runner settings")
            raise InvalidInput(f"invalid {where}: {error['msg']}") from None

    def workspace_root(self, runner_id: str) -> Path:
        """This process's own workspace directory (see :mod:`hivemind_runner.workspace`)."""
        return self.workspace_dir / runner_id
