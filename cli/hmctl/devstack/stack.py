"""``hmctl dev up | down | status``: the local stack (DESIGN §14) as supervised processes on loopback.

``up`` starts, in order, each step waiting until the previous one answers:

1. ``moto`` (``python -m hmctl.devstack.moto_server``): S3, DynamoDB and SQS, in memory;
2. the deployment from core's schema (:func:`hivemind.store.bootstrap.create_all`);
3. an admin credential: a fresh ``hma_`` secret, registered by its auth hash with
   ``python -m hivemind_functions.bootstrap_admin`` (the secret itself never leaves this process except
   into the admin profile);
4. ``api`` (``python -m hivemind_functions.local``): the API app with its settle worker and janitor;
   the runner fee is set through the admin API (which also proves the admin key works);
5. ``runner`` (``python -m hivemind_runner``): simulated TEE, the Docker backend when an engine answers
   (building the agent base image if it is missing or older than the agent SDK), else the process
   backend; ready once its attestation document is served by ``GET /v1/attestation``;
6. the admin profile, written by the caller's ``write_admin_profile``.

Each started process is recorded in the state file before the next step, so ``down`` can stop a stack
whose ``up`` was interrupted. A failed step stops whatever this ``up`` started and reports the failing
process's last log lines. The CLI imports core only: the control plane and the runner are processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from hivemind.keys import auth_hash, auth_token
from hivemind.tokens import Secret, TokenKind
from hmctl.devstack import environment, processes
from hmctl.devstack.processes import ProcessRecord
from hmctl.devstack.state import (
    DevStackError,
    StackRecord,
    StackStatus,
    clear_record,
    ensure_private_dir,
    exclusive_lock,
    load_record,
    save_record,
)
from hmctl.errors import ExitCode

if TYPE_CHECKING:
    import boto3

LOOPBACK = "127.0.0.1"
DEFAULT_API_PORT = 8700
DEFAULT_PREFIX = "hivemind"
DEFAULT_REGION = "us-east-1"
ADMIN_PROFILE = "local-admin"
# micro-USD per second of runner time: a local run costs a fraction of a cent, so the ledger shows it.
LOCAL_RUNNER_FEE_PER_S = 100
# The order processes start in; they stop in reverse.
START_ORDER = ("moto", "api", "runner")
# SIGTERM, then SIGKILL after this long: above the runner's own shutdown grace (10 s, set below).
STOP_GRACE_S = 15.0

# Credentials the emulator accepts; set explicitly so no real AWS profile or key is ever read or used.
_EMULATOR_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "hmctl-local",
    "AWS_SECRET_ACCESS_KEY": "hmctl-local",
    "AWS_SESSION_TOKEN": "hmctl-local",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_DROPPED_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SECURITY_TOKEN")

WriteAdminProfile = Callable[[str, Secret, str], None]
Say = Callable[[str], None]


class RunnerBackend(StrEnum):
    AUTO = "auto"
    DOCKER = "docker"
    PROCESS = "process"


@dataclass(frozen=True)
class Timeouts:
    moto_s: float = 30.0
    api_s: float = 45.0
    runner_s: float = 90.0


@dataclass(frozen=True)
class UpOptions:
    api_port: int = DEFAULT_API_PORT
    aws_port: int = 0
    runner_backend: RunnerBackend = RunnerBackend.AUTO
    admin_profile: str = ADMIN_PROFILE
    janitor_interval_s: int = 60
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass(frozen=True)
class UpResult:
    record: StackRecord
    already_running: bool


def _quiet(_: str) -> None:
    return None


class DevStack:
    """The local stack whose state lives in ``directory`` (see :mod:`hmctl.devstack.state`)."""

    def __init__(self, directory: Path, *, python: str = sys.executable) -> None:
        self.directory = directory
        self.python = python
        self.logs = directory / "logs"

    # --- queries -------------------------------------------------------------------------------

    def record(self) -> StackRecord | None:
        return load_record(self.directory)

    def dead_processes(self, record: StackRecord) -> list[str]:
        return [proc.name for proc in record.processes if not processes.is_running(proc)]

    def running_status(self) -> StackStatus:
        """The status of a running, ready stack; a clear error otherwise."""
        record = self.record()
        if record is None:
            raise DevStackError(
                "the local stack is not running; start it with: hmctl dev up --background",
                code="dev_stack_not_running",
                exit_code=ExitCode.UNAVAILABLE,
            )
        dead = self.dead_processes(record)
        if record.status is None or dead or len(record.processes) < len(START_ORDER):
            what = f"its {', '.join(dead)} process stopped" if dead else "it did not finish starting"
            raise DevStackError(
                f"the local stack is not healthy ({what}); logs are in {self.logs}. "
                "Restart it with: hmctl dev down && hmctl dev up --background",
                code="dev_stack_unhealthy",
                exit_code=ExitCode.UNAVAILABLE,
            )
        return record.status

    # --- up ------------------------------------------------------------------------------------

    def up(
        self, options: UpOptions, *, write_admin_profile: WriteAdminProfile, say: Say = _quiet
    ) -> UpResult:
        environment.require_stack_modules()
        ensure_private_dir(self.directory)
        with exclusive_lock(self.directory):
            existing = self.record()
            if existing is not None:
                if existing.status is not None and not self.dead_processes(existing):
                    return UpResult(existing, already_running=True)
                say("a previous local stack is only partly running; stopping what is left of it")
                self._stop_all(existing, say)
                clear_record(self.directory)
            backend = self._choose_backend(options.runner_backend, say)
            starter = _Starter(self, options, backend, say)
            try:
                record = starter.run(write_admin_profile)
            except BaseException:
                # Anything that failed (or Ctrl-C) mid-way: stop what this up started, keep the logs.
                partial = self.record()
                if partial is not None:
                    self._stop_all(partial, say)
                    clear_record(self.directory)
                raise
            return UpResult(record, already_running=False)

    def _choose_backend(self, requested: RunnerBackend, say: Say) -> RunnerBackend:
        if requested is RunnerBackend.PROCESS:
            return requested
        answers = environment.docker_answers()
        if requested is RunnerBackend.DOCKER and not answers:
            raise DevStackError(
                "--runner-backend docker: no Docker engine answers (start one with "
                "agent-runner/deploy/dockerd.sh, or use --runner-backend process)",
                code="docker_unavailable",
                exit_code=ExitCode.USAGE,
            )
        if not answers:
            say("no Docker engine answers: the runner uses the process backend")
            return RunnerBackend.PROCESS
        # The script rebuilds only when the image is missing or older than the agent SDK it carries
        # (agents built on a stale base would lack SDK changes); otherwise it returns in a moment.
        image = environment.AGENT_BASE_IMAGE
        exists = environment.docker_image_exists(image)
        try:
            environment.find_repo()
        except DevStackError:
            if not exists:
                raise
            say(f"using the existing {image} (no source tree to check it against; see HMCTL_REPO)")
            return RunnerBackend.DOCKER
        if exists:
            say(f"checking that the agent base image {image} is up to date")
        else:
            say(f"building the agent base image {image} (once per machine)")
        environment.build_base_image()
        return RunnerBackend.DOCKER

    # --- down ----------------------------------------------------------------------------------

    def down(self, *, say: Say = _quiet) -> list[str]:
        """Stop every process the recorded stack started (and only those). Returns their names."""
        ensure_private_dir(self.directory)
        with exclusive_lock(self.directory):
            record = self.record()
            if record is None:
                return []
            stopped = self._stop_all(record, say)
            clear_record(self.directory)
            return stopped

    def _stop_all(self, record: StackRecord, say: Say) -> list[str]:
        stopped: list[str] = []
        survivors: list[str] = []
        for proc in reversed(record.processes):
            if processes.is_running(proc):
                say(f"stopping {proc.name} (pid {proc.pid})")
                stopped.append(proc.name)
            if not processes.stop(proc, grace_s=STOP_GRACE_S):
                survivors.append(f"{proc.name} (pid {proc.pid})")
        if survivors:
            raise DevStackError(
                f"could not stop {', '.join(survivors)}, even with SIGKILL; check them with ps",
                code="dev_stop_failed",
            )
        return stopped


class _Starter:
    """One ``up``: starts the processes in order and records each one as soon as it exists."""

    def __init__(self, stack: DevStack, options: UpOptions, backend: RunnerBackend, say: Say) -> None:
        self.stack = stack
        self.options = options
        self.backend = backend
        self.say = say
        self.started: list[ProcessRecord] = []
        # One id per state directory: two local stacks on one host never share a runner workspace.
        digest = hashlib.sha256(str(stack.directory.resolve()).encode()).hexdigest()[:12]
        self.runner_id = f"runner_dev{digest}"
        self.prefix = DEFAULT_PREFIX
        self.region = DEFAULT_REGION
        self.started_at = int(time.time())

    def _record(self, status: StackStatus | None = None) -> StackRecord:
        record = StackRecord(
            status=status,
            prefix=self.prefix,
            runner_id=self.runner_id,
            started_at=self.started_at,
            processes=tuple(self.started),
        )
        save_record(self.stack.directory, record)
        return record

    def _spawn(self, name: str, argv: Sequence[str], env: dict[str, str]) -> ProcessRecord:
        log_path = self.stack.logs / f"{name}.log"
        with _new_log(log_path) as log:
            log.write(
                f"\n----- hmctl dev up: {name} starting at {time.strftime('%Y-%m-%d %H:%M:%S')} -----\n"
            )
        record, _child = processes.spawn(name, argv, env=env, log_path=log_path)
        self.started.append(record)
        self._record()
        return record

    def run(self, write_admin_profile: WriteAdminProfile) -> StackRecord:
        ensure_private_dir(self.stack.logs)
        options = self.options
        timeouts = options.timeouts

        self.say("starting the AWS emulator (moto: S3, DynamoDB, SQS)")
        moto_ready = self.stack.directory / "moto.ready"
        moto_ready.unlink(missing_ok=True)
        moto = self._spawn(
            "moto",
            [
                self.stack.python,
                "-m",
                "hmctl.devstack.moto_server",
                "--host",
                LOOPBACK,
                "--port",
                str(options.aws_port),
                "--ready-file",
                str(moto_ready),
            ],
            self._base_env(),
        )
        endpoint = str(_wait_ready_file(moto_ready, moto, timeouts.moto_s)["endpoint_url"])
        # boto3 and the store are imported here, by `hmctl dev up` only: every other command would pay
        # about 150 ms of start-up for them.
        from hivemind.store import AwsClients, StoreConfig  # noqa: PLC0415
        from hivemind.store.bootstrap import create_all  # noqa: PLC0415
        from hivemind.store.schema import QueueRole, TableRole  # noqa: PLC0415

        config = StoreConfig(prefix=self.prefix, region=self.region, endpoint_url=endpoint)

        self.say("creating tables, bucket and queues from the core schema")
        clients = AwsClients(config, session=_emulator_session(self.region))
        create_all(clients)

        self.say("registering a local admin key")
        admin = Secret.generate(TokenKind.ADMIN)
        env = self._base_env() | config.to_env()
        self._bootstrap_admin(auth_hash(admin), env)

        self.say("starting the control plane (API, settle worker, janitor)")
        api_ready = self.stack.directory / "api.ready"
        api_ready.unlink(missing_ok=True)
        api = self._spawn(
            "api",
            [
                self.stack.python,
                "-m",
                "hivemind_functions.local",
                "--host",
                LOOPBACK,
                "--port",
                str(options.api_port),
                "--ready-file",
                str(api_ready),
                "--janitor-interval",
                str(options.janitor_interval_s),
            ],
            env | self._api_env(),
        )
        service_url = str(_wait_ready_file(api_ready, api, timeouts.api_s)["url"])
        _wait_http_ok(f"{service_url}/v1/healthz", api, timeouts.api_s)
        _admin_put(service_url, admin, "/v1/admin/prices/runner-fee", {"per_second": LOCAL_RUNNER_FEE_PER_S})

        self.say(f"starting the runner (simulated TEE, {self.backend.value} backend)")
        runner = self._spawn("runner", [self.stack.python, "-m", "hivemind_runner"], env | self._runner_env())
        _wait_runner_attested(service_url, self.runner_id, runner, timeouts.runner_s)

        write_admin_profile(options.admin_profile, admin, service_url)
        status = StackStatus(
            service_url=service_url,
            aws_endpoint_url=endpoint,
            region=self.region,
            bucket=config.bucket,
            tables={role.value: config.table_name(role) for role in TableRole},
            queues={role.value: clients.queue_url(role) for role in QueueRole},
            admin_profile=options.admin_profile,
            runner_backend=self.backend.value,
        )
        return self._record(status)

    # --- environments --------------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in _DROPPED_ENV}
        env.update(_EMULATOR_AWS_ENV)
        env["AWS_DEFAULT_REGION"] = env["AWS_REGION"] = self.region
        env["PYTHONUNBUFFERED"] = "1"
        return env

    @staticmethod
    def _api_env() -> dict[str, str]:
        return {
            "HIVEMIND_SELF_SERVE_SIGNUP_ENABLED": "true",
            "HIVEMIND_BILLING_ENFORCE_CREDITS": "true",
        }

    def _runner_env(self) -> dict[str, str]:
        return {
            "HIVEMIND_TEE": "simulated",
            "HIVEMIND_RUNNER_ID": self.runner_id,
            "HIVEMIND_RUNNER_SEED_FILE": str(self.stack.directory / "runner-seed"),
            "HIVEMIND_RUNNER_BACKEND": self.backend.value,
            # Short long-polls and a short grace so dev down returns in seconds.
            "HIVEMIND_RUNNER_WAIT_S": "2",
            "HIVEMIND_RUNNER_HEARTBEAT_S": "10",
            "HIVEMIND_RUNNER_SHUTDOWN_GRACE_S": "10",
        }

    def _bootstrap_admin(self, admin_hash: str, env: dict[str, str]) -> None:
        log_path = self.stack.logs / "bootstrap-admin.log"
        completed = subprocess.run(  # noqa: S603 - fixed module of this distribution
            [
                self.stack.python,
                "-m",
                "hivemind_functions.bootstrap_admin",
                "--auth-hash",
                admin_hash,
                "--label",
                "hmctl dev up",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        _new_log(log_path).close()
        log_path.write_text(completed.stdout + completed.stderr, encoding="utf-8")
        if completed.returncode != 0:
            raise DevStackError(
                f"registering the local admin key failed:\n{processes.tail(log_path)}",
                code="dev_stack_start_failed",
            )


def _new_log(path: Path):
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(descriptor, "a", encoding="utf-8")


def _emulator_session(region: str) -> boto3.session.Session:
    import boto3  # noqa: PLC0415 - see _Starter.run

    return boto3.session.Session(
        aws_access_key_id=_EMULATOR_AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=_EMULATOR_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=_EMULATOR_AWS_ENV["AWS_SESSION_TOKEN"],
        region_name=region,
    )


# --- readiness -----------------------------------------------------------------------------------

_POLL_S = 0.2


# The option that moves a process to another port, for the "address in use" hint.
_PORT_OPTIONS = {"api": "--port", "moto": "--aws-port"}


def _failed_to_start(proc: ProcessRecord, why: str) -> DevStackError:
    log = processes.tail(Path(proc.log))
    hint = None
    if "in use" in log and proc.name in _PORT_OPTIONS:
        option = _PORT_OPTIONS[proc.name]
        hint = f"another program listens on that port: pass {option} PORT, or {option} 0 for any free port"
    return DevStackError(
        f"{proc.name} {why}. Last lines of {proc.log}:\n{log}" if log else f"{proc.name} {why} ({proc.log})",
        hint=hint,
        code="dev_stack_start_failed",
    )


def _wait(proc: ProcessRecord, timeout_s: float, what: str, check: Callable[[], object | None]) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result is not None:
            return result
        if not processes.is_running(proc):
            raise _failed_to_start(proc, "exited while starting")
        if time.monotonic() >= deadline:
            raise _failed_to_start(proc, f"did not {what} within {timeout_s:.0f} s")
        time.sleep(_POLL_S)


def _wait_ready_file(path: Path, proc: ProcessRecord, timeout_s: float) -> dict[str, object]:
    def check() -> dict[str, object] | None:
        try:
            return dict(json.loads(path.read_text(encoding="utf-8")))
        except (FileNotFoundError, ValueError):
            return None

    result = _wait(proc, timeout_s, "start listening", check)
    assert isinstance(result, dict)
    return result


def _wait_http_ok(url: str, proc: ProcessRecord, timeout_s: float) -> None:
    def check() -> bool | None:
        try:
            return True if httpx.get(url, timeout=2.0).status_code == 200 else None
        except httpx.HTTPError:
            return None

    _wait(proc, timeout_s, f"answer {url}", check)


def _wait_runner_attested(service_url: str, runner_id: str, proc: ProcessRecord, timeout_s: float) -> None:
    def check() -> bool | None:
        try:
            response = httpx.get(f"{service_url}/v1/attestation", timeout=5.0)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        runners = response.json().get("runners", [])
        return True if any(entry.get("runner_id") == runner_id for entry in runners) else None

    _wait(proc, timeout_s, "publish its attestation", check)


def _admin_put(service_url: str, admin: Secret, path: str, body: dict[str, object]) -> None:
    response = httpx.put(
        f"{service_url}{path}",
        json=body,
        headers={"Authorization": f"Bearer {auth_token(admin)}"},
        timeout=10.0,
    )
    if response.status_code != 200:
        raise DevStackError(
            f"the local admin key was refused by {path} ({response.status_code}: {response.text[:300]})",
            code="dev_stack_start_failed",
        )
